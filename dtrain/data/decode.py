"""Image files -> uint8 H x W x C arrays: one file (`decode_image`), or many in worker processes
(`decode_chunks`, `decode_all`), naming every file that cannot be decoded."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from dtrain.errors import UserError

CHUNK = 256          # images per decode task (one worker round trip)


def decode_image(path: str | Path, size: int | None, channels: int = 3) -> np.ndarray:
    """An image file as uint8 H x W x C, converted to RGB (or L) and resized to size x size if needed."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.array(im)  # writable (np.asarray gives a read-only view torch warns about)
    except Exception as e:
        raise UserError(f"cannot decode image {path}: {type(e).__name__}: {e}. Remove or replace the file.") \
            from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def default_workers() -> int:
    """Decode processes: the CPU cores this process may use, at most 32."""
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                      32))


class _Chunks(torch.utils.data.Dataset):
    """Item k: images k*CHUNK .. as one uint8 array, plus the positions of files that failed to decode."""

    def __init__(self, files, size: int, channels: int):
        self.files, self.size, self.channels = list(map(str, files)), size, channels

    def __len__(self) -> int:
        return -(-len(self.files) // CHUNK)

    def __getitem__(self, k: int):
        files = self.files[k * CHUNK:(k + 1) * CHUNK]
        out = np.zeros((len(files), self.size, self.size, self.channels), dtype=np.uint8)
        bad = []
        for i, f in enumerate(files):
            try:
                out[i] = decode_image(f, self.size, self.channels)
            except (UserError, ValueError):
                bad.append(k * CHUNK + i)
        return torch.from_numpy(out), torch.tensor(bad, dtype=torch.long)


def decode_chunks(files, size: int, channels: int, workers: int, progress: Callable[[int], None] | None = None):
    """Yield the decoded images in order, chunk by chunk, decoding in `workers` processes.

    After the last chunk, raises a UserError naming the files that could not be decoded (all of them
    are tried first, so the message names every bad file, or the first few and how many)."""
    loader = torch.utils.data.DataLoader(_Chunks(files, size, channels), batch_size=None, shuffle=False,
                                         num_workers=workers, prefetch_factor=4 if workers else None)
    bad: list[int] = []
    for images, failed in loader:
        bad += failed.tolist()
        yield images.numpy()
        if progress is not None:
            progress(len(images))
    if bad:
        names = ", ".join(str(files[i]) for i in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise UserError(f"{len(bad)} image(s) cannot be decoded (truncated, or not an image): {names}{more}. "
                        f"Remove or replace them and run again.")


def decode_all(files, size: int, channels: int, workers: int, progress=None) -> np.ndarray:
    """Every image decoded into one in-memory uint8 N x H x W x C array."""
    out = np.empty((len(files), size, size, channels), dtype=np.uint8)
    i = 0
    for chunk in decode_chunks(files, size, channels, workers, progress):
        out[i:i + len(chunk)] = chunk
        i += len(chunk)
    return out
