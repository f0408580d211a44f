"""A lost worker: launch/torchrun.sh (and the Slurm node launcher) restart the worker group, which
continues from last.pt. Real processes, real kill -9, on the CPU (gloo)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers import REPO, children, env, metrics, tiny_run, train_here

ROUNDS, EPOCHS = 3, 8
ARGS = tiny_run(None, "--epochs", str(EPOCHS), "--seed", "0", "--resume", "auto", size=256)
RESUMED = re.compile(r"resumed from .*last\.pt at epoch (\d+)")


def saved_epochs(out: Path) -> int:
    """Epochs in metrics.jsonl once last.pt has been written after the newest row (0 before that)."""
    rows, last = out / "metrics.jsonl", out / "last.pt"
    try:
        if last.stat().st_mtime_ns < rows.stat().st_mtime_ns:
            return 0
        return len(rows.read_text().splitlines())
    except FileNotFoundError:
        return 0


def fake_python(tmp_path: Path) -> Path:
    """A stand-in interpreter that prints what the launcher asked it to run, and a setting it exported."""
    path = tmp_path / "python"
    path.write_text('#!/bin/sh\necho "SHARE=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE ARGS=$*"\n')
    path.chmod(0o755)
    return path


def launcher_args(cmd: list[str], tmp_path: Path, **extra) -> list[str]:
    e = env(DTRAIN_PYTHON=fake_python(tmp_path), GPUS_PER_NODE=2, SLURM_JOB_ID=7, MASTER_ADDR="n1", MASTER_PORT=20007,
            **extra)
    r = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SHARE=1 " in r.stdout, r.stdout        # every restart bootstraps from a fresh store
    return r.stdout.split("ARGS=")[1].split()


@pytest.mark.process
@pytest.mark.parametrize("cmd", [["bash", "launch/torchrun.sh"], ["bash", "slurm/_node.sh", "dtrain/main.py"]])
def test_launchers_restart_lost_workers_and_honour_torchrun_args(cmd, tmp_path):
    for nodes in ("1", "2"):
        args = launcher_args([*cmd, "--arch", "cnn"], tmp_path, SLURM_JOB_NUM_NODES=nodes)
        assert "--max-restarts=3" in args, args
        if cmd[1] == "launch/torchrun.sh":
            break
    args = launcher_args([*cmd, "--arch", "cnn"], tmp_path, SLURM_JOB_NUM_NODES="2",
                         TORCHRUN_ARGS="--max-restarts 0 --monitor-interval 1")
    # The user's options come after the defaults, so torchrun takes theirs.
    i = args.index("--max-restarts")
    assert args[i:i + 4] == ["--max-restarts", "0", "--monitor-interval", "1"], args
    assert args.index("--max-restarts=3") < i
    assert args[-2:] == ["--arch", "cnn"]


@pytest.mark.process
@pytest.mark.slow
def test_torchrun_sh_recovers_from_a_lost_worker_every_time(tmp_path):
    """kill -9 one of two workers, three times in one run: each time torchrun restarts the group, which
    resumes from last.pt (not from scratch); the run finishes every epoch once and exits 0."""
    out = tmp_path / "run"
    proc = subprocess.Popen(["bash", "launch/torchrun.sh", *ARGS, "--output-dir", str(out)], cwd=REPO,
                            env=env(GPUS_PER_NODE=2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    killed: list[tuple[int, int]] = []             # (pid, epochs recorded when it was killed)
    try:
        deadline = time.monotonic() + 240
        while len(killed) < ROUNDS and proc.poll() is None and time.monotonic() < deadline:
            done = saved_epochs(out)
            workers = [w for torchrun in children(proc.pid) for w in children(torchrun)]  # torchrun.sh's child's children
            # One more epoch recorded and saved since the last kill, by a group of two workers.
            if done > len(killed) and len(workers) == 2 and not any(pid in workers for pid, _ in killed):
                os.kill(workers[len(killed) % 2], signal.SIGKILL)
                killed.append((workers[len(killed) % 2], done))
            time.sleep(0.05)
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    text = "".join(lines)
    assert len(killed) == ROUNDS, f"killed {killed} before the run ended\n{text}"
    assert rc == 0, f"exit status {rc}\n{text}"
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1)), text
    # Each restarted group resumed from last.pt at an epoch the run had reached (not from scratch).
    resumed = [int(e) for e in RESUMED.findall(text)]
    assert len(resumed) == ROUNDS, text
    assert all(e > done for e, (_, done) in zip(resumed, killed)), (resumed, killed, text)
    assert text.count("Gloo connectFullMesh failed") == 0, text


def torchrun_sh(args: list, timeout: int = 300, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "launch/torchrun.sh", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env(GPUS_PER_NODE=1, **extra_env))


SMALL = tiny_run()


@pytest.mark.process
def test_a_restart_does_not_continue_another_runs_folder(tmp_path):
    """A new job under launch/torchrun.sh into a finished run's folder is refused on every attempt: its
    restarts (TORCHELASTIC_RESTART_COUNT > 0) do not count as continuing that run."""
    out = tmp_path / "run"
    train_here([*SMALL, "--epochs", "1", "--output-dir", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = torchrun_sh([*SMALL, "--epochs", "3", "--output-dir", out], TORCHRUN_ARGS="--max-restarts 1")
    assert r.returncode != 0
    assert r.stderr.count("holds an earlier run") == 2, r.stderr   # the first attempt and its restart
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.process
def test_an_error_a_restart_cannot_fix_ends_the_restarts_at_once(tmp_path):
    """A divergence trains once: the restarts that torchrun makes of the job stop before loading any data."""
    out = tmp_path / "run"
    r = torchrun_sh([*SMALL, "--fake-size", "256", "--epochs", "3", "--lr", "1e4", "--output-dir", out],
                    TORCHRUN_ARGS="--max-restarts 2")
    assert r.returncode != 0
    assert r.stderr.count("became NaN or infinite") == 3, r.stderr
    assert r.stderr.count("a restart cannot fix it") == 2, r.stderr
    assert r.stdout.count("dtrain cnn on fake") == 1, r.stdout          # one attempt read data and trained
