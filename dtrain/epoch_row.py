"""The epoch row: the figures a run reports once per epoch, one schema for everything that reads them.

The training loop builds a row with `epoch_row(**values)` (every key of COLUMNS, None where a figure is
missing); metrics.jsonl stores it, the console prints the columns that have a format, TensorBoard and W&B
chart the charted ones against the step, run.png draws the losses and accuracies, and dtrain summarize
computes its statistics from the summarized ones. A new figure is one line here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    key: str
    what: str
    console: str | None = None   # the console table's format of the value, or None: not in the table
    chart: bool = True            # a TensorBoard / W&B scalar (epoch/<key>)
    summarized: bool = False      # read by dtrain summarize's statistics (a number or null)


COLUMNS = (
    Column("epoch", "the epoch (1-based)", "{}"),
    Column("step", "optimiser steps so far", "{}", chart=False),
    Column("train_loss", "mean training loss of the epoch", "{:.4f}"),
    Column("train_acc", "training accuracy of the epoch (the model's argmax against the labels)", "{:.2%}"),
    Column("val_loss", "validation loss (null when the epoch was not evaluated)", "{:.4f}"),
    Column("val_acc", "validation accuracy", "{:.2%}", summarized=True),
    Column("val_top5", "validation top-5 accuracy (more than 5 classes)", "{:.2%}", summarized=True),
    Column("lr", "learning rate at the epoch's end", "{:.3g}"),
    Column("epoch_seconds", "training seconds of the epoch (evaluation excluded)", "{:.1f}", summarized=True),
    Column("eval_seconds", "evaluation seconds", chart=False),
    Column("images_per_second", "training images per second over every process", "{:,.0f}", summarized=True),
    Column("train_samples", "training images of the epoch over every process", chart=False, summarized=True),
    Column("val_samples", "validation images evaluated", chart=False),
    Column("skipped_steps", "steps fp16's GradScaler skipped on inf/NaN gradients (null without fp16)", "{}"),
    Column("elapsed_seconds", "seconds from the start of training to the end of this row's evaluation",
           chart=False),
    Column("warmup_seconds", "seconds from the start of training to the end of the first step (compile, "
           "autotuning)", chart=False),
)
KEYS = tuple(c.key for c in COLUMNS)
CHARTED = tuple(c.key for c in COLUMNS if c.chart)
SUMMARIZED = tuple(c.key for c in COLUMNS if c.summarized)


def epoch_row(**values) -> dict:
    """A row with exactly the schema's keys, in its order."""
    missing, unknown = set(KEYS) - set(values), set(values) - set(KEYS)
    if missing or unknown:
        raise ValueError(f"epoch row: missing {sorted(missing)}, unknown {sorted(unknown)}")
    return {k: values[k] for k in KEYS}
