"""Checkpoints: written atomically, read as untrusted input.

A checkpoint is a plain dict of tensors and primitive values, so `torch.load(weights_only=True)` reads it.
It holds what inference needs to rebuild the model alone (arch, its arguments, classes, normalisation,
input size) plus the training state (optimiser, scheduler, scaler, position, RNG states).
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from dtrain.errors import UserError

FORMAT = "dtrain"
VERSION = 1
MODEL_KEYS = ("arch", "arch_args", "num_classes", "in_channels", "image_size", "classes", "mean", "std", "model")


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file) on a temp file beside `path`, fsync it, then rename it over `path`.

    A kill at any moment leaves either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    state = {"format": FORMAT, "version": VERSION, **state}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a dtrain checkpoint safely; any problem is a UserError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: give the path of a last.pt or best.pt written by "
                        f"dtrain/main.py")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as e:
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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
