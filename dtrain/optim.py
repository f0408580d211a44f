"""Optimisers and the learning-rate schedule (advanced exactly once per optimiser step)."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, decay_norm_bias: bool) -> list[dict]:
    if decay_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_bias)
    # fused kernels on CUDA (one launch for all parameters), foreach elsewhere
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **fast)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, **fast)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fast)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    raise ValueError(cfg.optimizer)


class LRSchedule:
    """lr = base_lr * warm-up(t) * shape(t) * plateau_scale, set on every param group.

    `step()` once per optimiser step (never through accelerate.prepare, which would step it once per
    process); `end_epoch(metrics)` once per evaluated epoch, for the plateau rule.
    """

    def __init__(self, optimizer, cfg, steps_per_epoch: int, total_steps: int):
        self.opt, self.cfg = optimizer, cfg
        self.steps_per_epoch, self.total = max(1, steps_per_epoch), max(1, total_steps)
        self.warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.t = 0
        self.scale = 1.0
        self.best = None
        self.bad_epochs = 0
        self._apply()

    def factor(self, t: int) -> float:
        c = self.cfg
        warm = min(1.0, (t + 1) / self.warmup) if self.warmup and t < self.warmup else 1.0
        progress = min(1.0, max(0, t - self.warmup) / max(1, self.total - self.warmup))
        if c.scheduler == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        elif c.scheduler == "linear":
            shape = 1.0 - progress
        elif c.scheduler == "onecycle":  # linear up over the first quarter from 1/25, then linear down to 0
            p = t / self.total
            shape = 0.04 + 0.96 * p / 0.25 if p < 0.25 else max(0.0, (1 - p) / 0.75)
        elif c.scheduler == "multistep":
            epoch = t / self.steps_per_epoch
            shape = c.gamma ** sum(epoch >= m for m in c.milestones)
        else:  # plateau, none
            shape = 1.0
        return warm * shape * self.scale

    def _apply(self) -> None:
        f = self.factor(self.t)
        for g, base in zip(self.opt.param_groups, self.base):
            g["lr"] = base * f

    def step(self) -> None:
        self.t += 1
        self._apply()

    def end_epoch(self, metrics: dict) -> None:
        """ReduceLROnPlateau's rule (relative threshold 1e-4) on the monitored validation metric."""
        if self.cfg.scheduler != "plateau" or metrics.get(self.cfg.plateau_monitor) is None:
            return
        value = metrics[self.cfg.plateau_monitor]
        minimise = self.cfg.plateau_monitor.endswith("loss")
        better = self.best is None or (value < self.best * (1 - 1e-4) if minimise else value > self.best * (1 + 1e-4))
        if better:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.cfg.plateau_patience:
                self.scale *= self.cfg.plateau_factor
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
