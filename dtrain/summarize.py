"""Many runs, one answer: a table of the runs under some folders, grouped by their settings.

    dtrain summarize runs/                         # every run folder under runs/
    python -m dtrain.summarize runs/a runs/b --out results/

A run folder is a folder with the config.json that dtrain writes. Runs whose resolved settings are equal
apart from the seed, the output and the logging fields (IGNORED) form a group: one row of the table with
n, mean ± std and min..max of the final and of the best val_acc, the mean training seconds and img/s.

A run is finished when its metrics.jsonl reaches the planned end: the last row is epoch `epochs` (or
step `max_steps` or beyond) and has a val_acc. Anything else (stopped by a signal and not resumed,
killed, failed, still running, or no epoch done at all) is counted apart in the group's "not finished"
column and listed under the table; it never enters the statistics.

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
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from dtrain.config import Config, settings_where
from dtrain.epoch_row import SUMMARIZED
from dtrain.errors import UserError, run_command
from dtrain.files import make_folder, write_bytes, write_text
from dtrain.report.console import make_console
from dtrain.report.metrics import read_metrics

# Settings that do not change what is trained (the seed, where the output goes, how the run is logged and
# saved, where the data comes from): declared on each Config field (Policy.groups).
IGNORED = frozenset(settings_where(lambda p: not p.groups))

CSV_COLUMNS = ["group", "n", "final_acc_mean", "final_acc_std", "best_acc_mean", "best_acc_std",
               "train_seconds_mean", "final_acc_min", "final_acc_max", "best_acc_min", "best_acc_max",
               "images_per_second_mean", "not_finished"]
TOP5_COLUMNS = ["final_top5_mean", "final_top5_std"]


def ignored(key: str) -> bool:
    return key in IGNORED


@dataclass
class Run:
    path: Path
    settings: dict
    rows: list[dict]
    status: str                 # "finished" or "not finished"
    reason: str = ""            # why it is not finished

    @property
    def finished(self) -> bool:
        return self.status == "finished"

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
class Group:
    settings: dict              # the group's settings that differ between the groups
    runs: list[Run] = field(default_factory=list)

    @property
    def name(self) -> str:
        return " ".join(f"{k}={show(v)}" for k, v in self.settings.items()) or "all"

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.finished]

    @property
    def not_finished(self) -> list[Run]:
        return [r for r in self.runs if not r.finished]


def show(value) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


# ---- reading runs -------------------------------------------------------------------------------------

def find_runs(paths: list[str]) -> list[Path]:
    """Run folders: each PATH that holds a config.json, else every folder under PATH that does."""
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} does not exist: give run folders or folders of runs")
        if not p.is_dir():
            raise UserError(f"{p} is not a folder: give run folders (holding config.json) or folders of runs")
        if (p / "config.json").is_file():
            found.append(p)
        else:
            found.extend(sorted(c.parent for c in p.rglob("config.json") if _is_run_config(c)))
    unique = list(dict.fromkeys(found))
    if not unique:
        raise UserError(f"no dtrain runs under {', '.join(paths)} (a run folder holds the config.json and "
                        f"metrics.jsonl that training writes)")
    return unique


def _is_run_config(path: Path) -> bool:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"arch", "dataset", "epochs"} <= set(config)


def read_rows(path: Path) -> list[dict]:
    """metrics.jsonl's epoch rows (report.metrics.read_metrics: a line cut short by a kill at the end is
    left out; a line damaged elsewhere is a UserError naming it)."""
    return [row for row in read_metrics(path) if isinstance(row, dict) and "epoch" in row]


def resolved_settings(config: dict) -> dict:
    """config.json over the Config defaults, so a run saved before a field existed compares equal."""
    return {**Config().to_dict(), **config}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_run(path: Path) -> Run:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path / 'config.json'} cannot be read ({e}); remove the folder from the paths "
                        f"or repair the file") from None
    if not isinstance(config, dict) or "arch" not in config:
        raise UserError(f"{path / 'config.json'} is not a dtrain run configuration")
    settings = resolved_settings(config)
    try:
        rows = read_rows(path / "metrics.jsonl")
    except UserError as e:
        return Run(path, settings, [], "not finished", f"unreadable: {e}")
    epochs, max_steps = settings.get("epochs"), settings.get("max_steps")
    if not rows:
        return Run(path, settings, rows, "not finished", "no epoch finished (failed early, or still in epoch 1)")
    if not _is_int(epochs) or not (max_steps is None or _is_int(max_steps)) or not all(
            isinstance(r, dict) and _is_int(r.get("epoch")) and _is_int(r.get("step", 0))
            and all(isinstance(r.get(k), (int, float, type(None))) for k in SUMMARIZED) for r in rows):
        return Run(path, settings, [], "not finished", "unreadable: an epoch count or a figure in config.json or "
                                                       "metrics.jsonl is not a number")
    last = rows[-1]
    reached = last["epoch"] >= epochs or (max_steps is not None and last.get("step", 0) >= max_steps)
    if reached and last.get("val_acc") is not None:
        return Run(path, settings, rows, "finished")
    return Run(path, settings, rows, "not finished",
               f"ended at epoch {last['epoch']} of {epochs} (stopped, failed, or still running)")


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups of equal settings (the IGNORED ones apart), each named by the settings that differ between groups."""
    def key(run):
        return json.dumps({k: v for k, v in run.settings.items() if not ignored(k)}, sort_keys=True)

    by_key: dict[str, list[Run]] = {}
    for run in runs:
        by_key.setdefault(key(run), []).append(run)
    reps = [members[0].settings for members in by_key.values()]
    names = sorted({k for s in reps for k in s if not ignored(k)})
    differ = [k for k in names if len({json.dumps(s.get(k), sort_keys=True) for s in reps}) > 1]
    groups = [Group({k: members[0].settings.get(k) for k in differ}, members) for members in by_key.values()]
    groups.sort(key=lambda g: [_order(v) for v in g.settings.values()])
    return groups


def _order(value):
    if isinstance(value, bool) or value is None:
        return (0, str(value))
    if isinstance(value, (int, float)):
        return (1, value)
    return (2, show(value))


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
    if top5 and len(top5) == len(done):
        stats["final_top5_mean"], stats["final_top5_std"] = mean_std(top5)
    return stats


# ---- output -------------------------------------------------------------------------------------------

def csv_text(groups: list[Group]) -> str:
    rows = [group_stats(g) for g in groups]
    setting_names = list(groups[0].settings) if groups else []
    columns = CSV_COLUMNS + [c for c in TOP5_COLUMNS if any(c in r for r in rows)] + setting_names
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for g, r in zip(groups, rows):
        values = {**r, **{k: show(v) if v is not None else "" for k, v in g.settings.items()}}
        w.writerow(["" if values.get(c) is None else values[c] for c in columns])
    return buf.getvalue()


def render(groups: list[Group]) -> bytes:
    """summary.png: val_acc per epoch per group, the mean as a line and min..max as a band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(groups))]
    for g, colour in zip(groups, colours):
        per_epoch: dict[int, list[float]] = {}
        for run in g.finished:
            for epoch, acc in run.accs():
                per_epoch.setdefault(epoch, []).append(acc * 100)
        if not per_epoch:
            continue
        epochs = sorted(per_epoch)
        mean = [math.fsum(per_epoch[e]) / len(per_epoch[e]) for e in epochs]
        ax.plot(epochs, mean, color=colour, marker="o", markersize=3, linewidth=1.6,
                label=f"{g.name} (n={len(g.finished)}, final {mean[-1]:.2f}%)")
        ax.fill_between(epochs, [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs],
                        color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("validation accuracy per epoch: mean over finished runs, band min..max", fontsize=11)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if ax.lines:
        ax.legend(loc="best", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no finished run", transform=ax.transAxes, ha="center", va="center", color="grey")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _pct(mean, std) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2%}" + (f" ± {std * 100:.2f}" if std is not None else "")


def _range(lo, hi) -> str:
    return "-" if lo is None else f"{lo:.2%}..{hi:.2%}"


def print_table(groups: list[Group], console) -> None:
    stats = [group_stats(g) for g in groups]
    top5 = any("final_top5_mean" in s for s in stats)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in groups[0].settings if groups else []:
        table.add_column(name)
    for col in ["n", "final val_acc", "final min..max", "best val_acc", "best min..max"] + \
               (["final top-5"] if top5 else []) + ["train s", "img/s", "not finished"]:
        table.add_column(col, justify="right")
    for g, s in zip(groups, stats):
        cells = [show(v) for v in g.settings.values()]
        cells += [str(s["n"]), _pct(s["final_acc_mean"], s["final_acc_std"]),
                  _range(s["final_acc_min"], s["final_acc_max"]), _pct(s["best_acc_mean"], s["best_acc_std"]),
                  _range(s["best_acc_min"], s["best_acc_max"])]
        if top5:
            cells.append(_pct(s.get("final_top5_mean"), s.get("final_top5_std")))
        cells += ["-" if s["train_seconds_mean"] is None else f"{s['train_seconds_mean']:.1f}",
                  "-" if s["images_per_second_mean"] is None else f"{s['images_per_second_mean']:,.0f}",
                  f"[yellow]{s['not_finished']}[/]" if s["not_finished"] else "0"]
        table.add_row(*cells)
    console.print(table)
    console.print("mean ± sample standard deviation (ddof=1, in points) over the finished runs of each group")
    for g in groups:
        for run in g.not_finished:
            console.print(f"[yellow]not finished[/]: {run.path} ({g.name}): {run.reason}; not in the statistics")


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


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    runs = [read_run(p) for p in find_runs(args.paths)]
    groups = group_runs(runs)
    console = make_console()
    done = sum(r.finished for r in runs)
    console.print(f"[bold]dtrain summarize[/]: {len(runs)} runs ({done} finished) in {len(groups)} groups")
    print_table(groups, console)
    csv_path, png_path = write_outputs(groups, Path(args.out))
    console.print(f"wrote {csv_path} and {png_path}")
    return {"groups": [{**group_stats(g), "settings": g.settings} for g in groups],
            "csv": str(csv_path), "png": str(png_path)}


def main(argv=None) -> None:
    run_command(run, argv)


if __name__ == "__main__":
    main()
