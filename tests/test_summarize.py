"""dtrain summarize: run folders in the format a real training run writes, grouped and averaged."""
import csv
import json

import numpy as np
import pytest

from helpers import metrics, run_here, tiny_run, train_here


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """One real run (cnn on fake data with 5 classes, so no top-5, 2 epochs): its config.json and
    metrics.jsonl are the templates."""
    out = tmp_path_factory.mktemp("real") / "run"
    train_here(tiny_run(out, "--num-classes", "5", "--epochs", "2"))
    config = json.loads((out / "config.json").read_text())
    rows = metrics(out)
    assert len(rows) == 2 and {"epoch", "step", "val_acc", "epoch_seconds", "train_samples"} <= set(rows[-1])
    assert rows[-1]["val_top5"] is None
    return out, config, rows


def make_run(root, name, template, accs, epochs=None, **settings):
    """A run folder like the real one, with these val_acc values per epoch (and settings changed)."""
    _, config, rows = template
    d = root / name
    d.mkdir(parents=True)
    config = {**config, **settings, "output_dir": str(d), "epochs": epochs or len(accs)}
    (d / "config.json").write_text(json.dumps(config, indent=2))
    steps = rows[0]["step"]
    lines = [json.dumps({**rows[-1], "epoch": i + 1, "step": steps * (i + 1), "val_acc": a}) for i, a in enumerate(accs)]
    (d / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return d


def summarize(paths, out):
    """dtrain summarize PATHS --out OUT in this process, 200 columns wide (its exit status, stdout, stderr)."""
    return run_here("summarize", [*paths, "--out", out], status=None, extra_env={"COLUMNS": 200})


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_seeds_group_with_numpy_mean_and_std_and_unfinished_apart(real_run, tmp_path):
    runs = tmp_path / "runs"
    finals = [0.61, 0.64, 0.70]
    for seed, final in enumerate(finals):
        make_run(runs, f"lr0.1-seed{seed}", real_run, [0.3, 0.5 + seed / 10, final], seed=seed, lr=0.1,
                 wandb_name=f"n{seed}")
    make_run(runs, "lr0.1-seed3", real_run, [0.9], epochs=3, seed=3, lr=0.1)           # stopped after epoch 1
    (runs / "lr0.1-seed4").mkdir()
    (runs / "lr0.1-seed4" / "config.json").write_text(
        json.dumps({**real_run[1], "seed": 4, "lr": 0.1, "epochs": 3}))                 # died in epoch 1
    make_run(runs, "lr0.05-seed0", real_run, [0.2, 0.3, 0.4], seed=0, lr=0.05)
    r = summarize([runs], tmp_path / "out")
    assert r.returncode == 0, r.stderr
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert list(rows[0])[:7] == ["group", "n", "final_acc_mean", "final_acc_std", "best_acc_mean", "best_acc_std",
                                 "train_seconds_mean"]
    assert "lr" in rows[0] and "seed" not in rows[0] and "wandb_name" not in rows[0]
    by_lr = {float(row["lr"]): row for row in rows}
    assert set(by_lr) == {0.05, 0.1}
    g = by_lr[0.1]
    assert int(g["n"]) == 3 and int(g["not_finished"]) == 2
    assert float(g["final_acc_mean"]) == pytest.approx(np.mean(finals), abs=1e-12)
    assert float(g["final_acc_std"]) == pytest.approx(np.std(finals, ddof=1), abs=1e-12)
    assert float(g["best_acc_mean"]) == pytest.approx(np.mean(finals), abs=1e-12)
    assert float(g["final_acc_min"]) == 0.61 and float(g["final_acc_max"]) == 0.70
    seconds = sum(row["epoch_seconds"] for row in [real_run[2][-1]] * 3)
    assert float(g["train_seconds_mean"]) == pytest.approx(seconds)
    single = by_lr[0.05]
    assert int(single["n"]) == 1 and single["final_acc_std"] == "" and float(single["final_acc_mean"]) == 0.4
    assert "final_top5_mean" not in rows[0]
    assert "lr0.1-seed3" in r.stdout and "lr0.1-seed4" in r.stdout and "not finished" in r.stdout
    assert (tmp_path / "out" / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_by_two_grid_gives_two_groups_and_best_differs_from_final(real_run, tmp_path):
    runs = []
    for lr in (0.05, 0.2):
        for seed in (0, 1):
            runs.append(make_run(tmp_path, f"lr{lr}-s{seed}", real_run, [0.5, 0.8 + seed / 100, 0.6], lr=lr,
                                 seed=seed))
    r = summarize(runs, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert [(float(row["lr"]), int(row["n"])) for row in rows] == [(0.05, 2), (0.2, 2)]
    assert [row["group"] for row in rows] == ["lr=0.05", "lr=0.2"]
    assert float(rows[0]["best_acc_mean"]) == pytest.approx(0.805)
    assert float(rows[0]["final_acc_mean"]) == pytest.approx(0.6)
    assert float(rows[0]["final_acc_std"]) == 0.0


def test_the_real_run_and_top5(real_run, tmp_path):
    out, config, rows = real_run
    with_top5 = make_run(tmp_path, "top5", real_run, [0.3, 0.4], dataset="cifar100")
    lines = [json.loads(line) for line in (with_top5 / "metrics.jsonl").read_text().splitlines()]
    (with_top5 / "metrics.jsonl").write_text("".join(json.dumps({**row, "val_top5": 0.9}) + "\n" for row in lines))
    r = summarize([out, with_top5], tmp_path / "out")
    assert r.returncode == 0, r.stderr
    by_dataset = {row["dataset"]: row for row in read_csv(tmp_path / "out" / "summary.csv")}
    real = by_dataset["fake"]
    assert int(real["n"]) == 1 and float(real["final_acc_mean"]) == rows[-1]["val_acc"]
    assert float(real["best_acc_mean"]) == max(row["val_acc"] for row in rows)
    assert float(real["images_per_second_mean"]) == pytest.approx(
        sum(row["train_samples"] for row in rows) / sum(row["epoch_seconds"] for row in rows))
    assert real["final_top5_mean"] == "" and float(by_dataset["cifar100"]["final_top5_mean"]) == 0.9
    assert "final top-5" in r.stdout


def test_a_cut_line_ends_the_rows_and_the_run_is_not_finished(real_run, tmp_path):
    d = make_run(tmp_path, "cut", real_run, [0.3, 0.4])
    text = (d / "metrics.jsonl").read_text()
    (d / "metrics.jsonl").write_text(text[: len(text) - 20])              # a kill during the last append
    r = summarize([d], tmp_path / "out")
    assert r.returncode == 0, r.stderr
    row = read_csv(tmp_path / "out" / "summary.csv")[0]
    assert int(row["n"]) == 0 and int(row["not_finished"]) == 1 and row["final_acc_mean"] == ""
    assert "ended at epoch 1 of 2" in r.stdout


def test_hand_edited_files_are_reported_apart_not_a_crash(real_run, tmp_path):
    make_run(tmp_path / "runs", "good", real_run, [0.3, 0.4])
    make_run(tmp_path / "runs", "bad-epochs", real_run, [0.3, 0.4], epochs="x")
    d = make_run(tmp_path / "runs", "bad-row", real_run, [0.3, 0.5])
    (d / "metrics.jsonl").write_text((d / "metrics.jsonl").read_text().replace('"epoch": 2', '"epoch": null'))
    d = make_run(tmp_path / "runs", "bad-line", real_run, [0.3, 0.6])
    lines = (d / "metrics.jsonl").read_text().splitlines()
    (d / "metrics.jsonl").write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    r = summarize([tmp_path / "runs"], tmp_path / "out")
    assert r.returncode == 0, r.stderr
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert sum(int(row["n"]) for row in rows) == 1 and sum(int(row["unreadable"]) for row in rows) == 3
    assert sum(int(row["not_finished"]) for row in rows) == 0
    listed = [line for line in r.stdout.splitlines() if line.startswith("unreadable: ")]
    assert len(listed) == 3 and "line 2 is not JSON" in r.stdout, r.stdout
    assert "config.json: epochs is 'x', not a whole number" in r.stdout
    assert "metrics.jsonl line 2: epoch is None, not a whole number" in r.stdout


def test_errors_are_one_line(tmp_path):
    r = summarize([tmp_path / "missing"], tmp_path / "out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = summarize([tmp_path / "empty"], tmp_path / "out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no dtrain runs" in r.stderr
    assert not (tmp_path / "out").exists()


def test_an_unwritable_out_is_one_line(real_run, tmp_path):
    (tmp_path / "file").write_text("x")
    r = summarize([real_run[0]], tmp_path / "file" / "out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is a file, not a folder" in r.stderr
    assert r.stderr.rstrip().endswith("pass --out DIR with a writable folder")


def test_nan_and_infinity_in_metrics_make_a_run_unreadable_listed_apart_not_averaged(real_run, tmp_path):
    """metrics.jsonl is strict JSON from dtrain (null for a non-finite figure); a hand-edited or foreign file can
    hold NaN or Infinity, which Python's json reads: such a run is unreadable, never a finished run of the mean."""
    runs = tmp_path / "runs"
    for seed, final in ((0, 0.6), (1, 0.7)):
        make_run(runs, f"good{seed}", real_run, [0.3, final], seed=seed)
    nan = make_run(runs, "nan", real_run, [0.3, 0.9], seed=2)
    inf = make_run(runs, "inf", real_run, [0.3, 0.8], seed=3)
    edits = ((nan, '"val_acc": 0.9', '"val_acc": NaN'), (inf, '"epoch_seconds": ', '"epoch_seconds": -Infinity, "x": '))
    for d, old, new in edits:
        text = (d / "metrics.jsonl").read_text()
        assert old in text
        (d / "metrics.jsonl").write_text(text.replace(old, new))
    r = summarize([runs], tmp_path / "out")
    assert r.returncode == 0, r.stderr
    row = read_csv(tmp_path / "out" / "summary.csv")[0]
    assert int(row["n"]) == 2 and float(row["final_acc_mean"]) == pytest.approx(0.65)
    assert int(row["unreadable"]) == 2 and int(row["not_finished"]) == 0
    assert float(row["train_seconds_mean"]) == pytest.approx(2 * real_run[2][-1]["epoch_seconds"])
    listed = [line for line in r.stdout.splitlines() if line.startswith("unreadable: ")]
    assert len(listed) == 2 and "not finished:" not in r.stdout, r.stdout
    assert f"{nan}/metrics.jsonl line 2: val_acc is nan" in r.stdout and f"{inf}/metrics.jsonl line 1: epoch_seconds " \
                                                                         f"is -inf" in r.stdout, r.stdout
    assert "nan%" not in r.stdout.lower()


def test_a_config_json_not_utf8_or_not_json_is_listed_as_skipped_with_its_reason_never_dropped(real_run, tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "good", real_run, [0.3, 0.4])
    latin1 = make_run(runs, "latin1", real_run, [0.3, 0.5])
    text = (latin1 / "config.json").read_text().replace('"wandb_notes": null', '"wandb_notes": "caf\u00e9"')
    (latin1 / "config.json").write_bytes(text.encode("latin-1"))                      # a real non-UTF-8 file
    cut = make_run(runs, "cut", real_run, [0.3, 0.6])
    (cut / "config.json").write_text((cut / "config.json").read_text()[:40])
    r = summarize([runs], tmp_path / "out")
    assert r.returncode == 0, r.stderr
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert [int(row["n"]) for row in rows] == [1]
    skipped = {line.split(": ")[1]: line for line in r.stdout.splitlines() if line.startswith("skipped: ")}
    assert set(skipped) == {f"{latin1}/config.json", f"{cut}/config.json"}, r.stdout
    assert ": not UTF-8 (byte " in skipped[f"{latin1}/config.json"] and ": not JSON (" in skipped[f"{cut}/config.json"]
    assert all(line.endswith("repair it, or move the folder out of the paths") for line in skipped.values())
    assert "dtrain summarize: 3 runs (1 finished, 2 skipped) in 1 group\n" in r.stdout
    r = summarize([latin1], tmp_path / "out2")                                         # named itself, alone
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not UTF-8" in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: no run to summarize: {latin1}/config.json: not UTF-8")


def _recipe_settings(recipe: str, **changes) -> dict:
    from dtrain.settings import build_config
    return {**build_config(["--recipe", recipe]).to_dict(), **changes}


def test_unlike_runs_show_only_the_settings_that_separate_them_and_a_plot_with_its_legend_outside(real_run, tmp_path):
    """Groups of unlike runs (every shipped recipe: archs, datasets, schedules; three learning rates each): the
    table names each group by the few settings that separate them (short names, a legend below), fits the
    console, and summary.csv keeps every setting that differs; the plot's legend is outside the axes, inside the
    figure, and matplotlib says nothing on the console."""
    from dtrain.config import list_recipes
    runs = tmp_path / "runs"
    recipes = list_recipes()
    assert len(recipes) >= 10
    for recipe in recipes:
        for factor in (0.5, 1, 2):
            settings = _recipe_settings(recipe)
            settings["lr"] *= factor
            epochs = settings.pop("epochs")
            accs = [min(0.95, factor / 4 + e / epochs / 2) for e in range(1, epochs + 1)]
            make_run(runs, f"{recipe}-{factor}", real_run, accs, epochs=epochs, **settings)
    r = run_here("summarize", [runs, "--out", tmp_path / "out"], status=None, extra_env={"COLUMNS": 120})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert len(rows) == 3 * len(recipes) and len({row["group"] for row in rows}) == 3 * len(recipes)
    lines = r.stdout.splitlines()
    header = lines[1].split()
    assert "n" in header, r.stdout
    shown = header[:header.index("n")]
    assert 1 <= len(shown) <= 3, lines[1]
    assert shown[0] == "recipe", lines[1]        # more than 3 settings would separate them: the recipe names them
    assert all(len(line) <= 120 for line in lines[:3 + 3 * len(recipes)]) and "\u2026" not in r.stdout, r.stdout
    differing = [c for c in rows[0] if c not in summarize_columns(rows[0])]
    assert len(differing) > 10 and "lr" in differing                        # the CSV keeps every differing setting
    assert all(name in differing for name in shown) or any(line.startswith("settings: ") for line in lines)
    others = [line for line in lines if line.startswith("also differ")]
    assert len(others) == 1 and "summary.csv" in others[0]

    import warnings

    from dtrain import summarize as module
    groups = module.group_runs([module.read_run(p) for p in sorted(runs.iterdir())])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = module.draw(groups)
        fig.canvas.draw()
    (ax,), legend = fig.axes, fig.legends[0] if fig.legends else fig.axes[0].get_legend()
    box, axes_box, fig_box = legend.get_window_extent(), ax.get_window_extent(), fig.bbox
    assert not box.overlaps(axes_box), (box, axes_box)
    assert fig_box.x0 <= box.x0 and box.x1 <= fig_box.x1 and fig_box.y0 <= box.y0 and box.y1 <= fig_box.y1
    assert axes_box.height > 150 and axes_box.width > 300                 # the axes keep their room
    assert len(legend.get_texts()) == 3 * len(recipes) and min(t.get_fontsize() for t in legend.get_texts()) >= 7
    styles = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in ax.lines}
    assert len(styles) == 3 * len(recipes)                                # each group tells apart


def summarize_columns(row: dict) -> list[str]:
    from dtrain.summarize import CSV_COLUMNS, TOP5_COLUMNS
    return [c for c in row if c in CSV_COLUMNS or c in TOP5_COLUMNS or c == "unreadable"]


def test_a_grid_of_long_setting_names_has_short_titles_and_their_legend(real_run, tmp_path):
    for smoothing in (0.0, 0.1):
        for decay in (5e-4, 1e-3):
            make_run(tmp_path / "runs", f"ls{smoothing}-wd{decay}", real_run, [0.3, 0.4 + smoothing + decay],
                     label_smoothing=smoothing, weight_decay=decay, batch_size=32)
    r = summarize([tmp_path / "runs"], tmp_path / "out")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split()[:3] == ["wd", "ls", "n"], r.stdout                     # in the order of the flags
    assert "settings: wd = --weight-decay, ls = --label-smoothing" in lines, r.stdout
    assert not any(line.startswith("also differ") for line in lines)
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert [row["group"] for row in rows][:2] == ["weight_decay=0.0005 label_smoothing=0.0",
                                                  "weight_decay=0.0005 label_smoothing=0.1"]
    assert {"label_smoothing", "weight_decay"} <= set(rows[0]) and "batch_size" not in rows[0]
