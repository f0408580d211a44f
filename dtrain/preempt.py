"""Stop requests: SIGUSR1 (Slurm's warning before a time limit or preemption) and SIGTERM.

The handler only records the signal; the training loop asks `requested()` at each step boundary, where
all processes agree (an all-reduce over a CPU group, so no GPU synchronisation), then saves and exits.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignal:
    def __init__(self):
        self.signum = 0
        self.group = None
        self._previous = {}

    def install(self) -> "StopSignal":
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every rank must create the group; gloo keeps the flag exchange off the GPU stream
            self.group = dist.new_group(backend="gloo")
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def requested(self) -> int:
        """The signal number any process received (0: none). Every process must call this together."""
        if self.group is None:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
