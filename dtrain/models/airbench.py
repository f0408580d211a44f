"""`airbench`: an airbench94-class network, written from the paper's description
(K. Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024).

    whitening: 2x2 conv, no padding, no bias, frozen; 2 * (in_channels * 4) filters, set by
               `init_from_data` to the whitening transform of the training images' 2x2 patches and its
               negation (24 filters for RGB)
    GELU
    3 blocks, widths 64 / 256 / 256, each:
        conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU
    global max pool, linear without bias, logits scaled by 1/9

The convs have no bias; the first `cin` filters of every block conv start as the identity (Dirac).
BatchNorm: running averages keep 60% of the old value per step (the paper's "momentum 0.6", which is
torch's momentum=0.4), eps 1e-12, the scale frozen at 1 (only the shift is learned). For 10 classes and
RGB: 1,972,768 parameters, 1,971,328 of them trained (frozen: 288 whitening + 1,152 BN scales).
Pure conv/pool/BN ops, so channels_last works throughout.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dtrain.models.layers import check_image_size


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose scale stays 1; only the bias is trained."""

    def __init__(self, channels: int, keep: float = 0.6, eps: float = 1e-12):
        super().__init__(channels, eps=eps, momentum=1.0 - keep)
        self.weight.requires_grad_(False)


class ConvGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU, then (conv3x3 -> BN -> GELU) once more (airbench94) or twice
    (airbench96): `convs` 2 or 3."""

    def __init__(self, cin: int, cout: int, convs: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = FrozenScaleBatchNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = FrozenScaleBatchNorm(cout)
        if convs == 3:
            self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.norm3 = FrozenScaleBatchNorm(cout)
        self.act = nn.GELU()
        for conv in (m for m in self.children() if isinstance(m, nn.Conv2d)):
            with torch.no_grad():
                n = min(conv.in_channels, conv.out_channels)
                nn.init.dirac_(conv.weight[:n, :n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        x = self.act(self.norm2(self.conv2(x)))
        return self.act(self.norm3(self.conv3(x))) if hasattr(self, "conv3") else x


class AirbenchNet(nn.Module):
    LOGIT_SCALE = 1 / 9

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, int, int] = (64, 256, 256),
                 convs: int = 2):
        super().__init__()
        self.whiten = nn.Conv2d(in_channels, 2 * in_channels * 4, 2, padding=0, bias=False)
        self.whiten.weight.requires_grad_(False)
        self.act = nn.GELU()
        groups, cin = [], self.whiten.out_channels
        for width in widths:
            groups.append(ConvGroup(cin, width, convs))
            cin = width
        self.layers = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(cin, num_classes, bias=False)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4, max_images: int = 5000) -> None:
        """Set the whitening filters from normalised training images x (N, C, H, W).

        The covariance of all 2x2 patches (C*4 dimensions) is eigen-decomposed; each eigenvector divided by
        sqrt(eigenvalue + eps) becomes a filter, so the filter outputs have (near) identity covariance. The
        negated filters are appended, which lets the following GELU see both signs.
        """
        weight = self.whiten.weight
        c = weight.shape[1]
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"init_from_data expects images of shape (N, {c}, H, W), got {tuple(x.shape)}")
        x = x[:max_images]
        dim = c * 4
        total = torch.zeros(dim, dtype=torch.float64, device=x.device)
        outer = torch.zeros(dim, dim, dtype=torch.float64, device=x.device)
        count = 0
        for chunk in x.split(500):
            patches = chunk.float().unfold(2, 2, 1).unfold(3, 2, 1)  # N, C, H-1, W-1, 2, 2
            patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, dim).double()
            total += patches.sum(0)
            outer += patches.T @ patches
            count += patches.shape[0]
        mean = total / count
        cov = (outer - count * torch.outer(mean, mean)) / max(count - 1, 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # largest first
        filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)).T  # dim x dim
        filters = filters.reshape(dim, c, 2, 2)
        weight.copy_(torch.cat([filters, -filters]).to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.act(self.whiten(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.head(x) * self.LOGIT_SCALE


def airbench(num_classes: int, in_channels: int = 3, image_size: int = 32) -> AirbenchNet:
    check_image_size(image_size, 9, "airbench")
    return AirbenchNet(num_classes, in_channels)


def airbench96(num_classes: int, in_channels: int = 3, image_size: int = 32) -> AirbenchNet:
    """airbench96's network (K. Jordan's cifar10-airbench, airbench/lib_airbench96.py: 96.05% on CIFAR-10):
    widths 128 / 384 / 512, three convolutions per block; 9,918,752 parameters for 10 classes, 9,915,392 of
    them trained (its code's layout has 24 more: a bias on the whitening layer, which dtrain's has not)."""
    check_image_size(image_size, 9, "airbench96")
    return AirbenchNet(num_classes, in_channels, widths=(128, 384, 512), convs=3)
