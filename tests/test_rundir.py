"""The output folder of a run: one run at a time (run.lock), and no run starts over an earlier one's results.

Real processes: training runs of dtrain/main.py, and a small script that holds the lock the way main does.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtrain import rundir
from dtrain.errors import UserError
from dtrain.rundir import RunLock, default_output_dir, resume_for
from helpers import MAIN, REPO, env, metrics, tiny_run, train, train_here

RUN = tiny_run(None, "--eval-batch-size", "64")
LONG = tiny_run(None, "--epochs", "1000", size=256)

# takes the lock on argv[1] the way dtrain/main.py does, says so, and holds it until killed
HOLDER = """
import sys, time
from dtrain.errors import run_command
from dtrain.rundir import open_output_dir
def run(argv):
    lock, resume = open_output_dir(argv[0], None)
    print("holding", flush=True)
    time.sleep(600)
run_command(run, sys.argv[1:])
"""

# takes the lock on argv[1] as HOLDER does, but stops half-way through writing its record, where a kill -9
# may find a run that is starting
HALF_WRITTEN = """
import json, sys, time
from dtrain.rundir import open_output_dir
def dump(record, f):
    f.write(json.dumps(record)[:20])
    f.flush()
    print("writing", flush=True)
    time.sleep(600)
json.dump = dump
open_output_dir(sys.argv[1], None)
"""


def files(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the first run ended early:\n{proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.2)


def start(cmd: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, cmd)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=env(), start_new_session=True)


def stop(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    proc.communicate(timeout=120)


def killed(cmd: list, ready) -> subprocess.Popen:
    """Start cmd, wait for ready(proc), then kill -9 it: no chance to release anything."""
    proc = start(cmd)
    try:
        ready(proc)
    finally:
        stop(proc)
    return proc


def refused(args: list) -> str:
    """Run dtrain/main.py (in this process) expecting a refusal: exit 2 and one line on stderr; that line."""
    r = train_here(args, status=None)
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "epoch" not in r.stdout                         # refused before any training
    return lines[0]


def write_lock(out: Path, age: float = 0.0, **record) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lock = out / "run.lock"
    lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 4242, "proc_start": "1",
                                "started": "2026-01-01 00:00:00 UTC", "job": None, "attempt": [0, 0],
                                "token": "theirs", **record}))
    if age:
        past = time.time() - age
        os.utime(lock, (past, past))
    return lock


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The folder of a finished 1-epoch run."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_here([*RUN, "--epochs", "1", "--output-dir", out])
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]
    return out


@pytest.fixture
def earlier(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ---- one run at a time ------------------------------------------------------------------------------------

@pytest.mark.process
def test_second_run_into_a_running_runs_folder_is_refused_at_once_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first = start([MAIN, *LONG, "--output-dir", out])
    try:
        wait_for(out / "config.json", first)
        before = json.loads((out / "run.lock").read_text())
        assert before["pid"] == first.pid and before["host"] == socket.gethostname()
        line = refused([*RUN, "--epochs", "1", "--output-dir", out, "--resume", "auto"])
        assert line == (f"error: {out} is in use by the run started {before['started']} on "
                        f"{socket.gethostname()} (pid {first.pid}): wait for it, or use another --output-dir")
        assert first.poll() is None                        # the first run goes on, still holding its lock
        assert json.loads((out / "run.lock").read_text()) == before
    finally:
        stop(first, signal.SIGTERM)                       # saves and exits, releasing the lock
    assert first.returncode == 0
    assert not (out / "run.lock").exists()


@pytest.mark.process
def test_lock_left_by_kill_9_is_taken_over_and_said_so(tmp_path):
    out = tmp_path / "run"
    first = killed([MAIN, *LONG, "--output-dir", out], lambda proc: wait_for(out / "run.lock", proc))
    assert (out / "run.lock").exists()
    r = train_here([*RUN, "--epochs", "1", "--output-dir", out, "--resume", "auto"])
    assert f"taking over the stale lock {out / 'run.lock'}" in r.stdout
    assert f"(pid {first.pid}): its process {first.pid} is gone" in r.stdout
    assert [row["epoch"] for row in metrics(out)] == [1]
    assert not (out / "run.lock").exists()


@pytest.mark.process
def test_a_run_killed_while_taking_the_lock_leaves_none_and_the_next_run_starts(tmp_path):
    out = tmp_path / "run"
    def writing(proc):
        assert proc.stdout.readline() == "writing\n"
    killed(["-c", HALF_WRITTEN, out], writing)            # in the middle of the lock's record
    assert not (out / "run.lock").exists()
    r = train_here([*RUN, "--epochs", "1", "--output-dir", out])
    assert "stale" not in r.stdout
    assert [row["epoch"] for row in metrics(out)] == [1]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []   # its temp file removed


@pytest.mark.process
def test_holder_script_refuses_a_second_holder_and_releases_on_exit(tmp_path):
    out = tmp_path / "run"
    first = start(["-c", HOLDER, out])
    try:
        assert first.stdout.readline() == "holding\n"
        second = subprocess.run([sys.executable, "-c", HOLDER, str(out)], capture_output=True, text=True,
                                cwd=REPO, env=env(), timeout=120)
        assert second.returncode == 2
        assert "is in use by the run started" in second.stderr and f"(pid {first.pid})" in second.stderr
    finally:
        stop(first, signal.SIGINT)                        # Ctrl-C: run_command exits 2, the lock is released
    assert first.returncode == 2
    assert not (out / "run.lock").exists()


def test_forked_child_leaves_the_parents_lock_alone(tmp_path):
    with RunLock(tmp_path) as lock:
        pid = os.fork()
        if pid == 0:  # what a forked helper process that ends normally does
            lock.release()
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock.path.exists()


def test_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with RunLock(tmp_path):
            assert (tmp_path / "run.lock").exists()
            raise RuntimeError("boom")
    assert not (tmp_path / "run.lock").exists()


def test_stale_lock_of_another_host_is_taken_over_through_main(tmp_path):
    out = tmp_path / "run"
    write_lock(out, age=10 * rundir.STALE_SECONDS)
    r = train_here([*RUN, "--epochs", "1", "--output-dir", out])
    assert ("taking over the stale lock" in r.stdout and "on node-elsewhere (pid 4242)" in r.stdout
            and "last refreshed" in r.stdout)
    assert [row["epoch"] for row in metrics(out)] == [1]
    assert not (out / "run.lock").exists()


def test_fresh_lock_of_another_host_is_refused(tmp_path):
    out = tmp_path / "run"
    lock = write_lock(out)
    with pytest.raises(UserError, match=r"is in use by the run started 2026-01-01 00:00:00 UTC on node-elsewhere "
                                        r"\(pid 4242\): wait for it, or use another --output-dir"):
        RunLock(out).acquire()
    assert json.loads(lock.read_text())["token"] == "theirs"


@pytest.mark.process
def test_same_host_lock_is_judged_by_its_pid(tmp_path):
    said = []
    me = socket.gethostname()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        start_ticks = rundir._proc_start(alive.pid)
        write_lock(tmp_path / "a", host=me, pid=alive.pid, proc_start=start_ticks, age=10 * rundir.STALE_SECONDS)
        with pytest.raises(UserError, match=f"pid {alive.pid}"):  # alive: held, however old its heartbeat
            RunLock(tmp_path / "a", say=said.append).acquire()
        write_lock(tmp_path / "b", host=me, pid=alive.pid, proc_start="1")  # the pid now names another process
        RunLock(tmp_path / "b", say=said.append).acquire().release()
        assert "the pid now belongs to another process" in said[-1]
    finally:
        alive.kill()
        alive.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # ended, not yet reaped by its parent (this test)
    while rundir._proc_stat(zombie.pid)[0] != "Z":
        time.sleep(0.05)
    write_lock(tmp_path / "d", host=me, pid=zombie.pid, proc_start=rundir._proc_start(zombie.pid))
    RunLock(tmp_path / "d", say=said.append).acquire().release()
    assert f"its process {zombie.pid} is gone" in said[-1]
    zombie.wait()
    write_lock(tmp_path / "c", host=me, pid=alive.pid)    # its process is gone
    lock = RunLock(tmp_path / "c", say=said.append).acquire()
    assert f"its process {alive.pid} is gone" in said[-1]
    assert json.loads((tmp_path / "c" / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "c" / "run.lock").exists()


def test_earlier_attempt_of_the_same_job_is_taken_over_at_once(tmp_path):
    said = []
    write_lock(tmp_path, job="777/", attempt=[0, 0])      # fresh, on another node
    with pytest.raises(UserError, match="in use"):         # another job, or the same attempt: held
        RunLock(tmp_path, env={"SLURM_JOB_ID": "777"}).acquire()
    lock = RunLock(tmp_path, env={"SLURM_JOB_ID": "777", "SLURM_RESTART_COUNT": "1"}, say=said.append).acquire()
    assert "earlier attempt of this job" in said[-1]
    lock.release()
    write_lock(tmp_path, job="/rdzv-1", attempt=[0, 0])
    lock = RunLock(tmp_path, env={"TORCHELASTIC_RUN_ID": "rdzv-1", "TORCHELASTIC_RESTART_COUNT": "2"},
                   say=said.append).acquire()
    lock.release()
    write_lock(tmp_path, job=None, attempt=[0, 0])        # torchrun's default rendezvous id names no job
    with pytest.raises(UserError, match="in use"):
        RunLock(tmp_path, env={"TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "2"}).acquire()


def test_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_SECONDS", 0.05)
    with RunLock(tmp_path) as lock:
        past = time.time() - 1000
        os.utime(lock.path, (past, past))
        deadline = time.monotonic() + 60
        while lock.path.stat().st_mtime < past + 500:
            assert time.monotonic() < deadline, "the lock was not refreshed"
            time.sleep(0.05)


def test_output_path_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder; move it or use another --output-dir"):
        RunLock(tmp_path / "f" / "run").acquire()


# ---- nothing starts over an earlier run ------------------------------------------------------------------

def test_new_run_into_a_finished_runs_folder_is_refused_and_leaves_it_untouched(earlier):
    before = files(earlier)
    line = refused([*RUN, "--epochs", "2", "--output-dir", earlier])
    assert f"{earlier} holds an earlier run" in line and "--resume auto" in line and "another --output-dir" in line
    assert files(earlier) == before


@pytest.mark.process
def test_two_process_run_into_a_finished_runs_folder_is_refused_on_every_rank(earlier):
    before = files(earlier)
    r = train([*RUN, "--epochs", "2", "--output-dir", earlier], nproc=2, check=False, timeout=240)
    assert r.returncode != 0                               # the launcher's own status; each rank exits 2
    assert r.stderr.count(f"error: {earlier} holds an earlier run") == 2, r.stderr[-3000:]
    assert "exitcode  : 2" in r.stderr and "SIGABRT" not in r.stderr, r.stderr[-3000:]
    assert files(earlier) == before


def test_resume_auto_without_last_pt_keeps_best_pt_and_metrics(earlier):
    (earlier / "last.pt").unlink()
    before = files(earlier)
    line = refused([*RUN, "--epochs", "2", "--output-dir", earlier, "--resume", "auto"])
    assert "best.pt" in line and "metrics.jsonl" in line and "no last.pt" in line and "another --output-dir" in line
    assert files(earlier) == before


def test_torchrun_restart_continues_the_run(tmp_path):
    """A restart of the job that claimed the folder continues it; another job's restart is refused."""
    out = tmp_path / "run"
    train_here([*RUN, "--epochs", "1", "--output-dir", out], extra_env={"TORCHELASTIC_RUN_ID": "job-a"})
    first = metrics(out)
    r = train_here([*RUN, "--epochs", "2", "--output-dir", out],
                   extra_env={"TORCHELASTIC_RUN_ID": "job-a", "TORCHELASTIC_RESTART_COUNT": 1})
    assert "resumed from" in r.stdout
    rows = metrics(out)
    assert [row["epoch"] for row in rows] == [1, 2] and rows[0] == first[0]
    r = train_here([*RUN, "--epochs", "3", "--output-dir", out], status=None,
                   extra_env={"TORCHELASTIC_RUN_ID": "job-b", "TORCHELASTIC_RESTART_COUNT": 1})
    assert r.returncode == 2 and "holds an earlier run" in r.stderr and metrics(out) == rows


def test_resume_decisions(tmp_path):
    out = tmp_path / "run"
    assert resume_for(out, None) is None                   # nothing there: a fresh start
    assert resume_for(out, "auto") == "auto"
    out.mkdir()
    (out / "config.json").write_text("{}")                 # stopped before its first checkpoint
    assert resume_for(out, "auto") == "auto"
    with pytest.raises(UserError, match="--resume auto"):
        resume_for(out, None)
    assert resume_for(out, None, restarts=1) == "auto"
    assert resume_for(out, str(tmp_path / "other.pt"), restarts=1) == str(tmp_path / "other.pt")
    (out / "last.pt").write_bytes(b"x")
    assert resume_for(out, str(out / "last.pt")) == str(out / "last.pt")
    assert resume_for(out, str(tmp_path / "other.pt"), restarts=1) == "auto"
    with pytest.raises(UserError, match="another --output-dir"):  # another run's checkpoint over this one
        resume_for(out, str(tmp_path / "other.pt"))
    (out / "best.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="another --output-dir"):  # back to its best: rows after it would go
        resume_for(out, str(out / "best.pt"))


def test_default_output_dir_is_stable_across_requeues():
    slurm = {"SLURM_JOB_NAME": "cifar", "SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "2"}
    assert default_output_dir("resnet18", env=slurm) == Path("runs/cifar-10_2")
    assert default_output_dir("resnet18", env={"SLURM_JOB_NAME": "cifar", "SLURM_JOB_ID": "12"}) == Path("runs/cifar-12")
    name = default_output_dir("timm:resnet50", env={}).name
    assert name.startswith("timm-resnet50-") and len(name) == len("timm-resnet50-") + len("20260101-000000")


def test_default_output_dir_is_one_folder_for_every_process_and_restart_of_a_torchrun_job():
    env = {"TORCHELASTIC_RUN_ID": "3f2a9c1b-77", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert default_output_dir("cnn", env=env) == Path("runs/cnn-3f2a9c1b")
    assert default_output_dir("cnn", "cnn-lr0.1-seed1", env=env) == Path("runs/cnn-lr0.1-seed1")


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    """In one process (a notebook, a script calling dtrain.main.run): the run's folder is free once it returns."""
    from dtrain.main import run
    out = tmp_path / "run"
    small = tiny_run(out)
    run([*small, "--epochs", "1"])
    assert not (out / "run.lock").exists()
    assert run([*small, "--epochs", "2", "--resume", "auto"])["epochs"] == 2
