"""Image files -> uint8 H x W x C arrays: one file (`decode_image`), or many in worker processes
(`decode_chunks`, `decode_all`), naming every file that cannot be decoded.

One decoder serves training (ImageFolder, Kaggle) and prediction. Every mode PIL opens becomes 8-bit by its
real range (`to_8bit`), then "L" or "RGB" as the caller asks (greyscale -> RGB repeats the grey; RGB -> L
is PIL's ITU-R 601-2 luma), then size x size (bilinear, antialiased when it shrinks):

- 8-bit modes (1, L, P, RGB) as they are; CMYK, YCbCr, LAB and HSV through PIL's conversion to RGB.
- 16-bit greyscale (I;16, I;16L, I;16B, I;16N): value / 257, so 0..65535 (the full 16-bit scale) maps
  onto 0..255.
- I (32-bit integers): as they are when every value is within 0..255; else, when within 0..65535, as
  16-bit (/ 257); else min..max stretched onto 0..255.
- F (32-bit floats): x 255 when every value is within 0..1; else min..max stretched onto 0..255 (NaN
  counts as the minimum, infinities are clipped to the finite range).
  A stretched image whose values are all equal is that value clipped to 0..255.
- Transparency (RGBA, LA, PA, RGBa, P or L or RGB with a transparent colour): composited over white
  (BACKGROUND), not dropped, so a transparent pixel looks as a viewer shows it on a white page.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from dtrain.data.workers import short_socket_folder
from dtrain.errors import UserError

CHUNK = 256          # images per decode task (one worker round trip)
DECODER_VERSION = 2  # part of the packed cache's key: change it when decoding gives other pixels
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})  # decode to one grey
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
BACKGROUND = (255, 255, 255)   # what transparent pixels are composited over
_TO_RGB = frozenset({"CMYK", "YCbCr", "LAB", "HSV"})


def decode_image(path: str | Path, size: int | None, channels: int = 3) -> np.ndarray:
    """An image file as uint8 H x W x C (C = `channels`, 1 or 3): decoded by `to_8bit`, converted to L or
    RGB and resized to size x size when it is not. Errors: a UserError naming the file (missing, a folder,
    not an image)."""
    try:
        with Image.open(path) as im:
            im = to_8bit(im).convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.array(im)  # writable (np.asarray gives a read-only view torch warns about)
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not an image file") from None
    except Exception as e:
        raise UserError(f"cannot decode image {path}: {type(e).__name__}: {e}. Remove or replace the file.") \
            from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def to_8bit(im: Image.Image) -> Image.Image:
    """`im` as an 8-bit image ("L", "RGB" or an 8-bit mode PIL converts to them) by its real range, with
    transparency composited over BACKGROUND (see the module doc)."""
    if im.mode in SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
        return Image.fromarray(scale_to_8bit(np.asarray(im), im.mode), "L")
    if im.has_transparency_data:
        return over_background(im)
    if im.mode in _TO_RGB:
        return im.convert("RGB")
    return im


def over_background(im: Image.Image) -> Image.Image:
    """An image with transparency as RGB, composited over BACKGROUND."""
    rgba = im.convert("LA").convert("RGBA") if im.mode == "La" else im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")


def scale_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """The uint8 grey levels of a 16-bit, I or F image's values (see the module doc)."""
    if mode in SIXTEEN_BIT_MODES:
        return _round(values.astype(np.float64) / 257)
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    lo, hi = values[finite].min(), values[finite].max()
    values = np.where(np.isnan(values), lo, np.clip(values, lo, hi))
    if mode == "I" and lo >= 0 and hi <= 255:
        return _round(values)
    if mode == "I" and lo >= 0 and hi <= 65535:
        return _round(values / 257)
    if mode == "F" and lo >= 0 and hi <= 1:
        return _round(values * 255)
    if hi == lo:
        return np.full(values.shape, np.clip(np.round(lo), 0, 255), np.uint8)
    return _round((values - lo) / (hi - lo) * 255)


def _round(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


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
    if workers:
        short_socket_folder()
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
