"""The checkpoint format, in one place: `.pt` files written atomically and read as untrusted input, and the
`.safetensors` files `dtrain export` writes, read back into the same shape.

A checkpoint is a plain dict of tensors and primitive values, every tensor on the CPU (whatever device
trained it), so `torch.load(path, weights_only=True)` reads it on any machine. `load_checkpoint` returns
that dict. Its keys (MODEL_SCHEMA holds the check each of the model part must pass when loaded; a
training position must have TRAINING_KEYS):

    format, version     "dtrain", VERSION (a file without a version is version 0 and loads; a newer one
                        is refused)
  what inference needs to rebuild the model alone (`model_meta` builds it):
    arch, arch_args     the --arch and its builder options (dtrain.models.build_model)
    num_classes, classes, in_channels, image_size, mean, std   the data it was trained on
    config              the run's Config as a dict
    data                the training data's fingerprint (`data_fingerprint`): dataset kind, number of
                        images, a digest of their labels in order
    model               the weights to deploy (the EMA average when --ema), a state dict
  the training position (engine.Trainer.state_dict writes it, load_state_dict reads it back):
    optimizer, scheduler, scaler, epoch, step, batch_in_epoch, best_acc, epoch_seconds
    best_step           the step of the state that scored best_acc (None before an evaluation)
    epoch_sums          the epoch under way's [loss sum, correct, count, skipped steps] over all processes
    rng                 torch (and CUDA) RNG states
    train_model, ema_n  with --ema only: the trained (not averaged) weights and the average's count

Checkpoints are verified when read: a .pt is a zip archive whose records carry CRC-32 checksums, and every
record is checked against its checksum before torch reads a byte of it; an exported .safetensors carries a
SHA-256 digest of its tensor data in its metadata. A file changed after dtrain wrote it (a flipped bit on a
disk, a copy cut short) is one line naming it, never weights silently off.

Which settings a resumed run may change is dtrain.resume's; how last.pt and best.pt are written, and in
which order, dtrain.checkpointer's.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from dtrain.errors import UserError
from dtrain.files import atomic_write
from dtrain.models.state import strip_prefixes

FORMAT = "dtrain"
VERSION = 1
TRAINING_KEYS = ("optimizer", "scheduler", "epoch", "step", "batch_in_epoch", "best_acc")
# what torch.load raises on a damaged or foreign file
UNREADABLE = (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _per_channel(v, ckpt: dict) -> bool:
    """A list of one number per input channel (mean, std)."""
    return isinstance(v, list) and len(v) == ckpt["in_channels"] and \
        all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


# key -> check(value, checkpoint) of the part of a checkpoint that inference needs
MODEL_SCHEMA: dict[str, Callable[[object, dict], bool]] = {
    "arch": lambda v, _: isinstance(v, str),
    "arch_args": lambda v, _: isinstance(v, dict),
    "num_classes": lambda v, _: _count(v),
    "in_channels": lambda v, _: _count(v),
    "image_size": lambda v, _: _count(v),
    "classes": lambda v, ckpt: isinstance(v, list) and len(v) == ckpt["num_classes"] and
    all(isinstance(c, str) for c in v),
    "mean": _per_channel,
    "std": _per_channel,
    "model": lambda v, _: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
}
MODEL_KEYS = tuple(MODEL_SCHEMA)
META_KEYS = [k for k in MODEL_KEYS if k != "model"] + ["config"]   # what an exported file's metadata holds


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


# ---- writing ------------------------------------------------------------------------------------------

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
    state = on_cpu({"format": FORMAT, "version": VERSION, **state})
    atomic_write(path, lambda f: torch.save(state, f))


def safetensors_bytes(ckpt: dict) -> bytes:
    """The checkpoint's model weights and metadata as a .safetensors file's bytes: the tensors, and in the
    file's (string) metadata the format marker, each of META_KEYS as JSON and the SHA-256 of the tensor data
    (the bytes after the header, which the metadata's length does not change)."""
    # each tensor its own contiguous copy: safetensors refuses tensors that share memory
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in strip_prefixes(ckpt["model"]).items()}
    metadata = {"format": FORMAT, "version": str(VERSION)}
    metadata.update({k: json.dumps(ckpt.get(k)) for k in META_KEYS})
    digest = hashlib.sha256(_safetensors_data(safetensors_save(tensors, metadata))).hexdigest()
    return safetensors_save(tensors, {**metadata, "sha256": digest})


def _safetensors_data(blob: bytes) -> bytes:
    """The tensor data of a safetensors file: what follows its 8-byte header length and JSON header."""
    return blob[8 + int.from_bytes(blob[:8], "little"):]


# ---- reading ------------------------------------------------------------------------------------------

def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a dtrain checkpoint (.pt, or .safetensors from dtrain export) safely; any problem is a UserError
    that names the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: give the path of a last.pt or best.pt written by "
                        f"dtrain train, or of a .safetensors written by dtrain export")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path} cannot be read: it is not a PyTorch checkpoint (a text file, random "
                        f"bytes, or a file cut short); give a last.pt or best.pt written by dtrain/main.py")
    verify(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # untrusted bytes: torch's unpickler raises all kinds
        raise UserError(f"checkpoint {path} cannot be read (corrupt, or it holds objects that are unsafe to "
                        f"load): {_load_error(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a dtrain checkpoint (it lacks format={FORMAT!r}); train with "
                        f"dtrain/main.py to make one")
    return check_model_meta(ckpt, path)


class DamagedCheckpoint(UserError):
    """A checkpoint whose bytes changed after dtrain wrote it; the message names the file and the way out."""

    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        super().__init__(f"checkpoint {path} is damaged: {what}, so it changed after dtrain wrote it (a disk or "
                         f"copy error); {other_checkpoint_advice(self.path)}")


def other_checkpoint_advice(path: Path) -> str:
    """What to use instead of a damaged `path`: its run's other checkpoint where there is one, else an earlier
    run or a fresh start."""
    if path.suffix == ".safetensors":
        return "export it again from the run's checkpoint with dtrain export"
    other = {"last.pt": "best.pt", "best.pt": "last.pt"}.get(path.name)
    if other is not None and (path.parent / other).is_file():
        return (f"use {path.parent / other} instead (to resume from it: copy it over last.pt, then --resume auto; "
                f"the steps since it was written are lost), or an earlier run")
    return "use another checkpoint of the run or an earlier run, or start a fresh run in another --output-dir"


def verify(path: str | os.PathLike) -> None:
    """Check every record of a .pt (a zip archive) against its CRC-32; a DamagedCheckpoint if one fails."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise DamagedCheckpoint(Path(path), f"its zip archive cannot be read ({e})") from None
    if bad is not None:
        raise DamagedCheckpoint(Path(path), f"its record {bad} fails its CRC check")


def load_safetensors(path: str | os.PathLike) -> dict:
    """A .safetensors file written by `dtrain export`, as the dict `load_checkpoint` gives for a .pt
    (the model metadata keys, "config", and "model": the state dict); any problem is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: give a .safetensors file written by dtrain export")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read as safetensors (truncated or not a safetensors file): "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} holds weights without dtrain's metadata; export it with dtrain export")
    if "sha256" in metadata and hashlib.sha256(_safetensors_data(path.read_bytes())).hexdigest() != metadata["sha256"]:
        raise DamagedCheckpoint(path, "its tensor data does not match the SHA-256 digest written with it")
    missing = [k for k in META_KEYS if k not in metadata]
    if missing:
        raise UserError(f"{path} is incomplete: its metadata lacks {', '.join(missing)}")
    try:
        meta = {k: json.loads(metadata[k]) for k in META_KEYS}
        version = json.loads(metadata.get("version", "0"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} has damaged metadata: {e}") from None
    return check_model_meta({"format": FORMAT, "version": version, **meta, "model": state}, path)


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
    bad = [key for key, ok in MODEL_SCHEMA.items() if not ok(ckpt[key], ckpt)]
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


def read_step(path: str | os.PathLike) -> int | None:
    """The step of the checkpoint at `path`, or None when it is missing, damaged or unreadable."""
    try:
        verify(path)
        held = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (UserError, *UNREADABLE):
        return None
    return held.get("step") if isinstance(held, dict) else None
