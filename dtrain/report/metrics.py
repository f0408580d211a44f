"""metrics.jsonl: one JSON object per epoch, appended by the main process."""
from __future__ import annotations

import json
from pathlib import Path

from dtrain.checkpoint import atomic_write


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsFile:
    def __init__(self, output_dir: str | Path, resumed_epoch: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        if resumed_epoch is not None and self.path.exists():
            # a run resumed from epoch E: drop rows of later epochs a killed run may have left behind
            rows = [r for r in read_metrics(self.path) if r["epoch"] <= resumed_epoch]
            atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
        elif resumed_epoch is None:
            self.path.unlink(missing_ok=True)

    def epoch(self, row: dict, evaluation=None) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
