"""Which reporters a run gets: all on the main process, none elsewhere."""
from __future__ import annotations

from pathlib import Path

from dtrain.report import Reporters


def make_reporters(cfg, output_dir: Path, resumed_epoch: int | None, is_main: bool) -> Reporters:
    if not is_main:
        return Reporters()
    from dtrain.report.console import ConsoleReporter
    from dtrain.report.metrics import MetricsFile
    members = [ConsoleReporter(), MetricsFile(output_dir, resumed_epoch)]
    return Reporters(members)
