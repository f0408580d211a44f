"""The fast tier's runs in this process (tests/helpers.py: run_here, train_here): they go through the command
line's own entry point, report what a process would (exit status, stdout, stderr), fail a test on an exit it
did not expect, and leave this process as they found it; and what dtrain.main.main itself leaves behind."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from dtrain.signals import SIGNALS
from helpers import children, metrics, process_state_kept, reset_accelerate, run_here, tiny_run, train_here


def handlers() -> dict:
    return {s: signal.getsignal(s) for s in SIGNALS}


def open_files() -> set:
    """The files this process has open (links under /proc/self/fd), less sockets, pipes and anonymous inodes."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/"):
            found.add(target)
    return found


def accelerate_state() -> tuple[int, int]:
    from accelerate.state import AcceleratorState, PartialState
    return len(PartialState._shared_state), len(AcceleratorState._shared_state)


def test_a_run_reports_its_exit_status_and_output_like_a_process(tmp_path):
    out = tmp_path / "run"
    r = train_here(tiny_run(out, "--epochs", "1"))
    assert r.returncode == 0 and "world size 1" in r.stdout and r.result["steps"] == 2
    assert [row["epoch"] for row in metrics(out)] == [1]
    refused = train_here(tiny_run(out, "--epochs", "2"), status=2)        # an earlier run's folder
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out} holds an earlier run"), refused.stderr
    assert refused.result is None and "epoch" not in refused.stdout
    assert run_here("main", ["--list-archs"]).stdout.split()[:1]              # a listing: exit 0, on stdout


def test_an_unexpected_exit_fails_the_test_with_stderr(tmp_path):
    with pytest.raises(AssertionError, match=r"exited 2, not 0(.|\n)*error: unknown arch 'resnet1000'"):
        train_here(tiny_run(tmp_path / "run", arch="resnet1000"))
    with pytest.raises(AssertionError, match="exited 0, not 2"):
        run_here("main", ["--list-recipes"], status=2)
    assert run_here("main", ["--arch", "resnet1000"], status=None).returncode == 2    # None: the caller checks


def test_an_exception_that_escapes_main_is_status_1_with_its_traceback(tmp_path):
    def broken(*args, **kwargs):
        raise ValueError("a bug")
    r = train_here(tiny_run(tmp_path / "run", "--max-steps", "1"), status=1, build_model=broken)
    assert "Traceback (most recent call last)" in r.stderr and "ValueError: a bug" in r.stderr
    import dtrain.main
    assert dtrain.main.build_model is not broken                               # the patch is undone


def test_runs_leave_this_process_as_they_found_it(tmp_path, monkeypatch):
    """What the helper puts back, whichever way the run ends: a run that trains, one refused, one that
    diverges, one that raises."""
    monkeypatch.setenv("DTRAIN_TEST_MARK", "kept")
    torch.manual_seed(1234)
    before = (torch.get_rng_state(), torch.get_num_threads(), handlers(), dict(os.environ), list(os.sys.argv))
    out = tmp_path / "run"
    train_here(tiny_run(out, "--epochs", "1"), extra_env={"DTRAIN_TEST_MARK": None, "TORCHELASTIC_RUN_ID": "x"})
    train_here(tiny_run(out, "--epochs", "1"), status=2)
    train_here(tiny_run(tmp_path / "nan", "--epochs", "2", "--lr", "1e4", batch=16), status=3)
    train_here(tiny_run(tmp_path / "bug", "--max-steps", "1"), status=1, build_optimizer=None)
    after = (torch.get_rng_state(), torch.get_num_threads(), handlers(), dict(os.environ), list(os.sys.argv))
    assert torch.equal(after[0], before[0]) and after[1:] == before[1:]
    assert accelerate_state() == (0, 0)


def test_state_that_a_run_changes_is_put_back_by_the_helper():
    """A block that changes everything process_state_kept promises to restore (a test that cannot fail...)."""
    before = (torch.get_rng_state(), torch.get_num_threads(), handlers(), dict(os.environ))
    with process_state_kept():
        torch.manual_seed(99)
        torch.set_num_threads(1 if before[1] > 1 else 2)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        os.environ["DTRAIN_TEST_LEAK"] = "1"
        from dtrain.distributed import make_accelerator
        make_accelerator(cpu=True)
        assert accelerate_state() != (0, 0)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (torch.get_num_threads(), handlers(), dict(os.environ)) == before[1:]
    assert accelerate_state() == (0, 0)


def test_a_compile_run_leaves_no_compile_workers_behind(tmp_path, monkeypatch):
    """--compile starts inductor's pool of compile-worker processes (dtrain.compiled.start_workers, on a machine
    with more than one core); the helper shuts it down after the run."""
    started = []

    def start_workers():
        start()
        started.extend(children(os.getpid()))
    import dtrain.compiled
    start = dtrain.compiled.start_workers
    monkeypatch.setattr(dtrain.compiled, "start_workers", start_workers)
    monkeypatch.setattr(torch, "compile", lambda model=None, **kwargs: model)    # no compiling itself
    from torch._inductor.async_compile import get_compile_threads
    before = children(os.getpid())
    train_here(tiny_run(tmp_path / "run", "--max-steps", "1", "--compile", size=32, batch=16))
    assert set(started) > set(before) or get_compile_threads() <= 1       # the pool did start
    deadline = time.monotonic() + 30
    while children(os.getpid()) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert children(os.getpid()) == before, f"started {started}"


# ---- what dtrain.main.main itself leaves behind (no helper putting it back) ---------------------------------

def bare_main(argv) -> int:
    """dtrain.main.main(argv) in this process, with nothing put back but what the test itself checks: its exit
    status."""
    import contextlib
    import io
    from dtrain.main import main
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            return e.code
    return 0


def weights_that_do_not_fit(out: Path) -> None:
    """Make out/last.pt's first weight a tensor of another shape: the settings check passes, loading fails."""
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["model"][next(iter(ckpt["model"]))] = torch.zeros(1)
    torch.save(ckpt, out / "last.pt")


CASES = ["trains", "refused", "diverges", "resumed", "weights-do-not-fit"]


@pytest.mark.parametrize("case", CASES)
def test_main_gives_back_what_it_took(tmp_path, case):
    """Whichever way a run ends, dtrain.main.main gives back its run lock (the file and its heartbeat thread),
    the stop-signal handlers it installed and the files it opened, and leaves os.environ and torch's thread
    count alone. (Its exit hook for the lock cannot be checked here: atexit has no way to list them.)"""
    out = tmp_path / "run"
    if case in ("refused", "resumed", "weights-do-not-fit"):
        train_here(tiny_run(out, "--epochs", "1", "--max-steps", "1"))
    if case == "weights-do-not-fit":
        weights_that_do_not_fit(out)
    argv, status = {
        "trains": (tiny_run(out, "--epochs", "1", "--tensorboard"), 0),
        "refused": (tiny_run(out, "--epochs", "2"), 2),
        "diverges": (tiny_run(out, "--epochs", "2", "--lr", "1e4", "--tensorboard", batch=16), 3),
        "resumed": (tiny_run(out, "--epochs", "2", "--resume", "auto", "--tensorboard"), 0),
        "weights-do-not-fit": (tiny_run(out, "--epochs", "2", "--resume", "auto", "--tensorboard"), 2),
    }[case]
    with process_state_kept():
        bare_main(tiny_run(tmp_path / "warm-up", "--max-steps", "1", "--tensorboard"))  # lazy imports, caches
        reset_accelerate()
        time.sleep(0.2)
        before = (handlers(), dict(os.environ), torch.get_num_threads(), open_files(),
                  {t.name for t in threading.enumerate()})
        assert bare_main(argv) == status
        time.sleep(0.2)                                      # the heartbeat thread wakes and ends
        after = (handlers(), dict(os.environ), torch.get_num_threads(), open_files(),
                 {t.name for t in threading.enumerate()})
    assert not (out / "run.lock").exists()
    assert after[1] == before[1], "os.environ"
    assert after[2] == before[2], "torch threads"
    assert after[3] <= before[3], f"files left open: {sorted(after[3] - before[3])}"
    assert after[4] <= before[4], f"threads left running: {sorted(after[4] - before[4])}"
    assert after[0] == before[0], "stop-signal handlers"
