"""The CIFAR ResNets of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016, section 4.2):
`resnet20`, `resnet32`, `resnet44`, `resnet56`, `resnet110`.

    stem: conv3x3 -> 16, BN, ReLU
    3 stages of n = (depth - 2) / 6 basic blocks (conv3x3-BN-ReLU-conv3x3-BN, add, ReLU), 16 / 32 / 64
    channels, strides 1 / 2 / 2
    global average pool, linear

Shortcuts are the paper's option A, which it used for CIFAR: parameter-free identities; where a stage halves
the size and doubles the width, the input is subsampled (every other pixel) and zero channels are padded
on both sides of it (as the widely used reference code does). Convs have no bias and start He-normal.

Parameters for 10 classes and 3 input channels (the paper's Table 6 in brackets): resnet20 269,722 (0.27M),
resnet32 464,154 (0.46M), resnet44 658,586 (0.66M), resnet56 853,018 (0.85M), resnet110 1,727,962 (1.7M).
The often quoted 272,474 / 855,770 / 1,730,714 are option B's (a 1x1 conv + BN projection at the two
downsampling blocks, 2,752 parameters more), which rounds to 0.47M and 0.86M for resnet32 and resnet56, not
the paper's figures. Adaptive pooling makes them work for any image size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dtrain.models.layers import check_norm, init_he_normal, norm2d

DEPTHS = (20, 32, 44, 56, 110)
WIDTHS = (16, 32, 64)


class SubsampleZeroPad(nn.Module):
    """Option A shortcut: keep every `stride`-th pixel, pad zero channels on both sides up to `cout`."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.before = (cout - cin) // 2
        self.after = cout - cin - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm2d(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = norm2d(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        changes_shape = stride != 1 or cin != cout
        self.shortcut = SubsampleZeroPad(cin, cout, stride) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def make_stage(cin: int, cout: int, blocks: int, stride: int, norm: str) -> nn.Sequential:
    rest = (BasicBlock(cout, cout, 1, norm) for _ in range(blocks - 1))
    return nn.Sequential(BasicBlock(cin, cout, stride, norm), *rest)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, norm: str = "batch"):
        super().__init__()
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, WIDTHS[0], 3, padding=1, bias=False), norm2d(norm, WIDTHS[0]), nn.ReLU(inplace=True),
        )
        stages, cin = [], WIDTHS[0]
        for i, width in enumerate(WIDTHS):
            stages.append(make_stage(cin, width, blocks, 1 if i == 0 else 2, norm))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_he_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(depth: int, num_classes: int, in_channels: int = 3, image_size: int = 32, *,
                 norm: str = "batch") -> CifarResNet:
    """`resnet<depth>` for depth in DEPTHS; `norm` 'batch' (the paper's) or 'group'."""
    check_norm(norm, ("batch", "group"), f"resnet{depth}")
    return CifarResNet(depth, num_classes, in_channels, norm)
