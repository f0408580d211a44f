"""Weights & Biases from the main process only; offline when there is no API key; nothing with --no-wandb."""
from pathlib import Path

from helpers import MAIN, launch

ARGS = ["--arch", "cnn", "--dataset", "fake", "--fake-size", "128", "--batch-size", "32", "--epochs", "2",
        "--no-plots", "--log-every", "1"]


def run(tmp_path: Path, extra_args=(), nproc=1, **env):
    out = tmp_path / "run"
    base = {"HOME": str(tmp_path / "home"), "WANDB_API_KEY": None, "WANDB_MODE": None}  # no key, no netrc
    base.update(env)
    r = launch(MAIN, [*ARGS, "--output-dir", str(out), *extra_args], nproc=nproc, extra_env=base)
    return out, r


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


def test_offline_mode_on_two_processes_makes_one_run_with_the_metrics(tmp_path):
    out, _ = run(tmp_path, nproc=2, WANDB_MODE="offline")
    runs = offline_runs(out)
    assert len(runs) == 1, runs
    data = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in (b"train/loss", b"epoch/val_acc", b"best_acc", b"confusion_matrix"):
        assert key in data, key


def test_no_key_and_no_mode_runs_offline_and_says_how_to_sync(tmp_path):
    out, r = run(tmp_path)
    assert len(offline_runs(out)) == 1
    assert "wandb sync" in r.stdout
    # resumed: the same W&B run id continues
    run_id = (out / "wandb_id").read_text()
    launch(MAIN, [*ARGS, "--epochs", "3", "--output-dir", str(out), "--resume", "auto"],
           extra_env={"HOME": str(tmp_path / "home"), "WANDB_API_KEY": None, "WANDB_MODE": None})
    assert all(p.name.endswith(run_id) for p in offline_runs(out))


def test_no_wandb_writes_no_wandb_directory(tmp_path):
    out, _ = run(tmp_path, ["--no-wandb"], WANDB_MODE="offline")
    assert not (out / "wandb").exists() and (out / "metrics.jsonl").exists()
