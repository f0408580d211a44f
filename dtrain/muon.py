"""Muon for the weight matrices and convolution filters, SGD or AdamW for the rest, as one optimiser.

Muon (K. Jordan et al. 2024, "Muon: an optimizer for hidden layers"; airbench94 with Muon on its convolutions
reaches 94% on CIFAR-10 in 2.6 s on an A100): the momentum of a weight's gradient is orthogonalised by
Newton-Schulz iterations before the step, so every direction of the update has about the same size. The
update is torch's own (`torch.optim._muon.muon`, the functional form of torch.optim.Muon), which takes
matrices only: a convolution's filters (out, in, kh, kw) are updated as the (out, in * kh * kw) matrix they
form (the orthogonalisation does not depend on the order of the columns, so a channels_last filter is
viewed in its own memory order, without a copy).

Groups ("algorithm" in each param group): "muon" for the weights of two or more dimensions except the head
(the last linear layer), which keeps the usual optimiser with the biases and normalisation weights: "sgd"
(momentum, Nesterov, weight decay added to the gradient: torch.optim.SGD's rule) or "adamw" (decoupled weight
decay: torch.optim.AdamW's rule). Every group's "lr" follows the learning-rate schedule.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim._muon import muon as muon_update

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)   # torch.optim.Muon's defaults (Keller Jordan's quintic)
NS_STEPS = 5


def matrix(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view of a weight (or its gradient or buffer) of two or more dimensions, sharing its memory: rows
    are the output channels."""
    if t.dim() == 2 or t.is_contiguous():
        return t.view(t.shape[0], -1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).view(t.shape[0], -1)
    raise ValueError(f"a weight of shape {tuple(t.shape)} laid out neither contiguous nor channels_last")


def head_of(model: nn.Module) -> nn.Linear | None:
    """The model's classifier: its last linear layer (in the order the model registers its modules)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def muon_groups(model: nn.Module, *, muon_lr: float, muon_weight_decay: float, aux: str, lr: float,
                weight_decay: float, decay_norm_bias: bool = True, bias_lr_scale: float = 1.0) -> list[dict]:
    """The parameter groups: "muon" for every trained weight of two or more dimensions but the head's; `aux`
    ("sgd" or "adamw") at `lr` for the head's weight, and for the biases and normalisation weights at `lr` x
    `bias_lr_scale` with `weight_decay` / `bias_lr_scale` (none without `decay_norm_bias`), as
    dtrain.optim.param_groups treats them. Empty groups are left out."""
    head = head_of(model)
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    matrices, heads, vectors = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            (heads if id(p) in head_params and p.dim() >= 2 else matrices if p.dim() >= 2 else vectors).append(p)
    groups = [{"params": matrices, "algorithm": "muon", "lr": muon_lr, "weight_decay": muon_weight_decay},
              {"params": heads, "algorithm": aux, "lr": lr, "weight_decay": weight_decay},
              {"params": vectors, "algorithm": aux, "lr": lr * bias_lr_scale,
               "weight_decay": weight_decay / bias_lr_scale if decay_norm_bias else 0.0}]
    return [g for g in groups if g["params"]]


class MuonWithAuxiliary(torch.optim.Optimizer):
    """One optimiser over the groups of `muon_groups` (see the module)."""

    def __init__(self, groups: list[dict], *, momentum: float = 0.95, nesterov: bool = True,
                 aux_momentum: float = 0.9, aux_nesterov: bool = False, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        defaults = dict(momentum=momentum, nesterov=nesterov, aux_momentum=aux_momentum, aux_nesterov=aux_nesterov,
                        betas=betas, eps=eps)
        super().__init__(groups, defaults)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, then each buffer laid out as its parameter: a buffer keeps the memory layout it was saved
        in, and Muon reads buffers as matrices of the parameter's layout (--channels-last may change on
        resume)."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            for name, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                {"muon": self._muon, "sgd": self._sgd, "adamw": self._adamw}[group["algorithm"]](group, params)
        return loss

    def _buffer(self, p: torch.Tensor, name: str) -> torch.Tensor:
        state = self.state[p]
        if name not in state:
            state[name] = torch.zeros_like(p)
        return state[name]

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        muon_update([matrix(p) for p in params], [matrix(p.grad) for p in params],
                    [matrix(self._buffer(p, "momentum_buffer")) for p in params], lr=group["lr"],
                    weight_decay=group["weight_decay"], momentum=group["momentum"], nesterov=group["nesterov"],
                    ns_coefficients=NS_COEFFICIENTS, ns_steps=NS_STEPS, eps=1e-7, adjust_lr_fn=None,
                    has_complex=False)

    def _sgd(self, group: dict, params: list[torch.Tensor]) -> None:
        """torch.optim.SGD's rule (dampening 0): d = g + wd * p; b = m * b + d; p -= lr * (d + m * b or b)."""
        m, wd, lr = group["aux_momentum"], group["weight_decay"], group["lr"]
        for p in params:
            d = p.grad.add(p, alpha=wd) if wd else p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = d.clone()
            else:
                state["momentum_buffer"].mul_(m).add_(d)
            b = state["momentum_buffer"]
            p.add_(d.add(b, alpha=m) if group["aux_nesterov"] else b, alpha=-lr)

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        """torch.optim.AdamW's rule: decoupled decay p *= 1 - lr * wd, then Adam with bias correction."""
        (beta1, beta2), eps, lr, wd = group["betas"], group["eps"], group["lr"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
            t = state["step"]
            avg, avg_sq = self._buffer(p, "exp_avg"), self._buffer(p, "exp_avg_sq")
            p.mul_(1 - lr * wd)
            avg.lerp_(p.grad, 1 - beta1)
            avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (avg_sq / (1 - beta2 ** t)).sqrt_().add_(eps)
            p.addcdiv_(avg, denom, value=-lr / (1 - beta1 ** t))


def describe(optimizer: MuonWithAuxiliary) -> str:
    """Each group's algorithm, size, learning rate (before the schedule) and weight decay, for the start-up line."""
    parts = []
    for g in optimizer.param_groups:
        n = sum(p.numel() for p in g["params"])
        lr = g.get("initial_lr", g["lr"])
        parts.append(f"{g['algorithm']} on {n:,} parameters (lr {lr:.3g}, weight decay {g['weight_decay']:.3g})")
    return "; ".join(parts)

