"""The Kaggle "CIFAR-10 - Object Recognition in Images" layout.

    DIR/train/1.png .. 50000.png    DIR/trainLabels.csv (id,label; label = class name)
    DIR/test/1.png .. 300000.png    DIR/sampleSubmission.csv (id,label)

Training (`--dataset kaggle --data-dir DIR --val-split N`) reads train/ and trainLabels.csv; the test set
has no labels, so N labelled training images (a fixed, seeded, class-stratified split) are held out for
validation. The training images are decoded once into the packed cache (dtrain.data.cache), so later runs
start at once and train from memory. `test_set(DIR)` is the (file-backed, unlabelled) test folder that
dtrain/predict.py predicts.
"""
from __future__ import annotations

import csv
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import torch

from dtrain.data import ImageSet, cache, stratified_split
from dtrain.data.cifar import CLASSES, MEAN, STD
from dtrain.errors import UserError

NATIVE_SIZE = 32   # the competition's PNGs; --image-size N resizes them as they are decoded
_PNG = re.compile(r"(\d+)\.png")
LAYOUT = ("DIR/train/1.png .. N.png, DIR/trainLabels.csv (id,label) and DIR/test/1.png .., as unpacked from "
          "the competition's train.7z/test.7z (or written by `python ../shared/data/export.py kaggle DIR`)")


def _few(items, k: int = 5) -> str:
    items = list(items)
    more = f" ... ({len(items)} in all)" if len(items) > k else ""
    return ", ".join(map(str, items[:k])) + more


def list_pngs(folder: str | os.PathLike) -> dict[int, str]:
    """{id: path} of the `<integer>.png` files in folder; anything else (.DS_Store, notes.txt) is ignored."""
    found: dict[int, str] = {}
    clashes = []
    with os.scandir(folder) as it:
        for entry in it:
            m = _PNG.fullmatch(entry.name)
            if m is None:
                continue
            i = int(m.group(1))
            if i in found:
                clashes.append(entry.name)
            found[i] = entry.path
    if clashes:
        raise UserError(f"{folder}: several files have the same numeric id ({_few(sorted(clashes))}); keep one "
                        f"file per id")
    return found


def test_set(directory: str | os.PathLike, size: int = 32, channels: int = 3,
             warn: Callable[[str], None] | None = None) -> ImageSet:
    """The test images of a Kaggle folder (DIR/test, or DIR itself when it holds the PNGs), file-backed,
    ids in numeric order, labels -1. Ids missing from 1..max give a warning that says how many."""
    directory = Path(directory)
    folder = directory / "test" if (directory / "test").is_dir() else directory
    if not folder.is_dir():
        raise UserError(f"Kaggle test folder not found: {directory / 'test'} does not exist. Point --data-dir at "
                        f"the folder that holds test/ ({LAYOUT})")
    found = list_pngs(folder)
    if not found:
        raise UserError(f"no <integer>.png images in {folder}: expected the Kaggle test images 1.png, 2.png, ...")
    ids = sorted(found)
    present = sum(1 for i in ids if i >= 1)
    missing = ids[-1] - present if ids[-1] >= 1 else 0
    if missing:
        gaps = [i for i in range(1, ids[-1] + 1) if i not in found]
        message = (f"{folder}: {missing:,} id(s) missing from 1..{ids[-1]:,} (e.g. {_few(gaps, 3)}); the "
                   f"predictions will lack them")
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(message)
    return ImageSet(labels=torch.full((len(ids),), -1, dtype=torch.long), classes=list(CLASSES),
                    files=[found[i] for i in ids], ids=ids, channels=channels, size=size, mean=MEAN, std=STD,
                    meta={"root": str(folder), "missing_ids": missing})


def read_labels(path: Path) -> list[tuple[int, str]]:
    """(id, label) rows of trainLabels.csv, checked."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not rows or [c.strip().lower() for c in rows[0]] != ["id", "label"]:
        first = ','.join(rows[0]) if rows else 'empty'
        raise UserError(f"{path}: the first line must be the header 'id,label', not {first!r}")
    out, bad = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2 or not row[0].strip().isdigit():
            bad.append(line)
            continue
        out.append((int(row[0]), row[1].strip()))
    if bad:
        raise UserError(f"{path}: malformed line(s) {_few(bad)} (each line must be <integer id>,<class name>)")
    if not out:
        raise UserError(f"{path} lists no images")
    seen, dup = set(), []
    for i, _ in out:
        if i in seen:
            dup.append(i)
        seen.add(i)
    if dup:
        raise UserError(f"{path}: id(s) listed more than once: {_few(sorted(set(dup)))}")
    return out


def load(cfg, log: Callable[[str], None] | None = print) -> tuple[ImageSet, ImageSet]:
    """The labelled training images (decoded once into the packed cache; `log` hears when that happens),
    split into training and validation."""
    root = Path(cfg.data_dir)
    train_dir, labels_csv = root / "train", root / "trainLabels.csv"
    missing = [str(p) for p in (train_dir, labels_csv) if not p.exists()]
    if missing:
        raise UserError(f"the Kaggle CIFAR-10 layout is incomplete in {root}: {' and '.join(missing)} not found. "
                        f"Expected {LAYOUT}.")
    rows = read_labels(labels_csv)
    found = list_pngs(train_dir)
    no_image = [i for i, _ in rows if i not in found]
    if no_image:
        raise UserError(f"{labels_csv}: {len(no_image):,} id(s) have no image in {train_dir}: "
                        f"{_few(f'{i}.png' for i in no_image)}")
    index = {c: k for k, c in enumerate(CLASSES)}
    unknown: dict[str, list[int]] = {}
    for i, label in rows:
        if label not in index:
            unknown.setdefault(label, []).append(i)
    if unknown:
        named = _few(f"{label!r} (id {ids[0]}{', ...' if len(ids) > 1 else ''})" for label, ids in unknown.items())
        raise UserError(f"{labels_csv}: unknown label(s) {named}; {sum(map(len, unknown.values())):,} rows in all. "
                        f"The classes are: {', '.join(CLASSES)}")
    labels = torch.tensor([index[label] for _, label in rows], dtype=torch.long)
    if cfg.val_split <= 0:
        raise UserError("--dataset kaggle needs --val-split N: the Kaggle test set has no labels, so N labelled "
                        "training images (a fixed, seeded, class-stratified split) are held out for validation, "
                        "e.g. --val-split 5000")
    try:
        train_idx, val_idx = stratified_split(labels, cfg.val_split, cfg.seed)
    except ValueError as e:
        raise UserError(f"--val-split {cfg.val_split}: {e} ({len(labels):,} labelled images)") from None
    size = cfg.image_size or NATIVE_SIZE
    files = [found[i] for i, _ in rows]
    images = cache.load_or_build(files, root, f"train-{size}px", size, 3, cfg.cache_dir, log=log)
    full = ImageSet(labels=labels, classes=list(CLASSES), images=torch.from_numpy(images), files=files,
                    ids=[i for i, _ in rows], channels=3, size=size, mean=MEAN, std=STD, meta={"root": str(root)})
    return full.subset(train_idx), full.subset(val_idx)
