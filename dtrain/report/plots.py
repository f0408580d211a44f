"""A picture of the run: <output-dir>/run.png, redrawn after epochs and at the end (main process only).

Left: loss, accuracy (train vs val, per epoch; val top-5 dashed where there are more than 5 classes) and
the learning rate; right: the confusion matrix of the latest evaluation (rows: true class with its recall,
columns: predicted class; colour: share of the row, numbers: image counts). The title says how far the run
got, its latest and best validation accuracy (and top-5), so a glance tells whether the run went well.

matplotlib is a dependency of dtrain; where it is missing anyway, a run warns once and draws nothing. Drawing uses
the Agg canvas directly (no pyplot, no display). Redraws are throttled so they take at most about 5% of
the run's wall time (a fast GPU epoch is shorter than a redraw); the final picture is always drawn. The
file is replaced atomically, so a viewer never reads half a PNG.
"""
from __future__ import annotations

import io
import time
from pathlib import Path
import numpy as np

from dtrain.files import atomic_write
from dtrain.report.metrics import read_metrics

MAX_SHARE = 0.05          # redraw when drawing has used at most this share of the time since the last draw
ANNOTATE_MAX = 20         # write the counts in the confusion cells up to this many classes
NAMES_MAX = 40            # class names on the confusion axes up to this many classes

class PlotReporter:
    def __init__(self, output_dir, resumed_epoch: int | None = None):
        self.path = Path(output_dir) / "run.png"
        self.rows = []
        if resumed_epoch is not None:  # the curves so far, as metrics.jsonl holds them
            self.rows = [r for r in read_metrics(Path(output_dir) / "metrics.jsonl") if r["epoch"] <= resumed_epoch]
        self.classes: list[str] = []
        self.title = ""
        self.epochs = None
        self.confusion = None      # (epoch, K x K counts)
        self.dirty = False
        self.last_draw_end = None
        self.draw_seconds = 0.0

    def start(self, cfg, info: dict) -> None:
        self.classes = [str(c) for c in info.get("classes") or []]
        self.title = f"{cfg.arch} on {cfg.dataset} ({Path(info.get('output_dir', self.path.parent)).name})"
        self.epochs = cfg.epochs

    def _take(self, row: dict | None, evaluation) -> None:
        if row is not None:
            self.rows.append(dict(row))
        if evaluation is not None and len(evaluation.targets):
            k = len(self.classes) or int(max(evaluation.targets.max(), evaluation.preds.max())) + 1
            epoch = row["epoch"] if row is not None else (self.rows[-1]["epoch"] if self.rows else 0)
            self.confusion = (epoch, evaluation.confusion(k).cpu().numpy())
        self.dirty = True

    def epoch(self, row: dict, evaluation=None) -> None:
        self._take(row, evaluation)
        now = time.perf_counter()
        if self.last_draw_end is None or \
                self.draw_seconds <= MAX_SHARE * (now - self.last_draw_end + self.draw_seconds):
            self.draw()

    def end(self, summary: dict, evaluation=None) -> None:
        if evaluation is not None and self.confusion is None:  # epoch() normally brought it already
            self._take(None, evaluation)
        self.draw()

    def close(self) -> None:
        if self.dirty:  # e.g. stopped by a signal after undrawn epochs
            self.draw()

    # ---- drawing -----------------------------------------------------------------------------------
    def draw(self) -> None:
        t0 = time.perf_counter()
        png = render(self.rows, self.confusion, self.classes, self.title, self.epochs)
        atomic_write(self.path, lambda f: f.write(png))
        self.dirty = False
        self.last_draw_end = time.perf_counter()
        self.draw_seconds = self.last_draw_end - t0


def _series(rows: list[dict], key: str, scale: float = 1.0):
    pts = [(r["epoch"], r[key] * scale) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def render(rows: list[dict], confusion, classes: list[str], title: str = "", epochs: int | None = None) -> bytes:
    """The run picture as PNG bytes."""
    buf = io.BytesIO()
    figure(rows, confusion, classes, title, epochs).savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def figure(rows: list[dict], confusion, classes: list[str], title: str = "", epochs: int | None = None):
    """The run picture as a matplotlib Figure on an Agg canvas (matplotlib is loaded when a picture is drawn)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(classes) if classes else (0 if confusion is None else confusion[1].shape[0])
    side = 7.0 if k <= 12 else min(16.0, 4.0 + 0.3 * k) if k <= NAMES_MAX else 9.0
    fig = Figure(figsize=(6.5 + side + (2.0 if 0 < k <= NAMES_MAX else 0.0), max(7.5, side)), dpi=100,
                 layout="constrained")       # room for long class names, whatever their length
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(3, 2, width_ratios=[6.5, side], height_ratios=[3, 3, 1.6])
    ax_loss, ax_acc, ax_lr = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[2, 0])
    ax_cm = fig.add_subplot(gs[:, 1])

    style = {"marker": "o", "markersize": 3 if len(rows) > 30 else 4, "linewidth": 1.6}
    for ax, key, label, scale in ((ax_loss, "loss", "loss", 1.0), (ax_acc, "acc", "accuracy (%)", 100.0)):
        lines = [(f"train_{key}", "train", "tab:blue", "-"), (f"val_{key}", "val", "tab:orange", "-")]
        if key == "acc":
            lines.append(("val_top5", "val top-5", "tab:orange", "--"))
        for series, name, colour, linestyle in lines:
            x, y = _series(rows, series, scale)
            if x:
                if series.startswith("val") and key == "acc":
                    best = int(np.argmax(y))
                    name = f"{name} (best {y[best]:.2f}% at epoch {x[best]})"
                ax.plot(x, y, color=colour, linestyle=linestyle, label=name, **style)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize=9)
    ax_loss.set_title("loss per epoch", fontsize=10)
    ax_acc.set_title("accuracy per epoch", fontsize=10)
    x, y = _series(rows, "lr")
    if x:
        ax_lr.plot(x, y, color="tab:green", **style)
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useOffset=False)
    ax_lr.set_xlabel("epoch")
    ax_lr.grid(alpha=0.3)
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.xaxis.get_major_locator().set_params(integer=True)
        if not rows:
            ax.text(0.5, 0.5, "no epoch finished yet", transform=ax.transAxes, ha="center", va="center",
                    color="grey")

    if confusion is None:
        ax_cm.text(0.5, 0.5, "no evaluation yet", transform=ax_cm.transAxes, ha="center", va="center", color="grey")
        ax_cm.set_axis_off()
    else:
        _confusion(ax_cm, fig, confusion[0], np.asarray(confusion[1]), classes)

    done = rows[-1]["epoch"] if rows else 0
    head = title + (f"  |  epoch {done}/{epochs}" if epochs else f"  |  epoch {done}")
    accs = [r["val_acc"] for r in rows if r.get("val_acc") is not None]
    if accs:
        head += f"  |  val acc {accs[-1]:.2%} (best {max(accs):.2%})"
    top5 = [r["val_top5"] for r in rows if r.get("val_top5") is not None]
    if top5:
        head += f", top-5 {top5[-1]:.2%}"
    fig.suptitle(head, fontsize=12, fontweight="bold")
    return fig


def _confusion(ax, fig, epoch: int, cm, classes: list[str]) -> None:
    from matplotlib.colors import PowerNorm
    k = cm.shape[0]
    names = classes if len(classes) == k else [str(i) for i in range(k)]
    totals = cm.sum(1, keepdims=True)
    share = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)
    # a square-root colour scale, so that a few percent of confusion stands out next to the diagonal
    im = ax.imshow(share, cmap="Blues", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label("share of the true class", fontsize=9)
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"confusion matrix (validation, epoch {epoch}): {acc:.2%} of {int(cm.sum()):,} correct",
                 fontsize=10)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (recall)")
    if k <= NAMES_MAX:
        recall = np.diag(share)
        fs = 9 if k <= 15 else 7
        tilt = k > 4 and max(len(n) for n in names) > 3
        ax.set_xticks(range(k), [n[:28] for n in names], rotation=45 if tilt else 0, ha="right" if tilt else "center",
                      fontsize=fs)
        ax.set_yticks(range(k), [f"{n[:28]} ({r:.0%})" for n, r in zip(names, recall)], fontsize=fs)
    if k <= ANNOTATE_MAX:
        fs = 9 if k <= 12 else 7
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=fs,
                            color="white" if share[i, j] > 0.4 else "black")
