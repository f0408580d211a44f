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

    def batches(self, epoch: int, batch_size: int, start: int = 0, accum: int = 1) -> list[torch.Tensor]:
        """Index batches of epoch `epoch` (0-based), skipping the first `start` (mid-epoch resume). With
        gradient accumulation the `accum` micro-batches of a step interleave (micro-batch j holds the step's
        positions j, j + accum, ...), so that P processes with --grad-accum k split a step's global batch
        into the same P x k parts as P x k processes would (augmentation draws and SAM depend on the parts).
        The count is that of plain batches of batch_size."""
        self.sampler.set_epoch(epoch)
        idx = torch.tensor(list(self.sampler), dtype=torch.long)
        out = []
        for chunk in idx.split(batch_size * accum):
            parts = min(accum, -(-len(chunk) // batch_size))
            out.extend(chunk[j::parts] for j in range(parts))
        return out[start:]

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)


def eval_shard(n: int, rank: int, world: int) -> torch.Tensor:
    """Indices rank, rank+P, ... without padding: every image is evaluated exactly once in all (a rank at or
    past n gets none)."""
    return torch.arange(min(rank, n), n, world)
