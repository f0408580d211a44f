"""`cnn`: a small CNN that trains on a laptop CPU in a minute.

Three stages of two 3x3 conv -> norm -> ReLU layers (32, 64, 128 channels), 2x2 max-pool after the first
two stages, global average pooling, linear. 288,746 parameters for 10 classes and
3 channels with BatchNorm. `norm='group'` uses GroupNorm (no batch statistics, so a DDP run matches a
single-process run exactly); `norm='none'` drops normalisation (convs then get a bias).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dtrain.models.layers import NORMS, check_image_size, check_norm, conv_norm_relu


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, norm: str = "batch"):
        super().__init__()
        bias = norm == "none"
        layers: list[nn.Module] = []
        cin = in_channels
        for i, width in enumerate((32, 64, 128)):
            layers.append(conv_norm_relu(cin, width, 3, norm=norm, bias=bias))
            layers.append(conv_norm_relu(width, width, 3, norm=norm, bias=bias))
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.fc(x)


def cnn(num_classes: int, in_channels: int = 3, image_size: int = 32, *, norm: str = "batch") -> SmallCNN:
    check_norm(norm, NORMS, "cnn")
    check_image_size(image_size, 4, "cnn")
    return SmallCNN(num_classes, in_channels, norm=norm)
