"""Random images for smoke runs: noise around a per-class colour, so a model can learn something."""
from __future__ import annotations

import torch

from dtrain.data import ImageSet

NATIVE_SIZE = 32   # --image-size N generates N x N images


def make(n: int, num_classes: int, size: int, channels: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    colours = torch.rand(num_classes, 1, 1, channels, generator=torch.Generator().manual_seed(1234)) * 160 + 48
    noise = torch.randn(n, size, size, channels, generator=g) * 40
    images = (colours[labels] + noise).clamp(0, 255).to(torch.uint8)
    return ImageSet(labels=labels, classes=[f"class{i}" for i in range(num_classes)], images=images,
                    channels=channels, size=size, mean=(0.5,) * channels, std=(0.25,) * channels)


def load(cfg) -> tuple[ImageSet, ImageSet]:
    k, size = cfg.num_classes or 10, cfg.image_size or NATIVE_SIZE
    return (make(cfg.fake_size, k, size, 3, cfg.seed), make(max(cfg.fake_size // 4, 1), k, size, 3, cfg.seed + 1))
