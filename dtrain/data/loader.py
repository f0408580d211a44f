"""Batch iterators that yield (uint8 images N x C x H x W, labels, dataset indices) on the device, and
`choose_loader`, the one place that decides between holding a set in memory and reading it from files.

MemoryLoader keeps the whole uint8 set on the device and indexes it (no workers, no host copies);
FileLoader decodes image files in DataLoader workers; ArrayLoader reads evaluation batches from a host
array (e.g. a memory-mapped cache). All shard with `TrainShards`/`eval_shard`, so augmentation and
everything after it is the same for each.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from dtrain.data import ImageSet
from dtrain.data.decode import decode_image
from dtrain.data.sampler import TrainShards, eval_shard
from dtrain.data.workers import short_socket_folder
from dtrain.errors import UserError
from dtrain.signals import ignore_stop_signals

MEMORY_BUDGET = 2 * 1024 ** 3            # bytes of decoded uint8 pixels a file-backed set may take in memory


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


class ShardedLoader:
    """Training: this process's DistributedSampler shard, reshuffled per epoch; evaluation: an exact shard."""

    def __init__(self, imageset: ImageSet, device, *, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 train: bool = True, accum: int = 1):
        self.set, self.device, self.batch_size = imageset, torch.device(device), batch_size
        self.rank, self.world = rank, world
        self.train, self.accum = train, accum
        self.shards = TrainShards(len(imageset), rank, world, seed) if train else None

    def __len__(self) -> int:
        if self.train:
            return self.shards.num_batches(self.batch_size)
        return -(-len(eval_shard(len(self.set), self.rank, self.world)) // self.batch_size)

    def index_batches(self, epoch: int, start: int) -> list[torch.Tensor]:
        if self.train:
            return self.shards.batches(epoch, self.batch_size, start, self.accum)
        return list(eval_shard(len(self.set), self.rank, self.world).split(self.batch_size))[start:]


class MemoryLoader(ShardedLoader):
    """The uint8 images live on the device once; batches are gathered there by index."""

    def __init__(self, imageset, device, **shard):
        super().__init__(imageset, device, **shard)
        self.images = imageset.images.permute(0, 3, 1, 2).contiguous().to(device)  # N C H W uint8
        self.labels = imageset.labels.to(device)

    def batches(self, epoch: int = 0, start: int = 0):
        index_batches = self.index_batches(epoch, start)
        if not index_batches:
            return
        # the epoch's indices go to the device in one copy (from pinned memory: the host does not wait);
        # batches are views of it
        flat = torch.cat(index_batches)
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(self.device, non_blocking=True)
        for idx in flat.split([len(b) for b in index_batches]):
            yield self.images[idx], self.labels[idx], idx


class FileLoader(ShardedLoader):
    """Images decoded from files in DataLoader worker processes."""

    def __init__(self, imageset, device, *, workers: int = 4, **shard):
        super().__init__(imageset, device, **shard)
        self.workers = workers

    def batches(self, epoch: int = 0, start: int = 0):
        index_batches = self.index_batches(epoch, start)
        if self.workers:
            short_socket_folder()
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


def choose_loader(requested: str, *sets: ImageSet, budget: int = MEMORY_BUDGET) -> str:
    """"memory" or "files": how to read `sets` (e.g. train and validation) under --loader `requested`.

    Sets already in memory are read from memory whatever was asked (there is nothing to decode). File-backed
    sets are held in memory when asked ("memory") or, with "auto", when their decoded uint8 pixels together
    fit in `budget` bytes; else they are decoded from the files as they are read."""
    if all(s.in_memory for s in sets):
        return "memory"
    if requested == "auto":
        pixels = sum(len(s) * s.size * s.size * s.channels for s in sets)
        return "memory" if pixels <= budget else "files"
    return requested


def make_loader(imageset: ImageSet, kind: str, *, device, batch_size: int, rank: int, world: int, seed: int,
                train: bool, workers: int, accum: int = 1):
    """The loader of `kind` ("memory" or "files", from `choose_loader`) for this process's shard: of each
    epoch's shuffled order with `train`, else of the set in order."""
    shard = dict(batch_size=batch_size, rank=rank, world=world, seed=seed, train=train, accum=accum)
    if kind == "memory":
        if not imageset.in_memory:
            raise UserError("--loader memory needs a dataset held in memory; this one is read from files "
                            "(use --loader files or auto)")
        return MemoryLoader(imageset, device, **shard)
    if imageset.in_memory:  # files requested for an in-memory set: nothing to decode, index it in memory
        return MemoryLoader(imageset, device, **shard)
    return FileLoader(imageset, device, workers=workers, **shard)


class ArrayLoader(ShardedLoader):
    """Evaluation batches from a host uint8 N x H x W x C array (e.g. a memory-mapped cache).

    Each process reads only its own shard's rows, batch by batch, a batch ahead in a helper thread;
    the NHWC -> NCHW permutation happens on the device, on uint8 (4x cheaper than on the float batch)."""

    def __init__(self, imageset, device, *, batch_size: int, rank: int = 0, world: int = 1):
        super().__init__(imageset, device, batch_size=batch_size, rank=rank, world=world, train=False)
        self.images = imageset.images if isinstance(imageset.images, torch.Tensor) else \
            torch.from_numpy(imageset.images)
        self.labels = imageset.labels

    def _host_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, labels, indices) of a batch on the host; pinned for a GPU, so that the copies to it do not
        make the host wait."""
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        x = self.images[lo:hi] if hi - lo == len(idx) else self.images[idx]
        batch = (x.contiguous(), self.labels[idx], idx)
        if self.device.type == "cuda":
            batch = tuple(t.pin_memory() for t in batch)
        return batch

    def batches(self, epoch: int = 0, start: int = 0):
        index_batches = [b for b in self.index_batches(epoch, start) if len(b)]
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self._host_batch, index_batches[0]) if index_batches else None
            for k in range(len(index_batches)):
                x, y, idx = pending.result()
                if k + 1 < len(index_batches):
                    pending = pool.submit(self._host_batch, index_batches[k + 1])
                x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()  # uint8: cheap
                yield x, y.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True)
