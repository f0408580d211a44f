"""Grids of runs from one command line: `--sweep KEY=V1,V2,...` (repeatable, any setting).

The grid is every combination of the values, in the order of `itertools.product` over the --sweep flags
as given: the last flag varies fastest. `--sweep lr=0.05,0.1,0.2 --sweep seed=0,1` numbers its six runs

    0: lr=0.05 seed=0   1: lr=0.05 seed=1   2: lr=0.1 seed=0   3: lr=0.1 seed=1   4: lr=0.2 seed=0   5: lr=0.2 seed=1

A run is one combination: `--sweep-index N`, by default `$SLURM_ARRAY_TASK_ID` inside a Slurm array task
(`sbatch --array=0-5 ...`; an array task past the end of the grid fails with one line). Its output dir is
Slurm's `runs/<job>-<array job>_<task>`, elsewhere `run_name` (e.g. `runs/resnet18-lr0.1-seed1`). All runs
of one sweep share a W&B group (`group_name`). The sweep and the index are saved in config.json.
"""
from __future__ import annotations

import hashlib
import itertools
import os

from dtrain.config import FIELDS, flag_name, is_list_setting, parse_value, settings_where
from dtrain.errors import UserError

NOT_SWEPT = settings_where(lambda p: not p.sweepable)


def parse_sweep(spec: list[str]) -> list[tuple[str, list]]:
    """['lr=0.1,0.2', 'seed=0,1'] -> [('lr', [0.1, 0.2]), ('seed', [0, 1])], each value of its field's type."""
    axes, seen = [], set()
    for item in spec:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key or not values.strip():
            raise UserError(f"--sweep {item!r}: write KEY=V1,V2,... (e.g. --sweep seed=0,1,2)")
        if key not in FIELDS or key in NOT_SWEPT:
            raise UserError(f"--sweep {item!r}: {key!r} is not a setting that can be swept (see --help)")
        if key in seen:
            raise UserError(f"--sweep {item!r}: {key} is swept twice; give all its values in one --sweep")
        seen.add(key)
        if is_list_setting(key):
            raise UserError(f"--sweep {item!r}: {key} is a list setting, whose values a comma cannot separate; "
                            f"sweep recipes that set it instead (--sweep recipe=a.toml,b.toml)")
        try:
            axes.append((key, [parse_value(key, v) for v in values.split(",")]))
        except UserError as e:
            raise UserError(f"--sweep {item!r}: {e}") from None
    return axes


def combinations(spec: list[str]) -> list[dict]:
    axes = parse_sweep(spec)
    return [dict(zip([k for k, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]


def default_index() -> int | None:
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return int(task) if task and task.isdigit() else None


def apply_sweep(overrides: dict) -> dict:
    """The command line's settings with the chosen combination of the --sweep grid filled in."""
    spec = overrides.get("sweep") or []
    if not spec:
        if overrides.get("sweep_index") is not None:
            raise UserError("--sweep-index needs a grid: add --sweep KEY=V1,V2,... (e.g. --sweep seed=0,1,2)")
        return overrides
    grid = combinations(spec)
    index = overrides.get("sweep_index")
    if index is None:
        index = default_index()
    if index is None:
        raise UserError(f"--sweep: say which of the {len(grid)} combinations this run is with --sweep-index N "
                        f"(0..{len(grid) - 1}), or run it as a Slurm array task (--sweep-list shows them)")
    if not 0 <= index < len(grid):
        raise UserError(f"--sweep-index {index} is past the end of the sweep: it has {len(grid)} combinations "
                        f"(0..{len(grid) - 1}); submit with --array=0-{len(grid) - 1}")
    both = sorted(set(grid[index]) & set(overrides))
    if both:
        raise UserError(f"{flag_name(both[0])} is given and also swept: drop one of them")
    return {**overrides, **grid[index], "sweep": list(spec), "sweep_index": index}


def _text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "x".join(map(str, value))
    return str(value)


def run_name(cfg) -> str:
    """A sweep run's output folder name outside Slurm: the arch and the swept values, e.g. resnet18-lr0.1-seed1."""
    parts = [cfg.arch] + [f"{key}{_text(getattr(cfg, key))}" for key, _ in parse_sweep(cfg.sweep) if key != "arch"]
    return "-".join(parts).replace(":", "-").replace("/", "-").replace(" ", "")


def group_name(cfg) -> str | None:
    """The W&B group of every run of cfg's sweep: the Slurm array job, else the arch and a hash of the grid."""
    if not cfg.sweep:
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{os.environ.get('SLURM_JOB_NAME', 'array')}-{array_job}"
    keys = [key for key, _ in parse_sweep(cfg.sweep)]
    digest = hashlib.sha1("\n".join(cfg.sweep).encode()).hexdigest()[:8]
    return "-".join(([] if "arch" in keys else [cfg.arch.replace(":", "-")]) + ["sweep"] + keys + [digest])


def listing(spec: list[str]) -> str:
    """What --sweep-list prints: each combination with its index, and the --array that submits them all."""
    if not spec:
        raise UserError("--sweep-list needs a grid: add --sweep KEY=V1,V2,... (e.g. --sweep seed=0,1,2)")
    grid = combinations(spec)
    lines = [f"{i}: " + " ".join(f"{k}={_text(v)}" for k, v in combo.items()) for i, combo in enumerate(grid)]
    lines.append(f"{len(grid)} combinations; submit them with: sbatch --array=0-{len(grid) - 1} ... "
                 f"(or run each with --sweep-index N)")
    return "\n".join(lines)
