"""The checkpoint format, in one place: written atomically, read as untrusted input.

A checkpoint is a plain dict of tensors and primitive values, so `torch.load(weights_only=True)` reads it.
`load_checkpoint` returns that dict; its keys:

    format, version     "dtrain", VERSION (a file without a version is version 0 and loads; a newer one
                        is refused)
  what inference needs to rebuild the model alone (`model_meta` builds it; MODEL_KEYS must be present):
    arch, arch_args     the --arch and its builder options (dtrain.models.build_model)
    num_classes, classes, in_channels, image_size, mean, std   the data it was trained on
    config              the run's Config as a dict
    data                the training data's fingerprint (`data_fingerprint`): dataset kind, number of
                        images, a digest of their labels in order
    model               the weights to deploy (the EMA average when --ema), a state dict
  the training position (`training_state` writes it, `restore_training` reads it back):
    optimizer, scheduler, scaler, epoch, step, batch_in_epoch, best_acc, epoch_seconds
    best_step           the step of the state that scored best_acc (None before an evaluation; absent in
                        older files)
    epoch_sums          the epoch under way's [loss sum, correct, count] over all processes
    rng                 torch (and CUDA) RNG states
    train_model, ema_n  with --ema only: the trained (not averaged) weights and the average's count

Resuming (`find_resume`, `check_resumable`): what shapes the model, the data, the optimiser's state or a
mid-epoch position must be the same as in the checkpoint's run, and a difference is named before any
training; the settings in MAY_CHANGE are read afresh from this run.

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
import hashlib
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


def atomic_write(path: str | os.PathLike, write, remedy: str = "use another --output-dir") -> None:
    """Call write(file) on a temp file beside `path`, fsync it, then rename it over `path`.

    A kill at any moment leaves either the old file or the new one, never a half-written one. The file gets
    the mode an ordinary new file would (0666 less the umask). A full disk, a read-only folder or a file in
    the way of the folder is a UserError naming the path and ending with `remedy`, what the user can do
    (the old file is kept).
    """
    path = Path(path)
    make_output_dir(path.parent, remedy)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e, remedy) from None
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
            raise _disk_full_error(path, remedy) from None
        if isinstance(e, OSError):
            raise _write_error(path, e, remedy) from None
        raise


def make_output_dir(folder: str | os.PathLike, remedy: str = "use another --output-dir") -> Path:
    """Create `folder` (and its parents) and return it; a file in the way or a read-only place is a
    UserError ending with `remedy`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(folder, e, remedy) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {folder}: the folder is read-only (for this user); make it writable "
                        f"or {remedy}")
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


def _disk_full_error(path: Path, remedy: str) -> UserError:
    return UserError(f"disk full writing {path}: free space on {_mount_point(path.parent)} or {remedy}")


def _write_error(path: Path, e: OSError, remedy: str) -> UserError:
    if e.errno in _DISK_FULL:
        return _disk_full_error(path, remedy)
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {path}: {e.strerror.lower()} (the folder is read-only for this user); "
                         f"make it writable or {remedy}")
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        return UserError(f"cannot write {path}: {blocker} is a file, not a folder; move it or {remedy}")
    return UserError(f"cannot write {path}: {e.strerror or e}; check the folder or {remedy}")


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


def on_cpu(value):
    """`value` (nested dicts, lists, tuples) with every tensor copied to the CPU: a checkpoint written on a
    GPU loads with a plain torch.load(weights_only=True) on a machine without one."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    state = on_cpu({"format": FORMAT, "version": VERSION, **state})
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a dtrain checkpoint safely; any problem is a UserError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: give the path of a last.pt or best.pt written by "
                        f"dtrain train, or of a .safetensors written by dtrain export")
    if path.suffix == ".safetensors":  # the deployable weights `dtrain export` writes, with the same metadata
        from dtrain.export import load_safetensors
        return load_safetensors(path)
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path} cannot be read: it is not a PyTorch checkpoint (a text file, random "
                        f"bytes, or a file cut short); give a last.pt or best.pt written by dtrain/main.py")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # untrusted bytes: torch's unpickler raises all kinds
        raise UserError(f"checkpoint {path} cannot be read (corrupt, or it holds objects that are unsafe to "
                        f"load): {_load_error(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a dtrain checkpoint (it lacks format={FORMAT!r}); train with "
                        f"dtrain/main.py to make one")
    return check_model_meta(ckpt, path)


def _number_list(n: int):
    return lambda v: isinstance(v, list) and len(v) == n and all(isinstance(x, (int, float)) for x in v)


def check_model_meta(ckpt: dict, path) -> dict:
    """The checkpoint (a .pt's dict or an exported file's metadata and weights) if its version is readable and
    what inference needs is there with the right types; else a UserError naming the file and the entry."""
    version = ckpt.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{path} has a damaged format version ({version!r}): it is not a file dtrain wrote")
    if version > VERSION:
        raise UserError(f"checkpoint {path} was written by a newer dtrain (format version {version}); "
                        f"upgrade dtrain to read it")
    missing = [k for k in MODEL_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}")
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    rules = {"arch": lambda v: isinstance(v, str), "arch_args": lambda v: isinstance(v, dict),
             "num_classes": count, "in_channels": count, "image_size": count,
             "classes": lambda v: isinstance(v, list) and len(v) == ckpt["num_classes"]
             and all(isinstance(c, str) for c in v),
             "mean": _number_list(ckpt["in_channels"]), "std": _number_list(ckpt["in_channels"]),
             "model": lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values())}
    bad = [key for key, ok in rules.items() if not ok(ckpt[key])]
    if not isinstance(ckpt.get("config", {}), dict):
        bad.append("config")
    if bad:
        raise UserError(f"checkpoint {path} is damaged: its {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not "
                        f"what dtrain writes there")
    return ckpt


def _load_error(e: Exception) -> str:
    """The line of torch.load's error that says what is wrong."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    unsafe = [line for line in lines if "Unsupported global" in line or "WeightsUnpickler error" in line]
    return (unsafe or lines or [type(e).__name__])[0]


def model_meta(cfg, arch_args: dict, classes, in_channels: int, image_size: int, mean, std,
               data: dict | None = None) -> dict:
    """The part of a checkpoint that inference needs besides the weights (and the data's fingerprint)."""
    meta = {"arch": cfg.arch, "arch_args": dict(arch_args), "num_classes": len(classes), "in_channels": in_channels,
            "image_size": image_size, "classes": list(classes), "mean": list(mean), "std": list(std),
            "config": cfg.to_dict()}
    if data is not None:
        meta["data"] = dict(data)
    return meta


def data_fingerprint(dataset: str, labels: torch.Tensor) -> dict:
    """What identifies a run's training data: the dataset kind, the number of images and a digest of their
    labels in order (it changes with other images, another split or another order; the class names are
    kept beside it in the checkpoint)."""
    digest = hashlib.sha256(labels.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"dataset": dataset, "train_size": len(labels), "labels": digest}


# Settings a resumed run reads afresh: they may differ from the checkpoint's run. Every other setting
# must match where `check_resumable` says (or is where the run is: output_dir, resume, recipe).
MAY_CHANGE = (
    # how long and how fast the run learns
    "epochs", "max_steps", "lr", "momentum", "nesterov", "weight_decay", "scheduler", "onecycle_start",
    "onecycle_peak", "onecycle_end", "warmup_epochs", "milestones", "gamma", "plateau_monitor",
    "plateau_patience", "plateau_factor", "label_smoothing", "grad_clip", "ema", "lookahead",
    # augmentation, loading, evaluation
    "augment", "crop_padding", "pad_mode", "hflip", "vflip", "cutout_holes", "cutout_length", "translate",
    "rotate", "loader", "workers", "cache_dir", "data_dir", "download", "normalize", "eval_batch_size", "tta",
    "tta_shift", "eval_every",
    # the machine: processes, precision, speed
    "precision", "channels_last", "compile", "sync_bn", "dist_timeout", "cpu",
    # only a fresh run's start
    "pretrained", "weights",
    # logging and output
    "save_every", "save_every_minutes", "log_every", "plots", "tensorboard", "wandb", "wandb_project",
    "wandb_entity", "wandb_name",
    "wandb_mode", "wandb_group", "wandb_tags", "wandb_notes", "output_dir", "resume", "recipe", "sweep",
    "sweep_index",
)
# Settings a resumed run always needs unchanged, and why.
SAME_ALWAYS = {
    "optimizer": "the optimiser's state depends on it",
    "decay_norm_bias": "the optimiser's parameter groups depend on it",
    "bias_lr_scale": "the optimiser's parameter groups depend on it",
    "batch_size": "the run's step count, its schedule and its place in an epoch count batches of that size",
    "grad_accum": "the run's step count, its schedule and its place in an epoch count batches of that size",
}
# Settings a run at a mid-epoch position needs unchanged: its place is in the sample order --seed shuffles
# (the number of processes may change: the order is the same on any number). At an epoch boundary it may change.
SAME_MID_EPOCH = ("seed",)
# Settings checked through what they make (the model and its arguments, the data's fingerprint), so another
# value that makes the same is fine.
CHECKED_BY_RESULT = ("arch", "norm", "aux_logits", "dataset", "cifar100_labels", "val_split", "image_size",
                     "fake_size", "num_classes")
TRAINING_KEYS = ("optimizer", "scheduler", "epoch", "step", "batch_in_epoch", "best_acc")


def find_resume(cfg, out: Path) -> tuple[Path | None, dict | None]:
    """(path, checkpoint) to resume from, or (None, None) for a fresh start: --resume PATH, or with
    --resume auto the output folder's last.pt when there is one. A file that is no training checkpoint, or
    settings that must match the checkpoint's run and do not, are a UserError (`check_resumable` checks the
    data once it is loaded)."""
    if cfg.resume is None:
        return None, None
    path = Path(out) / "last.pt" if cfg.resume == "auto" else Path(cfg.resume)
    if cfg.resume == "auto" and not path.exists():
        return None, None
    ckpt = load_checkpoint(path)
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path} holds weights but no training position ({', '.join(missing)} missing), so a run "
                        f"cannot continue from it; give a last.pt or best.pt written by dtrain/main.py")
    if ckpt["arch"] != cfg.arch:
        raise UserError(f"{path} holds a {ckpt['arch']!r} model but this run trains {cfg.arch!r}: pass the same "
                        f"--arch (or --recipe), or another --output-dir for a fresh run")
    _refuse(path, _setting_differences(ckpt, cfg))
    return path, ckpt


def check_resumable(ckpt: dict | None, meta: dict, path) -> None:
    """A UserError naming how this run's data (meta: its model_meta) differs from the checkpoint's run:
    classes, image size and channels, the data's fingerprint. Nothing when ckpt is None (a fresh start)."""
    if ckpt is not None:
        _refuse(path, _data_differences(ckpt, meta))


def _refuse(path, diffs: list[str]) -> None:
    if diffs:
        raise UserError(f"cannot resume from {path}: {'; '.join(diffs)}. Resume with the settings it was trained "
                        f"with (they are in its config.json), or start a fresh run in another --output-dir")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _short(values, n: int = 6) -> str:
    values = list(values)
    return ", ".join(map(str, values[:n])) + (f", ... ({len(values)} in all)" if len(values) > n else "")


def _setting_differences(ckpt: dict, cfg) -> list[str]:
    """The settings of this run that differ from the checkpoint's where resuming needs them unchanged."""
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    data = ckpt.get("data") if isinstance(ckpt.get("data"), dict) else {}
    diffs = []

    def compare(key, before, why=""):
        if before is not None and before != getattr(cfg, key):
            diffs.append(f"{_flag(key)} is {getattr(cfg, key)!r} here but {before!r} in the checkpoint{why}")

    for key, before in (ckpt["arch_args"] if isinstance(ckpt["arch_args"], dict) else {}).items():
        if hasattr(cfg, key):
            compare(key, before)
    compare("dataset", data.get("dataset", saved.get("dataset")))
    for key, why in SAME_ALWAYS.items():
        compare(key, saved.get(key), f" ({why})")
    if ckpt["batch_in_epoch"]:
        where = f"epoch {ckpt['epoch'] + 1}, batch {ckpt['batch_in_epoch']}"
        for key in SAME_MID_EPOCH:
            compare(key, saved.get(key), f", which stopped mid-epoch ({where}), a place that needs the same {_flag(key)}")
    return diffs


def _data_differences(ckpt: dict, meta: dict) -> list[str]:
    """How this run's data differs from the checkpoint's run's."""
    before, now = (m.get("data") if isinstance(m.get("data"), dict) else {} for m in (ckpt, meta))
    classes_before, classes_now = list(ckpt["classes"]), list(meta["classes"])
    diffs = []
    if len(classes_before) != len(classes_now):
        diffs.append(f"the data has {len(classes_now)} classes here but {len(classes_before)} in the checkpoint "
                     f"(--num-classes, or other data)")
    elif classes_before != classes_now:
        diffs.append(f"the class names differ: {_short(classes_now)} here, {_short(classes_before)} in the "
                     f"checkpoint (other data)")
    elif "train_size" in before and before["train_size"] != now.get("train_size"):
        diffs.append(f"the training data has {now.get('train_size')} images here but {before['train_size']} in the "
                     f"checkpoint's run (other data, --val-split or --fake-size)")
    elif "labels" in before and before["labels"] != now.get("labels"):
        diffs.append("the training data has as many images as in the checkpoint's run but other labels or another "
                     "order (other data, or another --seed where it draws the data or the --val-split)")
    for key, what in (("image_size", "--image-size"), ("in_channels", "the images' channels")):
        if int(ckpt[key]) != int(meta[key]):
            diffs.append(f"{what} is {meta[key]} here but {ckpt[key]} in the checkpoint")
    return diffs


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
    """Put a Trainer back at the position `training_state` saved. The optimiser keeps this run's settings
    (momentum, weight decay, ...: MAY_CHANGE) and takes the checkpoint's state."""
    try:
        trainer.raw.load_state_dict(ckpt["train_model"] if "train_model" in ckpt else ckpt["model"])
        if trainer.ema is not None:
            trainer.ema.module.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"the checkpoint's weights do not fit this model: {str(e).strip().splitlines()[0]}; "
                        f"resume with the settings it was trained with, or start a fresh run") from None
    if trainer.ema is not None:
        trainer.ema.load_count(ckpt.get("ema_n", 1))
    _load_optimizer(trainer.opt, ckpt["optimizer"])
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


def _load_optimizer(opt, state: dict) -> None:
    """The checkpoint's optimiser state under this run's settings (lr, momentum, weight decay, ...)."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        opt.load_state_dict(state)
    except ValueError as e:  # parameter groups of other sizes
        raise UserError(f"the checkpoint's optimiser state does not fit this run's: {e}; resume with the settings "
                        f"it was trained with, or start a fresh run") from None
    for group, mine in zip(opt.param_groups, settings):
        group.update(mine)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
