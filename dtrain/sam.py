"""Sharpness-aware minimisation (Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently Improving
Generalization"; WRN-16-8 on CIFAR-10: 97.1%) and its adaptive form (Kwon et al. 2021, ASAM: 97.45%).

A step takes two passes over its batch. The first computes the gradient g at the weights w and moves them
to the nearby point of highest loss, w + e with e = rho * g / ||g||; adaptive: e = rho * T^2 g / ||T g||,
with T = |w| + eta (eta 0.01) for the layers' weights and 1 for biases, as in the authors' code
(SamsungLabs/ASAM, asam.py). The second pass computes the gradient there, which the optimiser then applies
at w. The first pass's gradient is the process's own (m-sharpness, the paper's data-parallel form, with m
the images of one process's micro-batch): it is not all-reduced, so it costs no communication, and a run on
one process with --grad-accum P takes the steps of a run on P processes. BatchNorm's running statistics are
updated by the first pass only, once per step.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


ASAM_ETA = 0.01


def perturbation(params: list[torch.Tensor], grads: list[torch.Tensor | None], rho: float,
                 adaptive: list[bool] | None = None) -> list[torch.Tensor]:
    """e for each parameter from the first pass's gradients (see the module; a parameter without a gradient
    stays where it is); no host synchronisation. `adaptive`: ASAM, True for each parameter it scales by
    |w| + eta (a layer's weight; the rest are scaled by 1). The gradients' scale does not matter (fp16's
    loss scale); when they overflowed (inf or NaN, which fp16's GradScaler then skips) nothing moves."""
    grads = [torch.zeros_like(p, dtype=torch.float) if g is None else g.float() for p, g in zip(params, grads)]
    flags = adaptive if adaptive is not None else [False] * len(params)
    t = [p.detach().float().abs().add(ASAM_ETA) if scaled else None for p, scaled in zip(params, flags)]
    tg = [g if ti is None else ti * g for ti, g in zip(t, grads)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in tg]))
    finite = torch.isfinite(norm)
    scale = rho / (norm + 1e-12)
    moves = [(v if ti is None else ti * v) * scale for ti, v in zip(t, tg)]
    return [torch.where(finite, m, torch.zeros_like(m)).to(p.dtype) for p, m in zip(params, moves)]


@contextmanager
def moved(params: list[torch.Tensor], e: list[torch.Tensor]):
    """The parameters moved by e for the `with` block, back exactly where they were after it (restored from
    a copy: w + e - e is not always w in floating point)."""
    with torch.no_grad():
        kept = torch._foreach_add(params, 0)    # a copy of each
        torch._foreach_add_(params, e)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, kept)


@contextmanager
def running_stats_frozen(model: nn.Module):
    """BatchNorm layers keep their running statistics for the `with` block (momentum 0)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
