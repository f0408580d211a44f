"""A running average of a model's weights (EMA), optionally with lookahead, without host synchronisation.

`WeightAverage(model, decay)` keeps a copy of the model; `update_parameters(model)` after every optimiser
step moves the copy towards the model: avg <- decay * avg + (1 - decay) * w, over parameters and floating
buffers (BatchNorm statistics); integer buffers are copied. The first update copies the model.

torch's `AveragedModel` does the same but moves its step counter (a CPU tensor) to the device on every
update, a blocking copy that stalls the host once per step on a GPU; here the counter is a Python int and
every update is two foreach kernels.

Lookahead (`lookahead=k`, as airbench trains): every k steps the average is updated with the decay
raised to the k-th power and ramped up as progress**3 (progress = step / total steps), then the trained
weights are set to the average. Between those steps the average is left alone.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float, lookahead: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay, self.lookahead = decay, int(lookahead)
        self.n_averaged = torch.zeros((), dtype=torch.long)  # CPU: kept for checkpoints
        self._n = 0
        self._lists = None

    def _pairs(self, model: nn.Module):
        if self._lists is not None and self._lists[0] is model:
            return self._lists[1]
        floats_a, floats_m, others_a, others_m = [], [], [], []
        for a, m in zip(list(self.module.parameters()) + list(self.module.buffers()),
                        list(model.parameters()) + list(model.buffers()), strict=True):
            if a.is_floating_point():
                floats_a.append(a.detach())
                floats_m.append(m.detach())
            else:
                others_a.append(a.detach())
                others_m.append(m.detach())
        self._lists = (model, (floats_a, floats_m, others_a, others_m))
        return self._lists[1]

    @torch.no_grad()
    def update_parameters(self, model: nn.Module, progress: float | None = None) -> None:
        """Average in `model` (the same architecture, unwrapped). `progress` in [0, 1]: the lookahead ramp."""
        self._n = max(self._n, int(self.n_averaged))  # restored from a checkpoint
        fa, fm, oa, om = self._pairs(model)
        step = self._n + 1                      # this update follows optimiser step `step`
        if self._n == 0:                        # start from the model
            torch._foreach_copy_(fa + oa, fm + om)
        elif not self.lookahead:
            torch._foreach_lerp_(fa, fm, 1.0 - self.decay)
            if oa:
                torch._foreach_copy_(oa, om)
        elif step % self.lookahead == 0:
            ramp = 1.0 if progress is None else min(1.0, max(0.0, progress)) ** 3
            torch._foreach_lerp_(fa, fm, 1.0 - self.decay ** self.lookahead * ramp)
            torch._foreach_copy_(fm, fa)        # the trained weights jump to the average
            if oa:
                torch._foreach_copy_(oa, om)
        self._n += 1
        self.n_averaged.fill_(self._n)

    def load_count(self, n: int) -> None:
        self._n = int(n)
        self.n_averaged.fill_(self._n)
