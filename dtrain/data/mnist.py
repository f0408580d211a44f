"""MNIST in torchvision's layout: DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (each also
accepted gzipped, with .gz appended; DIR/raw/ and DIR itself are searched too).

Our own reader of the idx format (big-endian header: two zero bytes, a type byte 0x08 for unsigned
bytes, the number of dimensions, then one 32-bit size per dimension, then the data). Any set of images
in that format reads, whatever its number of images (e.g. the 5,000 real digits of ../shared/data) and
its square image size. Absent files are downloaded from torchvision's MNIST mirrors when allowed.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from dtrain.data import ImageSet, resize_images
from dtrain.errors import UserError

SPLITS = {"train": "train", "test": "t10k"}
FILES = [f"{s}-{kind}-ubyte" for s in SPLITS.values() for kind in ("images-idx3", "labels-idx1")]
CLASSES = [str(i) for i in range(10)]
MEAN = (0.1307,)
STD = (0.3081,)
NATIVE_SIZE = 28             # MNIST's digits; other square idx files are read at their own size
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def _open(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e}); re-download or re-export it") from None


def read_idx(path: str | Path, expect_magic: int | None = None) -> np.ndarray:
    """An idx file (or .gz) as a uint8 array of its declared shape; a bad header or size is a UserError."""
    path = Path(path)
    data = _open(path)
    if len(data) < 8:
        raise UserError(f"{path} is not an idx file: only {len(data)} bytes")
    magic = int.from_bytes(data[:4], "big")
    ndim = data[3]
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08 or ndim < 1 or \
            (expect_magic is not None and magic != expect_magic):
        want = f"{expect_magic} (0x{expect_magic:08x})" if expect_magic is not None else "0x000008NN"
        raise UserError(f"{path} is not an MNIST idx file of unsigned bytes: magic number {magic} (0x{magic:08x}), "
                        f"expected {want}. Re-download or re-export it")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated idx header ({len(data)} bytes)")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise UserError(f"{path}: the header declares shape {shape} ({expected} bytes with the header) but the "
                        f"file has {len(data)} bytes (truncated or corrupt); re-download or re-export it")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _candidates(root: Path) -> list[Path]:
    return [root / "MNIST" / "raw", root / "raw", root]


def _path(folder: Path, name: str) -> Path | None:
    for p in (folder / name, folder / f"{name}.gz"):
        if p.is_file():
            return p
    return None


def find(root: str | Path) -> Path | None:
    """The folder under root holding all four files (plain or .gz), or None."""
    for d in _candidates(Path(root)):
        if all(_path(d, n) is not None for n in FILES):
            return d
    return None


def missing_message(root, why: str) -> str:
    raw = Path(root) / "MNIST" / "raw"
    return (f"MNIST not found in {Path(root).resolve()} and {why}. Put the four idx files (optionally .gz) in "
            f"{raw}: {', '.join(FILES)}, or point --data-dir at the folder that holds MNIST/raw/ "
            f"(python ../shared/data/export.py mnist DIR writes 5,000 real digits in this layout)")


def download(root: str | Path) -> None:
    """Fetch the missing files from torchvision's mirrors into DIR/MNIST/raw (checked by MD5)."""
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive
    raw = Path(root) / "MNIST" / "raw"
    for filename, md5 in MNIST.resources:
        name = filename[:-3]
        if _path(raw, name) is not None:
            continue
        errors = []
        for mirror in MNIST.mirrors:
            try:
                download_and_extract_archive(f"{mirror}{filename}", download_root=str(raw), filename=filename,
                                             md5=md5)
                break
            except Exception as e:  # offline, proxy, a dead mirror...
                errors.append(f"{mirror}: {type(e).__name__}: {e}")
                if (raw / filename).exists() and not check_integrity(str(raw / filename), md5):
                    (raw / filename).unlink()
        else:
            raise UserError(missing_message(root, "downloading it failed (" + "; ".join(errors) + ")"))


def read(root: str | Path, image_size: int | None = None) -> tuple[ImageSet, ImageSet]:
    d = find(root)
    if d is None:
        raise UserError(missing_message(root, "--no-download was given"))
    sets = []
    for split in SPLITS.values():
        ipath, lpath = _path(d, f"{split}-images-idx3-ubyte"), _path(d, f"{split}-labels-idx1-ubyte")
        x, y = read_idx(ipath, IMAGES_MAGIC), read_idx(lpath, LABELS_MAGIC)
        if x.ndim != 3 or x.shape[1] != x.shape[2]:
            raise UserError(f"{ipath}: expected N x H x W square images, got shape {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise UserError(f"{lpath} holds {len(y)} labels but {ipath} holds {len(x)} images")
        if len(y) and y.max() >= len(CLASSES):
            raise UserError(f"{lpath}: labels must be 0..9, found {int(y.max())}")
        images = torch.from_numpy(x.copy())[..., None]               # N x H x W x 1
        if image_size is not None and image_size != images.shape[1]:
            if image_size < 1:
                raise UserError(f"--image-size must be positive, not {image_size}")
            images = resize_images(images, image_size)
        sets.append(ImageSet(labels=torch.from_numpy(y.astype(np.int64)), classes=list(CLASSES), images=images,
                             channels=1, size=images.shape[1], mean=MEAN, std=STD, meta={"root": str(d)}))
    return sets[0], sets[1]


def load(cfg) -> tuple[ImageSet, ImageSet]:
    """Read the idx files; download the missing ones first when allowed (the caller makes only one process
    download)."""
    if find(cfg.data_dir) is None and cfg.download:
        download(cfg.data_dir)
    return read(cfg.data_dir, cfg.image_size)
