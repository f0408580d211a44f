"""The MNIST write-up's networks.

All three keep the write-up's exact layer sizes at 28x28 and accept other sizes and channel counts: an
adaptive average pool to the write-up's final spatial size sits before the flatten (an identity at 28x28),
so e.g. 32x32 or 64x64 inputs give the same flatten width.

`mnist-cnn` (8,550 parameters for 10 classes, 1 channel)
    conv5 -> 10, max-pool 2, BN, ReLU, conv5 -> 20, max-pool 2, BN, ReLU, flatten 20*4*4 = 320, linear 10.
    At 28x28: 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4.

`mnist-cnn-deep` (232,554 parameters)
    conv5-32, conv5-32, max-pool 2, dropout 0.25, conv3-64, conv3-64, max-pool 2, dropout 0.25
    (each conv followed by BN and ReLU), flatten 64*3*3 = 576, linear 256, ReLU, dropout 0.5, linear 10.
    All convs are unpadded ('valid'), which is the layout that yields the write-up's 576 at 28x28:
    28 -conv5-> 24 -conv5-> 20 -pool-> 10 -conv3-> 8 -conv3-> 6 -pool-> 3.

`mnist-resnet` (577,402 parameters)
    stem conv3 -> 16, BN, ReLU; three stages of two BasicBlocks with 16/32/64 channels and strides 1/2/2
    (28 -> 28 -> 14 -> 7); flatten 64*7*7 = 3136, linear 128, LayerNorm, ReLU, linear 10.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dtrain.models.layers import check_image_size, check_norm, norm2d
from dtrain.models.resnet import make_stage


class MnistCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, norm: str = "batch"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 10, 5), nn.MaxPool2d(2), norm2d(norm, 10), nn.ReLU(inplace=True),
            nn.Conv2d(10, 20, 5), nn.MaxPool2d(2), norm2d(norm, 20), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(20 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _conv_bn_relu(cin: int, cout: int, kernel: int, norm: str) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel), norm2d(norm, cout), nn.ReLU(inplace=True)]


class MnistCNNDeep(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, norm: str = "batch"):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32, 5, norm), *_conv_bn_relu(32, 32, 5, norm),
            nn.MaxPool2d(2), nn.Dropout(0.25),
            *_conv_bn_relu(32, 64, 3, norm), *_conv_bn_relu(64, 64, 3, norm),
            nn.MaxPool2d(2), nn.Dropout(0.25),
        )
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.classifier = nn.Sequential(
            nn.Linear(64 * 3 * 3, 256), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class MnistResNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, norm: str = "batch"):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), norm2d(norm, 16), nn.ReLU(inplace=True),
        )
        self.layer1 = make_stage(16, 16, 2, 1, norm)
        self.layer2 = make_stage(16, 32, 2, 2, norm)
        self.layer3 = make_stage(32, 64, 2, 2, norm)
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.head = nn.Sequential(
            nn.Linear(64 * 7 * 7, 128), nn.LayerNorm(128), nn.ReLU(inplace=True), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(torch.flatten(self.pool(x), 1))


def mnist_cnn(num_classes: int, in_channels: int = 1, image_size: int = 28, *, norm: str = "batch") -> MnistCNN:
    check_norm(norm, ("batch", "group"), "mnist-cnn")
    check_image_size(image_size, 16, "mnist-cnn")
    return MnistCNN(num_classes, in_channels, norm)


def mnist_cnn_deep(
    num_classes: int, in_channels: int = 1, image_size: int = 28, *, norm: str = "batch"
) -> MnistCNNDeep:
    check_norm(norm, ("batch", "group"), "mnist-cnn-deep")
    check_image_size(image_size, 20, "mnist-cnn-deep")
    return MnistCNNDeep(num_classes, in_channels, norm)


def mnist_resnet(
    num_classes: int, in_channels: int = 1, image_size: int = 28, *, norm: str = "batch"
) -> MnistResNet:
    check_norm(norm, ("batch", "group"), "mnist-resnet")
    return MnistResNet(num_classes, in_channels, norm)
