"""Per-channel normalisation statistics."""
from __future__ import annotations

from typing import Iterable

import torch

from dtrain.data.decode import decode_chunks, default_workers
from dtrain.errors import UserError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def channel_stats(batches: Iterable[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std per channel over every pixel of every image (the dataset's std, not a mean of
    per-image stds), in [0, 1] units, in one pass over uint8 N x H x W x C batches."""
    total = sq = None
    count = 0
    for b in batches:
        x = b.reshape(-1, b.shape[-1]).double()
        s, q = x.sum(0), (x * x).sum(0)
        total, sq = (s, q) if total is None else (total + s, sq + q)
        count += x.shape[0]
    if not count:
        raise UserError("cannot compute normalisation statistics of an empty training set")
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def resolve(mode: str, train) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation for `--normalize mode`; 'dataset' uses the format's known figures, else computes."""
    c = train.channels
    if mode == "none":
        return (0.0,) * c, (1.0,) * c
    if mode == "imagenet":
        if c == 1:
            return (sum(IMAGENET[0]) / 3,), (sum(IMAGENET[1]) / 3,)
        return IMAGENET
    if mode == "dataset" and train.mean is not None:
        return tuple(train.mean), tuple(train.std)
    if train.in_memory:
        return channel_stats(train.images.split(4096))
    if train.files is None:
        raise UserError("computing normalisation statistics needs the training images")
    return channel_stats(file_batches(train))


def file_batches(train):
    """A file-backed set's images decoded (and resized) as the loader does, as uint8 N x H x W x C chunks,
    in worker processes; a file that cannot be decoded is a UserError naming it."""
    for chunk in decode_chunks(train.files, train.size, train.channels, default_workers()):
        yield torch.from_numpy(chunk)
