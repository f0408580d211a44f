"""Batch iterators that yield (uint8 images N x C x H x W, labels, dataset indices) on the device.

MemoryLoader keeps the whole uint8 set on the device and indexes it (no workers, no host copies);
FileLoader decodes image files in DataLoader workers. Both shard with `TrainShards`/`eval_shard`,
so augmentation and everything after it is the same for both.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dtrain.data import ImageSet
from dtrain.data.sampler import TrainShards, eval_shard
from dtrain.errors import UserError
from dtrain.preempt import ignore_stop_signals


def decode_image(path: str | Path, size: int | None, channels: int = 3) -> np.ndarray:
    """An image file as uint8 H x W x C, converted to RGB (or L) and resized to size x size if needed."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.array(im)  # writable (np.asarray gives a read-only view torch warns about)
    except Exception as e:
        raise UserError(f"cannot decode image {path}: {type(e).__name__}: {e}. Remove or replace the file.") \
            from None
    return arr[:, :, None] if arr.ndim == 2 else arr


class FileImages(torch.utils.data.Dataset):
    """A file-backed set, decoded a whole batch per worker call (DataLoader's `__getitems__`): one uint8
    N x C x H x W tensor per batch, decoded straight into place, without a tensor per image to collate."""

    def __init__(self, imageset: ImageSet):
        self.set = imageset

    def __len__(self) -> int:
        return len(self.set)

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]):
        s = self.set
        x = np.empty((len(indices), s.size, s.size, s.channels), dtype=np.uint8)
        for k, i in enumerate(indices):
            x[k] = decode_image(s.files[i], s.size, s.channels)
        idx = torch.tensor(indices, dtype=torch.long)
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), s.labels[idx], idx


def _whole_batch(batch):
    return batch


def _user_error_from_worker(e: UserError) -> UserError:
    """DataLoader re-raises a worker's exception with the worker's traceback as text: keep the message."""
    last = str(e).strip().splitlines()[-1]
    return UserError(last.split("UserError: ", 1)[-1])


class _Loader:
    """Training: this process's DistributedSampler shard, reshuffled per epoch; evaluation: an exact shard."""

    def __init__(self, imageset: ImageSet, device, batch_size: int, rank: int, world: int, seed: int, train: bool):
        self.set, self.device, self.batch_size, self.rank, self.world = imageset, device, batch_size, rank, world
        self.train = train
        self.shards = TrainShards(len(imageset), rank, world, seed) if train else None

    def __len__(self) -> int:
        if self.train:
            return self.shards.num_batches(self.batch_size)
        return -(-len(eval_shard(len(self.set), self.rank, self.world)) // self.batch_size)

    def index_batches(self, epoch: int, start: int) -> list[torch.Tensor]:
        if self.train:
            return self.shards.batches(epoch, self.batch_size, start)
        return list(eval_shard(len(self.set), self.rank, self.world).split(self.batch_size))[start:]


class MemoryLoader(_Loader):
    """The uint8 images live on the device once; batches are gathered there by index."""

    def __init__(self, imageset, device, batch_size, rank, world, seed=0, train=True):
        super().__init__(imageset, device, batch_size, rank, world, seed, train)
        self.images = imageset.images.permute(0, 3, 1, 2).contiguous().to(device)  # N C H W uint8
        self.labels = imageset.labels.to(device)

    def batches(self, epoch: int = 0, start: int = 0):
        index_batches = self.index_batches(epoch, start)
        if not index_batches:
            return
        # the epoch's indices go to the device in one copy; batches are views of it
        flat = torch.cat(index_batches).to(self.device, non_blocking=True)
        for idx in flat.split([len(b) for b in index_batches]):
            yield self.images[idx], self.labels[idx], idx


class FileLoader(_Loader):
    """Images decoded from files in DataLoader worker processes."""

    def __init__(self, imageset, device, batch_size, rank, world, seed=0, train=True, workers=4):
        super().__init__(imageset, device, batch_size, rank, world, seed, train)
        self.workers = workers

    def batches(self, epoch: int = 0, start: int = 0):
        index_batches = self.index_batches(epoch, start)
        loader = torch.utils.data.DataLoader(
            FileImages(self.set), batch_sampler=[b.tolist() for b in index_batches], num_workers=self.workers,
            collate_fn=_whole_batch, pin_memory=self.device.type == "cuda", persistent_workers=False,
            worker_init_fn=ignore_stop_signals,
            prefetch_factor=4 if self.workers else None)
        try:
            for x, y, idx in loader:
                yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                       idx.to(self.device, non_blocking=True))
        except UserError as e:
            raise _user_error_from_worker(e) from None


def memory_bytes(imageset: ImageSet) -> int:
    return len(imageset) * imageset.size * imageset.size * imageset.channels


def make_loader(imageset: ImageSet, kind: str, device, batch_size: int, rank: int, world: int, seed: int,
                train: bool, workers: int):
    if kind == "memory":
        if not imageset.in_memory:
            raise UserError("--loader memory needs a dataset held in memory; this one is read from files "
                            "(use --loader files or auto)")
        return MemoryLoader(imageset, device, batch_size, rank, world, seed, train)
    if imageset.in_memory:  # files requested for an in-memory set: nothing to decode, index it in memory
        return MemoryLoader(imageset, device, batch_size, rank, world, seed, train)
    return FileLoader(imageset, device, batch_size, rank, world, seed, train, workers)
