"""The training loop. It knows an nn.Module, batch iterators and a batch pipeline, never which model,
dataset or logger it is driving.

Position and preemption: `TrainState` counts completed epochs, optimiser steps and the batches done in
the current epoch. A stop signal is honoured at an optimiser-step boundary that every process agrees on
(dtrain.preempt), the main process saves `last.pt` with that position, and a run started with `--resume
auto` continues there, skipping only the batches already done in that one epoch. With
--save-every-minutes the main process's clock asks for the same save mid-epoch (the flag travels with the
stop signal's) and training goes on. `Trainer.state_dict` / `load_state_dict` are the whole of a run's
position; the Checkpointer decides where and when it is written.

Divergence: a non-finite loss is looked for where the loop reads device values already (the loss of a
log step, the epoch's sums when they are reduced), so it costs no synchronisation; the flag travels with
the stop signal's, so every process stops at the same step with TrainingDiverged, which names the last
good checkpoint. Under fp16's GradScaler a non-finite loss is a skipped step, and the run has diverged
only once the scale has collapsed (MIN_SCALE). A save checks the weights first and refuses non-finite ones.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from dtrain.checkpointer import Checkpointer
from dtrain.data.augment import BatchRNG
from dtrain.distributed import run_on_main, sync_buffers
from dtrain import sam
from dtrain.ema import WeightAverage
from dtrain.epoch_row import epoch_row
from dtrain.errors import TrainingDiverged, UserError, out_of_memory
from dtrain.inference import Evaluation, eager, eval_logits, evaluate, module_for
from dtrain.models import training_loss
from dtrain.optim import LRSchedule, ScheduleSpec
from dtrain.swa import SWA

# Under fp16 the run has diverged when the GradScaler's scale has fallen below this: it halves on every
# overflowed step from 2**16, so nearly every step for a while had inf/NaN gradients.
MIN_SCALE = 1.0


class EpochMeter:
    """Training loss sum, correct predictions, sample count and skipped optimiser steps of the epoch under
    way, as one float64 tensor on the device (adding a batch never waits for the device).

    Under fp16's GradScaler a batch whose loss is not finite is left out of the sums (its step is skipped,
    not trained on); every process skips the same steps, so only the main process counts them."""

    SIZE = 4

    def __init__(self, device="cpu", values=None):
        if values is None:  # zeros made on the device: no copy from the host
            self.sums = torch.zeros(self.SIZE, dtype=torch.float64, device=device)
        else:
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
        if self.sums.device == torch.device(device):
            return self
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

    @property
    def position(self) -> tuple[int, int, int]:
        return self.epoch, self.step, self.batch_in_epoch


@dataclass(frozen=True)
class LoopSpec:
    """What the loop needs from the Config."""
    epochs: int
    max_steps: int | None
    grad_accum: int
    grad_clip: float | None
    label_smoothing: float
    ema: float | None
    lookahead: int
    seed: int
    log_every: int
    eval_every: int
    save_every: int
    tta: bool
    tta_shift: int
    sam: float | None = None            # SAM's rho (dtrain.sam), None: off
    sam_adaptive: bool = False
    swa_start: int | None = None        # SWA: average the weights from this epoch on (dtrain.swa), None: off

    @classmethod
    def from_config(cls, cfg) -> "LoopSpec":
        return cls(cfg.epochs, cfg.max_steps, cfg.grad_accum, cfg.grad_clip, cfg.label_smoothing, cfg.ema,
                   cfg.lookahead, cfg.seed, cfg.log_every, cfg.eval_every, cfg.save_every, cfg.tta, cfg.tta_shift,
                   cfg.sam, cfg.sam_adaptive, cfg.swa_start)


@dataclass
class TrainParts:
    """What a Trainer trains, built by the caller (dtrain.main)."""
    model: nn.Module            # the module the forward pass runs: under DDP / torch.compile wrappers
    module: nn.Module           # the module beneath the wrappers (the same parameters): EMA, checkpoints, hooks
    optimizer: torch.optim.Optimizer
    train_loader: Any           # .batches(epoch, start) -> (x, y, index); len(); .batch_size
    val_loader: Any
    train_pipe: Any             # device-side augmentation + normalisation: pipe(x, generator)
    eval_pipe: Any
    val_labels: torch.Tensor
    compile: Callable[[nn.Module], nn.Module] | None = None  # how the evaluated module is compiled (if it is)
    mix: Callable | None = None  # MixUp/CutMix: mix(x, y, epoch, batch) -> (x, soft targets) (dtrain.data.mixing)


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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    """`Trainer(spec, schedule, accelerator, parts, checkpointer, reporters, stop).fit()`; `resume_from`
    puts it back at a saved position before `fit`."""

    def __init__(self, spec: LoopSpec, schedule: ScheduleSpec, accelerator, parts: TrainParts,
                 checkpointer: Checkpointer, reporters, stop):
        self.spec, self.acc = spec, accelerator
        self.model, self.module, self.opt = parts.model, parts.module, parts.optimizer
        self.train_loader, self.val_loader = parts.train_loader, parts.val_loader
        self.train_pipe, self.eval_pipe, self.val_labels = parts.train_pipe, parts.eval_pipe, parts.val_labels
        self.checkpoints, self.report, self.stop = checkpointer, reporters, stop
        self.state = TrainState(meter=EpochMeter(accelerator.device))
        self.ema = WeightAverage(self.module, spec.ema, spec.lookahead) if spec.ema else None
        # evaluation runs the module beneath DDP (no collective in its forward, so a process with an empty
        # validation shard makes the same calls as the others), after its buffers are made rank 0's
        self.swa = SWA(self.module) if spec.swa_start is not None else None
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.trained_params = [p for _, p in named]
        # ASAM scales the layers' weights (names with "weight", as its authors' code), not the biases
        self.asam_weights = ["weight" in n for n, _ in named] if spec.sam_adaptive else None
        self._compile = parts.compile or (lambda m: m)
        self.train_eval_module = self.ema.module if self.ema is not None else self.module
        self.train_eval_model = self._compile(self.train_eval_module)
        self.scaler = accelerator.scaler  # fp16's GradScaler, or None
        self.rng = BatchRNG(accelerator.device, spec.seed)
        self.steps_per_epoch = -(-len(self.train_loader) // spec.grad_accum)
        total = spec.epochs * self.steps_per_epoch
        self.total_steps = min(total, spec.max_steps) if spec.max_steps is not None else total
        self.schedule = LRSchedule(self.opt, schedule, self.steps_per_epoch, self.total_steps)
        self.mix = parts.mix
        # mixed batches come with soft targets that carry the label smoothing already
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.0 if self.mix else spec.label_smoothing)
        self.clock = Clock()

    @property
    def averaging(self) -> bool:
        """Whether SWA's average is what the run evaluates and saves (once it holds weights)."""
        return self.swa is not None and self.swa.count > 0

    @property
    def eval_module(self) -> nn.Module:
        """The module evaluated and saved as "model": SWA's average, the EMA, or the trained module."""
        return self.swa.module if self.averaging else self.train_eval_module

    @property
    def eval_model(self) -> nn.Module:
        return self.swa.compiled(self._compile) if self.averaging else self.train_eval_model

    # ---- the state of a run ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The training position: weights (the average's as "model" with --ema), optimiser, schedule,
        scaler, counters, the epoch's sums and the RNG; see dtrain.checkpoint for the keys."""
        s, ema = self.state, self.ema
        state = {"model": self.eval_module.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.schedule.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "epoch": s.epoch, "step": s.step, "batch_in_epoch": s.batch_in_epoch, "best_acc": s.best_acc,
                 "best_step": s.best_step, "epoch_sums": s.meter.to_list(), "epoch_seconds": s.epoch_seconds,
                 "rng": rng_state()}
        if ema is not None or self.averaging:
            state["train_model"] = self.module.state_dict()
        if ema is not None:
            state["ema_n"] = int(ema.n_averaged.item())
        if self.swa is not None:
            state["swa"] = self.swa.state_dict()
        return state

    def load_state_dict(self, ckpt: dict) -> None:
        """Put the Trainer back at the position `state_dict` saved. The optimiser keeps this run's settings
        (momentum, weight decay, ...: the settings a resumed run may change) and takes the checkpoint's state."""
        try:
            self.module.load_state_dict(ckpt["train_model"] if "train_model" in ckpt else ckpt["model"])
            if self.ema is not None:
                self.ema.module.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(f"the checkpoint's weights do not fit this model: {str(e).strip().splitlines()[0]}; "
                            f"resume with the settings it was trained with, or start a fresh run") from None
        if self.ema is not None:
            self.ema.load_count(ckpt.get("ema_n", 1))
        if self.swa is not None and ckpt.get("swa"):
            self.swa.load_state_dict(ckpt["swa"])
        self._load_optimizer(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        s = self.state
        s.epoch, s.step, s.batch_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]
        s.best_acc, s.best_step = ckpt["best_acc"], ckpt.get("best_step")
        s.epoch_seconds = ckpt.get("epoch_seconds", 0.0)
        if s.batch_in_epoch and self.acc.is_main_process:  # the partial epoch's sums: held by one process
            s.meter.load(ckpt["epoch_sums"])
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])

    def _load_optimizer(self, state: dict) -> None:
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        try:
            self.opt.load_state_dict(state)
        except ValueError as e:  # parameter groups of other sizes
            raise UserError(f"the checkpoint's optimiser state does not fit this run's: {e}; resume with the "
                            f"settings it was trained with, or start a fresh run") from None
        for group, mine in zip(self.opt.param_groups, settings):
            group.update(mine)

    def resume_from(self, resume) -> None:
        """Continue from a dtrain.resume.Resume: its state, and the checkpointer's record of it (best.pt
        repaired where a stop fell between the two writes)."""
        self.load_state_dict(resume.checkpoint)
        if self.checkpoints.resumed(resume.path, resume.checkpoint):
            self.report.message(f"{self.checkpoints.best} was older than the best state {resume.path} records "
                                f"(a stop between the two writes): rewritten from {resume.path}")

    def save(self, best: bool = False) -> None:
        """Every process together: last.pt (and best.pt); TrainingDiverged when the weights are not finite
        (nothing is written then), a UserError the main process's write met on every process."""
        s = self.state
        if not self.checkpoints.save(self.state_dict, s.position, best=best):
            raise self.diverged(f"the weights became NaN or infinite by step {s.step} (epoch "
                                f"{s.epoch + (s.batch_in_epoch > 0)})")

    def diverged(self, what: str) -> TrainingDiverged:
        """The error that ends a diverged run: what happened, what is kept, what to change."""
        self.report.end_epoch()
        good = self.checkpoints.last_good
        if good is None:
            kept = "no checkpoint was saved before it, so there is nothing to resume"
        else:
            kept = f"the last good checkpoint is {good.path} ({good.where(len(self.train_loader))})"
        return TrainingDiverged(f"{what}: stopped without saving; {kept}; lower --lr, add --grad-clip, or warm up "
                                f"(--warmup-epochs)")

    def reduced_sums(self, meter: EpochMeter) -> EpochMeter:
        """The epoch's sums over all processes (every process calls this together); a non-finite loss sum
        (or under fp16 a collapsed scale) is a divergence."""
        total = meter.reduced(self.acc)
        if not math.isfinite(total.to_list()[0]) or self.scale_collapsed():
            s = self.state
            raise self.diverged(f"the training loss became NaN or infinite in epoch {s.epoch + 1} (by step "
                                f"{s.step})")
        return total

    # ---- one step ----------------------------------------------------------------------------------
    def train_step(self, x, target, sync: bool):
        """Forward and backward of one (micro-)batch: (loss, correct predictions), both on the device. The
        target is the labels, or under MixUp/CutMix soft targets, whose largest weight is the class a
        prediction must hit to count as correct (train_acc). With --sam the gradient is taken at the
        perturbed weights (dtrain.sam), the loss and predictions reported are those at the weights."""
        ctx = contextlib.nullcontext() if sync else self.acc.no_sync(self.model)
        model = module_for(self.model, len(x), self.train_loader.batch_size)
        if self.spec.sam:
            e, loss, logits = self.sam_first_pass(model, x, target)
            with sam.moved(self.trained_params, e), sam.running_stats_frozen(self.module), ctx:
                second, _ = training_loss(self.module, model(x), target, self.criterion)
                self.acc.backward(second / self.spec.grad_accum)
        else:
            with ctx:
                loss, logits = training_loss(self.module, model(x), target, self.criterion)
                self.acc.backward(loss / self.spec.grad_accum)
        label = target.argmax(1) if target.dim() == 2 else target
        return loss.detach(), (logits.argmax(1) == label).sum()

    def sam_first_pass(self, model, x, target):
        """SAM's first pass: this process's own gradient of the batch's loss at the weights (not all-reduced,
        not accumulated into .grad), and from it the step e towards the nearby point of highest loss.
        Returns (e, loss, logits)."""
        with self.acc.no_sync(self.model):
            loss, logits = training_loss(self.module, model(x), target, self.criterion)
            scaled = self.scaler.scale(loss) if self.scaler is not None else loss
            grads = torch.autograd.grad(scaled, self.trained_params, allow_unused=True)
        e = sam.perturbation(self.trained_params, list(grads), self.spec.sam, self.asam_weights)
        return e, loss, logits

    def optimizer_step(self) -> torch.Tensor | None:
        """Clip, step, schedule, average. Under fp16's GradScaler returns whether the scaler skipped the
        step (a device tensor: the scale went down, which it does only on inf/NaN gradients), else None."""
        scale = self.scaler._scale.clone() if self.scaler is not None else None  # no sync: get_scale() would
        if self.spec.grad_clip:
            self.acc.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.ema is not None:
            self.ema.update_parameters(self.module, (self.state.step + 1) / self.total_steps)
        self.state.step += 1
        return None if scale is None else self.scaler._scale < scale

    def scale_collapsed(self) -> bool:
        """Under fp16: whether the GradScaler's scale fell below MIN_SCALE (nearly every step overflowed:
        the loss stays non-finite). Reads the scale: call it where the loop synchronises anyway."""
        return self.scaler is not None and self.scaler.get_scale() < MIN_SCALE

    def finish_step(self, epoch: int, b: int, nb: int, loss: torch.Tensor, batch_started: float,
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
        if s.step % self.spec.log_every == 0 or s.batch_in_epoch == nb:
            loss_value = loss.item()
            diverged = not math.isfinite(loss_value) and (self.scaler is None or self.scale_collapsed())
            self.report.step(s.step, {"loss": loss_value, "lr": self.schedule.lr, "batch": b + 1,
                                      "epoch": epoch + 1,
                                      "images_per_second": self.clock.images_per_second(self.acc.num_processes)})
        return self.acted_on(self.stop.exchange(diverged=diverged, save_due=self.checkpoints.due()))

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
        if not len(self.val_loader):
            return
        x = next(iter(self.val_loader.batches()))[0]
        if module_for(model, len(x), getattr(self.val_loader, "batch_size", None)) is model:
            model.eval()
            with self.acc.autocast():
                eval_logits(model, self.eval_pipe(x), self.spec.tta, self.spec.tta_shift)
        self.model.train()

    def _sync(self) -> None:
        if self.acc.device.type == "cuda":
            torch.cuda.synchronize(self.acc.device)

    # ---- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        s = self.state
        self.clock = Clock()
        self.checkpoints.restart_clock()
        stopped_by, last_eval = 0, None
        if eager(self.eval_model) is not self.eval_model:
            self.warm_up_eval()
        try:
            while s.epoch < self.spec.epochs and s.step < self.total_steps:
                stopped_by = self.in_memory(self.train_epoch, training=True)
                if stopped_by:
                    self.leave_on_signal(stopped_by)
                    break
                last_eval = self.in_memory(self.end_epoch, training=False)
        except TrainingDiverged:
            self.acc.end_training()  # every process stops at this point: they leave the process group together
            raise
        elapsed = self.clock.elapsed()
        summary = {"steps": s.step, "epochs": s.epoch, "best_acc": s.best_acc, "stopped_by_signal": stopped_by,
                   "train_seconds": elapsed, "first_step_seconds": self.clock.first_step_seconds,
                   "warmup_seconds": self.clock.warmup_seconds,
                   "steady_seconds": elapsed - (self.clock.warmup_seconds or 0.0),
                   "output_dir": str(self.checkpoints.out)}
        if not stopped_by:
            self.report.end(summary, last_eval)
        return summary

    def in_memory(self, phase: Callable, training: bool):
        """phase(), with an allocation that fails turned into one line that says which batch to make smaller
        (the run's files stay as they were at its last save)."""
        try:
            return phase()
        except (RuntimeError, MemoryError) as e:
            if not out_of_memory(e):
                raise
            world = self.acc.num_processes
            if training:
                n, k = self.train_loader.batch_size, self.spec.grad_accum
                raise UserError(f"out of memory in a training step of {n} images per process (--batch-size "
                                f"{n * world * k} over {world} process(es), --grad-accum {k}): lower --batch-size, or "
                                f"keep the global batch with --grad-accum {2 * k} (each step in {2 * k} parts of "
                                f"{max(1, n // 2)}); the run's files are as at its last save") from None
            n = self.val_loader.batch_size
            raise UserError(f"out of memory evaluating batches of {n} images per process (--eval-batch-size "
                            f"{n * world}): lower --eval-batch-size; the run's files are as at its last save") from None

    def train_epoch(self) -> int:
        """Train from the saved position to the end of the epoch, --max-steps or a stop signal (returned)."""
        s, spec, epoch, nb = self.state, self.spec, self.state.epoch, len(self.train_loader)
        self.report.begin_epoch(epoch + 1, spec.epochs, nb, s.batch_in_epoch)
        self.model.train()
        meter = s.meter.to(self.acc.device)
        stopped_by, seconds_before, t0 = 0, s.epoch_seconds, time.perf_counter()
        self.clock.new_window()
        for b, (x, y, index) in enumerate(self.train_loader.batches(epoch, s.batch_in_epoch), s.batch_in_epoch):
            batch_started = time.perf_counter()
            step_in_epoch, micro = divmod(b, spec.grad_accum)
            x = self.train_pipe(x, self.rng.batch(epoch, step_in_epoch), index=index, epoch=epoch, micro=micro)
            target = y
            if self.mix is not None:
                x, target = self.mix(x, y, epoch, step_in_epoch)
            sync = (b + 1) % spec.grad_accum == 0 or b + 1 == nb
            loss, correct = self.train_step(x, target, sync)
            meter.add(loss, correct, len(y), finite_only=self.scaler is not None)
            self.clock.window_images += len(y)
            if sync:
                agreed = self.finish_step(epoch, b, nb, loss, batch_started, meter)
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
        out = self.checkpoints.out
        self.report.message(f"stopped by signal {signal} at step {s.step} (epoch {s.epoch + 1}, batch "
                            f"{s.batch_in_epoch}/{len(self.train_loader)}); {self.checkpoints.last} saved, "
                            f"continue with --resume auto --output-dir {out}")

    def end_epoch(self) -> Evaluation | None:
        spec, s = self.spec, self.state
        epoch, finished = s.epoch, s.batch_in_epoch >= len(self.train_loader)
        total = self.reduced_sums(s.meter)
        last = s.epoch + 1 >= spec.epochs or s.step >= self.total_steps
        if self.swa is not None and finished and epoch + 1 > spec.swa_start:
            self.swa.update(self.module)
            self.swa.recompute_batchnorm((self.eval_pipe(x) for x, _, _ in self.train_loader.batches(epoch)), self.acc)
        ev = None
        t_eval = time.perf_counter()
        if (epoch + 1) % spec.eval_every == 0 or last:
            sync_buffers(self.acc, self.eval_module)  # BatchNorm statistics (EMA's too): rank 0's, as saved
            ev = evaluate(self.eval_model, self.val_loader, self.eval_pipe, self.acc, self.val_labels,
                          tta=spec.tta, tta_shift=spec.tta_shift)
        row = epoch_row(epoch=epoch + 1, step=s.step, train_loss=total.mean_loss, train_acc=total.accuracy,
                        val_loss=ev.loss if ev else None, val_acc=ev.acc if ev else None,
                        val_top5=ev.top5 if ev else None, lr=self.schedule.lr, epoch_seconds=s.epoch_seconds,
                        eval_seconds=time.perf_counter() - t_eval,
                        images_per_second=total.count / s.epoch_seconds if s.epoch_seconds else None,
                        train_samples=total.count, val_samples=len(ev.index) if ev else None,
                        skipped_steps=total.skipped if self.scaler is not None else None,
                        elapsed_seconds=self.clock.elapsed(), warmup_seconds=self.clock.warmup_seconds)
        self.schedule.end_epoch(row)
        best = ev is not None and (s.best_acc is None or ev.acc > s.best_acc)
        if best:
            s.best_acc, s.best_step = ev.acc, s.step
        run_on_main(self.acc, lambda: self.report.epoch(row, ev))  # a write error (metrics.jsonl) ends every process
        if finished:
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
            s.meter, s.epoch_seconds = EpochMeter(self.acc.device), 0.0
        else:  # stopped mid-epoch by --max-steps: a resumed run completes this epoch's figures
            s.meter = total
        if best or last or not finished or (epoch + 1) % spec.save_every == 0:
            self.save(best=best)
        return ev
