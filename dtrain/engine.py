"""The training loop. It knows an nn.Module, batch iterators and a batch pipeline, never which model,
dataset or logger it is driving.

Position and preemption: `TrainState` counts completed epochs, optimiser steps and the batches done in
the current epoch. A stop signal is honoured at the next optimiser-step boundary (all processes agree),
the main process saves `last.pt` with that position, and a run started with `--resume auto` continues
there, skipping only the batches already done in that one epoch.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from dtrain.checkpoint import atomic_write, rng_state, save_checkpoint, set_rng_state
from dtrain.data.augment import BatchRNG
from dtrain.distributed import gather_samples
from dtrain.ema import WeightAverage
from dtrain.optim import LRSchedule


@dataclass
class TrainState:
    epoch: int = 0              # completed epochs
    step: int = 0               # optimiser steps taken
    batch_in_epoch: int = 0     # batches done in the epoch under way (mid-epoch resume)
    best_acc: float | None = None
    epoch_sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # this process: loss sum, correct, count
    epoch_seconds: float = 0.0


@dataclass
class Evaluation:
    loss: float
    acc: float
    index: torch.Tensor     # dataset indices, sorted
    preds: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor

    def confusion(self, num_classes: int) -> torch.Tensor:
        """rows: true class, columns: predicted class."""
        return torch.bincount(self.targets * num_classes + self.preds,
                              minlength=num_classes * num_classes).view(num_classes, num_classes)


def split_output(out):
    """A model returns logits, or in training (logits, [(weight, aux_logits), ...])."""
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, ()


def eager(model):
    """The module under a torch.compile wrapper (the same parameters), or the model itself."""
    return getattr(model, "_orig_mod", model)


def tta_logits(model, x: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """Mean logits of the image and its mirror; with `shift`, averaged (1/2 each) with those of the image
    moved by -shift and +shift pixels in both axes (reflect padding), as airbench's TTA."""
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format

    def pair(t):
        return (model(t).float() + model(t.flip(3).contiguous(memory_format=fmt)).float()) / 2

    logits = pair(x)
    if shift:
        h, w = x.shape[2:]
        padded = F.pad(x, (shift,) * 4, mode="reflect")
        moved = [padded[:, :, :h, :w], padded[:, :, 2 * shift:, 2 * shift:]]
        logits = logits / 2 + sum(pair(m.contiguous(memory_format=fmt)) for m in moved) / 4
    return logits


def eval_logits(model, x: torch.Tensor, tta: bool = False, tta_shift: int = 0) -> torch.Tensor:
    """float logits of a batch, with the mirror (and shift) test-time augmentation when asked."""
    return tta_logits(model, x, tta_shift) if tta else model(x).float()


@torch.no_grad()
def predict(model, loader, pipeline, accelerator, tta: bool = False, tta_shift: int = 0):
    """Logits for every item of `loader` (an evaluation shard per process), gathered: (index, logits).

    A batch smaller than the loader's batch size (the last one) runs on the eager module under a
    torch.compile wrapper, so a compiled model is never recompiled for it.
    """
    model.eval()
    idx_parts, logit_parts = [], []
    full = getattr(loader, "batch_size", None)
    for x, _, idx in loader.batches():
        x = pipeline(x)
        m = model if full is None or len(x) == full else eager(model)
        with accelerator.autocast():
            logits = eval_logits(m, x, tta, tta_shift)
        idx_parts.append(idx)
        logit_parts.append(logits)
    device = accelerator.device
    idx = torch.cat(idx_parts) if idx_parts else torch.zeros(0, dtype=torch.long, device=device)
    logits = torch.cat(logit_parts) if logit_parts else torch.zeros(0, 0, device=device)
    return gather_samples(accelerator, idx, logits)


def evaluate(model, loader, pipeline, accelerator, labels: torch.Tensor, tta: bool = False,
             tta_shift: int = 0) -> Evaluation:
    index, logits = predict(model, loader, pipeline, accelerator, tta, tta_shift)
    targets = labels.cpu()[index]
    loss = F.cross_entropy(logits, targets).item() if len(index) else float("nan")
    preds = logits.argmax(1)
    acc = (preds == targets).float().mean().item() if len(index) else float("nan")
    return Evaluation(loss, acc, index, preds, targets, logits)


class Trainer:
    def __init__(self, cfg, accelerator, model, raw_model, optimizer, train_loader, val_loader,
                 train_pipeline, eval_pipeline, val_labels, meta: dict, output_dir: Path, reporters, stop):
        self.cfg, self.acc = cfg, accelerator
        self.model, self.raw = model, raw_model          # raw: the module before DDP/compile (same parameters)
        self.opt = optimizer
        self.train_loader, self.val_loader = train_loader, val_loader
        self.train_pipe, self.eval_pipe = train_pipeline, eval_pipeline
        self.val_labels = val_labels
        self.meta, self.out, self.report, self.stop = meta, Path(output_dir), reporters, stop
        self.state = TrainState()
        self.ema = None
        if cfg.ema:
            self.ema = WeightAverage(raw_model, cfg.ema, cfg.lookahead)
        self.rng = BatchRNG(accelerator.device, cfg.seed, accelerator.process_index)
        self.compiled = eager(model) is not model
        self.steps_per_epoch = -(-len(train_loader) // cfg.grad_accum)
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps is not None else total
        self.schedule = LRSchedule(optimizer, cfg, self.steps_per_epoch, self.total_steps)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.first_step_seconds = None
        self.warmup_seconds = None     # fit start to the end of the first optimiser step (compile included)

    # ---- checkpoints -------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        s = self.state
        deploy = self.ema.module if self.ema is not None else self.raw
        state = {**self.meta, "model": deploy.state_dict(),
                 "optimizer": self.opt.state_dict(), "scheduler": self.schedule.state_dict(),
                 "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
                 "epoch": s.epoch, "step": s.step, "batch_in_epoch": s.batch_in_epoch, "best_acc": s.best_acc,
                 "epoch_sums": [float(v) for v in s.epoch_sums], "epoch_seconds": s.epoch_seconds,
                 "rng": rng_state()}
        if self.ema is not None:
            state["train_model"] = self.raw.state_dict()
            state["ema_n"] = int(self.ema.n_averaged.item())
        return state

    def save(self, best: bool = False) -> None:
        """Main process writes last.pt (and best.pt); every process calls this together."""
        if self.acc.is_main_process:
            state = self.checkpoint_state()
            save_checkpoint(self.out / "last.pt", state)
            if best:
                atomic_write(self.out / "best.pt", lambda f: shutil.copyfileobj(open(self.out / "last.pt", "rb"), f))
        self.acc.wait_for_everyone()

    def restore(self, ckpt: dict) -> None:
        self.raw.load_state_dict(ckpt["train_model"] if "train_model" in ckpt else ckpt["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["model"])
            self.ema.load_count(ckpt.get("ema_n", 1))
        self.opt.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["scheduler"])
        if self.acc.scaler is not None and ckpt.get("scaler"):
            self.acc.scaler.load_state_dict(ckpt["scaler"])
        s = self.state
        s.epoch, s.step, s.batch_in_epoch, s.best_acc = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"], ckpt["best_acc"]
        s.epoch_seconds = ckpt.get("epoch_seconds", 0.0)
        if s.batch_in_epoch:  # the partial epoch's sums over all processes: held by one, summed at epoch end
            s.epoch_sums = list(ckpt["epoch_sums"]) if self.acc.is_main_process else [0.0, 0.0, 0.0]
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])

    # ---- the loop ----------------------------------------------------------------------------------
    def train_step(self, x, y, sync: bool):
        ctx = contextlib.nullcontext() if sync else self.acc.no_sync(self.model)
        # a compiled model keeps the shape of a full batch; the epoch's short last batch runs eagerly
        model = self.model if not self.compiled or len(x) == self.train_loader.batch_size else eager(self.model)
        with ctx:
            logits, aux = split_output(model(x))
            loss = self.criterion(logits.float(), y)
            for weight, aux_logits in aux:
                loss = loss + weight * self.criterion(aux_logits.float(), y)
            self.acc.backward(loss / self.cfg.grad_accum)
        return loss.detach(), (logits.argmax(1) == y).sum()

    def optimizer_step(self) -> None:
        if self.cfg.grad_clip:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.ema is not None:
            self.ema.update_parameters(self.raw, (self.state.step + 1) / self.total_steps)
        self.state.step += 1

    @torch.no_grad()
    def warm_up_eval(self) -> None:
        """Compile the evaluation graph before the clock runs: one forward of a validation batch in eval
        mode, no gradients (no state changes: BatchNorm uses its running statistics)."""
        model = self.ema.module if self.ema is not None else self.model
        if eager(model) is model or not len(self.val_loader):
            return
        x = next(iter(self.val_loader.batches()))[0]
        if len(x) == getattr(self.val_loader, "batch_size", len(x)):
            model.eval()
            with self.acc.autocast():
                eval_logits(model, self.eval_pipe(x), self.cfg.tta, self.cfg.tta_shift)
        self.model.train()

    def _sync(self) -> None:
        if self.acc.device.type == "cuda":
            torch.cuda.synchronize(self.acc.device)

    def fit(self) -> dict:
        cfg, s, acc = self.cfg, self.state, self.acc
        stopped_by = 0
        t_start = self.t_fit = time.perf_counter()
        last_eval = None
        if self.compiled:
            self.warm_up_eval()
        while s.epoch < cfg.epochs and s.step < self.total_steps and not stopped_by:
            epoch = s.epoch
            nb = len(self.train_loader)
            self.report.begin_epoch(epoch + 1, cfg.epochs, nb, s.batch_in_epoch)
            self.model.train()
            sums = torch.tensor(s.epoch_sums, device=acc.device, dtype=torch.float64)
            t0, t_log, seen_log = time.perf_counter(), time.perf_counter(), 0
            for b, (x, y, _) in enumerate(self.train_loader.batches(epoch, s.batch_in_epoch), s.batch_in_epoch):
                t_step = time.perf_counter()
                x = self.train_pipe(x, self.rng.batch(epoch, b))
                sync = (b + 1) % cfg.grad_accum == 0 or b + 1 == nb
                loss, correct = self.train_step(x, y, sync)
                # torch.full, not torch.tensor: a blocking host-to-device copy would sync every step
                sums += torch.stack([loss.double() * len(y), correct.double(),
                                     torch.full((), float(len(y)), device=acc.device, dtype=torch.float64)])
                seen_log += len(y)
                if not sync:
                    continue
                self.optimizer_step()
                s.batch_in_epoch = b + 1
                if self.first_step_seconds is None:  # one synchronisation per run, to time the warm-up
                    self._sync()
                    self.first_step_seconds = time.perf_counter() - t_step
                    self.warmup_seconds = time.perf_counter() - t_start
                if s.step % cfg.log_every == 0 or s.batch_in_epoch == nb:
                    now = time.perf_counter()
                    self.report.step(s.step, {"loss": loss.item(), "lr": self.schedule.lr, "batch": b + 1,
                                              "epoch": epoch + 1,
                                              "images_per_second": seen_log * acc.num_processes / (now - t_log)})
                    t_log, seen_log = now, 0
                stopped_by = self.stop.requested()
                if stopped_by or s.step >= self.total_steps:
                    break
            s.epoch_seconds += time.perf_counter() - t0
            s.epoch_sums = sums.tolist()
            if stopped_by:  # save the position mid-epoch and leave; --resume auto continues here
                s.epoch_sums = acc.reduce(sums, reduction="sum").tolist()
                self.report.end_epoch()
                self.save()
                self.report.message(f"stopped by signal {stopped_by} at step {s.step} (epoch {epoch + 1}, batch "
                                    f"{s.batch_in_epoch}/{nb}); {self.out / 'last.pt'} saved, continue with "
                                    f"--resume auto --output-dir {self.out}")
                break
            last_eval = self.end_epoch(epoch, sums, finished=s.batch_in_epoch >= nb)
        summary = {"steps": s.step, "epochs": s.epoch, "best_acc": s.best_acc, "stopped_by_signal": stopped_by,
                   "train_seconds": time.perf_counter() - t_start, "first_step_seconds": self.first_step_seconds,
                   "warmup_seconds": self.warmup_seconds,
                   "steady_seconds": time.perf_counter() - t_start - (self.warmup_seconds or 0.0),
                   "output_dir": str(self.out)}
        if not stopped_by:
            self.report.end(summary, last_eval)
        return summary

    def end_epoch(self, epoch: int, sums: torch.Tensor, finished: bool) -> Evaluation | None:
        cfg, s, acc = self.cfg, self.state, self.acc
        total = acc.reduce(sums, reduction="sum").tolist()
        last = s.epoch + 1 >= cfg.epochs or s.step >= self.total_steps
        ev = None
        t_eval = time.perf_counter()
        if (epoch + 1) % cfg.eval_every == 0 or last:
            model = self.ema.module if self.ema is not None else self.model
            ev = evaluate(model, self.val_loader, self.eval_pipe, acc, self.val_labels, cfg.tta,
                          cfg.tta_shift)
        row = {"epoch": epoch + 1, "step": s.step,
               "train_loss": total[0] / max(total[2], 1), "train_acc": total[1] / max(total[2], 1),
               "val_loss": ev.loss if ev else None, "val_acc": ev.acc if ev else None, "lr": self.schedule.lr,
               "epoch_seconds": s.epoch_seconds, "eval_seconds": time.perf_counter() - t_eval,
               "images_per_second": total[2] / s.epoch_seconds if s.epoch_seconds else None,
               "train_samples": int(total[2]), "val_samples": len(ev.index) if ev else None,
               "elapsed_seconds": time.perf_counter() - self.t_fit, "warmup_seconds": self.warmup_seconds}
        self.schedule.end_epoch(row)
        best = ev is not None and (s.best_acc is None or ev.acc > s.best_acc)
        if best:
            s.best_acc = ev.acc
        self.report.epoch(row, ev)
        if finished:
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
            s.epoch_sums, s.epoch_seconds = [0.0, 0.0, 0.0], 0.0
        else:  # stopped mid-epoch by --max-steps: a resumed run completes this epoch's figures
            s.epoch_sums = total
        if best or last or not finished or (epoch + 1) % cfg.save_every == 0:
            self.save(best=best)
        return ev
