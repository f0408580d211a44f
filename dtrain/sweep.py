"""Grids of runs from one command line: `--sweep KEY=V1,V2,...` (repeatable, any setting).

The grid is every combination of the values, in the order of `itertools.product` over the --sweep flags
as given: the last flag varies fastest. `--sweep lr=0.05,0.1,0.2 --sweep seed=0,1` numbers its six runs

    0: lr=0.05 seed=0   1: lr=0.05 seed=1   2: lr=0.1 seed=0   3: lr=0.1 seed=1   4: lr=0.2 seed=0   5: lr=0.2 seed=1

Two values of one --sweep that are equal once read as the setting's type (`lr=0.1,0.10`, `hflip=true,1`), or
that would name one output folder, are refused: they would be one run twice.

A run is one combination: `--sweep-index N`, by default `$SLURM_ARRAY_TASK_ID` inside a Slurm array task
(`sbatch --array=0-5 ...`; an array task past the end of the grid fails with one line). Slurm allows array
indices up to MaxArraySize - 1 (1000 by default) in one sbatch: a larger grid goes in chunks, each an array
`--array=0-999` with `--sweep-offset K`, whose task T is combination K + T (`--sweep-list` prints them).
Its output dir is Slurm's `runs/<job>-<array job>_<task>`, elsewhere `run_name` (e.g.
`runs/resnet18-lr0.1-seed1`). All runs of one sweep share a W&B group (`group_name`). The sweep, the index
and the offset are saved in config.json.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re

from dtrain.config import FIELDS, flag_name, is_list_setting, parse_value, settings_where
from dtrain.errors import UserError

NOT_SWEPT = settings_where(lambda p: not p.sweepable)
MAX_ARRAY_SIZE = 1001      # Slurm's default MaxArraySize: array indices 0..1000 in one sbatch
CHUNK = 1000               # array tasks per sbatch when a grid needs several


def parse_sweep(spec: list[str]) -> list[tuple[str, list]]:
    """['lr=0.1,0.2', 'seed=0,1'] -> [('lr', [0.1, 0.2]), ('seed', [0, 1])], each value of its field's type;
    a UserError naming the --sweep for a mistake in it."""
    axes, seen = [], set()
    for item in spec:
        key, values = parse_axis(item)
        if key in seen:
            raise UserError(f"--sweep {item!r}: {key} is swept twice; give all its values in one --sweep")
        seen.add(key)
        axes.append((key, values))
    return axes


def parse_axis(item: str) -> tuple[str, list]:
    """One --sweep KEY=V1,V2,...: the setting and its values, each of the setting's type, no two the same."""
    key, sep, values = item.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not key or not values.strip():
        raise UserError(f"--sweep {item!r}: write KEY=V1,V2,... (e.g. --sweep seed=0,1,2)")
    if key not in FIELDS or key in NOT_SWEPT:
        raise UserError(f"--sweep {item!r}: {key!r} is not a setting that can be swept (see --help)")
    if is_list_setting(key):
        raise UserError(f"--sweep {item!r}: {key} is a list setting, whose values a comma cannot separate; "
                        f"sweep recipes that set it instead (--sweep recipe=a.toml,b.toml)")
    texts = values.split(",")
    try:
        parsed = [parse_value(key, v) for v in texts]
    except UserError as e:
        raise UserError(f"--sweep {item!r}: {e}") from None
    refuse_repeats(item, key, [t.strip() for t in texts], parsed)
    return key, parsed


def refuse_repeats(item: str, key: str, texts: list[str], values: list) -> None:
    """A UserError naming the first two values (as written) that are equal once parsed, or that would give
    one output folder name: two combinations of one run, the second told to --resume auto the first's."""
    first: dict[str, int] = {}
    for i, value in enumerate(values):
        j = first.setdefault(folder_part(value), i)
        if j == i:
            continue
        if values[j] == value:
            raise UserError(f"--sweep {item!r}: {texts[j]} and {texts[i]} are the same {key} ({_text(value)}); "
                            f"give each value once")
        raise UserError(f"--sweep {item!r}: {texts[j]} and {texts[i]} would write one output folder "
                        f"(...-{key}{folder_part(value)}); give values that differ in more than ':', '/' and spaces")


def combinations(spec: list[str]) -> list[dict]:
    axes = parse_sweep(spec)
    return [dict(zip([k for k, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]


def array_hint(size: int, command: str = "") -> str:
    """How to submit a grid of `size` combinations as Slurm arrays, in a few words."""
    if size <= MAX_ARRAY_SIZE:
        return f"submit with {command}--array=0-{size - 1}"
    return f"submit it in chunks of {command}--array=0-{CHUNK - 1} with --sweep-offset, as --sweep-list prints them"


def array_task_index(size: int) -> int | None:
    """$SLURM_ARRAY_TASK_ID as an index (None when unset or empty); a UserError naming it when it is not a
    whole number from 0."""
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if not task:
        return None
    if not re.fullmatch(r"[0-9]+", task):
        raise UserError(f"$SLURM_ARRAY_TASK_ID is {task!r}, not an array task index (a whole number from 0): "
                        f"{array_hint(size, 'sbatch ')}, or pass --sweep-index N "
                        f"(0..{size - 1})")
    return int(task)


def chosen_index(overrides: dict, size: int) -> tuple[int, str]:
    """The combination this run is, and how it was chosen (for messages): --sweep-index, else the Slurm array
    task plus --sweep-offset; a UserError for a contradiction, a negative or a missing index."""
    index, offset = overrides.get("sweep_index"), overrides.get("sweep_offset")
    if offset is not None and index is not None:
        raise UserError(f"--sweep-offset applies to Slurm array tasks (combination --sweep-offset + "
                        f"$SLURM_ARRAY_TASK_ID); with --sweep-index {index}, the combination itself, drop it")
    if offset is not None and offset < 0:
        raise UserError(f"--sweep-offset must be at least 0, not {offset}")
    if index is not None:
        if index < 0:
            raise UserError(f"--sweep-index {index} is negative: the {size} combinations are numbered "
                            f"0..{size - 1}; pass one of them (--sweep-list shows them)")
        return index, ""
    task = array_task_index(size)
    if task is None:
        raise UserError(f"--sweep: say which of the {size} combinations this run is with --sweep-index N "
                        f"(0..{size - 1}), or run it as a Slurm array task (--sweep-list shows them)")
    return task + (offset or 0), (f" (array task {task} + --sweep-offset {offset})" if offset else "")


def apply_sweep(overrides: dict) -> dict:
    """The command line's settings with the chosen combination of the --sweep grid filled in."""
    spec = overrides.get("sweep") or []
    if not spec:
        for key in ("sweep_index", "sweep_offset"):
            if overrides.get(key) is not None:
                raise UserError(f"{flag_name(key)} needs a grid: add --sweep KEY=V1,V2,... (e.g. --sweep seed=0,1,2)")
        return overrides
    grid = combinations(spec)
    index, how = chosen_index(overrides, len(grid))
    if index >= len(grid):
        raise UserError(f"--sweep-index {index}{how} is past the end of the sweep: it has {len(grid)} combinations "
                        f"(0..{len(grid) - 1}); {array_hint(len(grid))}")
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


def folder_part(value) -> str:
    """A value as it appears in a sweep run's folder name (no ':', '/' or spaces)."""
    return _text(value).replace(":", "-").replace("/", "-").replace(" ", "")


def run_name(cfg) -> str:
    """A sweep run's output folder name outside Slurm: the arch and the swept values, e.g. resnet18-lr0.1-seed1."""
    parts = [folder_part(cfg.arch)] + [f"{key}{folder_part(getattr(cfg, key))}" for key, _ in parse_sweep(cfg.sweep)
                                       if key != "arch"]
    return "-".join(parts)


def group_name(cfg) -> str | None:
    """The W&B group of every run of cfg's sweep: the Slurm array job (a grid in one array), else the arch and a
    hash of the grid (the same for every chunk of a grid submitted in chunks)."""
    if not cfg.sweep:
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and cfg.sweep_offset is None:
        return f"{os.environ.get('SLURM_JOB_NAME', 'array')}-{array_job}"
    keys = [key for key, _ in parse_sweep(cfg.sweep)]
    digest = hashlib.sha1("\n".join(cfg.sweep).encode()).hexdigest()[:8]
    return "-".join(([] if "arch" in keys else [cfg.arch.replace(":", "-")]) + ["sweep"] + keys + [digest])


def submit_lines(size: int) -> list[str]:
    """How to submit a grid of `size` combinations: one array within Slurm's default MaxArraySize (1001, array
    indices 0..1000 in one sbatch), else chunks of CHUNK tasks, each with its --sweep-offset."""
    if size <= MAX_ARRAY_SIZE:
        return [f"{size} combinations; submit them with: sbatch --array=0-{size - 1} ... "
                f"(or run each with --sweep-index N)"]
    chunks = [(start, min(CHUNK, size - start)) for start in range(0, size, CHUNK)]
    return [f"{size} combinations: more than one Slurm array may hold (MaxArraySize, {MAX_ARRAY_SIZE} by default, "
            f"allows indices 0..{MAX_ARRAY_SIZE - 1} in one sbatch); submit them in {len(chunks)} chunks:",
            *[f"  sbatch --array=0-{count - 1} ... --sweep-offset {start}" for start, count in chunks],
            f"(or all at once where MaxArraySize is above {size - 1}, as `scontrol show config | grep MaxArraySize` "
            f"says: sbatch --array=0-{size - 1} ...; append %K to an --array to run at most K of its tasks at a time)"]


def listing(spec: list[str]) -> str:
    """What --sweep-list prints: each combination with its index, and the sbatch --array lines that submit them."""
    if not spec:
        raise UserError("--sweep-list needs a grid: add --sweep KEY=V1,V2,... (e.g. --sweep seed=0,1,2)")
    grid = combinations(spec)
    lines = [f"{i}: " + " ".join(f"{k}={_text(v)}" for k, v in combo.items()) for i, combo in enumerate(grid)]
    return "\n".join(lines + submit_lines(len(grid)))
