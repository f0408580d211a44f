"""Sharpness-aware minimisation (Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently Improving
Generalization"; WRN-16-8 on CIFAR-10: 97.1%) and its adaptive form (Kwon et al. 2021, ASAM: 97.45%).

A step takes two passes over its batch. The first computes the gradient g at the weights w and moves them
to the nearby point of highest loss, w + e with e = rho * g / ||g|| (adaptive: e = rho * w^2 g / ||w g||);
the second computes the gradient there, which the optimiser then applies at w. The first pass's gradient is
the process's own (m-sharpness, the paper's data-parallel form, with m the images of one process's
micro-batch): it is not all-reduced, so it costs no communication, and a run on one process with
--grad-accum P takes the steps of a run on P processes. BatchNorm's running statistics are updated by the
first pass only, once per step.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def perturbation(params: list[torch.Tensor], grads: list[torch.Tensor | None], rho: float,
                 adaptive: bool) -> list[torch.Tensor]:
    """e for each parameter from the first pass's gradients (see the module; a parameter without a gradient
    stays where it is); no host synchronisation. The gradients' scale does not matter (fp16's loss scale)."""
    grads = [torch.zeros_like(p) if g is None else g.float() for p, g in zip(params, grads)]
    scaled = [p.abs() * g if adaptive else g for p, g in zip(params, grads)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
    scale = rho / (norm + 1e-12)
    return [((p.square() * g) if adaptive else g).mul(scale).to(p.dtype) for p, g in zip(params, grads)]


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
