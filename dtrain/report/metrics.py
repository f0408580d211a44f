"""metrics.jsonl: one strict-JSON object per epoch (null where a value is missing or not finite), appended
by the main process."""
from __future__ import annotations

import json
import math
from pathlib import Path

from dtrain.errors import UserError
from dtrain.files import append_line, write_text


def json_line(row: dict) -> str:
    """One row as a line of strict JSON: non-finite floats (NaN, inf) become null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(row), allow_nan=False) + "\n"


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of metrics.jsonl. A torn last line (a kill during an append) is left out; any other line
    that is not JSON is a UserError naming the file and line."""
    return [row for _, row in read_numbered_metrics(path)]


def read_numbered_metrics(path: str | Path) -> list[tuple[int, dict]]:
    """read_metrics' rows, each with its line number in the file (from 1), for messages that name the line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path} line {number} is not JSON; fix or remove that line") from None
    return rows


class MetricsFile:
    def __init__(self, output_dir: str | Path, resumed_epoch: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        if resumed_epoch is not None and self.path.exists():
            # a run resumed from epoch E: drop rows of later epochs (and a torn last line) a killed run left
            rows = [r for r in read_metrics(self.path) if r["epoch"] <= resumed_epoch]
            write_text(self.path, "".join(json_line(r) for r in rows))
        elif resumed_epoch is None:
            self.path.unlink(missing_ok=True)

    def epoch(self, row: dict, evaluation=None) -> None:
        append_line(self.path, json_line(row))
