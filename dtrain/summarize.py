"""Many runs, one answer: a table of the runs under some folders, grouped by their settings.

    dtrain summarize runs/                         # every run folder under runs/
    python -m dtrain.summarize runs/a runs/b --out results/

A run folder is a folder with the config.json that dtrain writes. Runs whose resolved settings are equal
apart from the seed, the output and the logging fields (IGNORED) form a group: one row of the table with
n, mean ± std and min..max of the final and of the best val_acc, the mean training seconds and img/s.
The table and the plot name each group by the fewest settings that tell the groups apart (short column
titles, a legend under the table); summary.csv has a column for every setting that differs.

A run is finished when its metrics.jsonl reaches the planned end: the last row is epoch `epochs` (or
step `max_steps` or beyond) and has a val_acc. Anything else (stopped by a signal and not resumed,
killed, failed, still running, or no epoch done at all) is counted apart in the group's "not finished"
column and listed under the table; it never enters the statistics. A run whose metrics.jsonl is not what
dtrain writes (a damaged line, a figure that is not a number, NaN or Infinity, which dtrain writes as
null) is "unreadable": counted and listed apart the same way. A folder whose config.json cannot be read
(not UTF-8, not strict JSON, not a dtrain run's settings) belongs to no group: it is listed as skipped,
with the reason. Nothing found is left out silently.

Standard deviations are sample standard deviations (ddof=1, as airbench reports them); a group of one
finished run has none (empty in the CSV). Accuracies are fractions, as in metrics.jsonl. Training seconds
are the sum of the rows' epoch_seconds (training only, evaluation excluded; correct across resumes);
img/s is training images over those seconds.

--out DIR (default: the current folder) gets summary.csv (one row per group) and summary.png (val_acc
per epoch for each group: the mean as a line, min..max as a band).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from dtrain.config import FIELDS, Config, flag_name, settings_where
from dtrain.epoch_row import SUMMARIZED
from dtrain.errors import UserError, run_command
from dtrain.files import make_folder, write_bytes, write_text
from dtrain.report.console import make_console
from dtrain.report.metrics import read_numbered_metrics

# Settings that do not change what is trained (the seed, where the output goes, how the run is logged and
# saved, where the data comes from): declared on each Config field (Policy.groups).
IGNORED = frozenset(settings_where(lambda p: not p.groups))
FLAG_ORDER = {name: i for i, name in enumerate(FIELDS)}
NAME_COLUMNS = 3     # more settings than this to tell the groups apart: name them by recipe where that is shorter
RUN_KEYS = ("arch", "dataset", "epochs")       # a config.json without them is not a dtrain run's

CSV_COLUMNS = ["group", "n", "final_acc_mean", "final_acc_std", "best_acc_mean", "best_acc_std",
               "train_seconds_mean", "final_acc_min", "final_acc_max", "best_acc_min", "best_acc_max",
               "images_per_second_mean", "not_finished", "unreadable"]
TOP5_COLUMNS = ["final_top5_mean", "final_top5_std"]

FINISHED, NOT_FINISHED, UNREADABLE = "finished", "not finished", "unreadable"
SKIP_REMEDY = "repair it, or move the folder out of the paths"


def ignored(key: str) -> bool:
    return key in IGNORED


class Unusable(Exception):
    """A file summarize cannot use; the message completes "<file>: ..." (config.json) or is whole (metrics)."""


@dataclass
class Run:
    path: Path
    settings: dict
    rows: list[dict]
    status: str                 # FINISHED, NOT_FINISHED or UNREADABLE
    reason: str = ""            # why it is not finished, or unreadable

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def accs(self) -> list[tuple[int, float]]:
        return [(r["epoch"], r["val_acc"]) for r in self.rows if r.get("val_acc") is not None]

    @property
    def final_acc(self) -> float:
        return self.rows[-1]["val_acc"]

    @property
    def best_acc(self) -> float:
        return max(a for _, a in self.accs())

    @property
    def final_top5(self) -> float | None:
        return self.rows[-1].get("val_top5")

    @property
    def train_seconds(self) -> float:
        return sum(r.get("epoch_seconds") or 0.0 for r in self.rows)

    @property
    def images_per_second(self) -> float | None:
        seconds = self.train_seconds
        return sum(r.get("train_samples") or 0 for r in self.rows) / seconds if seconds > 0 else None


@dataclass
class Skipped:
    """A run folder whose config.json cannot be read: in no group, listed with the reason."""
    config: Path
    reason: str

    @property
    def line(self) -> str:
        return f"{self.config}: {self.reason}; {SKIP_REMEDY}"


@dataclass
class Group:
    settings: dict              # the fewest settings that tell the groups apart: the table's and the plot's names
    differing: dict = field(default_factory=dict)   # every setting that differs between the groups (summary.csv)
    runs: list[Run] = field(default_factory=list)

    @property
    def name(self) -> str:
        return " ".join(f"{k}={show(v)}" for k, v in self.settings.items()) or "all"

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.finished]

    @property
    def not_finished(self) -> list[Run]:
        return [r for r in self.runs if r.status == NOT_FINISHED]

    @property
    def unreadable(self) -> list[Run]:
        return [r for r in self.runs if r.status == UNREADABLE]


def show(value) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


# ---- reading runs -------------------------------------------------------------------------------------

def find_runs(paths: list[str]) -> list[Path]:
    """Run folders: each PATH that holds a config.json, else every folder under PATH that does (whether or not
    it can be read: read_run says)."""
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} does not exist: give run folders or folders of runs")
        if not p.is_dir():
            raise UserError(f"{p} is not a folder: give run folders (holding config.json) or folders of runs")
        if (p / "config.json").is_file():
            found.append(p)
        else:
            found.extend(sorted(c.parent for c in p.rglob("config.json") if c.is_file()))
    unique = list(dict.fromkeys(found))
    if not unique:
        raise UserError(f"no dtrain runs under {', '.join(paths)} (a run folder holds the config.json and "
                        f"metrics.jsonl that training writes)")
    return unique


def _refuse_constant(name: str):
    raise ValueError(f"it holds {name}, which dtrain never writes")


def read_config(path: Path) -> dict:
    """The run folder's config.json. Unusable (the reason) when it cannot be read, is not UTF-8, is not strict
    JSON (NaN and Infinity included) or lacks a dtrain run's arch, dataset and epochs."""
    try:
        text = (path / "config.json").read_bytes().decode("utf-8")
    except OSError as e:
        raise Unusable(f"cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise Unusable(f"not UTF-8 (byte {e.start} is {e.object[e.start]:#04x})") from None
    try:
        config = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise Unusable(f"not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except ValueError as e:
        raise Unusable(f"not strict JSON ({e})") from None
    if not isinstance(config, dict) or not set(RUN_KEYS) <= set(config):
        raise Unusable(f"not a dtrain run's settings (it has no {', '.join(RUN_KEYS)})")
    return config


def resolved_settings(config: dict) -> dict:
    """config.json over the Config defaults, so a run saved before a field existed compares equal."""
    return {**Config().to_dict(), **config}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_figure(value) -> bool:
    return value is None or isinstance(value, (int, float)) and not isinstance(value, bool)


def check_row(path: Path, number: int, row: dict) -> None:
    """Unusable (naming the line and the value) unless the row's epoch and step are whole numbers, its
    summarized figures numbers or null, and no value NaN or infinite (dtrain writes those as null)."""
    where = f"{path} line {number}"
    for key in ("epoch", "step"):
        if key in row and not _is_int(row[key]):
            raise Unusable(f"{where}: {key} is {row[key]!r}, not a whole number; repair or remove that line")
    for key in SUMMARIZED:
        if not _is_figure(row.get(key)):
            raise Unusable(f"{where}: {key} is {row[key]!r}, not a number; repair or remove that line")
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise Unusable(f"{where}: {key} is {value!r} (dtrain writes null for a figure that is not finite: the "
                           f"file was edited or written by another program); repair or remove that line")


def read_rows(path: Path) -> list[dict]:
    """metrics.jsonl's epoch rows, each checked (check_row). A line cut short by a kill at the end is left
    out (report.metrics); a line damaged elsewhere, or a file that cannot be read, is Unusable."""
    try:
        numbered = [(n, row) for n, row in read_numbered_metrics(path) if isinstance(row, dict) and "epoch" in row]
    except UserError as e:
        raise Unusable(str(e)) from None
    except OSError as e:
        raise Unusable(f"{path} cannot be read ({e.strerror or e})") from None
    for number, row in numbered:
        check_row(path, number, row)
    return [row for _, row in numbered]


def check_plan(settings: dict) -> None:
    """Unusable unless config.json's epochs is a whole number and max_steps one or null."""
    epochs, max_steps = settings.get("epochs"), settings.get("max_steps")
    if not _is_int(epochs):
        raise Unusable(f"config.json: epochs is {epochs!r}, not a whole number")
    if not (max_steps is None or _is_int(max_steps)):
        raise Unusable(f"config.json: max_steps is {max_steps!r}, not a whole number")


def progress(rows: list[dict], settings: dict) -> tuple[str, str]:
    """(FINISHED, "") when the last row reaches the planned end with a val_acc, else (NOT_FINISHED, why)."""
    epochs, max_steps = settings["epochs"], settings.get("max_steps")
    if not rows:
        return NOT_FINISHED, "no epoch finished (failed early, or still in epoch 1)"
    last = rows[-1]
    reached = last["epoch"] >= epochs or (max_steps is not None and last.get("step", 0) >= max_steps)
    if reached and last.get("val_acc") is not None:
        return FINISHED, ""
    return NOT_FINISHED, f"ended at epoch {last['epoch']} of {epochs} (stopped, failed, or still running)"


def read_run(path: Path) -> Run | Skipped:
    """The run in a folder: Skipped when its config.json cannot be read, an UNREADABLE Run when its figures
    cannot be trusted, else a finished or not finished Run."""
    try:
        settings = resolved_settings(read_config(path))
    except Unusable as e:
        return Skipped(path / "config.json", str(e))
    try:
        check_plan(settings)
        rows = read_rows(path / "metrics.jsonl")
    except Unusable as e:
        return Run(path, settings, [], UNREADABLE, str(e))
    return Run(path, settings, rows, *progress(rows, settings))


# ---- groups -------------------------------------------------------------------------------------------

def _value_key(settings: dict, key: str) -> str:
    return json.dumps(settings[key], sort_keys=True) if key in settings else "<absent>"


def _flag_order(keys) -> list[str]:
    return sorted(keys, key=lambda k: (FLAG_ORDER.get(k, len(FLAG_ORDER)), k))


def differing_settings(reps: list[dict]) -> list[str]:
    """The settings (IGNORED apart) whose values differ between these groups' settings, in the flags' order."""
    names = {k for s in reps for k in s if not ignored(k)}
    return _flag_order(k for k in names if len({_value_key(s, k) for s in reps}) > 1)


def separating_settings(reps: list[dict], differ: list[str], chosen: tuple[str, ...] = ()) -> list[str]:
    """The fewest of `differ` that tell the groups apart, in the flags' order: picked one at a time after
    `chosen`, each the one that splits the groups into the most classes (ties: the first flag)."""
    def classes(keys: list[str]) -> int:
        return len({tuple(_value_key(s, k) for k in keys) for s in reps})

    chosen = list(chosen)
    while classes(chosen) < len(reps) and len(chosen) < len(differ):
        chosen.append(max((k for k in differ if k not in chosen), key=lambda k: classes([*chosen, k])))
    return [k for k in differ if k in chosen]


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups of equal settings (the IGNORED ones apart), each named by the settings that tell them apart."""
    def key(run):
        return json.dumps({k: v for k, v in run.settings.items() if not ignored(k)}, sort_keys=True)

    by_key: dict[str, list[Run]] = {}
    for run in runs:
        by_key.setdefault(key(run), []).append(run)
    reps = [members[0].settings for members in by_key.values()]
    differ = differing_settings(reps)
    names = separating_settings(reps, differ)
    if len(names) > NAME_COLUMNS and all(len({_value_key(r.settings, "recipe") for r in members}) == 1
                                         for members in by_key.values()):
        by_recipe = separating_settings(reps, ["recipe", *differ], ("recipe",))
        if len(by_recipe) < len(names):
            names, differ = by_recipe, ["recipe", *differ]
    groups = [Group({k: members[0].settings.get(k) for k in names}, {k: members[0].settings.get(k) for k in differ},
                    members) for members in by_key.values()]
    groups.sort(key=lambda g: [_order(v) for v in [*g.settings.values(), *g.differing.values()]])
    return groups


def _order(value):
    if isinstance(value, bool) or value is None:
        return (0, str(value))
    if isinstance(value, (int, float)):
        return (1, value)
    return (2, show(value))


def short_names(keys: list[str]) -> dict[str, str]:
    """A column title per setting: the setting itself when it is one word or at most 8 characters, else the
    initials of its words (batch_size -> bs), made longer where two would be equal."""
    titles: dict[str, str] = {}
    for key in keys:
        words = key.split("_")
        candidates = [key] if len(words) == 1 or len(key) <= 8 else \
            ["".join(w[:1] for w in words), "".join(w[:2] for w in words), key]
        taken = set(titles.values()) | (set(keys) - {key})
        titles[key] = next((c for c in candidates if c not in taken), key)
    return titles


# ---- statistics ---------------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """The mean and the sample standard deviation (ddof=1; None for fewer than two values)."""
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def group_stats(group: Group) -> dict:
    """The group's CSV row (without its settings)."""
    done = group.finished
    final, best = [r.final_acc for r in done], [r.best_acc for r in done]
    rates = [r.images_per_second for r in done if r.images_per_second is not None]
    top5 = [r.final_top5 for r in done if r.final_top5 is not None]
    stats = {"group": group.name, "n": len(done)}
    stats["final_acc_mean"], stats["final_acc_std"] = mean_std(final)
    stats["best_acc_mean"], stats["best_acc_std"] = mean_std(best)
    stats["train_seconds_mean"] = mean_std([r.train_seconds for r in done])[0]
    stats["final_acc_min"], stats["final_acc_max"] = (min(final), max(final)) if final else (None, None)
    stats["best_acc_min"], stats["best_acc_max"] = (min(best), max(best)) if best else (None, None)
    stats["images_per_second_mean"] = mean_std(rates)[0]
    stats["not_finished"] = len(group.not_finished)
    stats["unreadable"] = len(group.unreadable)
    if top5 and len(top5) == len(done):
        stats["final_top5_mean"], stats["final_top5_std"] = mean_std(top5)
    return stats


# ---- output -------------------------------------------------------------------------------------------

def csv_text(groups: list[Group]) -> str:
    """summary.csv: a row per group, its statistics, then a column per setting that differs between groups."""
    rows = [group_stats(g) for g in groups]
    setting_names = list(groups[0].differing) if groups else []
    columns = CSV_COLUMNS + [c for c in TOP5_COLUMNS if any(c in r for r in rows)] + setting_names
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for g, r in zip(groups, rows):
        values = {**r, **{k: show(v) if v is not None else "" for k, v in g.differing.items()}}
        w.writerow(["" if values.get(c) is None else values[c] for c in columns])
    return buf.getvalue()


LINE_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "v"), ("-", "D"), ("--", "x"))  # 10 colours: 60 groups
LEGEND_FONT = 8
LEGEND_WRAP = 90           # characters of a legend entry's line
FIGURE_WIDTH = 10          # inches


def line_style(i: int) -> dict:
    """The i-th group's line: one of 10 colours, then the next dash and marker every 10 groups."""
    dash, marker = LINE_STYLES[i // 10 % len(LINE_STYLES)]
    return {"color": f"C{i % 10}", "linestyle": dash, "marker": marker}


def legend_shape(labels: list[str]) -> tuple[int, float]:
    """(columns, inches of height) of a legend of these labels under the axes of a FIGURE_WIDTH figure: as
    many columns as the longest label allows (at most 3), filled one after the other as matplotlib does, a
    line of LEGEND_FONT text about 0.19 in high."""
    widest = max(len(line) for label in labels for line in label.splitlines())
    columns = max(1, min(3, int(FIGURE_WIDTH * 13.5) // (widest + 8)))
    lines = [label.count("\n") + 1 for label in labels]
    rows = math.ceil(len(labels) / columns)
    per_column = max(sum(lines[start:start + rows]) for start in range(0, len(labels), rows))
    return columns, 0.45 + per_column * 0.19


def draw(groups: list[Group]):
    """The Figure of summary.png: val_acc per epoch per group (the mean as a line, min..max as a band), the
    legend under the axes, the figure as tall as the legend needs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = [(g, _per_epoch(g), line_style(i)) for i, g in enumerate(groups)]
    curves = [(g, per_epoch, style) for g, per_epoch, style in curves if per_epoch]
    labels = [textwrap.fill(f"{g.name} (n={len(g.finished)}, final {_mean(per_epoch[max(per_epoch)]):.2f}%)",
                            LEGEND_WRAP) for g, per_epoch, _ in curves]
    columns, legend_height = legend_shape(labels) if labels else (1, 0.0)
    fig = Figure(figsize=(FIGURE_WIDTH, 5.5 + legend_height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (g, per_epoch, style), label in zip(curves, labels):
        epochs = sorted(per_epoch)
        ax.plot(epochs, [_mean(per_epoch[e]) for e in epochs], markersize=3, markevery=max(1, len(epochs) // 20),
                linewidth=1.4, label=label, **style)
        ax.fill_between(epochs, [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs],
                        color=style["color"], alpha=0.15, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("validation accuracy per epoch: mean over finished runs, band min..max", fontsize=11)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if curves:
        fig.legend(loc="outside lower center", ncols=columns, fontsize=LEGEND_FONT, frameon=False)
    else:
        ax.text(0.5, 0.5, "no finished run", transform=ax.transAxes, ha="center", va="center", color="grey")
    return fig


def _per_epoch(group: Group) -> dict[int, list[float]]:
    per_epoch: dict[int, list[float]] = {}
    for run in group.finished:
        for epoch, acc in run.accs():
            per_epoch.setdefault(epoch, []).append(acc * 100)
    return per_epoch


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def render(groups: list[Group]) -> bytes:
    """summary.png's bytes (draw)."""
    buf = io.BytesIO()
    draw(groups).savefig(buf, format="png")
    return buf.getvalue()


def _pct(mean, std) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2%}" + (f" ± {std * 100:.2f}" if std is not None else "")


def _range(lo, hi) -> str:
    return "-" if lo is None else f"{lo:.2%}..{hi:.2%}"


def _count(n: int) -> str:
    return f"[yellow]{n}[/]" if n else "0"


def print_table(groups: list[Group], console) -> None:
    """The table (a row per group, its separating settings under short titles), the legend of those titles,
    the other settings that differ, and each run outside the statistics with the reason."""
    stats = [group_stats(g) for g in groups]
    top5 = any("final_top5_mean" in s for s in stats)
    unreadable = any(s["unreadable"] for s in stats)
    titles = short_names(list(groups[0].settings)) if groups else {}
    table = Table(box=None, pad_edge=False, collapse_padding=True, header_style="bold")
    for title in titles.values():
        table.add_column(escape(title), overflow="fold")
    for col in ["n", "final val_acc", "final min..max", "best val_acc", "best min..max"] + \
               (["final top-5"] if top5 else []) + ["train s", "img/s", "not finished"] + \
               (["unreadable"] if unreadable else []):
        table.add_column(col, justify="right", overflow="fold")
    for g, s in zip(groups, stats):
        cells = [escape(show(v)) for v in g.settings.values()]
        cells += [str(s["n"]), _pct(s["final_acc_mean"], s["final_acc_std"]),
                  _range(s["final_acc_min"], s["final_acc_max"]), _pct(s["best_acc_mean"], s["best_acc_std"]),
                  _range(s["best_acc_min"], s["best_acc_max"])]
        if top5:
            cells.append(_pct(s.get("final_top5_mean"), s.get("final_top5_std")))
        cells += ["-" if s["train_seconds_mean"] is None else f"{s['train_seconds_mean']:.1f}",
                  "-" if s["images_per_second_mean"] is None else f"{s['images_per_second_mean']:,.0f}",
                  _count(s["not_finished"])] + ([_count(s["unreadable"])] if unreadable else [])
        table.add_row(*cells)
    console.print(table)
    console.print("mean ± sample standard deviation (ddof=1, in points) over the finished runs of each group")
    print_legend(groups, titles, console)
    print_outside(groups, console)


def print_legend(groups: list[Group], titles: dict[str, str], console) -> None:
    """What the short titles stand for, and the settings that differ but are not in the table."""
    short = [f"{title} = {flag_name(key)}" for key, title in titles.items() if title != key]
    if short:
        console.print(escape("settings: " + ", ".join(short)))
    others = [k for k in (groups[0].differing if groups else {}) if k not in titles]
    if others:
        console.print(escape(f"also differ between the groups (a column each in summary.csv): {', '.join(others)}"))


def print_outside(groups: list[Group], console) -> None:
    """Each run counted apart from the statistics, with its group and the reason."""
    for status, runs in ((NOT_FINISHED, lambda g: g.not_finished), (UNREADABLE, lambda g: g.unreadable)):
        for g in groups:
            for run in runs(g):
                console.print(f"[yellow]{status}[/]: " + escape(f"{run.path} ({g.name}): {run.reason}; "
                                                                f"not in the statistics"))


def print_skipped(skipped: list[Skipped], console) -> None:
    for s in skipped:
        console.print("[yellow]skipped[/]: " + escape(s.line))


OUT_REMEDY = "pass --out DIR with a writable folder"


def write_outputs(groups: list[Group], out: Path) -> tuple[Path, Path]:
    csv_path, png_path = out / "summary.csv", out / "summary.png"
    make_folder(out, remedy=OUT_REMEDY)
    write_text(csv_path, csv_text(groups), remedy=OUT_REMEDY)
    write_bytes(png_path, render(groups), remedy=OUT_REMEDY)
    return csv_path, png_path


# ---- the command --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dtrain summarize",
        description="Summarise finished runs: one row per group of runs with equal settings (seed, output "
                    "and logging apart): mean ± std (ddof=1) and min..max of the final and best val_acc, "
                    "training seconds and img/s. Writes summary.csv and summary.png.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="run folders, or folders holding run folders")
    p.add_argument("--out", default=".", help="folder for summary.csv and summary.png (default: the current one)")
    return p


def counts_line(runs: list[Run], skipped: list[Skipped], groups: list[Group]) -> str:
    """The first line: how many run folders, how they stand, in how many groups."""
    states = [(sum(r.status == s for r in runs), s) for s in (FINISHED, NOT_FINISHED, UNREADABLE)]
    parts = [f"{n} {s}" for n, s in states if n or s == FINISHED] + ([f"{len(skipped)} skipped"] if skipped else [])
    total = len(runs) + len(skipped)
    return (f"[bold]dtrain summarize[/]: {total} run{'s' * (total != 1)} ({', '.join(parts)}) in {len(groups)} "
            f"group{'s' * (len(groups) != 1)}")


def no_run_error(skipped: list[Skipped]) -> UserError:
    if len(skipped) == 1:
        return UserError(f"no run to summarize: {skipped[0].line}")
    return UserError(f"no run to summarize: the config.json of each of the {len(skipped)} run folders above cannot "
                     f"be read; repair them, or give other paths")


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    found = [read_run(p) for p in find_runs(args.paths)]
    runs = [r for r in found if isinstance(r, Run)]
    skipped = [r for r in found if isinstance(r, Skipped)]
    console = make_console()
    if not runs:
        if len(skipped) > 1:
            print_skipped(skipped, console)
        raise no_run_error(skipped)
    groups = group_runs(runs)
    console.print(counts_line(runs, skipped, groups))
    print_table(groups, console)
    print_skipped(skipped, console)
    csv_path, png_path = write_outputs(groups, Path(args.out))
    console.print(escape(f"wrote {csv_path} and {png_path}"))
    return {"groups": [{**group_stats(g), "settings": g.differing} for g in groups],
            "skipped": [{"config": str(s.config), "reason": s.reason} for s in skipped],
            "csv": str(csv_path), "png": str(png_path)}


def main(argv=None) -> None:
    run_command(run, argv)


if __name__ == "__main__":
    main()
