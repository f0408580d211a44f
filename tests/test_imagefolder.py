"""ImageFolder datasets: layout, sizes, channels, memory vs file-backed, errors, '--normalize auto'."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtrain.checkpoint import load_checkpoint
from dtrain.settings import build_config
from dtrain.data import imagefolder, load_dataset, stats
from dtrain.data.decode import decode_image
from dtrain.data.loader import make_loader
from dtrain.errors import UserError
from helpers import tiny_run, train_here
from test_decode import write_16bit

CLASSES = ["zebra", "apple", "mango"]          # sorted: apple, mango, zebra


def write_folder(root: Path, n_train: int = 6, n_test: int = 2, sizes=((64, 64),), mode: str = "RGB",
                 classes=CLASSES, seed: int = 0, ext: str = ".png") -> Path:
    """root/{train,test}/<class>/<i>.png with a per-class colour plus noise, sizes cycling through `sizes`."""
    rng = np.random.default_rng(seed)
    k = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = sizes[k % len(sizes)]
                k += 1
                base = np.array([40 + 80 * ci, 200 - 60 * ci, 90 + 30 * ci])
                x = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                im = Image.fromarray(x)
                if mode == "L":
                    im = im.convert("L")
                im.save(d / f"{i:03d}{ext}")
    return root


def test_same_size_folder_loads_in_memory_with_sorted_class_names(tmp_path):
    root = write_folder(tmp_path, sizes=((48, 48),))
    (root / "train" / "apple" / "notes.txt").write_text("not an image")
    tr, te = imagefolder.read(root)
    assert tr.classes == ["apple", "mango", "zebra"] and te.classes == tr.classes
    assert tr.in_memory and tr.images.shape == (18, 48, 48, 3) and tr.images.dtype == torch.uint8
    assert te.images.shape == (6, 48, 48, 3) and tr.size == 48 and tr.channels == 3
    assert tr.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert tr.mean is None and tr.std is None      # no known statistics: '--normalize dataset' computes them
    first = root / "train" / "apple" / "000.png"
    assert np.array_equal(tr.images[0].numpy(), np.asarray(Image.open(first).convert("RGB")))


def test_varied_sizes_need_image_size_then_resize(tmp_path):
    root = write_folder(tmp_path, sizes=((40, 52), (64, 64), (90, 70)))
    with pytest.raises(UserError, match="--image-size"):
        imagefolder.read(root)
    tr, te = imagefolder.read(root, image_size=64)
    assert tr.images.shape == (18, 64, 64, 3) and te.images.shape == (6, 64, 64, 3)
    # resized exactly as the file-backed loader resizes
    f = root / "train" / "apple" / "000.png"
    assert np.array_equal(tr.images[0].numpy(), decode_image(f, 64, 3))


def test_non_square_single_size_needs_image_size(tmp_path):
    with pytest.raises(UserError, match="not square.*--image-size"):
        imagefolder.read(write_folder(tmp_path, sizes=((40, 30),)))


def test_greyscale_folder_has_one_channel_and_mixed_has_three(tmp_path):
    tr, _ = imagefolder.read(write_folder(tmp_path / "grey", sizes=((28, 28),), mode="L"))
    assert tr.channels == 1 and tr.images.shape == (18, 28, 28, 1)
    mixed = write_folder(tmp_path / "mixed", sizes=((28, 28),), mode="L")
    Image.new("RGB", (28, 28), (255, 0, 0)).save(mixed / "train" / "apple" / "colour.png")
    tr, _ = imagefolder.read(mixed)
    assert tr.channels == 3 and tr.images.shape == (19, 28, 28, 3)


def test_16bit_pngs_train_by_their_real_range_in_memory_and_from_files(tmp_path):
    """Training decodes as prediction does: a 16-bit PNG is value / 257 (not clipped to nearly white),
    whether the set is decoded into memory or by the file loader's workers."""
    rng = np.random.default_rng(0)
    values = {}
    for split, n in (("train", 3), ("test", 1)):
        for c in ("dark", "light"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                values[(split, c, i)] = rng.integers(0, 65536, (16, 16)).astype(np.uint16)
                write_16bit(tmp_path / split / c / f"{i}.png", values[(split, c, i)])
    expected = values[("train", "dark", 0)] / 257
    tr, _ = imagefolder.read(tmp_path)
    assert tr.channels == 1 and tr.in_memory
    assert np.abs(tr.images[0, :, :, 0].numpy() - expected).max() <= 1
    tr, _ = imagefolder.read(tmp_path, loader="files")
    loader = make_loader(tr, "files", device=torch.device("cpu"), batch_size=6, rank=0, world=1, seed=0,
                         train=False, workers=1)
    x, _, _ = next(iter(loader.batches()))
    assert np.abs(x[0, 0].numpy() - expected).max() <= 1


def test_channels_follow_the_decoders_grey_modes(tmp_path):
    """A set of greyscale-mode files (16-bit, LA, 1) has one channel; a palette image with transparency
    makes it RGB, composited over white."""
    root = write_folder(tmp_path, sizes=((16, 16),), mode="L")
    write_16bit(root / "train" / "apple" / "sixteen.png", np.full((16, 16), 65535, np.uint16))
    Image.fromarray(np.zeros((16, 16, 2), np.uint8), "LA").save(root / "train" / "mango" / "clear.png")
    Image.new("1", (16, 16), 1).save(root / "train" / "zebra" / "bits.png")
    tr, _ = imagefolder.read(root)
    assert tr.channels == 1
    assert (tr.images[6, :, :, 0] == 255).all()                       # apple/sixteen.png: full scale -> 255
    assert (tr.images[13, :, :, 0] == 255).all()                      # mango/clear.png: transparent -> white
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.save(root / "train" / "apple" / "trans.png", transparency=0)
    tr, _ = imagefolder.read(root)
    assert tr.channels == 3 and (tr.images[7] == 255).all()          # apple/trans.png: transparent -> white


def test_jpeg_and_upper_case_extensions_and_nested_folders(tmp_path):
    root = write_folder(tmp_path, sizes=((32, 32),), ext=".JPG")
    nested = root / "train" / "mango" / "more"
    nested.mkdir()
    Image.new("RGB", (32, 32)).save(nested / "x.jpeg")
    for hidden in (root / "train" / ".ipynb_checkpoints", root / "train" / "mango" / ".ipynb_checkpoints"):
        hidden.mkdir()
        Image.new("RGB", (32, 32)).save(hidden / "copy.png")      # Jupyter's copies: neither a class nor an image
    tr, _ = imagefolder.read(root)
    assert len(tr) == 19 and (tr.labels == 1).sum() == 7 and tr.classes == ["apple", "mango", "zebra"]


def test_val_split_is_stratified_and_seeded(tmp_path):
    root = write_folder(tmp_path, n_train=10, sizes=((16, 16),))
    import shutil
    shutil.rmtree(root / "test")
    with pytest.raises(UserError, match="--val-split"):
        imagefolder.read(root)
    tr, va = imagefolder.read(root, val_split=6, seed=3)
    assert len(tr) == 24 and len(va) == 6 and sorted(va.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    tr2, va2 = imagefolder.read(root, val_split=6, seed=3)
    assert torch.equal(va.images, va2.images)
    with pytest.raises(UserError, match="--val-split"):
        imagefolder.read(root, val_split=30)


def test_val_folder_accepted_in_place_of_test(tmp_path):
    root = write_folder(tmp_path, sizes=((16, 16),))
    (root / "test").rename(root / "val")
    tr, va = imagefolder.read(root)
    assert len(va) == 6


@pytest.mark.parametrize("breakage,match", [
    ("no_dir", "does not exist"), ("no_train", "no train/ folder"), ("empty_class", "without images.*apple"),
    ("no_classes", "no class folders"), ("unknown_test_class", "lacks: kiwi"), ("bad_file", "cannot read image"),
])
def test_layout_errors_say_what_is_expected(tmp_path, breakage, match):
    root = tmp_path / "data"
    if breakage == "no_train":
        (root / "test" / "a").mkdir(parents=True)
    elif breakage == "no_classes":
        (root / "train").mkdir(parents=True)
    elif breakage != "no_dir":
        write_folder(root, sizes=((16, 16),))
    if breakage == "empty_class":
        for f in (root / "train" / "apple").iterdir():
            f.unlink()
    if breakage == "unknown_test_class":
        (root / "test" / "kiwi").mkdir()
        Image.new("RGB", (16, 16)).save(root / "test" / "kiwi" / "k.png")
    if breakage == "bad_file":
        (root / "train" / "apple" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=match) as e:
        imagefolder.read(root)
    if breakage in ("no_dir", "no_train", "no_classes", "empty_class"):
        assert "train" in str(e.value)


def test_large_set_stays_file_backed_and_decodes_the_same(tmp_path):
    root = write_folder(tmp_path, sizes=((40, 52), (64, 64)))
    mem, _ = imagefolder.read(root, image_size=32)
    files, files_val = imagefolder.read(root, image_size=32, memory_budget=0)
    assert not files.in_memory and len(files.files) == 18 and files.size == 32 and files.channels == 3
    assert not files_val.in_memory
    loader = make_loader(files, "files", device=torch.device("cpu"), batch_size=5, rank=0, world=1, seed=0, train=False,
                         workers=0)
    got = torch.cat([x for x, _, _ in loader.batches()])                  # N C H W
    assert torch.equal(got.permute(0, 2, 3, 1), mem.images)
    forced, _ = imagefolder.read(root, image_size=32, loader="memory", memory_budget=0)
    assert forced.in_memory


def numpy_stats(root: Path, size: int | None = None, channels: int = 3):
    files = sorted((root / "train").rglob("*.png"))
    x = np.stack([decode_image(f, size, channels) for f in files]).astype(np.float64) / 255
    return x.reshape(-1, channels).mean(0), x.reshape(-1, channels).std(0)


@pytest.mark.parametrize("budget", [imagefolder.MEMORY_BUDGET, 0], ids=["in-memory", "file-backed"])
def test_normalize_auto_is_the_datasets_mean_and_std_over_all_pixels(tmp_path, budget):
    root = write_folder(tmp_path, n_train=7, sizes=((24, 24), (31, 20)))
    tr, _ = imagefolder.read(root, image_size=24, memory_budget=budget)
    mean, std = stats.resolve("auto", tr)
    ref_mean, ref_std = numpy_stats(root, 24)
    assert np.allclose(mean, ref_mean, atol=1e-9) and np.allclose(std, ref_std, atol=1e-9)
    # the std of the whole set, not the mean of per-image stds
    files = sorted((root / "train").rglob("*.png"))
    per_image = np.mean([decode_image(f, 24, 3).reshape(-1, 3).std(0) / 255 for f in files], 0)
    assert not np.allclose(std, per_image, atol=1e-3)
    assert stats.resolve("dataset", tr) == (mean, std)     # imagefolder knows no figures: computed too


def test_load_dataset_dispatches_on_config(tmp_path):
    root = write_folder(tmp_path, sizes=((20, 20),))
    cfg = build_config(["--arch", "cnn", "--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "16"])
    tr, te = load_dataset(cfg)
    assert tr.size == 16 and len(te) == 6


def test_64px_run_end_to_end_stores_the_computed_normalisation(tmp_path):
    root = write_folder(tmp_path / "data", sizes=((40, 52), (64, 64), (90, 70)))
    out = tmp_path / "run"
    train_here(["--recipe", "seed-simpsons", "--data-dir", str(root), "--batch-size", "6", "--eval-batch-size", "8",
           "--epochs", "1", "--max-steps", "2", "--output-dir", str(out)])   # resnet18, 64 px, flips, auto
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["arch"] == "resnet18" and ckpt["config"]["vflip"] and ckpt["config"]["normalize"] == "auto"
    assert ckpt["image_size"] == 64 and ckpt["in_channels"] == 3 and ckpt["classes"] == ["apple", "mango", "zebra"]
    ref_mean, ref_std = numpy_stats(root, 64)
    assert np.allclose(ckpt["mean"], ref_mean, atol=1e-6) and np.allclose(ckpt["std"], ref_std, atol=1e-6)


def test_file_backed_run_end_to_end(tmp_path):
    root = write_folder(tmp_path / "data", sizes=((30, 30),), mode="L")
    out = tmp_path / "run"
    train_here(tiny_run(out, "--loader", "files", "--workers", "1", "--epochs", "1", "--max-steps", "2",
                        dataset="imagefolder", data=root, batch=6))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["in_channels"] == 1 and ckpt["image_size"] == 30
    ref_mean, ref_std = numpy_stats(root, None, 1)
    assert np.allclose(ckpt["mean"], ref_mean, atol=1e-6) and np.allclose(ckpt["std"], ref_std, atol=1e-6)


def test_seed_recipes_hold_the_seeds_settings():
    c = build_config(["--recipe", "seed-simpsons"])
    assert (c.arch, c.dataset, c.image_size, c.optimizer, c.lr, c.batch_size, c.epochs, c.weight_decay) == \
        ("resnet18", "imagefolder", 64, "adam", 1e-3, 256, 120, 0.0)
    assert c.hflip and c.vflip and c.crop_padding == 0 and c.scheduler == "none"
    c = build_config(["--recipe", "seed-pretrained"])
    assert (c.arch, c.pretrained, c.optimizer, c.lr, c.weight_decay, c.batch_size, c.epochs) == \
        ("tv:resnet18", True, "adam", 1e-3, 5e-3, 64, 30)
    assert c.normalize == "imagenet"


def test_pretrained_recipe_runs_on_a_folder(tmp_path):
    """The fine-tune recipe's model and data path (ImageNet weights are not available offline, so none)."""
    root = write_folder(tmp_path / "data", sizes=((40, 52), (64, 64)))
    out = tmp_path / "run"
    train_here(["--recipe", "seed-pretrained", "--no-pretrained", "--data-dir", str(root), "--image-size", "32",
           "--batch-size", "6", "--epochs", "1", "--max-steps", "1", "--output-dir", str(out)])
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["arch"] == "tv:resnet18" and ckpt["num_classes"] == 3
    assert np.allclose(ckpt["mean"], stats.IMAGENET[0]) and np.allclose(ckpt["std"], stats.IMAGENET[1])
