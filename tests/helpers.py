"""Shared test helpers: generated datasets in real on-disk formats and launching real processes."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MAIN = str(REPO / "dtrain" / "main.py")


def _cifar_images(rng, n: int, classes: int, learnable: bool) -> tuple[np.ndarray, np.ndarray]:
    """n images as CIFAR stores them (N x 3072 uint8: R, G, B planes) and their labels."""
    y = rng.integers(0, classes, n)
    x = rng.normal(128, 40, (n, 3, 32, 32))
    if learnable:  # a per-class colour, so a model can learn
        x += (np.linspace(-60, 60, classes)[y])[:, None, None, None] * np.array([1, -1, 0.5])[None, :, None, None]
    return np.clip(x, 0, 255).astype(np.uint8).reshape(n, 3072), y


def write_cifar(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0, batches: int = 2,
                classes: int = 10, learnable: bool = True) -> Path:
    """A CIFAR-10 folder in the real pickled-batch format (dict with 'data' N x 3072 uint8, 'labels')."""
    rng = np.random.default_rng(seed)
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)

    def make(n):
        return _cifar_images(rng, n, classes, learnable)

    x, y = make(n_train)
    for k, idx in enumerate(np.array_split(np.arange(n_train), batches)):
        with open(d / f"data_batch_{k + 1}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {k + 1}", "labels": y[idx].tolist(), "data": x[idx],
                         "filenames": [f"{i}.png" for i in idx]}, f)
    x, y = make(n_test)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch", "labels": y.tolist(), "data": x,
                     "filenames": [f"{i}.png" for i in range(n_test)]}, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"][:classes]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072}, f)
    return Path(root)


def write_cifar100(root: Path, n_train: int = 300, n_test: int = 100, seed: int = 0, fine: int = 100,
                   coarse: int = 20, learnable: bool = True) -> Path:
    """A CIFAR-100 folder in the real layout: cifar-100-python/{train,test,meta}, pickled dicts with 'data'
    (N x 3072 uint8), 'fine_labels', 'coarse_labels' (fine class i belongs to superclass i % coarse), and
    the meta file's 'fine_label_names' and 'coarse_label_names'."""
    rng = np.random.default_rng(seed)
    d = Path(root) / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        x, y = _cifar_images(rng, n, fine, learnable)
        with open(d / name, "wb") as f:
            pickle.dump({"filenames": [f"{i}.png" for i in range(n)], "batch_label": f"{name}ing batch 1 of 1",
                         "fine_labels": y.tolist(), "coarse_labels": (y % coarse).tolist(), "data": x}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{i}" for i in range(fine)],
                     "coarse_label_names": [f"coarse{i}" for i in range(coarse)]}, f)
    return Path(root)


def write_python2_pickles(folder: Path, files: dict[str, dict]) -> None:
    """Each {file name: dict} pickled as the original CIFAR files were: protocol 2, byte-string keys."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, d in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump({k.encode(): v for k, v in d.items()}, f, protocol=2)


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
              "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)})
    e.pop("CUDA_VISIBLE_DEVICES", None)
    for k, v in extra.items():  # None: unset
        if v is None:
            e.pop(k, None)
        else:
            e[k] = str(v)
    return e


def launch(script: str, args: list, nproc: int = 1, timeout: int = 300, check: bool = True,
           extra_env: dict | None = None, cwd: Path | None = None, threads: int = 1) -> subprocess.CompletedProcess:
    """Run a dtrain entry point on nproc CPU processes (accelerate launch; plain python for 1).

    It runs in a session of its own: on a timeout the launcher and every process it started are killed.
    """
    args = [str(a) for a in args]
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), script, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd or REPO,
                            env=env(OMP_NUM_THREADS=threads, **(extra_env or {})), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout} s\n--- stdout\n{out[-4000:]}\n"
                             f"--- stderr\n{err[-4000:]}") from None
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n"
                             f"--- stderr\n{r.stderr[-6000:]}")
    return r


def train(args: list[str], nproc: int = 1, **kw) -> subprocess.CompletedProcess:
    return launch(MAIN, ["--no-wandb", "--no-plots", *args], nproc, **kw)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def signal_mid_run(cmd: list, sig, environ: dict | None = None, group: bool = True, delay: float = 0.0,
                   again_after: float | None = None, timeout: int = 180) -> tuple[int, str]:
    """Start `cmd` in a session of its own; once it prints "output: " (training starts) wait `delay` s and
    send `sig` to its whole process group (group=False: to the process alone), again after `again_after` s
    if given. Returns (exit status, stdout and stderr)."""
    import threading
    import time
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=environ or env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, started = [], threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("output: "):
                started.set()
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    send = (lambda: os.killpg(proc.pid, sig)) if group else (lambda: proc.send_signal(sig))
    try:
        assert started.wait(timeout), "".join(lines)
        time.sleep(delay)
        send()
        if again_after is not None:
            time.sleep(again_after)
            send()
        rc = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    thread.join(10)
    return rc, "".join(lines)


def children(pid: int) -> list[int]:
    """The pids of a process's children (a launcher's workers), from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return sorted(kids)


# ---- the fast tier: runs in this process ------------------------------------------------------------------

def tiny_run(out=None, *more, dataset: str | None = None, data=None, size: int = 64, batch: int = 32,
             arch: str = "cnn") -> list[str]:
    """The command line of a tiny training run: `arch` on `size` generated training images (--dataset fake,
    a quarter as many to validate on) or, given `data`, on that folder in the `dataset` format (default
    cifar10, no download); global batch `batch`, no DataLoader workers, no W&B, no run picture; into `out`
    (None: the default folder). `more` comes last, so a flag there overrides these."""
    args = ["--arch", arch, "--batch-size", str(batch), "--workers", "0", "--no-wandb", "--no-plots"]
    if data is None:
        args += ["--dataset", dataset or "fake", "--fake-size", str(size)]
    else:
        args += ["--dataset", dataset or "cifar10", "--data-dir", str(data), "--no-download"]
    if out is not None:
        args += ["--output-dir", str(out)]
    return [*args, *map(str, more)]


@dataclass
class Ran:
    """A command run in this process, reported as a finished process is (subprocess.CompletedProcess's
    fields), plus what its `run(argv)` returned (None when it ended with an error)."""
    args: list
    returncode: int
    stdout: str
    stderr: str
    result: Any = None


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that a run in this process starts like a new process."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# a fresh interpreter's warning filters (python -W none of them): what a run on the command line shows
FRESH_WARNING_FILTERS = [("default", None, DeprecationWarning, "__main__", 0),
                         ("ignore", None, DeprecationWarning, None, 0),
                         ("ignore", None, PendingDeprecationWarning, None, 0),
                         ("ignore", None, ImportWarning, None, 0),
                         ("ignore", None, ResourceWarning, None, 0)]


def _print_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextmanager
def process_state_kept():
    """A block that may run a command in this process, and after which this process is as before: the
    process-wide state a run sets up (accelerate's AcceleratorState, GradientState and PartialState) is
    reset before and after; torch's default random generator, its thread count, the stop-signal handlers,
    os.environ, sys.argv and the warning filters are put back; inductor's compile workers that a --compile
    run started (torch.compile's process pool) are shut down; the block shows warnings as a fresh interpreter
    does (on sys.stderr)."""
    import torch
    from dtrain.signals import SIGNALS
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    environ, argv = dict(os.environ), list(sys.argv)
    reset_accelerate()
    try:
        with warnings.catch_warnings():
            warnings.filters[:] = FRESH_WARNING_FILTERS
            warnings.showwarning = _print_warning
            yield
    finally:
        reset_accelerate()
        async_compile = sys.modules.get("torch._inductor.async_compile")
        if async_compile is not None:
            async_compile.shutdown_compile_workers()
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)
        os.environ.clear()
        os.environ.update(environ)
        sys.argv[:] = argv


def run_here(module: str, argv: list, status: int | None = 0, extra_env: dict | None = None, **patches) -> Ran:
    """`python dtrain/<module>.py ARGV` (module main, predict, export or summarize) in this process, through
    the command line's own entry point: dtrain.<module>.main(argv), which ends a UserError with one `error:` line and
    exit status 2, a divergence with 3, a lost peer with 4. Its stdout and stderr are captured; the process
    is put back as it was (process_state_kept). It runs as `launch` starts a process: one torch thread, W&B
    off, `extra_env` over that (a value None unsets the variable). `patches` replace names in the module for
    the run (e.g. make_accelerator=...).

    An exception that escapes main ends the run as it would end the interpreter: status 1, its traceback on
    stderr. A status other than `status` fails the test, showing stderr (None: any, the caller checks it)."""
    import importlib
    import io
    import traceback
    from contextlib import redirect_stderr, redirect_stdout

    import torch
    mod = importlib.import_module(f"dtrain.{module}")
    argv = [str(a) for a in argv]
    returned, run = [], mod.run

    def recorded_run(args):  # main calls the module's `run`: this one keeps what it returns
        returned.append(run(args))
        return returned[-1]

    saved = {name: getattr(mod, name) for name in [*patches, "run"]}
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with process_state_kept():
        os.environ.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"})
        for k, v in (extra_env or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        torch.set_num_threads(1)
        sys.argv[:] = [str(REPO / "dtrain" / f"{module}.py"), *argv]
        try:
            for name, value in {**patches, "run": recorded_run}.items():
                setattr(mod, name, value)
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    mod.main(argv)
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                    if not isinstance(e.code, (int, type(None))):
                        print(e.code, file=sys.stderr)
                except Exception:
                    code = 1
                    traceback.print_exc()
        finally:
            for name, value in saved.items():
                setattr(mod, name, value)
    r = Ran([module, *argv], code, out.getvalue(), err.getvalue(), returned[0] if returned and code == 0 else None)
    if status is not None and code != status:
        raise AssertionError(f"dtrain.{module}.main({' '.join(argv)}) exited {code}, not {status}\n"
                             f"--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}")
    return r


def train_here(args: list, status: int | None = 0, extra_env: dict | None = None, **patches) -> Ran:
    """`train(args)` run in this process (run_here): python dtrain/main.py --no-wandb --no-plots ARGS.
    `.result` is the summary dtrain.main.run returned."""
    return run_here("main", ["--no-wandb", "--no-plots", *args], status, extra_env, **patches)


def predict_here(args: list, status: int | None = 0, extra_env: dict | None = None, **patches) -> Ran:
    """`launch(PREDICT, args)` run in this process (run_here): python dtrain/predict.py ARGS."""
    return run_here("predict", args, status, extra_env, **patches)


def cli_error(argv) -> str:
    """The one line that a refused training run prints (run in this process): it exits 2, with no traceback
    and nothing else on stderr."""
    r = run_here("main", argv, status=2)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]
