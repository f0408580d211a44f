"""CIFAR-style ResNet18 (the seed variant).

Stem: 3x3 stride-1 conv to 64 channels, norm, ReLU, no max-pool. Four stages of two BasicBlocks
(64, 128, 256, 512 channels; strides 1, 2, 2, 2), a 1x1 conv + norm shortcut wherever the stride or the
width changes, global average pooling and a linear classifier. 11,173,962 parameters for 10 classes and
3 input channels. Adaptive pooling makes it work for any image size.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dtrain.models.layers import check_norm, norm2d


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, norm: str = "batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm2d(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm2d(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm2d(norm, cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def make_stage(cin: int, cout: int, blocks: int, stride: int, norm: str) -> nn.Sequential:
    layers = [BasicBlock(cin, cout, stride, norm)]
    layers += [BasicBlock(cout, cout, 1, norm) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    def __init__(
        self, blocks: tuple[int, ...], num_classes: int, in_channels: int = 3, norm: str = "batch",
    ):
        super().__init__()
        widths = (64, 128, 256, 512)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
            norm2d(norm, widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, cin = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stages.append(make_stage(cin, width, n, 1 if i == 0 else 2, norm))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32, *, norm: str = "batch") -> ResNet:
    check_norm(norm, ("batch", "group"), "resnet18")
    return ResNet((2, 2, 2, 2), num_classes, in_channels, norm=norm)
