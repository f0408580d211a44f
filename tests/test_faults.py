"""Faults injected for real: stop signals to the whole process group (with DataLoader workers), Ctrl-C,
a full disk, a read-only or blocked output folder, a torn metrics.jsonl, stale temp files, bad CIFAR
batches, an offline hub cache; and checkpoint file modes."""
import json
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrain.files import atomic_write, remove_stale_temp_files
from dtrain.errors import UserError
from helpers import MAIN, REPO, env, free_port, metrics, signal_mid_run, tiny_run, train, train_here, write_cifar

STOP_LINE = re.compile(r"stopped by signal (\d+) at step (\d+) \(epoch (\d+), batch (\d+)/(\d+)\)")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A folder of PNG files, read by DataLoader workers with --loader files."""
    from PIL import Image
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("test", 10)):
        for c, name in enumerate(("apple", "kiwi")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                x = np.clip(rng.normal(80 + 90 * c, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(x).save(d / f"{i}.png")
    return root


def folder_run(image_folder, out):
    return ["--arch", "cnn", "--dataset", "imagefolder", "--data-dir", str(image_folder), "--batch-size", "16",
            "--loader", "files", "--workers", "2", "--epochs", "1", "--seed", "0", "--no-wandb", "--no-plots",
            "--output-dir", str(out)]


def assert_saved_mid_epoch(out: Path, text: str, sig) -> None:
    stops = STOP_LINE.findall(text)
    assert stops and all(int(s[0]) == sig for s in stops), text
    assert "is killed by signal" not in text and f'File "{REPO / "dtrain"}' not in text, text  # no dtrain traceback
    step, batch, nb = int(stops[0][1]), int(stops[0][3]), int(stops[0][4])
    assert 0 < batch < nb, text
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]) == (0, step, batch)


@pytest.mark.process
@pytest.mark.parametrize("sig,again", [(signal.SIGTERM, None), (signal.SIGINT, None), (signal.SIGTERM, 0.3)],
                         ids=["sigterm", "ctrl-c", "sigterm-twice"])
def test_stop_signal_to_the_group_with_workers_saves_and_exits_0(image_folder, tmp_path, sig, again):
    """What scancel, timeout, docker stop and Ctrl-C do: the signal reaches the DataLoader workers too.
    The run saves last.pt at the next step and exits 0; a second SIGTERM during the save is absorbed."""
    out = tmp_path / "run"
    rc, text = signal_mid_run([sys.executable, MAIN, *folder_run(image_folder, out)], sig, delay=1.0,
                              again_after=again)
    assert rc == 0, text
    assert_saved_mid_epoch(out, text, sig)
    if sig == signal.SIGINT:
        assert "Ctrl-C: saving last.pt at the next step" in text


@pytest.mark.process
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_stop_signal_to_the_group_of_two_processes_saves(image_folder, tmp_path, sig):
    """Two processes under accelerate launch: the launcher forwards the signal once more to its workers,
    who still save once, at the same step, and stop. (The launcher itself exits non-zero: torch elastic
    re-raises the signal it got.)"""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), MAIN, *folder_run(image_folder, out)]
    rc, text = signal_mid_run(cmd, sig, delay=1.0)
    assert_saved_mid_epoch(out, text, sig)
    assert len(STOP_LINE.findall(text)) == 1, text        # reported once, by the main process


def test_second_ctrl_c_aborts_at_once_and_signals_after_a_stop_are_absorbed(monkeypatch):
    from dtrain.preempt import StopSignal
    from dtrain.signals import SIGNALS
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        stop = StopSignal().install().training()
        assert signal.getsignal(signal.SIGINT) not in (signal.default_int_handler, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT            # the first Ctrl-C asks for a save
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)        # the second aborts
            time.sleep(1)
        stop = StopSignal().install().training()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.exchange().signum == signal.SIGTERM     # the loop saves and stops from here on
        for s in (signal.SIGINT, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            os.kill(os.getpid(), s)                    # ignored: the process is still here
        time.sleep(0.1)
        stop.uninstall()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---- the output folder and its files -----------------------------------------------------------------

def one_error_line(r) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_previous_last_pt(small_fs):
    out = small_fs / "run"
    train_here(tiny_run(out, "--epochs", "1"))
    before = (out / "last.pt").read_bytes()
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    with open(small_fs / "filler", "wb") as f:       # leave room for the small files, not for a checkpoint
        f.write(b"\0" * (free - 256 * 1024))
    r = train_here(tiny_run(out, "--epochs", "2", "--resume", "auto"), status=None)
    line = one_error_line(r)
    assert re.search(rf"disk full writing {re.escape(str(out))}/(last|best)\.pt: free space on "
                     rf"{re.escape(str(small_fs))} or use another --output-dir", line), line
    assert (out / "last.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_output_dir_that_is_a_file_is_refused_before_training(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    r = train_here(tiny_run(blocker / "run", "--epochs", "1"), status=None)
    line = one_error_line(r)
    assert f"{blocker} is a file, not a folder" in line and "--output-dir" in line
    assert "epoch 1" not in r.stdout


def test_read_only_output_dir_is_refused_before_training(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:                            # root writes anywhere a mode allows: use a read-only mount
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode == 0
        if not mounted:
            pytest.skip("root without a read-only mount cannot be kept from writing")
    else:
        ro.chmod(0o555)
    try:
        r = train_here(tiny_run(ro / "run", "--epochs", "1"), status=None)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(ro)])
        ro.chmod(0o755)
    line = one_error_line(r)
    assert f"cannot write {ro / 'run'}" in line and "read-only" in line and "--output-dir" in line


def test_checkpoints_follow_the_umask_and_a_resume_repairs_metrics_and_removes_stale_temp_files(tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train_here(tiny_run(out, "--epochs", "1"))
    finally:
        os.umask(old)
    for name in ("last.pt", "best.pt", "config.json", "metrics.jsonl"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    with open(out / "metrics.jsonl", "a") as f:      # a kill in the middle of appending epoch 2's row
        f.write('{"epoch": 2, "step": 4, "train_lo')
    stale = out / ".last.pt.k3j9x0_q.tmp"             # an interrupted checkpoint write
    stale.write_bytes(b"\0" * 4096)
    train_here(tiny_run(out, "--epochs", "2", "--resume", "auto"))
    assert not stale.exists()
    assert [r["epoch"] for r in metrics(out)] == [1, 2]
    assert (out / "metrics.jsonl").read_text().endswith("}\n")


def test_remove_stale_temp_files_only_takes_atomic_write_leftovers(tmp_path):
    atomic_write(tmp_path / "last.pt", lambda f: f.write(b"x"))
    keep = [tmp_path / "last.pt", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for p in keep[1:]:
        p.write_text("mine")
    stale = [tmp_path / ".last.pt.a1b2c3d4.tmp", tmp_path / ".best.pt.zz_zz_zz.tmp"]
    for p in stale:
        p.write_text("half")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def test_metrics_are_strict_json_with_null_for_non_finite_values(tmp_path):
    from dtrain.report.metrics import MetricsFile, read_metrics
    m = MetricsFile(tmp_path)
    m.epoch({"epoch": 1, "train_loss": float("nan"), "val_loss": float("inf"), "val_acc": None, "lr": 0.1})

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=refuse) == {"epoch": 1, "train_loss": None, "val_loss": None,
                                                       "val_acc": None, "lr": 0.1}
    (tmp_path / "metrics.jsonl").write_text(line + "garbage\n" + line)
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_metrics(tmp_path / "metrics.jsonl")


# ---- data and weights ------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["data", "labels"])
def test_cifar_batches_with_float_pixels_or_labels_are_refused(tmp_path, entry):
    root = write_cifar(tmp_path, n_train=20, n_test=10)
    path = root / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "rb") as f:
        batch = pickle.load(f)
    batch[entry] = np.asarray(batch[entry], dtype=np.float32) / (255.0 if entry == "data" else 1.0)
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    r = train_here(tiny_run(tmp_path / "run", "--max-steps", "1", data=root, batch=10), status=None)
    line = one_error_line(r)
    assert str(path) in line and ("pixels must be integers" if entry == "data" else "labels must be integers") in line


def test_pretrained_with_a_weights_file_needs_no_hub_cache(tmp_path, monkeypatch):
    import torchvision
    from dtrain.models import build_model
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("tv:resnet18", 3, pretrained=True, weights=str(tmp_path / "resnet18.pth"))
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 3
    with pytest.raises(UserError, match="--weights FILE"):
        build_model("tv:resnet18", 3, pretrained=True)


@pytest.mark.process
def test_disk_full_on_the_main_process_ends_every_process_with_the_same_line(small_fs):
    """Only the main process writes checkpoints: its error reaches the other process, which would otherwise
    wait for it until the collective timeout."""
    out = small_fs / "run"
    train_here(tiny_run(out, "--epochs", "1"))
    before = (out / "last.pt").read_bytes()
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    with open(small_fs / "filler", "wb") as f:
        f.write(b"\0" * (free - 256 * 1024))
    r = train(tiny_run(out, "--epochs", "2", "--resume", "auto"), nproc=2, check=False, timeout=240)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2 and len(set(lines)) == 1, r.stderr
    assert re.search(rf"disk full writing {re.escape(str(out))}/(last|best)\.pt", lines[0]), lines[0]
    assert "exitcode  : 2" in r.stderr and "SIGABRT" not in r.stderr, r.stderr[-3000:]   # each exits 2, none aborts
    assert (out / "last.pt").read_bytes() == before


@pytest.mark.process
def test_save_every_minutes_saves_mid_epoch_and_a_kill_9_resumes_there(tmp_path):
    """--save-every-minutes: last.pt is written mid-epoch while training runs, so a kill -9 loses at most
    that much work; --resume auto continues from the saved batch."""
    out = tmp_path / "run"
    args = tiny_run(out, "--epochs", "1", "--save-every-minutes", "0.002", size=1280, batch=16)
    proc = subprocess.Popen([sys.executable, MAIN, *args], cwd=REPO,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline, saved = time.monotonic() + 180, None
        while saved is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            if (out / "last.pt").exists():
                ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
                saved = ckpt if ckpt["batch_in_epoch"] > 0 else None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        err = proc.communicate()[1]
    assert saved is not None, err
    assert proc.returncode == -signal.SIGKILL, err
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and 0 < ckpt["batch_in_epoch"] < 80
    r = train_here([*args, "--resume", "auto"])
    assert f"resumed from {out / 'last.pt'} at epoch 1, step {ckpt['step']}" in r.stdout, r.stdout
    rows = metrics(out)
    assert [(row["epoch"], row["step"], row["train_samples"]) for row in rows] == [(1, 80, 1280)]


def test_a_write_error_ends_with_the_callers_way_out(tmp_path):
    """predict, the image cache, summarize and export say what to pass instead, not --output-dir."""
    (tmp_path / "f").write_text("a file where a folder should be")
    with pytest.raises(UserError, match=r"f is a file, not a folder; move it or pass another --output$"):
        atomic_write(tmp_path / "f" / "sub.csv", lambda f: f.write(b"x"), remedy="pass another --output")
    with pytest.raises(UserError, match=r"move it or use another --output-dir$"):
        atomic_write(tmp_path / "f" / "last.pt", lambda f: f.write(b"x"))
