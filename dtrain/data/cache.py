"""Packed cache of decoded images: a folder's images as one uint8 N x H x W x C `.npy` file.

Decoding many small PNGs costs far more than using them, so a file-backed image set is decoded once (in
worker processes: dtrain.data.decode) and stored as a single array file, memory-mapped on later reads. The file's
name carries a key: a hash of the file list (names relative to the data root), each file's size and
modification time, and the decode settings (size, channels, the decoder's version). Any added, removed,
replaced or touched image, or a decoder that gives other pixels, gives a new key, hence a rebuild; older
caches of the same folder are then removed.

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

from dtrain.files import atomic_write
from dtrain.data import decode
from dtrain.errors import UserError

VERSION = 1
DIRNAME = ".dtrain-cache"


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
    """Hash of the file list (relative names, in order), sizes, mtimes and the decode settings (a cache
    written by an older decoder, which gave other pixels, is not reused)."""
    h = hashlib.sha256(f"dtrain packed cache v{VERSION} decoder={decode.DECODER_VERSION} size={size} "
                       f"channels={channels}\n".encode())
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
        for chunk in decode.decode_chunks(files, size, channels, workers, progress):
            f.write(np.ascontiguousarray(chunk).data)

    atomic_write(cache.path, write, remedy="pass --cache-dir DIR (a writable folder), or --no-cache")
    for old in cache.path.parent.glob(f"{cache.prefix}*.npy"):  # stale versions of this folder's cache
        if old != cache.path:
            old.unlink(missing_ok=True)


def load_or_build(files, root, name: str, size: int, channels: int, cache_dir=None, workers: int | None = None,
                  progress: Callable[[int], None] | None = None, log: Callable[[str], None] | None = None,
                  unwritable: str = "memory") -> np.ndarray | None:
    """The images of `files`, memory-mapped from the cache if it is there; else decoded and cached.

    When the cache folder is not writable (after a note to `log`): with `unwritable="memory"` the images
    decoded into memory, with `unwritable="none"` None (the caller decodes the images as it reads them)."""
    workers = decode.default_workers() if workers is None else workers
    cache = locate(files, root, name, size, channels, cache_dir)
    arr = open_cache(cache)
    if arr is not None:
        return arr
    if not writable(cache):
        instead = f"decoding {len(files):,} images into memory" if unwritable == "memory" else \
            "decoding the images as they are read"
        if log:
            log(f"note: cannot write the image cache in {cache.path.parent}; {instead} (pass --cache-dir DIR "
                f"to cache them for the next run)")
        return decode.decode_all(files, size, channels, workers, progress) if unwritable == "memory" else None
    if log:
        log(f"decoding {len(files):,} images into the cache {cache.path} ({cache.nbytes / 2**20:,.0f} MiB, "
            f"once; later runs read it)")
    build(cache, files, workers, progress)
    return open_cache(cache)
