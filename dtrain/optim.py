"""Optimisers and the learning-rate schedule (advanced exactly once per optimiser step)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dtrain.muon import MuonWithAuxiliary, muon_groups


@dataclass(frozen=True)
class OptimSpec:
    """What `build_optimizer` needs from the Config."""
    name: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    decay_norm_bias: bool
    bias_lr_scale: float
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_aux: str = "sgd"

    @classmethod
    def from_config(cls, cfg) -> "OptimSpec":
        return cls(cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.decay_norm_bias,
                   cfg.bias_lr_scale, cfg.muon_lr, cfg.muon_momentum, cfg.muon_weight_decay, cfg.muon_aux)


@dataclass(frozen=True)
class ScheduleSpec:
    """What `LRSchedule` needs from the Config."""
    scheduler: str
    warmup_epochs: float
    onecycle_start: float
    onecycle_peak: float
    onecycle_end: float
    milestones: tuple[int, ...]
    gamma: float
    plateau_monitor: str
    plateau_patience: int
    plateau_factor: float
    swa_start: int | None = None    # from this epoch on the learning rate holds at swa_lr (SWA)
    swa_lr: float | None = None

    @classmethod
    def from_config(cls, cfg) -> "ScheduleSpec":
        return cls(cfg.scheduler, cfg.warmup_epochs, cfg.onecycle_start, cfg.onecycle_peak, cfg.onecycle_end,
                   tuple(cfg.milestones), cfg.gamma, cfg.plateau_monitor, cfg.plateau_patience, cfg.plateau_factor,
                   cfg.swa_start, cfg.swa_lr)


def param_groups(model: nn.Module, weight_decay: float, decay_norm_bias: bool, lr: float,
                 bias_lr_scale: float = 1.0) -> list[dict]:
    """Weight matrices/kernels in one group; 1-D parameters (biases, normalisation weights) in another
    when they get no weight decay or their own learning rate: `bias_lr_scale` multiplies their LR and
    divides their weight decay, so the decay per step (lr * wd) stays that of the other weights."""
    if decay_norm_bias and bias_lr_scale == 1.0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    vectors = {"params": no_decay, "weight_decay": weight_decay / bias_lr_scale if decay_norm_bias else 0.0}
    if bias_lr_scale != 1.0:
        vectors["lr"] = lr * bias_lr_scale
    return [{"params": decay, "weight_decay": weight_decay}, vectors]


def build_optimizer(spec: OptimSpec, model: nn.Module, device: torch.device,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimiser of `spec` over `model`'s parameter groups, with fused kernels (one launch for all
    parameters, and under fp16's GradScaler no host sync per step) where `fused` says, by default on CUDA,
    else foreach (RMSprop has no fused kernel)."""
    if spec.name == "muon":
        groups = muon_groups(model, muon_lr=spec.muon_lr, muon_weight_decay=spec.muon_weight_decay,
                             aux=spec.muon_aux, lr=spec.lr, weight_decay=spec.weight_decay,
                             decay_norm_bias=spec.decay_norm_bias, bias_lr_scale=spec.bias_lr_scale)
        return MuonWithAuxiliary(groups, momentum=spec.muon_momentum, nesterov=True, aux_momentum=spec.momentum,
                                 aux_nesterov=spec.nesterov)
    groups = param_groups(model, spec.weight_decay, spec.decay_norm_bias, spec.lr, spec.bias_lr_scale)
    fast = {"fused": True} if (device.type == "cuda" if fused is None else fused) else {"foreach": True}
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov, **fast)
    if spec.name == "adam":
        return torch.optim.Adam(groups, lr=spec.lr, **fast)
    if spec.name == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, **fast)
    if spec.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=spec.lr, momentum=spec.momentum, foreach=True)
    raise ValueError(spec.name)


class LRSchedule:
    """lr = base_lr * warm-up(t) * shape(t) * plateau_scale, set on every param group.

    `step()` once per optimiser step (never through accelerate.prepare, which would step it once per
    process); `end_epoch(metrics)` once per evaluated epoch, for the plateau rule.
    """

    def __init__(self, optimizer, spec: ScheduleSpec, steps_per_epoch: int, total_steps: int):
        self.opt, self.spec = optimizer, spec
        self.steps_per_epoch, self.total = max(1, steps_per_epoch), max(1, total_steps)
        self.warmup = round(spec.warmup_epochs * self.steps_per_epoch)
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.t = 0
        self.scale = 1.0
        self.best = None
        self.bad_epochs = 0
        self._apply()

    def factor(self, t: int) -> float:
        c = self.spec
        warm = min(1.0, (t + 1) / self.warmup) if self.warmup and t < self.warmup else 1.0
        total, floor = self.total, 0.0
        if c.swa_start is not None:  # SWA: a decaying schedule runs until the averaging starts, down to swa_lr
            total, floor = max(1, c.swa_start * self.steps_per_epoch), self._swa_ratio()
        progress = min(1.0, max(0, t - self.warmup) / max(1, total - self.warmup))
        if c.scheduler == "cosine":
            shape = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        elif c.scheduler == "linear":
            shape = floor + (1 - floor) * (1.0 - progress)
        elif c.scheduler == "onecycle":  # linear from `start` up to 1 at `peak`, then linear down to `end`
            p = t / self.total
            start, peak, end = c.onecycle_start, c.onecycle_peak, c.onecycle_end
            shape = start + (1 - start) * p / peak if p < peak else max(end, end + (1 - end) * (1 - p) / (1 - peak))
        elif c.scheduler == "multistep":
            epoch = t / self.steps_per_epoch
            shape = c.gamma ** sum(epoch >= m for m in c.milestones)
        else:  # plateau, none
            shape = 1.0
        return warm * shape * self.scale

    def _apply(self) -> None:
        f = self.factor(self.t)
        c = self.spec
        if c.swa_start is not None and self.t >= c.swa_start * self.steps_per_epoch:
            f = self._swa_ratio()   # SWA: every group at swa_lr, in the groups' ratio to the first
        for g, base in zip(self.opt.param_groups, self.base):
            g["lr"] = base * f

    def _swa_ratio(self) -> float:
        """swa_lr over the first group's base LR (0 when that is 0: nothing trains at LR 0)."""
        return self.spec.swa_lr / self.base[0] if self.base[0] else 0.0

    def step(self) -> None:
        self.t += 1
        self._apply()

    def end_epoch(self, metrics: dict) -> None:
        """ReduceLROnPlateau's rule (relative threshold 1e-4) on the monitored validation metric."""
        c = self.spec
        if c.scheduler != "plateau" or metrics.get(c.plateau_monitor) is None:
            return
        value = metrics[c.plateau_monitor]
        minimise = c.plateau_monitor.endswith("loss")
        better = self.best is None or (value < self.best * (1 - 1e-4) if minimise else value > self.best * (1 + 1e-4))
        if better:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > c.plateau_patience:
                self.scale *= c.plateau_factor
                self.bad_epochs = 0
        self._apply()

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"t": self.t, "scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.scale, self.best, self.bad_epochs = state["t"], state["scale"], state["best"], state["bad_epochs"]
        self._apply()
