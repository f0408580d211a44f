"""The CIFAR-10 batch reader on generated batches in the real pickle format."""
import pickle
import time

import numpy as np
import pytest
import torch

from dtrain.settings import build_config
from dtrain.data import cifar
from dtrain.errors import UserError
from helpers import write_cifar, write_python2_pickles


def test_reads_generated_batches(cifar_dir):
    train, test = cifar.read(cifar_dir)
    assert train.images.shape == (200, 32, 32, 3) and train.images.dtype == torch.uint8
    assert test.images.shape == (50, 32, 32, 3) and len(test.labels) == 50
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    # pixel layout: 3072 = R plane, G plane, B plane, each row-major
    raw = pickle.load(open(cifar_dir / "cifar-10-batches-py" / "data_batch_1", "rb"))
    assert np.array_equal(train.images[0].numpy(), raw["data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert train.labels[:5].tolist() == raw["labels"][:5]


def test_reads_original_python2_style_pickles_with_byte_keys(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (7, 3072), dtype=np.uint8)
    batch = {"batch_label": b"x", "labels": [1, 2, 3, 4, 5, 6, 7], "data": x}
    meta = {"label_names": [n.encode() for n in cifar.CLASSES]}
    write_python2_pickles(tmp_path / "cifar-10-batches-py", {"data_batch_1": batch, "test_batch": batch,
                                                             "batches.meta": meta})
    train, test = cifar.read(tmp_path)
    assert len(train) == 7 and train.classes == cifar.CLASSES and train.labels.tolist() == [1, 2, 3, 4, 5, 6, 7]


def test_refuses_pickles_that_carry_code(tmp_path):
    root = write_cifar(tmp_path, 20, 10)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(root / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(UserError, match="not a readable CIFAR batch"):
        cifar.read(root)


def test_missing_data_without_download_names_the_path(tmp_path):
    cfg = build_config(["--arch", "cnn", "--data-dir", str(tmp_path / "nowhere"), "--no-download"])
    with pytest.raises(UserError, match="cifar-10-batches-py") as e:
        cifar.load(cfg)
    assert str(tmp_path / "nowhere") in str(e.value)


def test_failed_download_is_a_clear_error_within_seconds(tmp_path, monkeypatch):
    """Offline (as on these machines) the download fails fast; the message says where to put the data."""
    import torchvision.datasets.utils as tvu

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    cfg = build_config(["--arch", "cnn", "--data-dir", str(tmp_path)])
    t = time.time()
    with pytest.raises(UserError, match="downloading it failed.*network is unreachable.*data_batch_1"):
        cifar.load(cfg)
    assert time.time() - t < 30


def test_training_batches_are_read_in_numeric_order_and_stray_files_ignored(tmp_path):
    root = write_cifar(tmp_path, 30, 10, batches=3)
    d = root / "cifar-10-batches-py"
    (d / "data_batch_3").rename(d / "data_batch_10")
    (d / "data_batch_1.bak").write_bytes((d / "data_batch_1").read_bytes())
    expected = [pickle.load(open(d / f"data_batch_{k}", "rb"))["labels"] for k in (1, 2, 10)]
    train, _ = cifar.read(root)
    assert train.labels.tolist() == sum(expected, [])


def test_image_size_resizes_bilinear_antialiased(cifar_dir):
    """--image-size resizes CIFAR as it does every format (it was ignored: a model that needs 75 px got 32)."""
    cfg = build_config(["--dataset", "cifar10", "--data-dir", str(cifar_dir), "--image-size", "75", "--no-download"])
    native, _ = cifar.read(cifar_dir)
    train, test = cifar.load(cfg)
    assert train.images.shape == (200, 75, 75, 3) and test.images.shape == (50, 75, 75, 3)
    assert train.size == 75 and test.size == 75 and train.images.dtype == torch.uint8
    x = native.images[:3].permute(0, 3, 1, 2).float()
    expected = torch.nn.functional.interpolate(x, size=(75, 75), mode="bilinear", antialias=True, align_corners=False)
    assert torch.equal(train.images[:3], expected.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
    small, _ = cifar.read(cifar_dir, image_size=16)                # shrinking: antialiased
    assert small.images.shape == (200, 16, 16, 3)
    assert torch.equal(cifar.read(cifar_dir, image_size=32)[0].images, native.images)
