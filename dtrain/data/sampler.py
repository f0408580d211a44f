"""Which images each process sees: DistributedSampler shards for training, exact shards for evaluation."""
from __future__ import annotations

import torch
from torch.utils.data.distributed import DistributedSampler


class _Length:
    """A stand-in dataset: DistributedSampler only needs len()."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class TrainShards:
    """This process's shard of each epoch, cut into batches.

    The order comes from torch's DistributedSampler (seeded, re-shuffled by set_epoch, padded so every
    process gets the same number of samples): process r gets positions r, r+P, r+2P... of the epoch's
    permutation, so the P local batches of step k together are the same global batch as on 1 process.
    """

    def __init__(self, n: int, rank: int, world: int, seed: int, shuffle: bool = True):
        self.sampler = DistributedSampler(_Length(n), num_replicas=world, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=False)

    def __len__(self) -> int:
        return len(self.sampler)

    def batches(self, epoch: int, batch_size: int, start: int = 0) -> list[torch.Tensor]:
        """Index batches of epoch `epoch` (0-based), skipping the first `start` (mid-epoch resume)."""
        self.sampler.set_epoch(epoch)
        idx = torch.tensor(list(self.sampler), dtype=torch.long)
        return list(idx.split(batch_size))[start:]

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)


def eval_shard(n: int, rank: int, world: int) -> torch.Tensor:
    """Indices rank, rank+P, ... without padding: every image is evaluated exactly once in all (a rank at or
    past n gets none)."""
    return torch.arange(min(rank, n), n, world)
