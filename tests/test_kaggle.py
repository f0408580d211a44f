"""The Kaggle CIFAR-10 layout (dtrain/data/kaggle.py) and the packed decode cache (dtrain/data/cache.py)."""
from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtrain.config import Config
from dtrain.data import cache, decode, kaggle
from dtrain.errors import UserError
from helpers import REPO, tiny_run

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def image(label: int, rng) -> np.ndarray:
    """Noise around a per-class colour (learnable)."""
    colour = np.array([40 + 20 * label, 220 - 18 * label, 60 + 15 * (label % 5)])
    return np.clip(rng.normal(colour, 30, (32, 32, 3)), 0, 255).astype(np.uint8)


def write_kaggle(root: Path, n_train: int = 200, n_test: int = 0, seed: int = 0) -> Path:
    """The Kaggle layout: train/<id>.png, trainLabels.csv, test/<id>.png, sampleSubmission.csv."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, 10, n_train)
    for i, y in enumerate(labels, 1):
        Image.fromarray(image(y, rng)).save(root / "train" / f"{i}.png")
    with open(root / "trainLabels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        w.writerows([i, CLASSES[y]] for i, y in enumerate(labels, 1))
    if n_test:
        (root / "test").mkdir(exist_ok=True)
        for i in range(1, n_test + 1):
            Image.fromarray(image(rng.integers(0, 10), rng)).save(root / "test" / f"{i}.png")
        with open(root / "sampleSubmission.csv", "w", newline="") as f:   # as Kaggle's / export.py's
            w = csv.writer(f)
            w.writerow(["id", "label"])
            w.writerows([i, "cat"] for i in range(1, n_test + 1))
    return root


def cfg(root: Path, **kw) -> Config:
    return Config(**{"dataset": "kaggle", "data_dir": str(root), "val_split": 20, "seed": 0, **kw})


@pytest.fixture(scope="module")
def kdir(tmp_path_factory) -> Path:
    return write_kaggle(tmp_path_factory.mktemp("kaggle") / "cifar-10", n_train=200)


def test_train_val_split_classes_and_pixels(kdir):
    train, val = kaggle.load(cfg(kdir))
    assert (len(train), len(val)) == (180, 20)
    assert train.classes == CLASSES == sorted(CLASSES)
    assert train.in_memory and train.images.dtype == torch.uint8 and train.images.shape[1:] == (32, 32, 3)
    assert not set(train.ids) & set(val.ids) and len(set(train.ids) | set(val.ids)) == 200
    rows = dict(csv.reader(open(kdir / "trainLabels.csv")))
    for s in (train, val):
        for k in (0, len(s) - 1):
            i = s.ids[k]
            assert np.array_equal(s.images[k].numpy(), np.asarray(Image.open(kdir / "train" / f"{i}.png")))
            assert CLASSES[s.labels[k]] == rows[str(i)]
    # fixed and seeded: the same split again, another with another seed
    assert kaggle.load(cfg(kdir))[1].ids == val.ids
    assert kaggle.load(cfg(kdir, seed=1))[1].ids != val.ids
    # stratified: every class's share of the validation set follows its share of the data
    all_labels = torch.cat([train.labels, val.labels])
    for c in range(10):
        assert abs(int((val.labels == c).sum()) - 20 * float((all_labels == c).float().mean())) < 1 + 1e-9


def test_second_load_reads_the_cache_and_changes_rebuild_it(tmp_path, monkeypatch):
    root = write_kaggle(tmp_path / "k", n_train=60)
    train, _ = kaggle.load(cfg(root, val_split=10))
    files = list((root / cache.DIRNAME).glob("train-*.npy"))
    assert len(files) == 1 and files[0].stat().st_size >= 60 * 32 * 32 * 3

    def no_decoding(*a, **k):
        raise AssertionError("decoded again although the cache is there")
    monkeypatch.setattr(decode, "decode_chunks", no_decoding)
    again, _ = kaggle.load(cfg(root, val_split=10))
    assert torch.equal(again.images, train.images)
    monkeypatch.undo()
    # a replaced image: a new key, a rebuild with the new pixels, the stale cache removed
    new = np.full((32, 32, 3), 7, np.uint8)
    Image.fromarray(new).save(root / "train" / "3.png")
    train3, val3 = kaggle.load(cfg(root, val_split=10))
    s, k = (train3, train3.ids.index(3)) if 3 in train3.ids else (val3, val3.ids.index(3))
    assert np.array_equal(s.images[k].numpy(), new)
    assert [p.name for p in (root / cache.DIRNAME).glob("train-*.npy")] != [files[0].name]
    assert len(list((root / cache.DIRNAME).glob("train-*.npy"))) == 1


def test_cache_dir(tmp_path):
    root = write_kaggle(tmp_path / "k", n_train=40)
    kaggle.load(cfg(root, val_split=10, cache_dir=str(tmp_path / "cache")))
    assert len(list((tmp_path / "cache").glob("train-*.npy"))) == 1
    assert not (root / cache.DIRNAME).exists()


def test_no_val_split_says_to_pass_it(kdir):
    with pytest.raises(UserError, match=r"--val-split N.*test set has no labels"):
        kaggle.load(cfg(kdir, val_split=0))
    with pytest.raises(UserError, match="--val-split 200"):
        kaggle.load(cfg(kdir, val_split=200))


def test_missing_layout(tmp_path):
    root = write_kaggle(tmp_path / "k", n_train=5)
    (root / "trainLabels.csv").unlink()
    with pytest.raises(UserError, match=r"trainLabels\.csv not found"):
        kaggle.load(cfg(root, val_split=1))
    with pytest.raises(UserError, match=r"empty[/\\]train and .*trainLabels\.csv not found"):
        kaggle.load(cfg(tmp_path / "empty", val_split=1))


def test_ids_without_image_are_named(tmp_path):
    root = write_kaggle(tmp_path / "k", n_train=30)
    for i in (4, 9, 11, 12, 13, 20, 21):
        (root / "train" / f"{i}.png").unlink()
    with pytest.raises(UserError, match=r"7 id\(s\) have no image .*4\.png, 9\.png, 11\.png, 12\.png, 13\.png \.\.\. "
                                        r"\(7 in all\)"):
        kaggle.load(cfg(root, val_split=5))


def test_unknown_labels_are_named(tmp_path):
    root = write_kaggle(tmp_path / "k", n_train=30)
    text = (root / "trainLabels.csv").read_text().splitlines()
    text[5] = "5,kitten"
    text[8] = "8,Truck"
    (root / "trainLabels.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(UserError, match=r"unknown label\(s\) 'kitten' \(id 5\), 'Truck' \(id 8\).*airplane, "
                                        r"automobile"):
        kaggle.load(cfg(root, val_split=5))


def test_bad_csv(tmp_path):
    root = write_kaggle(tmp_path / "k", n_train=10)
    (root / "trainLabels.csv").write_text("image,class\n1,cat\n")
    with pytest.raises(UserError, match="header 'id,label'"):
        kaggle.load(cfg(root, val_split=2))
    (root / "trainLabels.csv").write_text("id,label\n1,cat\nx,dog\n3,cat\n1,dog\n")
    with pytest.raises(UserError, match=r"malformed line\(s\) 3"):
        kaggle.load(cfg(root, val_split=2))
    (root / "trainLabels.csv").write_text("id,label\n1,cat\n2,dog\n1,dog\n")
    with pytest.raises(UserError, match=r"more than once: 1"):
        kaggle.load(cfg(root, val_split=2))


def test_corrupt_train_image_is_named_and_no_cache_is_left(tmp_path):
    root = write_kaggle(tmp_path / "k", n_train=30)
    data = (root / "train" / "17.png").read_bytes()
    (root / "train" / "17.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"1 image\(s\) cannot be decoded .*train[/\\]17\.png"):
        kaggle.load(cfg(root, val_split=5))
    assert not [p for p in (root / cache.DIRNAME).iterdir()]   # neither a cache nor a temp file


# ---- the test folder ----------------------------------------------------------------------------------

def write_test(folder: Path, ids, mode: str = "RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in ids:
        Image.fromarray(image(i % 10, rng)).convert(mode).save(folder / f"{i}.png")


def test_test_set_numeric_order_and_junk_ignored(tmp_path):
    write_test(tmp_path / "k" / "test", range(1, 13))
    for junk in (".DS_Store", "notes.txt", "12.png.bak", "a.png", "3.PNG.txt"):
        (tmp_path / "k" / "test" / junk).write_bytes(b"junk")
    (tmp_path / "k" / "test" / "sub").mkdir()
    s = kaggle.test_set(tmp_path / "k")
    assert s.ids == list(range(1, 13))                 # not 1, 10, 11, 12, 2, ...
    assert [Path(f).name for f in s.files] == [f"{i}.png" for i in range(1, 13)]
    assert s.labels.tolist() == [-1] * 12 and not s.in_memory
    assert kaggle.test_set(tmp_path / "k" / "test").ids == s.ids   # the test folder itself works too


def test_test_set_warns_about_missing_ids(tmp_path):
    write_test(tmp_path / "test", [1, 2, 4, 5, 9])
    seen = []
    s = kaggle.test_set(tmp_path, warn=seen.append)
    assert s.ids == [1, 2, 4, 5, 9]
    assert len(seen) == 1 and "4 id(s) missing from 1..9" in seen[0] and "3, 6, 7" in seen[0]
    with pytest.warns(UserWarning, match="missing"):
        kaggle.test_set(tmp_path)


def test_test_set_errors(tmp_path):
    with pytest.raises(UserError, match="test folder not found"):
        kaggle.test_set(tmp_path / "nowhere")
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(UserError, match=r"no <integer>\.png images"):
        kaggle.test_set(tmp_path / "empty")
    write_test(tmp_path / "dup" / "test", [1, 2])
    (tmp_path / "dup" / "test" / "01.png").write_bytes((tmp_path / "dup" / "test" / "1.png").read_bytes())
    with pytest.raises(UserError, match="same numeric id"):
        kaggle.test_set(tmp_path / "dup")


def test_cache_converts_grey_and_rgba_and_names_bad_files(tmp_path):
    folder = tmp_path / "test"
    write_test(folder, [1, 2], "RGB")
    write_test(folder, [3], "L")
    write_test(folder, [4], "RGBA")
    s = kaggle.test_set(tmp_path)
    arr = cache.load_or_build(s.files, tmp_path, "test", 32, 3, log=None, workers=0)
    assert arr.shape == (4, 32, 32, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr[2], np.asarray(Image.open(folder / "3.png").convert("RGB")))
    assert np.array_equal(arr[3], np.asarray(Image.open(folder / "4.png").convert("RGB")))
    (folder / "2.png").write_bytes(b"not a png")
    (folder / "4.png").write_bytes((folder / "1.png").read_bytes()[:60])
    s = kaggle.test_set(tmp_path)
    with pytest.raises(UserError, match=r"2 image\(s\) cannot be decoded .*test[/\\]2\.png, .*test[/\\]4\.png"):
        cache.load_or_build(s.files, tmp_path, "test", 32, 3, log=None, workers=2)
    assert len(list((tmp_path / cache.DIRNAME).glob("*.npy"))) == 1          # only the earlier, valid one
    assert not list((tmp_path / cache.DIRNAME).glob("*.tmp"))


def test_array_loader_shards_cover_every_image_once(tmp_path):
    from dtrain.data import ImageSet
    from dtrain.data.loader import ArrayLoader
    images = torch.arange(23 * 2 * 2 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).view(23, 2, 2, 3)
    s = ImageSet(labels=torch.arange(23), classes=["a"], images=images, size=2)
    seen = []
    for rank in range(3):
        for x, y, idx in ArrayLoader(s, "cpu", batch_size=4, rank=rank, world=3).batches():
            assert torch.equal(x, images[idx].permute(0, 3, 1, 2)) and torch.equal(y, idx)
            seen += idx.tolist()
    assert sorted(seen) == list(range(23))


# ---- training on the layout ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.process
def test_two_process_training_builds_the_cache_once(tmp_path):
    root = write_kaggle(tmp_path / "k", n_train=120)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), str(REPO / "dtrain" / "main.py"),
           *tiny_run(tmp_path / "run", "--val-split", "20", "--max-steps", "2", dataset="kaggle", data=root, batch=16)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert out.count("decoding 120 images into the cache") == 1
    assert "100 train / 20 val images" in out
    assert (tmp_path / "run" / "last.pt").is_file()
    assert len(list((root / cache.DIRNAME).glob("train-*.npy"))) == 1
