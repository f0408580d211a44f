"""CIFAR-10 and CIFAR-100 in their standard python layouts:

    DIR/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}   labels 'labels'
    DIR/cifar-100-python/{train,test,meta}                               labels 'fine_labels' (100 classes)
                                                                         or 'coarse_labels' (20 superclasses)

Each file is a pickled dict: 'data' (N x 3072 uint8: the R, G and B planes, each 32 x 32 row-major) and the
label lists; the meta file holds the class names. Our own reader (torchvision's classes refuse any copy whose
MD5 differs): it reads the original files, re-encoded copies and subsets (for CIFAR-10 any number of
data_batch_* files). The pickles are read with an unpickler that only rebuilds numpy arrays and plain values.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dtrain.data import ImageSet, resize_images
from dtrain.errors import UserError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
NATIVE_SIZE = 32
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


@dataclass(frozen=True)
class Layout:
    """One CIFAR variant on disk: folder, archive, files, the keys of its labels and class names, and the
    per-channel mean and std over every pixel of its training images."""
    title: str
    folder: str
    url: str
    md5: str                      # of the archive, as torchvision checks it
    train: str                    # the training files' names, a regular expression (its groups order them)
    test: str
    meta: str
    listing: str                  # the files, as an error message names them
    labels: str                   # the label key of the data files
    names: str                    # the class-names key of the meta file
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_names: tuple[str, ...] | None = None   # the classes when the meta file is absent

    def train_files(self, d: Path) -> list[Path]:
        found = [(m, p) for p in d.iterdir() if (m := re.fullmatch(self.train, p.name)) and p.is_file()]
        return [p for m, p in sorted(found, key=lambda mp: [int(g) for g in mp[0].groups()])]


CIFAR10 = Layout("CIFAR-10", "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                 "c58f30108f718f92721af3b95e74349a", r"data_batch_(\d+)", "test_batch", "batches.meta",
                 "data_batch_1..5, test_batch, batches.meta", "labels", "label_names", MEAN, STD, tuple(CLASSES))
# CIFAR-100's statistics over all pixels of its 50,000 training images (e.g. Armour/pytorch-nn-practice's
# meanstd.py: mean 0.50707516 0.48654887 0.44091784, std 0.26733429 0.25643846 0.27615047).
_CIFAR100 = dict(title="CIFAR-100", folder="cifar-100-python",
                 url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 md5="eb9058c3a382ffc7106e4002c42a8d85", train="train", test="test", meta="meta",
                 listing="train, test, meta", mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
CIFAR100 = Layout(labels="fine_labels", names="fine_label_names", **_CIFAR100)
CIFAR100_COARSE = Layout(labels="coarse_labels", names="coarse_label_names", **_CIFAR100)


def layout(cfg) -> Layout:
    """The layout `--dataset` (and `--cifar100-labels`) asks for."""
    if cfg.dataset == "cifar100":
        return CIFAR100_COARSE if cfg.cifar100_labels == "coarse" else CIFAR100
    return CIFAR10


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


def _read_split(paths: list[Path], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for p in paths:
        d = _read_pickle(p)
        if "data" not in d or label_key not in d:
            raise UserError(f"{p} lacks the 'data' or {label_key!r} entry of a CIFAR batch")
        x, y = np.asarray(d["data"]), np.asarray(d[label_key])
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


def find(root: str | Path, kind: Layout = CIFAR10) -> Path | None:
    """The folder of `kind`'s files under root (or root itself), or None."""
    root = Path(root)
    for d in (root / kind.folder, root):
        if (d / kind.test).is_file() and kind.train_files(d):
            return d
    return None


def download(root: str | Path, kind: Layout = CIFAR10) -> None:
    from torchvision.datasets.utils import download_and_extract_archive
    try:
        download_and_extract_archive(kind.url, download_root=str(root), md5=kind.md5)
    except Exception as e:  # offline, proxy, disk full...
        raise UserError(missing_message(root, f"downloading it failed ({type(e).__name__}: {e})", kind)) from None


def missing_message(root, why: str, kind: Layout = CIFAR10) -> str:
    archive = kind.url.rsplit("/", 1)[1]
    return (f"{kind.title} not found in {Path(root).resolve()} and {why}. Put the python version of {kind.title} "
            f"there: {Path(root) / kind.folder}/{kind.listing} (unpack {archive} into {root}), or point "
            f"--data-dir at the folder that holds {kind.folder}/.")


def class_names(d: Path, kind: Layout) -> list[str]:
    if not (d / kind.meta).is_file():
        if kind.default_names is None:
            raise UserError(f"{d / kind.meta} not found: it holds the {kind.title} class names; unpack the whole "
                            f"{kind.url.rsplit('/', 1)[1]} into {d.parent}")
        return list(kind.default_names)
    meta = _read_pickle(d / kind.meta)
    if kind.names not in meta and kind.default_names is None:
        raise UserError(f"{d / kind.meta} lacks the {kind.names!r} entry of the {kind.title} meta file")
    return [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(kind.names, kind.default_names)]


def read(root: str | Path, kind: Layout = CIFAR10, image_size: int | None = None) -> tuple[ImageSet, ImageSet]:
    """(train, test) of the `kind` files under root, resized to image_size x image_size (bilinear,
    antialiased) when given: the whole set is held in memory at that size (N x S x S x 3 bytes)."""
    d = find(root, kind)
    if d is None:
        raise UserError(missing_message(root, "--no-download was given", kind))
    classes = class_names(d, kind)
    sets = []
    for paths in (kind.train_files(d), [d / kind.test]):
        x, y = _read_split(paths, kind.labels)
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise UserError(f"{d}: labels outside 0..{len(classes) - 1}")
        x = resize_images(x, image_size or NATIVE_SIZE)
        sets.append(ImageSet(labels=y, classes=classes, images=x, size=x.shape[1], mean=kind.mean, std=kind.std))
    return sets[0], sets[1]


def load(cfg) -> tuple[ImageSet, ImageSet]:
    """Read the CIFAR variant of `cfg`; download first when absent and allowed (the caller makes only one
    process download)."""
    kind = layout(cfg)
    if find(cfg.data_dir, kind) is None and cfg.download:
        download(cfg.data_dir, kind)
    return read(cfg.data_dir, kind, cfg.image_size)
