"""Datasets as uint8 image sets, one module per on-disk format.

Each format module has `load(cfg) -> (train: ImageSet, val: ImageSet)` and `NATIVE_SIZE`, the side of its
images without --image-size (None where the images decide: an image folder); `load_dataset` dispatches on
`cfg.dataset`. `--image-size N` resizes every format to N x N (bilinear, antialiased): in memory with
`resize_images` (cifar10, cifar100, mnist), when decoded (kaggle, imagefolder), or by generating the images at
that size (fake). Data code knows nothing of processes, models or logging.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

RESIZE_CHUNK = 1024   # images resized at a time: bounds the float copy (1024 x 3 x 224 x 224 floats: 0.6 GiB)
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


def _format(dataset: str):
    return importlib.import_module(f"dtrain.data.{FORMATS[dataset]}")


def load_dataset(cfg) -> tuple[ImageSet, ImageSet]:
    return _format(cfg.dataset).load(cfg)


def image_size_before_loading(cfg) -> int | None:
    """The side of the images a run of `cfg` trains on, as far as it is known before the data is read:
    --image-size, else the format's own size (cifar10, cifar100, kaggle, fake 32; mnist 28); None for an image
    folder without --image-size, whose images decide."""
    return cfg.image_size or _format(cfg.dataset).NATIVE_SIZE


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x H x W x C images -> N x size x size x C, bilinear and antialiased, RESIZE_CHUNK images at a
    time; the images themselves when they already have that size."""
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    out = torch.empty((n, size, size, c), dtype=torch.uint8)
    for lo in range(0, n, RESIZE_CHUNK):
        x = images[lo:lo + RESIZE_CHUNK].permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
        out[lo:lo + RESIZE_CHUNK] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


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
