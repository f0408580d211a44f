"""GoogLeNet for small images (the seed variant).

The Inception v1 network of Szegedy et al. adapted to 32x32 inputs the usual CIFAR way: the 7x7/2 stem,
its max-pool and the first two max-pools are replaced by one 3x3 stride-1 conv to 192 channels; every conv
is followed by BatchNorm and ReLU, and the 5x5 branch is two stacked 3x3 convs. Layout:
pre-layer, a3, b3, max-pool(3, 2, 1), a4..e4, max-pool, a5, b5, global average pool, linear 1024 -> classes.
Convs keep their bias, as in the widely used CIFAR version: 6,166,250 parameters for 10 classes.

`aux_logits=True` adds the paper's two auxiliary classifiers (on the outputs of a4 and d4): average pool
(adaptive, to 4x4, since the maps here are 8x8 or larger instead of 14x14), 1x1 conv to 128, FC 1024,
dropout 0.7, FC to the classes. In training mode the forward pass then returns
`(logits, [(0.3, aux1), (0.3, aux2)])`, which its `loss` hook scores; in eval mode only the logits.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dtrain.models.layers import check_norm, conv_norm_relu


class Inception(nn.Module):
    def __init__(
        self, cin: int, n1x1: int, n3x3red: int, n3x3: int, n5x5red: int, n5x5: int, pool_proj: int,
        norm: str = "batch",
    ):
        super().__init__()

        def cbr(a: int, b: int, k: int) -> nn.Sequential:
            return conv_norm_relu(a, b, k, norm=norm, bias=True)

        self.branch1 = cbr(cin, n1x1, 1)
        self.branch2 = nn.Sequential(cbr(cin, n3x3red, 1), cbr(n3x3red, n3x3, 3))
        self.branch3 = nn.Sequential(cbr(cin, n5x5red, 1), cbr(n5x5red, n5x5, 3), cbr(n5x5, n5x5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), cbr(cin, pool_proj, 1))
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class AuxHead(nn.Module):
    """Auxiliary classifier: pool to 4x4, 1x1 conv 128, FC 1024, dropout 0.7, FC classes."""

    def __init__(self, cin: int, num_classes: int, norm: str = "batch"):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = conv_norm_relu(cin, 128, 1, norm=norm, bias=True)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(0.7)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.dropout(self.relu(self.fc1(x))))


class GoogLeNet(nn.Module):
    AUX_WEIGHT = 0.3

    def __init__(
        self, num_classes: int, in_channels: int = 3, aux_logits: bool = False, norm: str = "batch",
    ):
        super().__init__()
        self.pre_layers = conv_norm_relu(in_channels, 192, 3, norm=norm, bias=True)
        self.a3 = Inception(192, 64, 96, 128, 16, 32, 32, norm)
        self.b3 = Inception(256, 128, 128, 192, 32, 96, 64, norm)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.a4 = Inception(480, 192, 96, 208, 16, 48, 64, norm)
        self.b4 = Inception(512, 160, 112, 224, 24, 64, 64, norm)
        self.c4 = Inception(512, 128, 128, 256, 24, 64, 64, norm)
        self.d4 = Inception(512, 112, 144, 288, 32, 64, 64, norm)
        self.e4 = Inception(528, 256, 160, 320, 32, 128, 128, norm)
        self.a5 = Inception(832, 256, 160, 320, 32, 128, 128, norm)
        self.b5 = Inception(832, 384, 192, 384, 48, 128, 128, norm)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(1024, num_classes)
        self.aux_logits = aux_logits
        if aux_logits:
            self.aux1 = AuxHead(512, num_classes, norm)
            self.aux2 = AuxHead(528, num_classes, norm)

    def forward(self, x: torch.Tensor):
        x = self.b3(self.a3(self.pre_layers(x)))
        x = self.a4(self.maxpool(x))
        aux = []
        if self.aux_logits and self.training:
            aux.append((self.AUX_WEIGHT, self.aux1(x)))
        x = self.d4(self.c4(self.b4(x)))
        if self.aux_logits and self.training:
            aux.append((self.AUX_WEIGHT, self.aux2(x)))
        x = self.maxpool(self.e4(x))
        x = self.b5(self.a5(x))
        logits = self.linear(torch.flatten(self.avgpool(x), 1))
        return (logits, aux) if aux else logits

    def loss(self, output, target: torch.Tensor, criterion) -> tuple[torch.Tensor, torch.Tensor]:
        """The model-hook loss (see dtrain.models): the main head's loss plus each auxiliary head's, weighted."""
        logits, aux = output if isinstance(output, tuple) else (output, ())
        loss = criterion(logits.float(), target)
        for weight, aux_logits in aux:
            loss = loss + weight * criterion(aux_logits.float(), target)
        return loss, logits


def googlenet(
    num_classes: int, in_channels: int = 3, image_size: int = 32, *,
    aux_logits: bool = False, norm: str = "batch",
) -> GoogLeNet:
    check_norm(norm, ("batch", "group"), "googlenet")
    return GoogLeNet(num_classes, in_channels, aux_logits=aux_logits, norm=norm)
