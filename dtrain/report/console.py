"""The console of training and prediction: output on the main process only, rich progress bars, and
the training run's table row per epoch (`ConsoleReporter`)."""
from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from dtrain.epoch_row import COLUMNS



def table_columns(num_classes: int | None, precision: str | None = None) -> list[tuple[str, str]]:
    """The epoch table's columns: val_top5 only for more than 5 classes, skipped_steps (the steps fp16's
    GradScaler skipped on inf/NaN gradients) only under fp16."""
    return [(c.key, c.console) for c in COLUMNS if c.console is not None
            and (c.key != "val_top5" or (num_classes or 0) > 5) and (c.key != "skipped_steps" or precision == "fp16")]


def make_console() -> Console:
    """Lines are not wrapped in logs (Slurm, CI): a non-terminal gets a wide console."""
    if sys.stdout.isatty():
        return Console(soft_wrap=True)
    return Console(soft_wrap=True, width=max(120, int(os.environ.get("COLUMNS", 0) or 0)))


def warn(text: str) -> None:
    """A warning outside any run's console (e.g. while choosing reporters): one line on stderr."""
    print(f"warning: {text}", file=sys.stderr, flush=True)


def capped(images: int, processes: int, per_process: int) -> str:
    """The note for a batch larger than the data: each process's batch is its whole shard of the images."""
    shard = -(-images // processes)
    return f"; capped: only {images:,} training images, {shard:,} per process" if shard < per_process else ""


class MainConsole:
    """Prints and progress bars on the main process; silent on the others."""

    def __init__(self, active: bool = True):
        self.rich = make_console() if active else None

    def print(self, *a, **kw) -> None:
        if self.rich is not None:
            self.rich.print(*a, highlight=False, **kw)

    def progress(self, description: str, total: int) -> "ProgressBar":
        """A bar of `total` images with their rate, shown on a terminal only (a log gets no bar lines)."""
        show = self.rich is not None and self.rich.is_terminal
        return ProgressBar(Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), _Rate(),
                                    TimeElapsedColumn(), TimeRemainingColumn(), console=self.rich, transient=True,
                                    disable=not show), total)


class _Rate(ProgressColumn):
    def render(self, task):
        return Text(f"{task.speed:,.0f} img/s" if task.speed else "")


class ProgressBar:
    """Images done out of `total`, and the rate since the bar was made."""

    def __init__(self, progress: Progress, total: int):
        self.p, self.total = progress, total
        self.task = progress.add_task("", total=total)
        self.done, self.t0 = 0, time.perf_counter()

    def __enter__(self):
        self.p.start()
        return self

    def __exit__(self, *exc):
        self.p.stop()

    def advance(self, n: int) -> None:
        self.done += n
        self.p.update(self.task, completed=min(self.done, self.total))

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def rate(self) -> float:
        return self.done / max(self.seconds, 1e-9)


class ConsoleReporter:
    def __init__(self, console: Console | None = None):
        self.console = console or make_console()
        self.progress = None
        self.task = None
        self.rows = 0
        self.columns = table_columns(None)

    def start(self, cfg, info: dict) -> None:
        self.columns = table_columns(info["num_classes"], info.get("precision"))
        self.console.print(f"[bold]dtrain[/] {cfg.arch} on {cfg.dataset}: {info['train_size']:,} train / "
                           f"{info['val_size']:,} val images, {info['num_classes']} classes, "
                           f"{info['parameters']:,} parameters")
        self.console.print(f"processes: {info['world_size']} ({info['distributed_type']}, device "
                           f"{info['device']}), world size {info['world_size']}, global batch {cfg.batch_size} "
                           f"({info['per_process_batch']} per process x {cfg.grad_accum} accumulation"
                           f"{capped(info['train_size'], info['world_size'], info['per_process_batch'])}), "
                           f"precision {info['precision']}"
                           + (f", compiled (static shapes; asked by {info['compile']})" if info.get("compile") else ""))
        self.console.print(f"output: {info['output_dir']}")

    def begin_epoch(self, epoch: int, epochs: int, total: int, done: int = 0) -> None:
        self.epoch_label, self.total, self.next_line = f"epoch {epoch}/{epochs}", total, done + total / 10
        if not self.console.is_terminal:  # a log file: plain lines, about every 10% of the epoch
            return
        self.progress = Progress(TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, stats="")

    def step(self, step: int, metrics: dict) -> None:
        stats = f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.3g}  {metrics['images_per_second']:,.0f} img/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=metrics["batch"], stats=stats)
        elif metrics["batch"] >= self.next_line and metrics["batch"] < self.total:
            self.console.print(f"{self.epoch_label} batch {metrics['batch']}/{self.total} step {step}  {stats}")
            self.next_line = metrics["batch"] + self.total / 10

    def end_epoch(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def epoch(self, row: dict, evaluation=None) -> None:
        self.end_epoch()
        table = Table(show_header=self.rows == 0, box=None, pad_edge=False)
        for name, _ in self.columns:
            table.add_column(name, justify="right", min_width=max(len(name), 9))
        table.add_row(*[fmt.format(row[k]) if row.get(k) is not None else "-" for k, fmt in self.columns])
        self.console.print(table)
        self.rows += 1

    def message(self, text: str) -> None:
        self.console.print(text)

    def end(self, summary: dict, evaluation=None) -> None:
        self.end_epoch()
        best = summary.get("best_acc")
        self.console.print(f"[bold]done[/]: {summary['steps']} steps in {summary['train_seconds']:.1f} s"
                           + (f", best val_acc {best:.2%}" if best is not None else "")
                           + f"; files in {summary['output_dir']}")
