"""Damaged files, exhausted resources, racing writers and ill-timed signals: each ends with one line that
says what to do, and leaves the run's files as they were at its last save. Real damaged files, a real full
tmpfs, a real memory limit, real second processes."""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from helpers import MAIN, REPO, cli_error, env, free_port, launch, metrics, train, train_here, write_cifar100

PREDICT = str(REPO / "dtrain" / "predict.py")
TINY = ["--arch", "cnn", "--dataset", "fake", "--fake-size", "64", "--batch-size", "16", "--workers", "0"]


def flip_a_bit_in_the_weights(path: Path) -> str:
    """Flip one bit in the middle of the largest tensor record of a .pt (a zip archive): the archive still
    opens, the record's CRC-32 no longer matches. Returns the record's name."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        with open(path, "rb") as f:
            f.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))
    return info.filename


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("damage") / "run"
    train_here([*TINY, "--epochs", "2", "--output-dir", out])
    return out


def test_a_flipped_bit_in_last_pt_refuses_the_resume_naming_the_file_and_best_pt(finished_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt"):
        (out / name).write_bytes((finished_run / name).read_bytes())
    record = flip_a_bit_in_the_weights(out / "last.pt")
    before = (out / "last.pt").read_bytes()
    line = cli_error([*TINY, "--epochs", "4", "--resume", "auto", "--output-dir", out])
    assert f"checkpoint {out / 'last.pt'} is damaged: its record {record} fails its CRC check" in line, line
    assert f"use {out / 'best.pt'} instead" in line and "diverged" not in line, line
    assert (out / "last.pt").read_bytes() == before and len(metrics(out)) == 2   # nothing trained, nothing written


@pytest.mark.process
def test_predict_and_export_refuse_a_damaged_checkpoint(finished_run, tmp_path):
    damaged = tmp_path / "best.pt"
    damaged.write_bytes((finished_run / "best.pt").read_bytes())
    flip_a_bit_in_the_weights(damaged)
    image = tmp_path / "one.png"
    from PIL import Image
    Image.new("RGB", (32, 32), (10, 200, 30)).save(image)
    r = launch(PREDICT, ["--checkpoint", damaged, "--image", image], check=False)
    assert r.returncode == 2 and "is damaged" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "dtrain", "export", str(damaged), "--format", "safetensors",
                        "--output", str(tmp_path / "m.safetensors")], capture_output=True, text=True, env=env(),
                       cwd=REPO)
    assert r.returncode == 2 and "is damaged" in r.stderr and not (tmp_path / "m.safetensors").exists(), r.stderr


@pytest.mark.process
def test_a_damaged_exported_safetensors_is_refused(finished_run, tmp_path):
    exported = tmp_path / "m.safetensors"
    r = subprocess.run([sys.executable, "-m", "dtrain", "export", str(finished_run / "best.pt"), "--format",
                        "safetensors", "--output", str(exported)], capture_output=True, text=True, env=env(), cwd=REPO)
    assert r.returncode == 0, r.stderr
    data = bytearray(exported.read_bytes())
    data[-100] ^= 0x01                                       # inside the tensor data
    exported.write_bytes(bytes(data))
    from dtrain.checkpoint import load_checkpoint
    from dtrain.errors import UserError
    with pytest.raises(UserError, match="does not match the SHA-256 digest"):
        load_checkpoint(exported)


@pytest.mark.process
def test_a_damaged_wandb_id_is_replaced_by_a_new_run_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--wandb", "--wandb-mode", "offline", "--output-dir", out]
    launch(MAIN, [*args, "--epochs", "1", "--no-plots"], extra_env={"WANDB_MODE": None})
    (out / "wandb_id").write_bytes(b"\xff\xfe\x00")        # a kill or a full disk mid-write; not UTF-8
    r = launch(MAIN, [*args, "--epochs", "2", "--resume", "auto", "--no-plots"], extra_env={"WANDB_MODE": None})
    assert "wandb_id is damaged" in r.stdout and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert re.fullmatch(r"[a-z0-9]+", (out / "wandb_id").read_text()) and len(metrics(out)) == 2


@pytest.mark.parametrize("content", [b"", b"\xff" * 8, b"x" * 5000, b"not an id!"],
                         ids=["empty", "not-utf8", "5000-chars", "not-an-id"])
def test_every_kind_of_damaged_wandb_id_is_said_and_dropped(tmp_path, content):
    from dtrain.report.wandb import WandbReporter
    said = []
    reporter = WandbReporter.__new__(WandbReporter)
    reporter.say = said.append
    (tmp_path / "wandb_id").write_bytes(content)
    assert reporter._saved_id(tmp_path / "wandb_id") is None and "is damaged" in said[0]
    (tmp_path / "wandb_id").write_text("3k2j9x1a\n")
    assert reporter._saved_id(tmp_path / "wandb_id") == "3k2j9x1a"


def fill(fs: Path, leave: int) -> None:
    """Fill the file system but `leave` bytes."""
    st = os.statvfs(fs)
    with open(fs / "filler", "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def one_error_line(r) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.process
def test_a_full_disk_at_the_metrics_append_is_one_line(small_fs):
    """The run's files (config.json, a lock) fit; the first metrics.jsonl row does not."""
    out = small_fs / "run"
    out.mkdir()
    fill(small_fs, leave=8192)                       # 2 pages: the lock and config.json
    r = train([*TINY, "--epochs", "1", "--no-plots", "--output-dir", out], check=False)
    line = one_error_line(r)
    assert f"disk full writing {out / 'metrics.jsonl'}" in line, line
    assert not (out / "run.lock").exists()


@pytest.mark.process
def test_a_full_disk_at_the_lock_is_one_line_and_leaves_no_lock(small_fs):
    out = small_fs / "run"
    out.mkdir()
    fill(small_fs, leave=0)
    r = train([*TINY, "--epochs", "1", "--output-dir", out], check=False)
    line = one_error_line(r)
    assert f"disk full writing {out / 'run.lock'}" in line, line
    assert not (out / "run.lock").exists()                          # no empty lock refusing the next runs
    (small_fs / "filler").unlink()
    train([*TINY, "--epochs", "1", "--output-dir", out])            # the next run starts at once


def memory_limit(gib: float):
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (int(gib * 2**30), int(gib * 2**30)))


@pytest.mark.process
def test_a_batch_that_does_not_fit_in_memory_is_one_line_naming_the_batch(tmp_path):
    """Under a real address-space limit: a batch of 256 images of 256 x 256 pixels (8 GiB of activations in
    the first convolution) cannot be allocated."""
    out = tmp_path / "run"
    cmd = [sys.executable, MAIN, *TINY, "--image-size", "256", "--fake-size", "256", "-b", "256", "--epochs", "1",
           "--no-wandb", "--no-plots", "--output-dir", str(out)]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
                       preexec_fn=memory_limit(5))
    line = one_error_line(r)
    assert line.startswith("error: out of memory in a training step of 256 images per process (--batch-size 256"), line
    assert "lower --batch-size, or keep the global batch with --grad-accum 2" in line, line
    assert not (out / "last.pt").exists() and not (out / "run.lock").exists()


HOLD_LOCK = """
import sys, time
from dtrain.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("holding", flush=True)
time.sleep(60)
"""


@pytest.mark.process
def test_an_unreadable_stale_lock_is_taken_over_only_if_it_is_still_the_one_seen(tmp_path, monkeypatch):
    """Run A reads an old, unreadable run.lock and judges it stale; before A moves it aside, run B (a real
    second process) takes the folder. A must not move B's lock away: compare-and-swap on the content."""
    from dtrain import rundir
    from dtrain.errors import UserError
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_bytes(b"\x00garbage")
    old = time.time() - 10 * rundir.STALE_SECONDS
    os.utime(out / "run.lock", (old, old))
    holder = {}
    original_read = rundir.RunLock._read

    def read_then_let_b_in(self):
        seen = original_read(self)
        if "b" not in holder:  # B: another run that also found the garbage stale, and took the folder
            (out / "run.lock").unlink()
            holder["b"] = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO, env=env(),
                                           stdout=subprocess.PIPE, text=True)
            assert holder["b"].stdout.readline().strip() == "holding"
        return seen

    monkeypatch.setattr(rundir.RunLock, "_read", read_then_let_b_in)
    try:
        with pytest.raises(UserError, match="is in use by the run started"):
            rundir.RunLock(out).acquire()
        assert json.loads((out / "run.lock").read_text())["pid"] == holder["b"].pid   # B still holds it
    finally:
        holder["b"].kill()
        holder["b"].wait()


@pytest.mark.process
def test_a_stop_signal_during_start_up_ends_the_run_at_once_with_its_line_and_no_lock(tmp_path):
    """SIGTERM while the images are still being decoded (the run's folder already claimed): exit 0 with the
    stop line, no run.lock left, nothing trained."""
    root = tmp_path / "folder"
    from PIL import Image
    for k in range(3000):
        path = root / "train" / f"c{k % 2}" / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (k % 256, 40, 90)).save(path)
    (root / "test").symlink_to(root / "train")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, MAIN, "--arch", "cnn", "--dataset", "imagefolder", "--data-dir",
                             str(root), "--workers", "0", "--epochs", "1", "--no-wandb", "--no-plots",
                             "--output-dir", str(out)], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "run.lock").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert (out / "run.lock").exists(), proc.communicate()
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stdout + stderr
    assert "stopped by signal 15 during start-up, before the first step" in stdout, stdout + stderr
    assert "Traceback" not in stderr and "epoch 1" not in stdout, stderr
    assert not (out / "run.lock").exists() and not (out / "last.pt").exists()


@pytest.mark.process
def test_when_torchrun_s_restarts_are_used_up_the_last_line_is_dtrain_s(tmp_path):
    """A run that fails at every attempt (here: a checkpoint that does not exist) under launch/torchrun.sh with
    one restart: after torchrun's report, dtrain's line says what happened and how to continue."""
    r = subprocess.run(["bash", "launch/torchrun.sh", *TINY, "--no-wandb", "--epochs", "1", "--resume",
                        str(tmp_path / "none.pt"), "--output-dir", str(tmp_path / "run")], cwd=REPO,
                       env=env(TORCHRUN_ARGS=f"--max-restarts 1 --master-port {free_port()}", GPUS_PER_NODE=1),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    last = [line for line in r.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("dtrain: the job failed and torchrun's restarts are used up"), r.stderr[-3000:]
    assert "--resume auto" in last


def test_a_cifar100_resume_with_other_labels_names_cifar100_labels(tmp_path):
    data = write_cifar100(tmp_path / "data")
    args = ["--arch", "cnn", "--dataset", "cifar100", "--data-dir", data, "--no-download", "-b", "50",
            "--workers", "0", "--max-steps", "1", "--output-dir", tmp_path / "run"]
    train_here(args)
    line = cli_error([*args, "--max-steps", "2", "--resume", "auto", "--cifar100-labels", "coarse"])
    assert "--cifar100-labels is 'coarse' here but 'fine' in the checkpoint (20 classes here, 100 there)" in line
    assert "--num-classes" not in line, line


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [v[5:] for v in environ if v.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


@pytest.mark.process
@pytest.mark.slow
def test_a_peer_lost_before_the_first_save_says_nothing_was_saved(tmp_path):
    """Rank 1 freezes in the first epoch, before any checkpoint: rank 0's line must not point at a last.pt."""
    from helpers import children
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), MAIN, *TINY, "--fake-size", "4096", "--no-wandb", "--no-plots", "--epochs", "5",
           "--dist-timeout", "8", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, training = [], threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("output: "):
                training.set()
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    frozen = None
    try:
        assert training.wait(240), "".join(lines)
        time.sleep(1)
        workers = {rank_of(pid): pid for pid in children(proc.pid)}
        frozen = workers[1]
        os.kill(frozen, signal.SIGSTOP)
        proc.wait(200)
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
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert errors and "rank 1 stopped answering for 8 s" in errors[0], text[-3000:]
    assert "nothing was saved before it: run the same command again to start" in errors[0], errors[0]
    assert not (out / "last.pt").exists()


def test_a_batch_larger_than_the_data_is_said_at_the_start(tmp_path):
    r = train_here([*TINY, "--fake-size", "40", "-b", "128", "--max-steps", "1", "--output-dir", tmp_path / "run"])
    assert "capped: only 40 training images, 40 per process" in r.stdout
