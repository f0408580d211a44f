"""Which reporters a run gets: all on the main process, none elsewhere."""
from __future__ import annotations

from pathlib import Path

from dtrain.report import Reporters
from dtrain.report.console import ConsoleReporter
from dtrain.report.metrics import MetricsFile
from dtrain.report.plots import PlotReporter
from dtrain.report.tensorboard import TensorBoardReporter, summary_writer_class
from dtrain.report.wandb import WandbReporter, WandbSpec
from dtrain.report.wandb import resolve_mode as resolve_wandb_mode


def make_reporters(cfg, output_dir: Path, resumed_epoch: int | None, is_main: bool) -> Reporters:
    if cfg.tensorboard:  # every process checks, so all fail alike without the package
        summary_writer_class()
    if not is_main:
        return Reporters()
    console = ConsoleReporter()
    members = [console, MetricsFile(output_dir, resumed_epoch)]
    if cfg.wandb and resolve_wandb_mode(cfg.wandb_mode) != "disabled":
        members.append(WandbReporter(WandbSpec.from_config(cfg), output_dir, console.message))
    if cfg.tensorboard:
        members.append(TensorBoardReporter(output_dir, resumed=resumed_epoch is not None))
    if cfg.plots:
        members.append(PlotReporter(output_dir, resumed_epoch))
    return Reporters(members)
