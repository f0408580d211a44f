"""slurm/cifar.sh on a real (throw-away, two-node) Slurm cluster, and stop-on-signal.

The cluster comes from the ``slurm_cluster`` fixture (tests/cluster/): these tests skip where it
cannot run (not root, no unshare, Slurm not installed) and fail on CI instead.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.slurm_cluster import NODES
from helpers import env as helpers_env, signal_mid_run, write_cifar
from test_restart import saved_epochs

REPO = Path(__file__).resolve().parents[1]

# Tiny but not instant: 2 processes x 8 images per step, 40 steps per epoch, 2 epochs.
N_TRAIN, N_TEST, BATCH, EPOCHS = 640, 50, 16, 2
STEPS_PER_EPOCH = N_TRAIN // BATCH
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
STOP_LINE = re.compile(r"stopped by signal (\d+) at step (\d+) \(epoch (\d+), batch (\d+)/(\d+)\)")

@pytest.fixture(scope="module")
def train_args(tmp_path_factory) -> list[str]:
    """dtrain/main.py flags for the jobs: cnn on a generated CIFAR-10 folder (real pickled format)."""
    data = write_cifar(tmp_path_factory.mktemp("cifar"), n_train=N_TRAIN, n_test=N_TEST)
    return ["--arch", "cnn", "--dataset", "cifar10", "--data-dir", str(data), "--no-download",
            "--batch-size", str(BATCH), "--epochs", str(EPOCHS), "--seed", "0", "--no-wandb"]


def job_env(cluster) -> dict:
    # sbatch exports the submitting environment to the job: one thread per process on 2 cores.
    return dict(cluster.env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")


def sbatch_cmd(log: Path, args: list[str], *options: str) -> list[str]:
    return ["sbatch", *options, "--nodes", "2", "--output", str(log), "slurm/cifar.sh", *args]


def submit(cluster, log: Path, args: list[str]) -> str:
    r = cluster.run(sbatch_cmd(log, args, "--parsable"), cwd=REPO, env=job_env(cluster))
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def failure(cluster, job_id: str, log: Path, what: str) -> str:
    return (f"{what}\n--- scontrol show job {job_id}: {cluster.job_state(job_id)}\n--- job log {log}:\n"
            f"{read(log)}\n--- daemons:\n{cluster.logs()}")


def wait_job(cluster, job_id: str, log: Path, timeout: float = 90) -> dict:
    """Poll until the job has ended (through requeues); its final ``scontrol show job`` fields."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.job_state(job_id)
        if state.get("JobState") in TERMINAL:
            return state
        time.sleep(0.25)
    cluster.run(["scancel", job_id])
    pytest.fail(failure(cluster, job_id, log, f"job {job_id} did not end within {timeout:.0f} s"))


def wait_for_line(cluster, job_id: str, log: Path, pattern: str, timeout: float = 60) -> None:
    """Poll the job log until a line matches (fails early if the job ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, read(log), re.M):
            return
        if cluster.job_state(job_id).get("JobState") in TERMINAL:
            break
        time.sleep(0.1)
    cluster.run(["scancel", job_id])
    pytest.fail(failure(cluster, job_id, log, f"no line matching {pattern!r} in the job log"))


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slurm
def test_two_nodes_answer_srun(slurm_cluster):
    r = slurm_cluster.run(["srun", "-N2", "hostname"], timeout=60)
    assert r.returncode == 0, r.stderr + slurm_cluster.logs()
    assert sorted(r.stdout.split()) == list(NODES)
    # Inside a node, every node name resolves (the torchrun rendezvous host is "n1").
    r = slurm_cluster.run(["srun", "-N2", "getent", "hosts", "n1"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[::3] == ["127.0.0.1", "127.0.0.1"]


@pytest.fixture(scope="module")
def ddp_job(slurm_cluster, tmp_path_factory, train_args):
    """One uninterrupted 2-node job, submitted with `sbatch --wait`; also the preemption baseline.

    Its --output-dir lies under the cluster's node-local directory, which each node sees as a
    directory of its own: the files land in the directory of the node whose process wrote them.
    """
    cluster = slurm_cluster
    tmp = tmp_path_factory.mktemp("ddp")
    log = tmp / "job.log"
    out = cluster.node_local / tmp.name
    # stdbuf: sbatch's "Submitted batch job N" would otherwise sit in its stdout buffer until it exits.
    waiter = subprocess.Popen(["stdbuf", "-oL", *sbatch_cmd(log, [*train_args, "--output-dir", str(out)], "--wait")],
                              cwd=REPO, env=job_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    # `sbatch --wait` polls the job after 2, 8, 32 s...: take the job id and poll faster ourselves.
    first = waiter.stdout.readline()
    match = re.search(r"Submitted batch job (\d+)", first)
    if not match:
        waiter.kill()
        pytest.fail(f"sbatch --wait said {first!r} {waiter.communicate()}")
    job_id = match.group(1)
    state = wait_job(cluster, job_id, log)
    node_dirs = {n: cluster.node_dir(n) / tmp.name for n in NODES}
    writers = [d for d in node_dirs.values() if (d / "last.pt").exists()]
    yield {"job_id": job_id, "state": state, "log": log, "out": out, "waiter": waiter, "node_dirs": node_dirs,
           "run_dir": writers[0] if len(writers) == 1 else None}
    if waiter.poll() is None:
        waiter.kill()
        waiter.wait()


@pytest.mark.slurm
def test_sbatch_two_nodes_is_one_ddp_job(ddp_job, slurm_cluster):
    job_id, state, log = ddp_job["job_id"], ddp_job["state"], ddp_job["log"]
    text = read(log)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", failure(
        slurm_cluster, job_id, log, "the job did not complete")
    assert state["NumNodes"] == "2"
    assert "world size 2" in text, text
    assert text.count("done:") == 1, text               # one console: the main process
    # Exactly one process wrote the outputs: only one node's view of the output dir has files.
    written = {n: sorted(p.name for p in d.iterdir()) if d.is_dir() else [] for n, d in ddp_job["node_dirs"].items()}
    writers = [n for n, files in written.items() if files]
    assert len(writers) == 1, f"files per node: {written}"
    run_dir = ddp_job["node_dirs"][writers[0]]
    assert {"last.pt", "metrics.jsonl", "config.json"} <= set(written[writers[0]]), written
    rows = metrics(run_dir)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    assert [r["step"] for r in rows] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
    assert all(r["train_samples"] == N_TRAIN for r in rows), rows
    # The default for a job: --resume auto (a fresh start here), no requeue.
    assert "--resume auto" in text and "(restart 0)" in text and "requeue" not in text


@pytest.mark.slow
@pytest.mark.slurm
def test_usr1_saves_requeues_and_resumes(ddp_job, slurm_cluster, train_args, tmp_path):
    cluster = slurm_cluster
    log, out = tmp_path / "job.log", tmp_path / "run"
    job_id = submit(cluster, log, [*train_args, "--output-dir", str(out)])
    # "output: DIR" is printed after the stop handlers are installed and before the first step.
    wait_for_line(cluster, job_id, log, r"^output: ")
    r = cluster.run(["scancel", "--signal=USR1", "--batch", job_id])
    assert r.returncode == 0, r.stderr
    state = wait_job(cluster, job_id, log, timeout=120)
    text = read(log)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", failure(
        cluster, job_id, log, "the requeued job did not complete")
    assert state["JobId"] == job_id and state["Restarts"] == "1", state

    stops = STOP_LINE.findall(text)
    assert len(stops) == 1, text
    signum, step, epoch, batch, nb = map(int, stops[0])
    assert signum == signal.SIGUSR1
    assert epoch == 1 and 0 < batch < nb == STEPS_PER_EPOCH, f"not stopped mid-epoch: {stops[0]}\n{text}"
    assert f"requeueing job {job_id}" in text
    assert "(restart 1)" in text                          # SLURM_RESTART_COUNT=1 in the second run
    assert re.search(rf"resumed from .*last\.pt at epoch 1, step {step}\b", text), text
    assert text.count("done:") == 1

    # Same optimiser steps and per-epoch samples as the uninterrupted run.
    assert ddp_job["run_dir"], "the uninterrupted run left no single output dir to compare with"
    baseline = metrics(ddp_job["run_dir"])
    rows = metrics(out)
    keys = ("epoch", "step", "train_samples")
    assert [{k: r[k] for k in keys} for r in rows] == [{k: r[k] for k in keys} for r in baseline]


@pytest.mark.slurm
def test_term_to_batch_shell_saves_without_requeue(slurm_cluster, train_args, tmp_path):
    """SIGTERM to the batch shell: the same save, then the job ends (exit 0), not requeued."""
    cluster = slurm_cluster
    log, out = tmp_path / "job.log", tmp_path / "run"
    job_id = submit(cluster, log, [*train_args, "--output-dir", str(out)])
    wait_for_line(cluster, job_id, log, r"^output: ")
    r = cluster.run(["scancel", "--signal=TERM", "--batch", job_id])
    assert r.returncode == 0, r.stderr
    state = wait_job(cluster, job_id, log)
    text = read(log)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0" and state["Restarts"] == "0", failure(
        cluster, job_id, log, "the job did not end cleanly")
    stops = STOP_LINE.findall(text)
    assert len(stops) == 1 and int(stops[0][0]) == signal.SIGTERM, text
    assert "requeueing" not in text and "done:" not in text
    assert (out / "last.pt").is_file()


def job_workers(job_id: str) -> dict[int, int]:
    """{rank: pid} of the job's training processes (torchrun's workers), on every node."""
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            pairs = dict(v.partition("=")[::2] for v in environ.read_bytes().decode(errors="replace").split("\0"))
        except OSError:
            continue
        if pairs.get("SLURM_JOB_ID") == job_id and "TORCHELASTIC_RESTART_COUNT" in pairs and "RANK" in pairs:
            found[int(pairs["RANK"])] = int(environ.parent.name)
    return found


@pytest.mark.slow
@pytest.mark.slurm
def test_lost_worker_restarts_the_group_which_resumes(slurm_cluster, train_args, tmp_path):
    """kill -9 the training process on the second node: torchrun restarts the worker group on both
    nodes, which continues from last.pt; the job completes with every epoch recorded once."""
    cluster, epochs = slurm_cluster, EPOCHS + 1
    log, out = tmp_path / "job.log", tmp_path / "run"
    job_id = submit(cluster, log, [*train_args, "--epochs", str(epochs), "--output-dir", str(out)])
    deadline, killed = time.monotonic() + 120, None
    while killed is None and time.monotonic() < deadline:
        workers = job_workers(job_id)
        if saved_epochs(out) >= 1 and 1 in workers:
            os.kill(workers[1], signal.SIGKILL)
            killed = workers[1]
        elif cluster.job_state(job_id).get("JobState") in TERMINAL:
            break
        time.sleep(0.1)
    assert killed, failure(cluster, job_id, log, "the job ended before a worker could be killed")
    state = wait_job(cluster, job_id, log, timeout=180)
    text = read(log)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0" and state["Restarts"] == "0", failure(
        cluster, job_id, log, "the job did not recover from the lost worker")
    assert re.search(r"resumed from .*last\.pt at epoch [2-9]", text), text
    assert [r["epoch"] for r in metrics(out)] == list(range(1, epochs + 1)), text


def job_logs(name: str) -> list[str]:
    """The log files of jobs named `name` in the checkout's logs/ (slurm/cifar.sh's default --output)."""
    return sorted(p.name for p in (REPO / "logs").glob(f"{name}-*"))


@pytest.mark.slurm
def test_array_tasks_write_runs_and_logs_named_job_name_array_id_task(slurm_cluster, train_args):
    """Without --output-dir, each task of an array job writes to runs/<job name>-<array job id>_<task>
    (dtrain/main.py's default under Slurm, the folder a requeued task resumes from), and with slurm/cifar.sh's
    own --output its log is logs/<job name>-<array job id>_<task>.out: the same name, not the task's job id."""
    cluster, name = slurm_cluster, f"dtrain-t{os.getpid()}"
    r = cluster.run(["sbatch", "--parsable", "--job-name", name, "--array=3-4", "--nodes", "1",
                     "slurm/cifar.sh", *train_args, "--epochs", "1"], cwd=REPO, env=job_env(cluster))
    assert r.returncode == 0, r.stderr
    array_id = r.stdout.strip().split(";")[0]
    dirs = [REPO / "runs" / f"{name}-{array_id}_{task}" for task in (3, 4)]
    logs = [REPO / "logs" / f"{name}-{array_id}_{task}.out" for task in (3, 4)]
    job_ids = set()
    try:
        for task, run_dir, task_log in zip((3, 4), dirs, logs):
            state = wait_job(cluster, f"{array_id}_{task}", task_log, timeout=120)
            assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", failure(
                cluster, f"{array_id}_{task}", task_log, "the array task did not complete")
            assert f"output: runs/{run_dir.name}" in read(task_log), (job_logs(name), read(task_log))
            assert (run_dir / "last.pt").is_file() and len(metrics(run_dir)) == 1, sorted(os.listdir(REPO / "runs"))
            job_ids.add(state["JobId"])
        assert len(job_ids) == 2                   # a task's own job id differs from the array's
        assert job_logs(name) == [log.name for log in logs]
    finally:
        for path in [*dirs, *logs]:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def wait_restarted(cluster, job_id: str, log: Path, restarts: int, timeout: float = 90) -> dict:
    """Poll until the requeued job has ended its `restarts`-th restart."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.job_state(job_id)
        if state.get("Restarts") == str(restarts) and state.get("JobState") in TERMINAL:
            return state
        time.sleep(0.25)
    pytest.fail(failure(cluster, job_id, log, f"job {job_id} did not end its restart {restarts} in {timeout:.0f} s"))


@pytest.mark.slurm
def test_a_plain_job_logs_to_job_name_job_id_also_when_requeued(slurm_cluster):
    """slurm/cifar.sh's --output is logs/%x-%A_%a.out, which Slurm writes as <job id>_4294967294 for a job that is
    not an array task: the job renames its log to logs/<job name>-<job id>.out. Requeued (Slurm opens a fresh
    <job id>_4294967294 file), the second run's lines follow the first's in that one file. The job fails at
    once (a mistake in its flags): its one line is in the log once per run."""
    cluster, name = slurm_cluster, f"dtrain-plain{os.getpid()}"
    line = "error: --sweep-index 5 is past the end of the sweep: it has 2 combinations (0..1); submit with --array=0-1"
    r = cluster.run(["sbatch", "--parsable", "--job-name", name, "--nodes", "1", "slurm/cifar.sh", "--arch", "cnn",
                     "--sweep", "seed=0,1", "--sweep-index", "5"], cwd=REPO, env=job_env(cluster))
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    log = REPO / "logs" / f"{name}-{job_id}.out"
    try:
        state = wait_job(cluster, job_id, log)
        assert state["JobState"] == "FAILED", state
        assert job_logs(name) == [log.name] and read(log).count(line) == 1, (job_logs(name), read(log))
        r = cluster.run(["scontrol", "requeue", job_id])
        assert r.returncode == 0, r.stderr
        wait_restarted(cluster, job_id, log, restarts=1)
        assert job_logs(name) == [log.name] and read(log).count(line) == 2, (job_logs(name), read(log))
    finally:
        for stray in (REPO / "logs").glob(f"{name}-*"):
            stray.unlink()


@pytest.mark.slurm
def test_the_arrays_sweep_list_prints_are_ones_sbatch_accepts(slurm_cluster, tmp_path):
    """--sweep-list's --array lines on the cluster's default MaxArraySize (1001): one array for 1,001
    combinations, three chunks for 2,500, each accepted by `sbatch --test-only`; one array of all 2,500, which
    the note reserves for a larger MaxArraySize, is refused."""
    from dtrain.sweep import listing
    r = slurm_cluster.run(["scontrol", "show", "config"])
    assert re.search(r"^MaxArraySize\s*=\s*1001$", r.stdout, re.M), r.stdout

    def arrays(size: int) -> list[str]:
        text = listing(["seed=" + ",".join(map(str, range(size)))]).splitlines()[size:]
        return [m.group(1) for line in text for m in re.finditer(r"sbatch (--array=\S+)", line)]

    def accepted(array: str) -> bool:
        r = slurm_cluster.run(["sbatch", "--test-only", array, "--nodes", "1", "--output", str(tmp_path / "x.out"),
                               "slurm/cifar.sh", "--arch", "cnn"], cwd=REPO, env=job_env(slurm_cluster))
        return r.returncode == 0
    assert arrays(1001) == ["--array=0-1000"] and accepted("--array=0-1000")
    *chunks, all_at_once = arrays(2500)
    assert chunks == ["--array=0-999", "--array=0-999", "--array=0-499"] and all(map(accepted, chunks))
    assert all_at_once == "--array=0-2499" and not accepted(all_at_once)


# Sweeps: small runs (12 steps per epoch), all tasks at once (1 CPU per task: 8 tasks per node).
SWEEP_TRAIN, SWEEP_TEST, SWEEP_BATCH = 192, 64, 16
SEEDS_EPOCHS, GRID_EPOCHS = 3, 2
SEEDS, KILLED, EXTRA = (0, 1, 2), 3, 4


def sweep_args(data: Path, epochs: int) -> list[str]:
    return ["--arch", "cnn", "--dataset", "cifar10", "--data-dir", str(data), "--no-download", "--batch-size",
            str(SWEEP_BATCH), "--epochs", str(epochs), "--no-wandb", "--no-plots"]


def submit_array(cluster, name: str, array: str, log: Path, args: list[str], **env) -> str:
    r = cluster.run(["sbatch", "--parsable", "--job-name", name, f"--array={array}", "--nodes", "1",
                     "--cpus-per-task", "1", "--output", str(log), "slurm/cifar.sh", *args],
                    cwd=REPO, env=dict(job_env(cluster), **env))
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def rows_in(path: Path) -> int:
    return len(read(path).splitlines())


def term_pending(pid: int) -> bool:
    """True once SIGTERM waits, undelivered, for the (stopped) process: SigPnd/ShdPnd in /proc/PID/status."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return True
    masks = [int(line.split()[1], 16) for line in lines if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(m >> (signal.SIGTERM - 1) & 1 for m in masks)


def cancel_after_first_epoch(cluster, task: str, run_dir: Path, log: Path, timeout: float = 300) -> int:
    """`scancel` the task mid-run: once its first epoch is in metrics.jsonl its training processes are
    stopped (SIGSTOP), so the cancel lands there however fast the rest would go; they continue (SIGCONT)
    once the cancel's SIGTERM waits for them. Returns the rows metrics.jsonl had at the cancel."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.job_state(task)
        workers = job_workers(state.get("JobId", "")) if rows_in(run_dir / "metrics.jsonl") >= 1 else {}
        if workers:
            for pid in workers.values():
                os.kill(pid, signal.SIGSTOP)
            rows = rows_in(run_dir / "metrics.jsonl")
            r = cluster.run(["scancel", task])
            assert r.returncode == 0, r.stderr
            held = time.monotonic() + 60
            while time.monotonic() < held and not all(map(term_pending, workers.values())):
                time.sleep(0.05)
            for pid in workers.values():
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            return rows
        if state.get("JobState") in TERMINAL:
            break
        time.sleep(0.05)
    pytest.fail(failure(cluster, task, log, f"task {task} ended before it could be stopped after epoch 1"))


def summarize(runs: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "dtrain", "summarize", str(runs), "--out", str(out)], cwd=REPO,
                       env=helpers_env(COLUMNS="200"), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(out / "summary.csv", newline="") as f:
        return {"text": r.stdout, "rows": list(csv.DictReader(f)), "out": out}


@pytest.fixture(scope="module")
def sweep_arrays(slurm_cluster, tmp_path_factory):
    """Two array jobs, submitted together, of slurm/cifar.sh with --sweep, each task its own run:

    - seeds: `--array=0-4 --sweep seed=0,1,2,3`, 1 process per task: tasks 0-2 finish; task 3 is
      cancelled after its first epoch; task 4 lies past the end of the grid;
    - grid: `--array=0-3 --sweep lr=0.05,0.1 --sweep seed=0,1`, 2 processes per task (GPUS_PER_NODE=2).

    When every task has ended, the run folders (runs/<job>-<array job>_<task> in the checkout) are moved
    into a folder per array, and `python -m dtrain summarize` reads each.
    """
    cluster, tmp = slurm_cluster, tmp_path_factory.mktemp("sweeps")
    data = write_cifar(tmp / "cifar", n_train=SWEEP_TRAIN, n_test=SWEEP_TEST, seed=1)
    name = f"dtrain-sweep{os.getpid()}"
    seeds_args = [*sweep_args(data, SEEDS_EPOCHS), "--sweep", "seed=" + ",".join(map(str, [*SEEDS, KILLED]))]
    grid_args = [*sweep_args(data, GRID_EPOCHS), "--sweep", "lr=0.05,0.1", "--sweep", "seed=0,1"]
    seeds = submit_array(cluster, name, f"0-{EXTRA}", tmp / "seeds-%a.log", seeds_args)
    grid = submit_array(cluster, name, "0-3", tmp / "grid-%a.log", grid_args, GPUS_PER_NODE="2")
    tasks = {f"{seeds}_{t}": tmp / f"seeds-{t}.log" for t in range(EXTRA + 1)}
    tasks.update({f"{grid}_{t}": tmp / f"grid-{t}.log" for t in range(4)})
    folders = {task: REPO / "runs" / f"{name}-{task}" for task in tasks}
    try:
        killed = f"{seeds}_{KILLED}"
        rows_at_kill = cancel_after_first_epoch(cluster, killed, folders[killed], tasks[killed])
        states = {task: wait_job(cluster, task, log, timeout=400) for task, log in tasks.items()}
    finally:
        for task in tasks:
            cluster.run(["scancel", task])
        runs = {seeds: tmp / "seeds-runs", grid: tmp / "grid-runs"}
        for task, folder in folders.items():
            if folder.exists():
                runs[task.split("_")[0]].mkdir(exist_ok=True)
                shutil.move(folder, runs[task.split("_")[0]] / folder.name)
    yield {"seeds": seeds, "grid": grid, "tasks": tasks, "states": states, "runs": runs, "name": name,
           "rows_at_kill": rows_at_kill, "summaries": {job: summarize(path, tmp / f"summary-{job}")
                                                       for job, path in runs.items() if path.is_dir()}}


def final_accs(runs: list[Path]) -> list[float]:
    return [metrics(run)[-1]["val_acc"] for run in runs]


def assert_completed(sweeps: dict, cluster, task: str) -> None:
    state = sweeps["states"][task]
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", failure(
        cluster, task, sweeps["tasks"][task], f"array task {task} did not complete")


@pytest.mark.slurm
@pytest.mark.slow
def test_seed_array_gives_one_finished_run_per_task_with_its_seed(sweep_arrays, slurm_cluster):
    s, seeds = sweep_arrays, sweep_arrays["seeds"]
    for seed in SEEDS:
        task = f"{seeds}_{seed}"
        assert_completed(s, slurm_cluster, task)
        run = s["runs"][seeds] / f"{s['name']}-{task}"
        assert f"output: runs/{run.name}" in read(s["tasks"][task])
        config = json.loads((run / "config.json").read_text())
        assert (config["seed"], config["sweep_index"]) == (seed, seed), config
        assert [r["epoch"] for r in metrics(run)] == list(range(1, SEEDS_EPOCHS + 1))
        assert (run / "last.pt").is_file()


@pytest.mark.slurm
@pytest.mark.slow
def test_summarize_seed_array_is_one_group_with_numpy_mean_and_std(sweep_arrays):
    import numpy as np
    s, seeds = sweep_arrays, sweep_arrays["seeds"]
    summary = s["summaries"][seeds]
    assert len(summary["rows"]) == 1, summary
    row = summary["rows"][0]
    finished = [s["runs"][seeds] / f"{s['name']}-{seeds}_{seed}" for seed in SEEDS]
    accs = final_accs(finished)
    assert int(row["n"]) == len(SEEDS), summary["text"]
    assert float(row["final_acc_mean"]) == pytest.approx(np.mean(accs), rel=1e-9, abs=1e-12)
    # summarize documents the sample standard deviation: numpy's ddof=1.
    assert float(row["final_acc_std"]) == pytest.approx(np.std(accs, ddof=1), rel=1e-9, abs=1e-12), accs
    assert (summary["out"] / "summary.png").read_bytes().startswith(b"\x89PNG"), summary["text"]


@pytest.mark.slurm
@pytest.mark.slow
def test_cancelled_task_is_unfinished_in_summarize_not_averaged(sweep_arrays):
    s, seeds = sweep_arrays, sweep_arrays["seeds"]
    task = f"{seeds}_{KILLED}"
    state = s["states"][task]
    assert state["JobState"] == "CANCELLED", state
    run = s["runs"][seeds] / f"{s['name']}-{task}"
    assert json.loads((run / "config.json").read_text())["seed"] == KILLED
    rows = metrics(run)
    assert 1 <= s["rows_at_kill"] == len(rows) < SEEDS_EPOCHS, rows
    summary = s["summaries"][seeds]
    assert int(summary["rows"][0]["not_finished"]) == 1 and int(summary["rows"][0]["n"]) == len(SEEDS)
    assert re.search(rf"not finished.*{re.escape(run.name)}", summary["text"].replace("\n", " ")), summary["text"]


@pytest.mark.slurm
@pytest.mark.slow
def test_array_task_past_the_grid_fails_with_one_line_and_no_run(sweep_arrays):
    s, seeds = sweep_arrays, sweep_arrays["seeds"]
    task = f"{seeds}_{EXTRA}"
    state, text = s["states"][task], read(s["tasks"][task])
    assert state["JobState"] == "FAILED" and state["ExitCode"] != "0:0", state
    assert f"error: --sweep-index {EXTRA} is past the end of the sweep: it has 4 combinations (0..3); " \
           f"submit with --array=0-3" in text, text
    # Found in the batch shell, once: no training process was started (nor restarted by torchrun) on it.
    assert text.count("error: ") == 1 and "torch.distributed.run" not in text, text
    run = s["runs"][seeds] / f"{s['name']}-{task}"
    assert not (run / "config.json").exists() and not (run / "metrics.jsonl").exists(), sorted(run.iterdir())


@pytest.mark.slurm
@pytest.mark.slow
def test_grid_array_on_two_processes_per_task_gives_two_groups(sweep_arrays, slurm_cluster):
    s, grid = sweep_arrays, sweep_arrays["grid"]
    expected = {0: (0.05, 0), 1: (0.05, 1), 2: (0.1, 0), 3: (0.1, 1)}
    for t, (lr, seed) in expected.items():
        task = f"{grid}_{t}"
        assert_completed(s, slurm_cluster, task)
        assert "world size 2" in read(s["tasks"][task]), read(s["tasks"][task])
        config = json.loads((s["runs"][grid] / f"{s['name']}-{task}" / "config.json").read_text())
        assert (config["lr"], config["seed"]) == (lr, seed), config
    rows = s["summaries"][grid]["rows"]
    assert [(float(r["lr"]), int(r["n"]), int(r["not_finished"])) for r in rows] == [(0.05, 2, 0), (0.1, 2, 0)], rows
    for r, lr in zip(rows, (0.05, 0.1)):
        runs = [s["runs"][grid] / f"{s['name']}-{grid}_{t}" for t, (l, _) in expected.items() if l == lr]
        assert float(r["final_acc_mean"]) == pytest.approx(sum(final_accs(runs)) / 2, rel=1e-9, abs=1e-12)


@pytest.mark.slurm
def test_predict_sh_job(slurm_cluster, ddp_job, train_args, tmp_path):
    """slurm/predict.sh runs dtrain/predict.py through the same launcher (1 node, here 1 CPU process),
    on the checkpoint of the 2-node job."""
    assert ddp_job["run_dir"], "the training job left no checkpoint"
    csv, log = tmp_path / "pred.csv", tmp_path / "job.log"
    data = train_args[train_args.index("--data-dir") + 1]
    r = slurm_cluster.run(["sbatch", "--parsable", "--output", str(log), "slurm/predict.sh", "--checkpoint",
                           str(ddp_job["run_dir"] / "best.pt"), "--dataset", "cifar10", "--data-dir", data,
                           "--split", "test", "--output", str(csv)], cwd=REPO, env=job_env(slurm_cluster))
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    state = wait_job(slurm_cluster, job_id, log)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", failure(
        slurm_cluster, job_id, log, "the predict job did not complete")
    assert state["JobName"] == "dtrain-predict" and state["NumNodes"] == "1"
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("id,label") and len(lines) == 1 + N_TEST, lines[:3]
    assert "--output-dir" not in read(log)                 # training defaults are not added to predict


@pytest.mark.slurm
def test_sbatch_wait_exits_0(ddp_job):
    """`sbatch --wait` (the ddp job's submitter) returns the job's exit status: 0."""
    waiter = ddp_job["waiter"]
    try:
        rc = waiter.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("sbatch --wait did not return within 90 s of the job's end")
    assert rc == 0, waiter.stderr.read()


@pytest.mark.process
def test_sigterm_plain_run_saves_and_stops(tmp_path):
    """No Slurm: SIGTERM to `python dtrain/main.py` saves last.pt at the next step and exits 0
    (nothing to requeue: the run continues with --resume auto, as the Slurm test shows)."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    args = ["--arch", "cnn", "--dataset", "fake", "--fake-size", "1280", "--batch-size", "16", "--epochs", "1",
            "--seed", "0", "--no-wandb", "--output-dir", str(out)]
    rc, text = signal_mid_run([sys.executable, "dtrain/main.py", *args], signal.SIGTERM, env, group=False,
                              timeout=120)
    assert rc == 0, text
    stops = STOP_LINE.findall(text)
    assert len(stops) == 1 and int(stops[0][0]) == signal.SIGTERM, text
    step, batch, nb = int(stops[0][1]), int(stops[0][3]), int(stops[0][4])
    assert 0 < batch < nb, text
    assert "requeue" not in text.lower() and "done:" not in text
    import torch

    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]) == (0, step, batch)   # the mid-epoch position
