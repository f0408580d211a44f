"""`preact-resnet18`: the pre-activation ResNet18 of He et al., "Identity Mappings in Deep Residual Networks"
(ECCV 2016), in the CIFAR layout of github.com/kuangliu/pytorch-cifar (PreActResNet18), the network of the
MixUp paper's CIFAR-10 results (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018).

    stem: conv3x3 -> 64 (no norm, no activation)
    4 stages of 2 pre-activation basic blocks, 64 / 128 / 256 / 512 channels, strides 1 / 2 / 2 / 2:
        o = ReLU(BN(x)); out = conv3x3(o, stride); out = conv3x3(ReLU(BN(out)))
        shortcut: conv1x1(o, stride) where the width or the stride changes, else x
    global average pool, linear

11,171,146 parameters for 10 classes and 3 input channels (the count of kuangliu's PreActResNet18; the
paper's full design would add a final BN-ReLU, 1,024 more, and the MixUp repository's copy a stem BN-ReLU,
128 more). Convs have no bias and keep torch's default initialisation, as in that code. Adaptive pooling
makes it work for any image size.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dtrain.models.layers import check_norm, norm2d

WIDTHS = (64, 128, 256, 512)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut; `dropout` (Wide ResNets) sits before the second conv."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, dropout: float = 0.0):
        super().__init__()
        self.bn1 = norm2d(norm, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm2d(norm, cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        changes_shape = stride != 1 or cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if changes_shape else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu(self.bn1(x))
        out = self.conv1(o)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(o))


def make_stage(cin: int, cout: int, blocks: int, stride: int, norm: str, dropout: float = 0.0) -> nn.Sequential:
    rest = (PreActBlock(cout, cout, 1, norm, dropout) for _ in range(blocks - 1))
    return nn.Sequential(PreActBlock(cin, cout, stride, norm, dropout), *rest)


class PreActResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int = 3, norm: str = "batch"):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, WIDTHS[0], 3, padding=1, bias=False)
        stages, cin = [], WIDTHS[0]
        for i, (width, n) in enumerate(zip(WIDTHS, blocks)):
            stages.append(make_stage(cin, width, n, 1 if i == 0 else 2, norm))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def preact_resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32, *,
                    norm: str = "batch") -> PreActResNet:
    """`norm` 'batch' (the paper's) or 'group'."""
    check_norm(norm, ("batch", "group"), "preact-resnet18")
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, norm)
