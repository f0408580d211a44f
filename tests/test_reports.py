"""TensorBoard scalars and the run picture (run.png)."""
from __future__ import annotations

import importlib.util
import io
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from dtrain.settings import build_config
from dtrain.inference import Evaluation
from dtrain.errors import UserError
from dtrain.report import plots
from dtrain.report.build import make_reporters
from helpers import tiny_run, train_here

# tensorboard is optional (the `tensorboard` extra) and matplotlib a dependency: CI should have both so these run
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard is not installed (pip install tensorboard)")


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def fake_eval(k: int, n: int = 50, seed: int = 0) -> Evaluation:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, k, (n,), generator=g)
    preds = torch.where(torch.rand(n, generator=g) < 0.8, targets, torch.randint(0, k, (n,), generator=g))
    return Evaluation(0.5, (preds == targets).float().mean().item(), torch.arange(n), preds, targets)


def row(epoch: int, step: int) -> dict:
    return {"epoch": epoch, "step": step, "train_loss": 2.0 / epoch, "train_acc": 1 - 0.5 / epoch,
            "val_loss": 2.2 / epoch, "val_acc": 1 - 0.6 / epoch, "lr": 0.1 / epoch, "epoch_seconds": 1.0,
            "images_per_second": 100.0, "train_samples": 100}


@needs_tensorboard
def test_tensorboard_run_writes_step_and_epoch_scalars(tmp_path):
    out = tmp_path / "run"
    train_here(tiny_run(out, "--epochs", "2", "--log-every", "1", "--tensorboard", batch=16))
    assert list((out / "tb").glob("events.out.tfevents.*"))
    s = scalars(out / "tb")
    for tag in ("train/loss", "train/lr", "train/images_per_second", "epoch/train_loss", "epoch/train_acc",
                "epoch/val_loss", "epoch/val_acc", "epoch/lr", "epoch/epoch"):
        assert tag in s, (tag, sorted(s))
    assert [st for st, _ in s["train/loss"]] == list(range(1, 9))            # 4 steps an epoch, logged each step
    assert [st for st, _ in s["epoch/val_acc"]] == [4, 8]                      # at each epoch's last step
    assert [v for _, v in s["epoch/epoch"]] == [1.0, 2.0]
    assert all(0.0 <= v <= 1.0 for _, v in s["epoch/val_acc"])


@needs_tensorboard
def test_tensorboard_resume_purges_the_killed_runs_later_steps(tmp_path):
    from dtrain.report.tensorboard import TensorBoardReporter
    cfg = build_config(["--arch", "cnn", "--dataset", "fake"])
    info = {"train_size": 1, "val_size": 1, "num_classes": 2, "parameters": 1, "world_size": 1}
    first = TensorBoardReporter(tmp_path)
    first.start(cfg, info)
    for st in range(1, 11):                      # ran to step 10, but the checkpoint it left is at step 6
        first.step(st, {"loss": 1.0, "lr": 0.1, "images_per_second": 5.0})
    first.close()
    # the resumed run starts later than the killed one: its event file sorts after the first by its time stamp
    # (in the same second the files' order would be that of a per-process counter, 9 before 10)
    time.sleep(1.1)
    second = TensorBoardReporter(tmp_path, resumed=True)
    second.start(cfg, info)
    for st in range(7, 13):
        second.step(st, {"loss": 2.0, "lr": 0.1, "images_per_second": 5.0})
    second.close()
    s = scalars(tmp_path / "tb")["train/loss"]
    assert [st for st, _ in s] == list(range(1, 13))
    assert [v for _, v in s] == [1.0] * 6 + [2.0] * 6


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # import -> ImportError
    cfg = build_config(["--arch", "cnn", "--dataset", "fake", "--tensorboard"])
    for is_main in (True, False):       # every process fails alike
        with pytest.raises(UserError, match="pip install tensorboard"):
            make_reporters(cfg, tmp_path, None, is_main)


def test_run_picture_from_a_real_run(tmp_path):
    out = tmp_path / "run"
    train_here(tiny_run(out, "--epochs", "2", "--plots", batch=16))
    png = out / "run.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.size[0] > 800 and im.size[1] > 500
    assert not list(out.glob(".run.png.*"))       # no temp files left behind


def test_plot_reporter_redraws_and_keeps_the_history_on_resume(tmp_path):
    cfg = SimpleNamespace(arch="cnn", dataset="fake", epochs=3)
    classes = ["cat", "dog", "frog"]
    rep = plots.PlotReporter(tmp_path)
    rep.start(cfg, {"classes": classes, "output_dir": str(tmp_path)})
    rep.epoch(row(1, 4), fake_eval(3))
    assert (tmp_path / "run.png").is_file() and rep.confusion[1].sum() == 50
    first = (tmp_path / "run.png").read_bytes()
    rep.draw_seconds = 0.0
    rep.epoch(row(2, 8), fake_eval(3, seed=1))
    rep.end({"steps": 8, "best_acc": 0.7}, fake_eval(3, seed=1))
    assert (tmp_path / "run.png").read_bytes() != first
    # a resumed run's picture starts from metrics.jsonl's rows
    import json
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row(e, 4 * e)) + "\n" for e in (1, 2, 3)))
    again = plots.PlotReporter(tmp_path, resumed_epoch=2)
    assert [r["epoch"] for r in again.rows] == [1, 2]


def test_redraws_are_throttled_when_drawing_would_dominate(tmp_path):
    rep = plots.PlotReporter(tmp_path)
    rep.start(SimpleNamespace(arch="a", dataset="b", epochs=100), {"classes": ["x", "y"]})
    calls = []

    def slow_draw():  # pretend each picture takes 10 s to draw
        calls.append(1)
        rep.dirty, rep.last_draw_end, rep.draw_seconds = False, time.perf_counter(), 10.0
    rep.draw = slow_draw
    for e in range(1, 6):
        rep.epoch(row(e, e), fake_eval(2))
    assert len(calls) == 1 and rep.dirty      # a 10 s draw after sub-second epochs: drawn once
    rep.end({"steps": 5}, fake_eval(2))
    assert len(calls) == 2                    # the final picture is always drawn


@pytest.mark.parametrize("k", [1, 14, 100])
def test_render_handles_any_number_of_classes(k):
    ev = fake_eval(k, n=300)
    png = plots.render([row(1, 1), {**row(2, 2), "val_loss": None, "val_acc": None}], (1, ev.confusion(k).numpy()),
                       [f"class {i}" for i in range(k)], "title", 5)
    with Image.open(io.BytesIO(png)) as im:
        im.verify()


def test_run_picture_draws_val_top5_where_the_rows_have_it():
    rows = [{**row(1, 4), "val_top5": 0.9}, {**row(2, 8), "val_top5": 0.95}]
    fig = plots.figure(rows, None, [], "t", 2)
    labels = [line.get_label() for ax in fig.axes for line in ax.lines]
    assert "val top-5 (best 95.00% at epoch 2)" in labels and "top-5 95.00%" in fig.get_suptitle()
    fig = plots.figure([row(1, 4), {**row(2, 8), "val_top5": None}], None, [], "t", 2)
    labels = [line.get_label() for ax in fig.axes for line in ax.lines]
    assert not any("top-5" in text for text in labels + [fig.get_suptitle()])


def test_console_table_has_val_top5_for_more_than_five_classes():
    from rich.console import Console

    from dtrain.report.console import ConsoleReporter
    cfg = build_config(["--arch", "cnn", "--dataset", "fake"])
    info = {"train_size": 10, "val_size": 10, "parameters": 1, "world_size": 1, "distributed_type": "NO",
            "device": "cpu", "per_process_batch": 8, "precision": "no", "output_dir": "x"}
    for k in (100, 6, 5, 2):
        buf = io.StringIO()
        rep = ConsoleReporter(Console(file=buf, width=200))
        rep.start(cfg, {**info, "num_classes": k})
        rep.epoch({**row(1, 4), "val_top5": 0.875 if k > 5 else None})
        rep.epoch({**row(2, 8), "val_top5": None})                  # an epoch without evaluation
        table = buf.getvalue().splitlines()[3:]
        assert ("val_top5" in table[0]) == (k > 5) and ("87.50%" in table[1]) == (k > 5), (k, table)
        assert table[0].split().index("val_acc") == 5


def test_render_before_any_epoch():
    png = plots.render([], None, [], "t")
    assert png[:4] == b"\x89PNG"

