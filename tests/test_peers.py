"""A frozen peer: one of two processes stops (SIGSTOP) and the other gives up after --dist-timeout with
one line naming it, instead of waiting for torch's default (30 minutes on gloo). Real processes, gloo."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dtrain.distributed import lost_peer_message
from dtrain.errors import EXIT_PEER_LOST
from helpers import MAIN, REPO, children, env, free_port

TIMEOUT = 10


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [v[5:] for v in environ if v.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


@pytest.mark.process
@pytest.mark.slow
def test_a_frozen_peer_ends_the_job_after_dist_timeout_naming_it(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), MAIN, "--arch", "cnn", "--dataset", "fake", "--fake-size", "512", "--batch-size", "32",
           "--no-wandb", "--no-plots", "--epochs", "50", "--dist-timeout", str(TIMEOUT), "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, trained = [], threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if (out / "last.pt").exists():  # an epoch is done and saved: training runs
                trained.set()
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    frozen = None
    try:
        assert trained.wait(240), "".join(lines)
        workers = {rank_of(pid): pid for pid in children(proc.pid)}
        assert set(workers) == {0, 1}, (workers, "".join(lines))
        frozen = workers[1]
        os.kill(frozen, signal.SIGSTOP)
        # the survivor gives up after TIMEOUT s; the launcher then kills the stopped one (after its own grace
        # period of 30 s for SIGTERM)
        proc.wait(TIMEOUT + 150)
    finally:
        if frozen is not None:
            try:
                os.kill(frozen, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    thread.join(10)
    text = "".join(lines)
    assert proc.returncode != 0, text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert errors and f"rank 1 stopped answering for {TIMEOUT} s (--dist-timeout)" in errors[0], text
    assert "resume with --resume auto" in errors[0], text
    assert f"(exitcode: {EXIT_PEER_LOST})" in text, text   # the survivor's own exit status, as the launcher reports it
    assert "[rank0]: Traceback" not in text, text
    assert (out / "last.pt").exists()


def gloo_error(text: str) -> RuntimeError:
    return RuntimeError(f"[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/{text}")


def test_lost_peer_messages_name_the_peer_when_known():
    timed_out = gloo_error("unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation to complete")
    line = lost_peer_message(timed_out, rank=0, world=2, timeout=20)
    assert line.startswith("rank 1 stopped answering for 20 s (--dist-timeout): the job stops;"), line
    assert line.endswith("(torch: Timed out waiting 20000ms for recv operation to complete)"), line
    assert lost_peer_message(timed_out, rank=1, world=2, timeout=20).startswith("rank 0 stopped answering")
    closed = gloo_error("pair.cc:534] Connection closed by peer [10.0.0.2]:4711")
    assert lost_peer_message(closed, rank=0, world=4, timeout=20).startswith(
        "the process at 10.0.0.2:4711 was lost (its connection closed)")
    assert lost_peer_message(timed_out, rank=2, world=4, timeout=20).startswith("another process stopped answering")
    # what gloo raises in the operations it closes when another one timed out: no source path, no "gloo"
    closed_after = RuntimeError("Application timeout caused pair closure")
    assert lost_peer_message(closed_after, rank=0, world=2, timeout=20).startswith("rank 1 stopped answering for 20 s")
    # other errors are not a lost peer
    assert lost_peer_message(RuntimeError("CUDA out of memory"), rank=0, world=2, timeout=20) is None
    assert lost_peer_message(RuntimeError("DataLoader timed out after 5 seconds"), 0, 2, 20) is None
    assert lost_peer_message(ValueError("gloo timeout"), 0, 2, 20) is None


@pytest.mark.process
def test_dist_timeout_reaches_the_process_group_and_the_stop_signal_group(tmp_path):
    """Two real processes on gloo: rank 1 joins no collective; rank 0's all-reduces on the default group and
    on the stop-signal group time out after 3 s (not torch's 30 minutes), while rank 1 still lives (until
    rank 0 is done)."""
    script, done = tmp_path / "probe.py", tmp_path / "done"
    script.write_text(
        "import sys, time, torch, torch.distributed as dist\n"
        "from pathlib import Path\n"
        "from dtrain.distributed import cpu_group, make_accelerator\n"
        "acc = make_accelerator(None, 3)\n"
        "group = cpu_group()\n"
        f"done = Path({str(done)!r})\n"
        "if acc.process_index == 1:\n"
        "    deadline = time.monotonic() + 60\n"
        "    while not done.exists() and time.monotonic() < deadline:\n"
        "        time.sleep(0.1)\n"
        "    sys.exit(0)\n"
        "for g in (None, group):\n"
        "    try:\n"
        "        dist.all_reduce(torch.ones(1), group=g)\n"
        "    except RuntimeError as e:\n"
        "        print('failed:', str(e).splitlines()[0], flush=True)\n"
        "done.write_text('')\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(script)]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    failed = [line for line in r.stdout.splitlines() if line.startswith("failed:")]
    assert len(failed) == 2 and all("Timed out waiting 3000ms" in line for line in failed), r.stdout + r.stderr


def test_dist_timeout_is_a_checked_setting():
    from dtrain.settings import build_config
    from dtrain.errors import UserError
    assert build_config(["--dist-timeout", "20"]).dist_timeout == 20
    assert build_config([]).dist_timeout == 600
    with pytest.raises(UserError, match="--dist-timeout must be positive"):
        build_config(["--dist-timeout", "0"])
