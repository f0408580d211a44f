"""`--tensorboard`: scalars to <output-dir>/tb (main process only), for `tensorboard --logdir <output-dir>/tb`.

Every scalar's x axis is the optimiser step, so per-step and per-epoch charts line up:
  train/loss, train/lr, train/images_per_second           every --log-every steps (the batch loss)
  epoch/<key> for each charted key of the epoch row (dtrain.epoch_row)   once per epoch, at its last step
A resumed run purges what a killed run logged after the point it resumes from (TensorBoard's purge_step),
so curves never show the same step twice; a fresh run in a used output dir purges everything before it.
"""
from __future__ import annotations

from pathlib import Path

from dtrain.epoch_row import CHARTED
from dtrain.errors import UserError

STEP_KEYS = ("loss", "lr", "images_per_second")


def summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard (or "
                        "pip install 'dtrain[tensorboard]'), or drop --tensorboard") from None
    return SummaryWriter


class TensorBoardReporter:
    def __init__(self, output_dir: str | Path, resumed: bool = False):
        self.SummaryWriter = summary_writer_class()   # fail at start-up, not after the first epoch
        self.log_dir = Path(output_dir) / "tb"
        self.resumed = resumed
        self.writer = None

    def _w(self, step: int):
        if self.writer is None:  # opened at the first write: a resumed run purges the killed run's later steps
            # fresh run: purge from step 0, so a reused output dir shows only this run (as metrics.jsonl)
            self.writer = self.SummaryWriter(log_dir=str(self.log_dir), purge_step=step if self.resumed else 0)
        return self.writer

    def start(self, cfg, info: dict) -> None:
        if not self.resumed:  # a fresh run: open now and describe it (a resumed one opens at its first step)
            self._w(0).add_text("run", f"{cfg.arch} on {cfg.dataset}: {info.get('train_size')} train / "
                                f"{info.get('val_size')} val images, {info.get('num_classes')} classes, "
                                f"{info.get('parameters')} parameters, {info.get('world_size')} processes, "
                                f"global batch {cfg.batch_size}", 0)

    def step(self, step: int, metrics: dict) -> None:
        w = self._w(step)
        for k in STEP_KEYS:
            if metrics.get(k) is not None:
                w.add_scalar(f"train/{k}", float(metrics[k]), step)

    def epoch(self, row: dict, evaluation=None) -> None:
        step = int(row["step"])
        w = self._w(step)
        for k in CHARTED:
            if row.get(k) is not None:
                w.add_scalar(f"epoch/{k}", float(row[k]), step)
        w.flush()

    def end(self, summary: dict, evaluation=None) -> None:
        if self.writer is not None:
            if summary.get("best_acc") is not None:
                self.writer.add_scalar("epoch/best_val_acc", float(summary["best_acc"]), int(summary["steps"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
