"""Packed cache of decoded images: a folder's images as one uint8 N x H x W x C `.npy` file.

Decoding many small PNGs costs far more than using them, so a file-backed image set is decoded once (in
DataLoader worker processes) and stored as a single array file, memory-mapped on later reads. The file's
name carries a key: a hash of the file list (names relative to the data root), each file's size and
modification time, and the decode settings (size, channels). Any added, removed, replaced or touched
image gives a new key, hence a rebuild; older caches of the same folder are then removed.

Location: `<data root>/.dtrain-cache/` beside the data, or `--cache-dir`. The file is written atomically
(temp file + rename): a killed build leaves no half cache. Callers decide which process builds (only
the main one: see dtrain.distributed.run_on_main); the others only read.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dtrain.checkpoint import atomic_write
from dtrain.data.loader import _Loader, decode_image
from dtrain.errors import UserError

VERSION = 1
DIRNAME = ".dtrain-cache"
CHUNK = 256          # images per decode task (one worker round trip)


@dataclass
class CacheFile:
    path: Path
    shape: tuple[int, int, int, int]   # N, H, W, C
    prefix: str                        # file-name prefix shared by every version of this folder's cache

    @property
    def nbytes(self) -> int:
        n, h, w, c = self.shape
        return n * h * w * c


def fingerprint(files: Sequence[str | os.PathLike], root: str | os.PathLike, size: int, channels: int) -> str:
    """Hash of the file list (relative names, in order), sizes, mtimes and the decode settings."""
    h = hashlib.sha256(f"dtrain packed cache v{VERSION} size={size} channels={channels}\n".encode())
    root = os.path.abspath(root)
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise UserError(f"cannot read image {f}: {e.strerror}") from None
        h.update(f"{os.path.relpath(os.path.abspath(f), root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def locate(files: Sequence[str | os.PathLike], root: str | os.PathLike, name: str, size: int, channels: int,
           cache_dir: str | os.PathLike | None = None) -> CacheFile:
    """Where the cache of these files lives (whether or not it exists yet)."""
    root = Path(root)
    folder = Path(cache_dir) if cache_dir else root / DIRNAME
    where = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]  # one --cache-dir, many data roots
    key = fingerprint(files, root, size, channels)[:20]
    prefix = f"{name}-{where}-"
    n = len(files)
    return CacheFile(folder / f"{prefix}{key}-{n}x{size}x{size}x{channels}.npy", (n, size, size, channels), prefix)


def open_cache(cache: CacheFile) -> np.ndarray | None:
    """The cached array, memory-mapped (copy-on-write: writable, never changes the file), or None."""
    if not cache.path.is_file():
        return None
    try:
        arr = np.load(cache.path, mmap_mode="c")
    except (ValueError, OSError) as e:
        raise UserError(f"the image cache {cache.path} is unreadable ({e}); delete it and run again") from None
    if arr.dtype != np.uint8 or tuple(arr.shape) != cache.shape:
        raise UserError(f"the image cache {cache.path} holds {arr.dtype} {tuple(arr.shape)}, expected uint8 "
                        f"{cache.shape}; delete it and run again")
    return arr


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


def writable(cache: CacheFile) -> bool:
    try:
        cache.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(cache.path.parent, os.W_OK)


def build(cache: CacheFile, files, workers: int, progress=None) -> None:
    """Decode `files` and write the cache file atomically, streaming (memory use: a few chunks)."""
    n, size, _, channels = cache.shape

    def write(f):
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": cache.shape}
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in decode_chunks(files, size, channels, workers, progress):
            f.write(np.ascontiguousarray(chunk).data)

    try:
        atomic_write(cache.path, write)
        share(cache.path)
    except OSError as e:
        raise UserError(f"cannot write the image cache {cache.path}: {e}. Free some space, pass --cache-dir "
                        f"DIR (a writable folder), or --no-cache") from None
    for old in cache.path.parent.glob(f"{cache.prefix}*.npy"):  # stale versions of this folder's cache
        if old != cache.path:
            old.unlink(missing_ok=True)


def load_or_build(files, root, name: str, size: int, channels: int, cache_dir=None, workers: int | None = None,
                  progress=None, log: Callable[[str], None] | None = print) -> np.ndarray:
    """The images of `files`, from the cache if it is there; else decoded and cached (or, when the cache
    folder is not writable, decoded into memory with a note)."""
    workers = default_workers() if workers is None else workers
    cache = locate(files, root, name, size, channels, cache_dir)
    arr = open_cache(cache)
    if arr is not None:
        return arr
    if not writable(cache):
        if log:
            log(f"note: cannot write the image cache in {cache.path.parent}; decoding {len(files):,} images "
                f"into memory (pass --cache-dir DIR to cache them for the next run)")
        return decode_all(files, size, channels, workers, progress)
    if log:
        log(f"decoding {len(files):,} images into the cache {cache.path} ({cache.nbytes / 2**20:,.0f} MiB, "
            f"once; later runs read it)")
    build(cache, files, workers, progress)
    return open_cache(cache)


def share(path: Path) -> None:
    """The usual permissions of a new file (atomic_write's temp files are private to their owner)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                      32))


class ArrayLoader(_Loader):
    """Evaluation batches from a host uint8 N x H x W x C array (e.g. a memory-mapped cache).

    Each process reads only its own shard's rows, batch by batch, a batch ahead in a helper thread;
    the NHWC -> NCHW permutation happens on the device, on uint8 (4x cheaper than on the float batch)."""

    def __init__(self, imageset, device, batch_size: int, rank: int, world: int):
        super().__init__(imageset, torch.device(device), batch_size, rank, world, 0, False)
        self.images = imageset.images if isinstance(imageset.images, torch.Tensor) else \
            torch.from_numpy(imageset.images)
        self.labels = imageset.labels

    def _host_batch(self, idx: torch.Tensor):
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        x = self.images[lo:hi] if hi - lo == len(idx) else self.images[idx]
        x = x.contiguous()
        if self.device.type == "cuda":
            x = x.pin_memory()
        return x, idx

    def batches(self, epoch: int = 0, start: int = 0):
        from concurrent.futures import ThreadPoolExecutor
        index_batches = [b for b in self.index_batches(epoch, start) if len(b)]
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self._host_batch, index_batches[0]) if index_batches else None
            for k in range(len(index_batches)):
                x, idx = pending.result()
                if k + 1 < len(index_batches):
                    pending = pool.submit(self._host_batch, index_batches[k + 1])
                x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()  # uint8: cheap
                yield x, self.labels[idx].to(self.device), idx.to(self.device)
