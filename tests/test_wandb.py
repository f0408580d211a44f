"""Weights & Biases from the main process only; offline when there is no API key; nothing with --no-wandb.

Real processes wherever W&B runs: its process-wide set-up reads the environment (HOME, the API key, the mode,
a sweep agent's run id) once and starts a service process, so each run needs a process of its own."""
import socket
from pathlib import Path

import pytest

from helpers import MAIN, launch, metrics, train_here

ARGS = ["--arch", "cnn", "--dataset", "fake", "--fake-size", "128", "--batch-size", "32", "--epochs", "2",
        "--no-plots", "--log-every", "1"]  # W&B on: the default


def run(tmp_path: Path, extra_args=(), nproc=1, timeout=300, **env):
    out = tmp_path / "run"
    base = {"HOME": str(tmp_path / "home"), "WANDB_API_KEY": None, "WANDB_MODE": None}  # no key, no netrc
    base.update(env)
    r = launch(MAIN, [*ARGS, "--output-dir", str(out), *extra_args], nproc=nproc, extra_env=base, timeout=timeout)
    return out, r


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


@pytest.mark.process
def test_offline_mode_on_two_processes_makes_one_run_with_the_metrics(tmp_path):
    out, _ = run(tmp_path, nproc=2, WANDB_MODE="offline")
    runs = offline_runs(out)
    assert len(runs) == 1, runs
    data = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in (b"train/loss", b"epoch/val_acc", b"best_acc", b"confusion_matrix"):
        assert key in data, key


@pytest.mark.process
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
    out = tmp_path / "run"
    train_here([*ARGS, "--output-dir", out, "--no-wandb"], extra_env={"WANDB_MODE": "offline"})
    assert not (out / "wandb").exists() and (out / "metrics.jsonl").exists()


@pytest.mark.process
@pytest.mark.slow
def test_api_key_without_network_trains_offline_into_a_fresh_run(tmp_path):
    """A W&B server that accepts connections and never answers (a black-holed network): the run trains,
    logs offline into a local run `wandb sync` can upload, and does not hang at start or exit."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)  # never accepted: connections open, no byte ever comes back
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        out, r = run(tmp_path, ["--epochs", "1", "--wandb"], timeout=120, WANDB_BASE_URL=url,
                     WANDB_API_KEY="0" * 40)
    assert "logging offline instead" in r.stdout, r.stdout
    runs = offline_runs(out)
    assert len(runs) == 1, runs
    assert runs[0].name.endswith((out / "wandb_id").read_text())
    assert list(runs[0].glob("*.wandb")) and len(metrics(out)) == 1


@pytest.mark.process
def test_under_a_sweep_agent_the_id_file_holds_the_run_the_agent_chose(tmp_path):
    """A W&B agent sets WANDB_SWEEP_ID and WANDB_RUN_ID for each trial; the id file must name the run W&B
    started, not one dtrain made up."""
    out, _ = run(tmp_path, ["--epochs", "1", "--wandb-tags", "tag-alpha,tag-beta",
                                    "--wandb-group", "group-of-trials"], WANDB_MODE="offline",
                 WANDB_SWEEP_ID="swp12345", WANDB_RUN_ID="agentrun")
    assert (out / "wandb_id").read_text() == "agentrun"
    runs = offline_runs(out)
    assert [p.name.rsplit("-", 1)[1] for p in runs] == ["agentrun"]
    data = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for text in (b"group-of-trials", b"tag-alpha", b"tag-beta"):
        assert text in data, text
