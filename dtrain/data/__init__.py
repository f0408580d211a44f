"""Datasets as uint8 image sets, one module per on-disk format.

Each format module has `load(cfg) -> (train: ImageSet, val: ImageSet)`; `load_dataset` dispatches on
`cfg.dataset`. Data code knows nothing of processes, models or logging.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

FORMATS = {"cifar10": "cifar", "cifar100": "cifar", "fake": "fake", "kaggle": "kaggle", "imagefolder": "imagefolder",
           "mnist": "mnist"}


@dataclass
class ImageSet:
    """Labelled images: in memory (`images`, uint8 N x H x W x C) or on disk (`files`, decoded on demand)."""
    labels: torch.Tensor                      # int64, N (-1 where unknown, e.g. a test set without labels)
    classes: list[str]
    images: torch.Tensor | None = None        # uint8 N x H x W x C
    files: list[str] | None = None           # one path per image when file-backed
    ids: list[int] | None = None             # external ids (e.g. Kaggle's numeric file names)
    channels: int = 3
    size: int = 32                           # images are size x size (file-backed sets are resized to it)
    mean: tuple[float, ...] | None = None    # the format's known normalisation, if any
    std: tuple[float, ...] | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(
            labels=self.labels[index], classes=self.classes,
            images=None if self.images is None else self.images[index],
            files=None if self.files is None else [self.files[i] for i in index.tolist()],
            ids=None if self.ids is None else [self.ids[i] for i in index.tolist()],
            channels=self.channels, size=self.size, mean=self.mean, std=self.std, meta=self.meta)


def load_dataset(cfg) -> tuple[ImageSet, ImageSet]:
    module = importlib.import_module(f"dtrain.data.{FORMATS[cfg.dataset]}")
    return module.load(cfg)


def stratified_split(labels: torch.Tensor, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_index, val_index): a fixed, seeded hold-out of n_val items with the classes' proportions."""
    if not 0 < n_val < len(labels):
        raise ValueError(f"the validation split must be between 1 and {len(labels) - 1} images, not {n_val}")
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    quota = [len(ix) * n_val / len(labels) for ix in per_class]
    take = [int(q) for q in quota]
    # hand the remaining slots to the classes with the largest fractional parts
    for i in sorted(range(len(quota)), key=lambda i: quota[i] - take[i], reverse=True)[: n_val - sum(take)]:
        take[i] += 1
    val = torch.cat([ix[torch.randperm(len(ix), generator=g)[:k]] for ix, k in zip(per_class, take)])
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).flatten(), val.sort().values
