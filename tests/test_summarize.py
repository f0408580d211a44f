"""dtrain summarize: run folders in the format a real training run writes, grouped and averaged."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, env, metrics, tiny_run, train_here


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
    r = subprocess.run([sys.executable, "-m", "dtrain.summarize", *map(str, paths), "--out", str(out)],
                       capture_output=True, text=True, env=env(COLUMNS=200), cwd=REPO, timeout=120)
    return r


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
    assert sum(int(row["n"]) for row in rows) == 1 and sum(int(row["not_finished"]) for row in rows) == 3
    assert r.stdout.count("unreadable") == 3 and "line 2 is not JSON" in r.stdout


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
