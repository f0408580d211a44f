"""The training loop. It knows an nn.Module, batch iterators and a batch pipeline, never which model,
dataset or logger it is driving.

Position and preemption: `TrainState` counts completed epochs, optimiser steps and the batches done in
the current epoch. A stop signal is honoured at the next optimiser-step boundary (all processes agree),
the main process saves `last.pt` with that position, and a run started with `--resume auto` continues
there, skipping only the batches already done in that one epoch. With --save-every-minutes the main
process's clock asks for the same save mid-epoch (the flag shares the stop signal's all-reduce) and
training goes on.

Divergence: a non-finite loss is looked for where the loop reads device values already (the loss of a
log step, the epoch's sums when they are reduced), so it costs no synchronisation; the flag shares the
stop signal's all-reduce, so every process stops at the same step with TrainingDiverged, which names the
last good checkpoint. A save checks the weights first and refuses non-finite ones (`checkpoint.all_finite`).
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.checkpoint import all_finite, atomic_write, save_checkpoint, training_state
from dtrain.data.augment import BatchRNG
from dtrain.distributed import gather_samples, run_on_main, sync_buffers
from dtrain.ema import WeightAverage
from dtrain.errors import TrainingDiverged
from dtrain.models import training_loss
from dtrain.optim import LRSchedule, ScheduleSpec

# Under fp16 the run has diverged when the GradScaler's scale has fallen below this: it halves on every
# overflowed step from 2**16, so nearly every step for a while had inf/NaN gradients.
MIN_SCALE = 1.0


class EpochMeter:
    """Training loss sum, correct predictions, sample count and skipped optimiser steps of the epoch under
    way, as one float64 tensor on the device (adding a batch never waits for the device).

    Under fp16's GradScaler a batch whose loss is not finite is left out of the sums (its step is skipped,
    not trained on); every process skips the same steps, so only the main process counts them."""

    SIZE = 4

    def __init__(self, device="cpu", values=(0.0, 0.0, 0.0, 0.0)):
        values = list(values) + [0.0] * (self.SIZE - len(values))  # checkpoints before the skipped count
        self.sums = torch.tensor(values, dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, correct: torch.Tensor, n: int, finite_only: bool = False) -> None:
        # torch.full, not torch.tensor: a blocking host-to-device copy would sync every step
        count = torch.full((), float(n), device=self.sums.device, dtype=torch.float64)
        loss, correct = loss.double() * n, correct.double()
        if finite_only:
            finite = torch.isfinite(loss)
            loss, correct, count = (torch.where(finite, v, 0.0) for v in (loss, correct, count))
        self.sums[:3] += torch.stack([loss, correct, count])

    def add_skipped(self, skipped: torch.Tensor) -> None:
        self.sums[3] += skipped.double()

    def to(self, device) -> "EpochMeter":
        return EpochMeter(device, self.to_list())

    def reduced(self, accelerator) -> "EpochMeter":
        """The sums over all processes."""
        return EpochMeter(self.sums.device, accelerator.reduce(self.sums, reduction="sum").tolist())

    def to_list(self) -> list[float]:
        return [float(v) for v in self.sums.tolist()]

    def load(self, values) -> None:
        self.sums = EpochMeter(self.sums.device, values).sums

    @property
    def count(self) -> int:
        return int(self.sums[2].item())

    @property
    def mean_loss(self) -> float:
        loss, _, count, _ = self.to_list()
        return loss / max(count, 1)

    @property
    def accuracy(self) -> float:
        _, correct, count, _ = self.to_list()
        return correct / max(count, 1)

    @property
    def skipped(self) -> int:
        return int(self.to_list()[3])


@dataclass
class TrainState:
    epoch: int = 0              # completed epochs
    step: int = 0               # optimiser steps taken
    batch_in_epoch: int = 0     # batches done in the epoch under way (mid-epoch resume)
    best_acc: float | None = None
    best_step: int | None = None  # the step of the state that scored best_acc (best.pt's)
    meter: EpochMeter = field(default_factory=EpochMeter)  # this process's sums for the epoch under way
    epoch_seconds: float = 0.0


@dataclass
class TrainParts:
    """What a Trainer trains, built by the caller (dtrain.main.build_model and build_data)."""
    model: nn.Module            # the module the forward pass runs: under DDP / torch.compile wrappers
    raw: nn.Module              # the module beneath the wrappers (the same parameters): EMA, checkpoints, hooks
    optimizer: torch.optim.Optimizer
    train_loader: Any           # .batches(epoch, start) -> (x, y, index); len(); .batch_size
    val_loader: Any
    train_pipe: Any             # device-side augmentation + normalisation: pipe(x, generator)
    eval_pipe: Any
    val_labels: torch.Tensor
    meta: dict                  # checkpoint.model_meta: saved in every checkpoint
    compile: Callable[[nn.Module], nn.Module] | None = None  # how the evaluated module is compiled (if it is)


class Clock:
    """The timers of a fit: its start, the first optimiser step, and the window of the last log line."""

    def __init__(self):
        self.start = self.window_start = time.perf_counter()
        self.window_images = 0
        self.first_step_seconds = None
        self.warmup_seconds = None   # fit start to the end of the first optimiser step (compile included)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def first_step_done(self, step_started: float) -> None:
        now = time.perf_counter()
        self.first_step_seconds, self.warmup_seconds = now - step_started, now - self.start

    def images_per_second(self, processes: int) -> float:
        """Over every process, since the previous call (or the epoch's start); starts a new window."""
        now = time.perf_counter()
        rate = self.window_images * processes / (now - self.window_start)
        self.window_start, self.window_images = now, 0
        return rate

    def new_window(self) -> None:
        self.window_start, self.window_images = time.perf_counter(), 0


@dataclass
class Evaluation:
    loss: float
    acc: float
    index: torch.Tensor     # dataset indices, sorted
    preds: torch.Tensor
    targets: torch.Tensor
    top5: float | None = None   # top-5 accuracy, for more than 5 classes

    def confusion(self, num_classes: int) -> torch.Tensor:
        """rows: true class, columns: predicted class."""
        return torch.bincount(self.targets * num_classes + self.preds,
                              minlength=num_classes * num_classes).view(num_classes, num_classes)


def eager(model):
    """The module under a torch.compile wrapper (the same parameters), or the model itself."""
    return getattr(model, "_orig_mod", model)


def for_batch(model, n: int, full: int | None):
    """The module to run a batch of `n` on: a compiled model keeps the shape of a full batch, so a shorter
    one (an epoch's last) runs on the eager module beneath it rather than compiling a second graph."""
    return model if full is None or n == full else eager(model)


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
    """Logits for every item of `loader` (an evaluation shard per process), gathered: (index, logits)."""
    model.eval()
    idx_parts, logit_parts = [], []
    full = getattr(loader, "batch_size", None)
    for x, _, idx in loader.batches():
        x = pipeline(x)
        with accelerator.autocast():
            logits = eval_logits(for_batch(model, len(x), full), x, tta, tta_shift)
        idx_parts.append(idx)
        logit_parts.append(logits)
    device = accelerator.device
    idx = torch.cat(idx_parts) if idx_parts else torch.zeros(0, dtype=torch.long, device=device)
    logits = torch.cat(logit_parts) if logit_parts else torch.zeros(0, 0, device=device)
    return gather_samples(accelerator, idx, logits)


def top_k_accuracy(logits: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor, k: int) -> float:
    """Share of samples whose class is among the k highest logits (or is the top-1 prediction, so that
    ties never make top-k lower than top-1)."""
    hit = (logits.topk(k, dim=1).indices == targets[:, None]).any(1) | (preds == targets)
    return hit.float().mean().item()


def evaluate(model, loader, pipeline, accelerator, labels: torch.Tensor, tta: bool = False,
             tta_shift: int = 0) -> Evaluation:
    index, logits = predict(model, loader, pipeline, accelerator, tta, tta_shift)
    targets = labels.cpu()[index]
    loss = F.cross_entropy(logits, targets).item() if len(index) else float("nan")
    preds = logits.argmax(1)
    acc = (preds == targets).float().mean().item() if len(index) else float("nan")
    top5 = top_k_accuracy(logits, targets, preds, 5) if len(index) and logits.shape[1] > 5 else None
    return Evaluation(loss, acc, index, preds, targets, top5)


class Trainer:
    """`Trainer(cfg, accelerator, parts, output_dir, reporters, stop).fit()`; checkpoint.restore_training
    puts it back at a saved position before `fit`."""

    def __init__(self, cfg, accelerator, parts: TrainParts, output_dir: Path, reporters, stop):
        self.cfg, self.acc = cfg, accelerator
        self.model, self.raw, self.opt = parts.model, parts.raw, parts.optimizer
        self.train_loader, self.val_loader = parts.train_loader, parts.val_loader
        self.train_pipe, self.eval_pipe = parts.train_pipe, parts.eval_pipe
        self.val_labels, self.meta = parts.val_labels, parts.meta
        self.out, self.report, self.stop = Path(output_dir), reporters, stop
        self.state = TrainState()
        self.ema = WeightAverage(self.raw, cfg.ema, cfg.lookahead) if cfg.ema else None
        # evaluation runs the module beneath DDP (no collective in its forward, so a process with an empty
        # validation shard makes the same calls as the others), after its buffers are made rank 0's
        self.eval_module = self.ema.module if self.ema is not None else self.raw
        self.eval_model = parts.compile(self.eval_module) if parts.compile else self.eval_module
        self.scaler = accelerator.scaler  # fp16's GradScaler, or None
        self.rng = BatchRNG(accelerator.device, cfg.seed, accelerator.process_index)
        self.steps_per_epoch = -(-len(self.train_loader) // cfg.grad_accum)
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps is not None else total
        self.schedule = LRSchedule(self.opt, ScheduleSpec.from_config(cfg), self.steps_per_epoch, self.total_steps)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.clock = Clock()
        self.save_interval = cfg.save_every_minutes * 60 if cfg.save_every_minutes else None
        self.last_save = time.monotonic()
        self.last_good = None       # (path, epoch, step, batch_in_epoch) of the last checkpoint written or resumed

    def save(self, best: bool = False) -> None:
        """The main process writes last.pt, then copies it to best.pt (the order dtrain.checkpoint explains);
        every process calls this together, and every one raises an error the main process's write met
        (a UserError) or TrainingDiverged when the weights are not finite (nothing is written then)."""
        s = self.state
        if not run_on_main(self.acc, lambda: self._write(best)):
            raise self.diverged(f"the weights became NaN or infinite by step {s.step} (epoch "
                                f"{s.epoch + (s.batch_in_epoch > 0)})")
        self.last_good = (self.out / "last.pt", s.epoch, s.step, s.batch_in_epoch)
        self.last_save = time.monotonic()

    def _write(self, best: bool) -> bool:
        state = training_state(self)
        if not all_finite(state["model"], state.get("train_model"), state["optimizer"]):
            return False
        save_checkpoint(self.out / "last.pt", {**self.meta, **state})
        if best:
            atomic_write(self.out / "best.pt", lambda f: shutil.copyfileobj(open(self.out / "last.pt", "rb"), f))
        return True

    def position(self, epoch: int, step: int, batch_in_epoch: int) -> str:
        if not batch_in_epoch:
            return f"end of epoch {epoch}, step {step}"
        return f"epoch {epoch + 1}, batch {batch_in_epoch}/{len(self.train_loader)}, step {step}"

    def diverged(self, what: str) -> TrainingDiverged:
        """The error that ends a diverged run: what happened, what is kept, what to change."""
        self.report.end_epoch()
        if self.last_good is None:
            kept = "no checkpoint was saved before it, so there is nothing to resume"
        else:
            path, epoch, step, batch = self.last_good
            kept = f"the last good checkpoint is {path} ({self.position(epoch, step, batch)})"
        return TrainingDiverged(f"{what}: stopped without saving; {kept}; lower --lr, add --grad-clip, or warm up "
                                f"(--warmup-epochs)")

    def reduced_sums(self, meter: EpochMeter) -> EpochMeter:
        """The epoch's sums over all processes (every process calls this together); a non-finite loss sum
        is a divergence."""
        total = meter.reduced(self.acc)
        if not math.isfinite(total.to_list()[0]) or self.scale_collapsed():
            s = self.state
            raise self.diverged(f"the training loss became NaN or infinite in epoch {s.epoch + 1} (by step "
                                f"{s.step})")
        return total

    # ---- one step ----------------------------------------------------------------------------------
    def train_step(self, x, y, sync: bool):
        ctx = contextlib.nullcontext() if sync else self.acc.no_sync(self.model)
        model = for_batch(self.model, len(x), self.train_loader.batch_size)
        with ctx:
            loss, logits = training_loss(self.raw, model(x), y, self.criterion)
            self.acc.backward(loss / self.cfg.grad_accum)
        return loss.detach(), (logits.argmax(1) == y).sum()

    def optimizer_step(self) -> torch.Tensor | None:
        """Clip, step, schedule, average. Under fp16's GradScaler returns whether the scaler skipped the
        step (a device tensor: the scale went down, which it does only on inf/NaN gradients), else None."""
        scale = self.scaler._scale.clone() if self.scaler is not None else None  # no sync: get_scale() would
        if self.cfg.grad_clip:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.ema is not None:
            self.ema.update_parameters(self.raw, (self.state.step + 1) / self.total_steps)
        self.state.step += 1
        return None if scale is None else self.scaler._scale < scale

    def scale_collapsed(self) -> bool:
        """Under fp16: whether the GradScaler's scale fell below MIN_SCALE (nearly every step overflowed:
        the loss stays non-finite). Reads the scale: call it where the loop synchronises anyway."""
        return self.scaler is not None and self.scaler.get_scale() < MIN_SCALE

    def end_accumulation(self, epoch: int, b: int, nb: int, loss: torch.Tensor, batch_started: float,
                         meter: EpochMeter):
        """The optimiser step after the last micro-batch of an accumulation, its timing and log line;
        returns what all processes agree on (preempt.Agreement: a stop signal, a timed save), or raises
        TrainingDiverged when the loss a log step read was not finite on any process (under fp16's
        GradScaler: not finite and the scale collapsed; a single non-finite loss is a skipped step)."""
        s = self.state
        skipped = self.optimizer_step()
        if skipped is not None and self.acc.is_main_process:
            meter.add_skipped(skipped)
        s.batch_in_epoch = b + 1
        if self.clock.first_step_seconds is None:  # one synchronisation per run, to time the warm-up
            self._sync()
            self.clock.first_step_done(batch_started)
        diverged = False
        if s.step % self.cfg.log_every == 0 or s.batch_in_epoch == nb:
            loss_value = loss.item()
            diverged = not math.isfinite(loss_value) and (self.scaler is None or self.scale_collapsed())
            self.report.step(s.step, {"loss": loss_value, "lr": self.schedule.lr, "batch": b + 1,
                                      "epoch": epoch + 1,
                                      "images_per_second": self.clock.images_per_second(self.acc.num_processes)})
        save_due = (self.save_interval is not None and self.acc.is_main_process
                    and time.monotonic() - self.last_save >= self.save_interval)
        return self.acted_on(self.stop.exchange(diverged=diverged, save_due=save_due))

    def acted_on(self, agreed):
        """The agreement, after raising TrainingDiverged when it says the loss diverged."""
        if agreed.diverged:
            s = self.state
            raise self.diverged(f"the training loss became NaN or infinite by step {s.step} (epoch {s.epoch + 1})")
        return agreed

    @torch.no_grad()
    def warm_up_eval(self) -> None:
        """Compile the evaluation graph before the clock runs: one forward of a validation batch in eval
        mode, no gradients (no state changes: BatchNorm uses its running statistics)."""
        model = self.eval_model
        if eager(model) is model or not len(self.val_loader):
            return
        x = next(iter(self.val_loader.batches()))[0]
        if for_batch(model, len(x), getattr(self.val_loader, "batch_size", None)) is model:
            model.eval()
            with self.acc.autocast():
                eval_logits(model, self.eval_pipe(x), self.cfg.tta, self.cfg.tta_shift)
        self.model.train()

    def _sync(self) -> None:
        if self.acc.device.type == "cuda":
            torch.cuda.synchronize(self.acc.device)

    # ---- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        s = self.state
        self.clock = Clock()
        self.last_save = time.monotonic()
        stopped_by, last_eval = 0, None
        if eager(self.eval_model) is not self.eval_model:
            self.warm_up_eval()
        try:
            while s.epoch < self.cfg.epochs and s.step < self.total_steps:
                stopped_by = self.train_epoch()
                if stopped_by:
                    self.leave_on_signal(stopped_by)
                    break
                last_eval = self.end_epoch()
        except TrainingDiverged:
            self.acc.end_training()  # every process stops at this point: they leave the process group together
            raise
        elapsed = self.clock.elapsed()
        summary = {"steps": s.step, "epochs": s.epoch, "best_acc": s.best_acc, "stopped_by_signal": stopped_by,
                   "train_seconds": elapsed, "first_step_seconds": self.clock.first_step_seconds,
                   "warmup_seconds": self.clock.warmup_seconds,
                   "steady_seconds": elapsed - (self.clock.warmup_seconds or 0.0), "output_dir": str(self.out)}
        if not stopped_by:
            self.report.end(summary, last_eval)
        return summary

    def train_epoch(self) -> int:
        """Train from the saved position to the end of the epoch, --max-steps or a stop signal (returned)."""
        s, cfg, epoch, nb = self.state, self.cfg, self.state.epoch, len(self.train_loader)
        self.report.begin_epoch(epoch + 1, cfg.epochs, nb, s.batch_in_epoch)
        self.model.train()
        meter = s.meter.to(self.acc.device)
        stopped_by, seconds_before, t0 = 0, s.epoch_seconds, time.perf_counter()
        self.clock.new_window()
        for b, (x, y, _) in enumerate(self.train_loader.batches(epoch, s.batch_in_epoch), s.batch_in_epoch):
            batch_started = time.perf_counter()
            x = self.train_pipe(x, self.rng.batch(epoch, b))
            sync = (b + 1) % cfg.grad_accum == 0 or b + 1 == nb
            loss, correct = self.train_step(x, y, sync)
            meter.add(loss, correct, len(y), finite_only=self.scaler is not None)
            self.clock.window_images += len(y)
            if sync:
                agreed = self.end_accumulation(epoch, b, nb, loss, batch_started, meter)
                stopped_by = agreed.signum
                if stopped_by or s.step >= self.total_steps:
                    break
                if agreed.save_due and s.batch_in_epoch < nb:
                    self.save_mid_epoch(meter, seconds_before + time.perf_counter() - t0)
        if not stopped_by:  # the last step's flags, still in flight on several processes
            stopped_by = self.acted_on(self.stop.settle()).signum
        s.epoch_seconds = seconds_before + time.perf_counter() - t0
        s.meter = meter
        return stopped_by

    def save_mid_epoch(self, meter: EpochMeter, epoch_seconds: float) -> None:
        """The timed save of --save-every-minutes, at a step boundary; training goes on (train_epoch puts
        this process's own sums back at the epoch's end)."""
        s = self.state
        s.meter, s.epoch_seconds = self.reduced_sums(meter), epoch_seconds
        self.save()

    def leave_on_signal(self, signal: int) -> None:
        """Save the position mid-epoch; --resume auto continues there."""
        s = self.state
        s.meter = self.reduced_sums(s.meter)
        self.report.end_epoch()
        self.save()
        self.report.message(f"stopped by signal {signal} at step {s.step} (epoch {s.epoch + 1}, batch "
                            f"{s.batch_in_epoch}/{len(self.train_loader)}); {self.out / 'last.pt'} saved, continue "
                            f"with --resume auto --output-dir {self.out}")

    def end_epoch(self) -> Evaluation | None:
        cfg, s = self.cfg, self.state
        epoch, finished = s.epoch, s.batch_in_epoch >= len(self.train_loader)
        total = self.reduced_sums(s.meter)
        last = s.epoch + 1 >= cfg.epochs or s.step >= self.total_steps
        ev = None
        t_eval = time.perf_counter()
        if (epoch + 1) % cfg.eval_every == 0 or last:
            sync_buffers(self.acc, self.eval_module)  # BatchNorm statistics (EMA's too): rank 0's, as saved
            ev = evaluate(self.eval_model, self.val_loader, self.eval_pipe, self.acc, self.val_labels, cfg.tta,
                          cfg.tta_shift)
        row = {"epoch": epoch + 1, "step": s.step, "train_loss": total.mean_loss, "train_acc": total.accuracy,
               "val_loss": ev.loss if ev else None, "val_acc": ev.acc if ev else None,
               "val_top5": ev.top5 if ev else None, "lr": self.schedule.lr,
               "epoch_seconds": s.epoch_seconds, "eval_seconds": time.perf_counter() - t_eval,
               "images_per_second": total.count / s.epoch_seconds if s.epoch_seconds else None,
               "train_samples": total.count, "val_samples": len(ev.index) if ev else None,
               "skipped_steps": total.skipped if self.scaler is not None else None,
               "elapsed_seconds": self.clock.elapsed(), "warmup_seconds": self.clock.warmup_seconds}
        self.schedule.end_epoch(row)
        best = ev is not None and (s.best_acc is None or ev.acc > s.best_acc)
        if best:
            s.best_acc, s.best_step = ev.acc, s.step
        self.report.epoch(row, ev)
        if finished:
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
            s.meter, s.epoch_seconds = EpochMeter(), 0.0
        else:  # stopped mid-epoch by --max-steps: a resumed run completes this epoch's figures
            s.meter = total
        if best or last or not finished or (epoch + 1) % cfg.save_every == 0:
            self.save(best=best)
        return ev
