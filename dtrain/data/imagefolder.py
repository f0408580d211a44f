"""Folders of images, one folder per class: DIR/train/<class>/..., DIR/test/<class>/... (torchvision's
ImageFolder layout; DIR/val/<class>/... is accepted in place of DIR/test).

- Class names are the sub-folder names of DIR/train, sorted; labels index that list. Files are found
  recursively inside each class folder and kept when their extension is one of torchvision's
  IMG_EXTENSIONS (any case). A test class folder whose name is not a training class is an error.
- `--val-split N` holds out N training images (stratified, seeded by `--seed`) as the validation set
  instead of DIR/test.
- Size: `--image-size S` resizes every image to S x S (bilinear, antialiased). Without it the images must
  all be one square size, which is then used as is.
- Channels: 1 when every image is greyscale (dtrain.data.decode.GREY_MODES: PIL modes 1, L, LA, I, I;16*,
  F), else 3 (RGB). Colour and greyscale images may be mixed: each is converted to the set's channel count
  when decoded. Every mode is decoded to 8 bits by its real range (16-bit by / 257, transparency over
  white: dtrain.data.decode), the same way for training and prediction.
- Memory: `dtrain.data.loader.choose_loader` decides. A set whose decoded uint8 pixels (train + validation)
  fit in MEMORY_BUDGET bytes is decoded once, in parallel, into `ImageSet.images`, so the in-memory
  (device-resident) loader applies; a larger one stays file-backed (`ImageSet.files`) and is decoded in
  DataLoader workers every epoch. `--loader memory` / `--loader files` force either.
- Normalisation: the folder has no known mean/std, so `--normalize dataset` (the default) and `auto`
  both compute them over the training images (dtrain.data.stats).
"""
from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from dtrain.data import ImageSet, stratified_split
from dtrain.data.decode import GREY_MODES, decode_all, default_workers
from dtrain.data.loader import MEMORY_BUDGET, choose_loader
from dtrain.errors import UserError

NATIVE_SIZE = None                       # the images decide (or --image-size)
HEADER_SCAN_LIMIT = 20_000               # with --image-size, larger sets decide the channels from a sample
LAYOUT = ("expected DIR/train/<class>/<image> and DIR/test/<class>/<image> (or DIR/val/...), e.g. "
          "DIR/train/cat/001.png, DIR/train/dog/002.jpg; or only DIR/train/... with --val-split N")


def _extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return tuple(e.lower() for e in IMG_EXTENSIONS)


def _images_under(folder: Path, exts: tuple[str, ...]) -> list[str]:
    """Image files under folder, recursively, sorted; hidden files and folders (.ipynb_checkpoints...) skipped."""
    found = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, n) for n in names if n.lower().endswith(exts) and not n.startswith(".")]
    return sorted(found)


def scan(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """(classes, files, labels) of one split folder. With `classes` given (the training classes), the
    folder's class folders must be among them; otherwise they define them."""
    exts = _extensions()
    folders = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        if not folders:
            raise UserError(f"{split_dir} has no class folders: {LAYOUT}")
        classes = folders
    else:
        unknown = [f for f in folders if f not in classes]
        if unknown:
            raise UserError(f"{split_dir} has class folders that {split_dir.parent / 'train'} lacks: "
                            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}. The same class "
                            f"folders must be under train/ and test/")
    index = {c: i for i, c in enumerate(classes)}
    files, labels, empty = [], [], []
    for c in folders:
        found = _images_under(split_dir / c, exts)
        if not found:
            empty.append(c)
        files += found
        labels += [index[c]] * len(found)
    if empty:
        raise UserError(f"{split_dir}: class folder(s) without images: {', '.join(empty[:10])}"
                        f"{' ...' if len(empty) > 10 else ''} (image files end in {', '.join(exts)}). "
                        f"Remove the empty folders or add images")
    return classes, files, labels


def _header(path: str) -> tuple[tuple[int, int], str]:
    """(width, height), mode: read from the file's header only."""
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except Exception as e:
        raise UserError(f"cannot read image {path}: {type(e).__name__}: {e}. Remove or replace the file.") \
            from None


def headers(files: list[str]) -> list[tuple[tuple[int, int], str]]:
    with ThreadPoolExecutor(default_workers()) as ex:   # header reads: I/O, threads suffice
        return list(ex.map(_header, files, chunksize=64))


def decide_geometry(files: list[str], image_size: int | None, seed: int = 0) -> tuple[int, int]:
    """(size, channels) of the set (see the module doc)."""
    if image_size is not None:
        if image_size < 1:
            raise UserError(f"--image-size must be positive, not {image_size}")
        sample = files if len(files) <= HEADER_SCAN_LIMIT else random.Random(seed).sample(files, 2000)
        modes = {m for _, m in headers(sample)}
        return image_size, 1 if modes <= GREY_MODES else 3
    info = headers(files)
    sizes = {}
    for f, (wh, _) in zip(files, info):
        sizes.setdefault(wh, f)
    if len(sizes) > 1:
        examples = ", ".join(f"{w}x{h} ({p})" for (w, h), p in list(sizes.items())[:3])
        raise UserError(f"the images have {len(sizes)} different sizes, e.g. {examples}: pass --image-size N "
                        f"to resize them all to N x N (e.g. --image-size 64)")
    (w, h), example = next(iter(sizes.items()))
    if w != h:
        raise UserError(f"the images are {w}x{h} (width x height, e.g. {example}), not square: pass "
                        f"--image-size N to resize them to N x N")
    modes = {m for _, m in info}
    return w, 1 if modes <= GREY_MODES else 3


def _find_test_dir(root: Path) -> Path | None:
    for name in ("test", "val"):
        if (root / name).is_dir():
            return root / name
    return None


def read(root: str | Path, image_size: int | None = None, val_split: int = 0, seed: int = 0,
         loader: str = "auto", memory_budget: int = MEMORY_BUDGET) -> tuple[ImageSet, ImageSet]:
    root = Path(root)
    train_dir = root / "train"
    if not root.is_dir():
        raise UserError(f"image folder {root.resolve()} does not exist: {LAYOUT}. Point --data-dir at DIR")
    if not train_dir.is_dir():
        raise UserError(f"{root.resolve()} has no train/ folder: {LAYOUT}")
    classes, files, labels = scan(train_dir)
    test_dir = _find_test_dir(root)
    if val_split:
        try:
            tr, va = stratified_split(torch.tensor(labels), val_split, seed)
        except ValueError as e:
            raise UserError(f"--val-split: {e} ({len(labels)} training images in {train_dir})") from None
        tr, va = tr.tolist(), va.tolist()
        splits = [([files[i] for i in tr], [labels[i] for i in tr]), ([files[i] for i in va], [labels[i] for i in va])]
    elif test_dir is not None:
        _, test_files, test_labels = scan(test_dir, classes)
        if not test_files:
            raise UserError(f"{test_dir} holds no images: {LAYOUT}")
        splits = [(files, labels), (test_files, test_labels)]
    else:
        raise UserError(f"{root.resolve()} has no test/ (or val/) folder for validation: add DIR/test/<class>/... "
                        f"or hold out training images with --val-split N (e.g. --val-split {max(1, len(files) // 10)})")
    size, channels = decide_geometry(splits[0][0] + splits[1][0], image_size, seed)
    sets = [ImageSet(labels=torch.tensor(y, dtype=torch.int64), classes=classes, files=f, channels=channels,
                     size=size, mean=None, std=None, meta={"root": str(root)}) for f, y in splits]
    if choose_loader(loader, *sets, budget=memory_budget) == "memory":
        for s in sets:
            s.images = torch.from_numpy(decode_all(s.files, size, channels, default_workers()))
            s.files = None
    return sets[0], sets[1]


def load(cfg) -> tuple[ImageSet, ImageSet]:
    return read(cfg.data_dir, cfg.image_size, cfg.val_split, cfg.seed, cfg.loader)
