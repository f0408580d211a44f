"""The checkpoint format, in one place: written atomically, read as untrusted input.

A checkpoint is a plain dict of tensors and primitive values, so `torch.load(weights_only=True)` reads it.
`load_checkpoint` returns that dict; its keys:

    format, version     "dtrain", VERSION (a file without a version is version 0 and loads; a newer one
                        is refused)
  what inference needs to rebuild the model alone (`model_meta` builds it; MODEL_KEYS must be present):
    arch, arch_args     the --arch and its builder options (dtrain.models.build_model)
    num_classes, classes, in_channels, image_size, mean, std   the data it was trained on
    config              the run's Config as a dict
    model               the weights to deploy (the EMA average when --ema), a state dict
  the training position (`training_state` writes it, `restore_training` reads it back):
    optimizer, scheduler, scaler, epoch, step, batch_in_epoch, best_acc, epoch_seconds
    best_step           the step of the state that scored best_acc (None before an evaluation; absent in
                        older files)
    epoch_sums          the epoch under way's [loss sum, correct, count] over all processes
    rng                 torch (and CUDA) RNG states
    train_model, ema_n  with --ema only: the trained (not averaged) weights and the average's count

last.pt and best.pt: the main process writes last.pt, then, when its evaluation is the best so far,
copies it to best.pt (each write atomic). A checkpoint's step names its position uniquely (two saves at
one step hold the same weights). A kill -9 at any point leaves one of: both old; last.pt new and best.pt
old; both new. The middle case is the one to repair, and last.pt says so: its best_step is its own step
while best.pt's step differs (or best.pt is missing). `restore_training` checks this at every resume and
writes the resumed state to best.pt (`repair_best`); a kill during that repair leaves the same case for
the next resume. So best.pt always holds the state whose accuracy the run records as best_acc. The other
order (best.pt first) is not repairable: a kill between the writes leaves best.pt ahead of last.pt,
holding weights whose accuracy the resumed run does not know, which a later, worse best would overwrite.
Neither file is ever written with non-finite weights (the Trainer checks `all_finite` first).
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch

from dtrain.distributed import run_on_main
from dtrain.errors import UserError

FORMAT = "dtrain"
VERSION = 1
MODEL_KEYS = ("arch", "arch_args", "num_classes", "in_channels", "image_size", "classes", "mean", "std", "model")


TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")  # atomic_write's temp files
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_LOW_SPACE = 1 << 20
_UNREADABLE = (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file) on a temp file beside `path`, fsync it, then rename it over `path`.

    A kill at any moment leaves either the old file or the new one, never a half-written one. The file gets
    the mode an ordinary new file would (0666 less the umask). A full disk, a read-only folder or a file in
    the way of the folder is a UserError naming the path (the old file is kept).
    """
    path = Path(path)
    make_output_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = _disk_full(e, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise UserError(f"disk full writing {path}: free space on {_mount_point(path.parent)} or use "
                            f"another --output-dir") from None
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def make_output_dir(folder: str | os.PathLike) -> Path:
    """Create `folder` (and its parents) and return it; a file in the way or a read-only place is a
    UserError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(folder, e) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {folder}: the folder is read-only (for this user); make it writable "
                        f"or use another --output-dir")
    return folder


def remove_stale_temp_files(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the temp files that interrupted atomic_write calls left in `out_dir`; returns their paths.
    Call it while no other process writes into `out_dir` (at the start of a run)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    stale = [p for p in sorted(out_dir.iterdir()) if TEMP_NAME.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(e: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space (torch.save reports it as a RuntimeError, not ENOSPC)."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return True
    if isinstance(e, (OSError, RuntimeError)):
        try:
            st = os.statvfs(folder)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < _LOW_SPACE
    return False


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def _write_error(path: Path, e: OSError) -> UserError:
    if e.errno in _DISK_FULL:
        return UserError(f"disk full writing {path}: free space on {_mount_point(path.parent)} or use another "
                         f"--output-dir")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {path}: {e.strerror.lower()} (the folder is read-only for this user); "
                         f"make it writable or use another --output-dir")
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        return UserError(f"cannot write {path}: {blocker} is a file, not a folder; move it or use another "
                         f"--output-dir")
    return UserError(f"cannot write {path}: {e.strerror or e}; check the folder or use another --output-dir")


def all_finite(*states) -> bool:
    """Whether every floating-point tensor in these (nested) state dicts is finite: one sync per device."""
    flags = {}

    def visit(v):
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() or v.is_complex():
                flags.setdefault(v.device, []).append(torch.isfinite(v).all())
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
    for state in states:
        visit(state)
    return all(bool(torch.stack(f).all()) for f in flags.values())


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    state = {"format": FORMAT, "version": VERSION, **state}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a dtrain checkpoint safely; any problem is a UserError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: give the path of a last.pt or best.pt written by "
                        f"dtrain/main.py")
    if path.suffix == ".safetensors":  # the deployable weights `dtrain export` writes, with the same metadata
        from dtrain.export import load_safetensors
        return load_safetensors(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except _UNREADABLE as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} cannot be read (truncated, corrupt, or not a PyTorch file, or it "
                        f"holds objects that are unsafe to load): {reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a dtrain checkpoint (it lacks format={FORMAT!r}); train with "
                        f"dtrain/main.py to make one")
    if ckpt.get("version", 0) > VERSION:
        raise UserError(f"checkpoint {path} was written by a newer dtrain (format version {ckpt['version']}); "
                        f"upgrade dtrain to read it")
    missing = [k for k in MODEL_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}")
    return ckpt


def model_meta(cfg, arch_args: dict, classes, in_channels: int, image_size: int, mean, std) -> dict:
    """The part of a checkpoint that inference needs besides the weights."""
    return {"arch": cfg.arch, "arch_args": dict(arch_args), "num_classes": len(classes), "in_channels": in_channels,
            "image_size": image_size, "classes": list(classes), "mean": list(mean), "std": list(std),
            "config": cfg.to_dict()}


def training_state(trainer) -> dict:
    """The training position of an engine.Trainer (its raw model, ema, optimiser, schedule, state)."""
    s, ema = trainer.state, trainer.ema
    scaler = trainer.acc.scaler
    state = {"model": (ema.module if ema is not None else trainer.raw).state_dict(),
             "optimizer": trainer.opt.state_dict(), "scheduler": trainer.schedule.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "epoch": s.epoch, "step": s.step, "batch_in_epoch": s.batch_in_epoch, "best_acc": s.best_acc,
             "best_step": s.best_step,
             "epoch_sums": s.meter.to_list(), "epoch_seconds": s.epoch_seconds, "rng": rng_state()}
    if ema is not None:
        state["train_model"] = trainer.raw.state_dict()
        state["ema_n"] = int(ema.n_averaged.item())
    return state


def restore_training(trainer, ckpt: dict) -> None:
    """Put a Trainer back at the position `training_state` saved."""
    trainer.raw.load_state_dict(ckpt["train_model"] if "train_model" in ckpt else ckpt["model"])
    if trainer.ema is not None:
        trainer.ema.module.load_state_dict(ckpt["model"])
        trainer.ema.load_count(ckpt.get("ema_n", 1))
    trainer.opt.load_state_dict(ckpt["optimizer"])
    trainer.schedule.load_state_dict(ckpt["scheduler"])
    scaler = trainer.acc.scaler
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    s = trainer.state
    s.epoch, s.step, s.batch_in_epoch, s.best_acc = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"], ckpt["best_acc"]
    s.epoch_seconds, s.best_step = ckpt.get("epoch_seconds", 0.0), ckpt.get("best_step")
    if s.batch_in_epoch and trainer.acc.is_main_process:  # the partial epoch's sums: held by one process
        s.meter.load(ckpt["epoch_sums"])
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    resumed = trainer.out / "last.pt" if trainer.cfg.resume == "auto" else Path(trainer.cfg.resume)
    trainer.last_good = (resumed, s.epoch, s.step, s.batch_in_epoch)
    if run_on_main(trainer.acc, lambda: repair_best(trainer.out / "best.pt", ckpt)):
        trainer.report.message(f"{trainer.out / 'best.pt'} was older than the best state {resumed} records "
                               f"(a stop between the two writes): rewritten from {resumed}")


def repair_best(best_path: str | os.PathLike, ckpt: dict) -> bool:
    """Main process, at a resume from `ckpt`: when ckpt is the run's best state (best_step == step) and
    best_path holds another step (or is missing or unreadable), write ckpt there. Returns whether it did."""
    if ckpt.get("best_step") is None or ckpt["best_step"] != ckpt["step"]:
        return False
    try:
        held = torch.load(best_path, map_location="cpu", weights_only=True, mmap=True)
    except _UNREADABLE:
        held = None
    if isinstance(held, dict) and held.get("step") == ckpt["step"]:
        return False
    save_checkpoint(best_path, ckpt)
    return True


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
