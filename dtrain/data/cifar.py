"""CIFAR-10 in its standard layout: DIR/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}.

Our own reader (torchvision's class refuses any copy whose MD5 differs): it reads the original batches,
re-encoded copies and subsets (any number of data_batch_* files). The pickles are read with an unpickler
that only rebuilds numpy arrays and plain values.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from dtrain.data import ImageSet
from dtrain.errors import UserError

FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:
        raise UserError(f"{path} is not a readable CIFAR batch ({type(e).__name__}: {e}); re-download or "
                        f"re-export the dataset") from None
    if not isinstance(d, dict):
        raise UserError(f"{path} is not a CIFAR batch (expected a pickled dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_split(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for p in paths:
        d = _read_pickle(p)
        if "data" not in d or "labels" not in d:
            raise UserError(f"{p} lacks the 'data' or 'labels' entry of a CIFAR batch")
        x, y = np.asarray(d["data"]), np.asarray(d["labels"])
        if x.dtype != np.uint8 and (x.dtype.kind not in "ui" or x.size and (x.min() < 0 or x.max() > 255)):
            raise UserError(f"{p}: pixels must be integers 0..255 (uint8), got {x.dtype} values; re-export the "
                            f"batch with uint8 pixels rather than training on cast values")
        if y.size and y.dtype.kind not in "ui":
            raise UserError(f"{p}: labels must be integers, got {y.dtype} values; re-export the batch with "
                            f"integer class indices")
        if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
            raise UserError(f"{p}: expected N x 3072 uint8 data and N labels, got {x.shape} and {len(y)}")
        xs.append(x.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(y.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(xs))), torch.from_numpy(np.concatenate(ys))


def find(root: str | Path) -> Path | None:
    """The batches folder under root (or root itself), or None."""
    root = Path(root)
    for d in (root / FOLDER, root):
        if (d / "test_batch").is_file() and list(d.glob("data_batch_*")):
            return d
    return None


def download(root: str | Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive
    try:
        download_and_extract_archive(URL, download_root=str(root), md5=MD5)
    except Exception as e:  # offline, proxy, disk full...
        raise UserError(missing_message(root, f"downloading it failed ({type(e).__name__}: {e})")) from None


def missing_message(root, why: str) -> str:
    return (f"CIFAR-10 not found in {Path(root).resolve()} and {why}. Put the python version of CIFAR-10 "
            f"there: {Path(root) / FOLDER}/data_batch_1..5, test_batch, batches.meta (unpack "
            f"cifar-10-python.tar.gz into {root}), or point --data-dir at the folder that holds "
            f"{FOLDER}/.")


def read(root: str | Path) -> tuple[ImageSet, ImageSet]:
    d = find(root)
    if d is None:
        raise UserError(missing_message(root, "--no-download was given"))
    classes = CLASSES
    if (d / "batches.meta").is_file():
        meta = _read_pickle(d / "batches.meta")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get("label_names", CLASSES)]
    train_paths = sorted(d.glob("data_batch_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    sets = []
    for paths in (train_paths, [d / "test_batch"]):
        x, y = _read_split(paths)
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise UserError(f"{d}: labels outside 0..{len(classes) - 1}")
        sets.append(ImageSet(labels=y, classes=classes, images=x, size=32, mean=MEAN, std=STD))
    return sets[0], sets[1]


def load(cfg) -> tuple[ImageSet, ImageSet]:
    """Read DIR/cifar-10-batches-py; download first when absent and allowed (the caller makes only one
    process download)."""
    if find(cfg.data_dir) is None and cfg.download:
        download(cfg.data_dir)
    return read(cfg.data_dir)
