"""CIFAR-100 in its real pickle layout (fine and coarse labels) and top-5 accuracy, from the reader to
metrics.jsonl, the console, TensorBoard, W&B, run.png and `dtrain summarize`."""
import csv
import importlib.util
import json
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dtrain.settings import build_config
from dtrain.data import cifar, load_dataset, stats
from dtrain.inference import top_k_accuracy
from dtrain.errors import UserError
from dtrain.models import build_model, list_archs
from helpers import REPO, env, metrics, predict_here, run_here, tiny_run, train, train_here, write_cifar100, \
    write_python2_pickles


def base(data, out, *more):
    """One epoch of the tiny run on the CIFAR-100 folder `data`."""
    return tiny_run(out, "--epochs", "1", *more, dataset="cifar100", data=data, batch=50)


@pytest.fixture(scope="module")
def c100(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("c100"))


def config(root, *extra):
    return build_config(["--arch", "cnn", "--dataset", "cifar100", "--data-dir", str(root), "--no-download", *extra])


def test_reads_fine_labels_by_default_in_the_real_layout(c100):
    train_set, test_set = load_dataset(config(c100))
    raw = pickle.load(open(c100 / "cifar-100-python" / "train", "rb"))
    assert train_set.images.shape == (300, 32, 32, 3) and len(test_set) == 100
    assert train_set.classes == [f"fine{i}" for i in range(100)]
    assert train_set.labels.tolist() == raw["fine_labels"]
    # 3072 = R plane, G plane, B plane, each row-major
    assert np.array_equal(train_set.images[7].numpy(), raw["data"][7].reshape(3, 32, 32).transpose(1, 2, 0))


def test_coarse_labels_give_the_20_superclasses(c100):
    train_set, test_set = load_dataset(config(c100, "--cifar100-labels", "coarse"))
    raw = pickle.load(open(c100 / "cifar-100-python" / "test", "rb"))
    assert train_set.classes == [f"coarse{i}" for i in range(20)]
    assert test_set.labels.tolist() == raw["coarse_labels"] and int(test_set.labels.max()) <= 19


def test_dataset_normalisation_is_cifar100s_published_mean_and_std(c100):
    train_set, _ = load_dataset(config(c100))
    assert stats.resolve("dataset", train_set) == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def test_python2_pickles_with_byte_keys(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (6, 3072), dtype=np.uint8)
    split = {"data": x, "fine_labels": [0, 1, 2, 3, 4, 99], "coarse_labels": [0, 0, 1, 1, 2, 19]}
    meta = {"fine_label_names": [f"f{i}".encode() for i in range(100)],
            "coarse_label_names": [f"c{i}".encode() for i in range(20)]}
    write_python2_pickles(tmp_path / "cifar-100-python", {"train": split, "test": split, "meta": meta})
    train_set, _ = cifar.read(tmp_path, cifar.CIFAR100)
    assert train_set.labels.tolist() == [0, 1, 2, 3, 4, 99] and train_set.classes[99] == "f99"
    assert cifar.read(tmp_path, cifar.CIFAR100_COARSE)[0].classes[19] == "c19"


def _rewrite(root, name, **entries):
    path = root / "cifar-100-python" / name
    d = pickle.load(open(path, "rb"))
    d.update(entries)
    with open(path, "wb") as f:
        pickle.dump(d, f)


def test_float_pixels_float_labels_and_code_are_refused(tmp_path):
    root = write_cifar100(tmp_path, 20, 10)
    raw = pickle.load(open(root / "cifar-100-python" / "train", "rb"))
    _rewrite(root, "train", data=raw["data"].astype(np.float32) / 255)
    with pytest.raises(UserError, match="pixels must be integers 0..255"):
        cifar.read(root, cifar.CIFAR100)
    _rewrite(root, "train", data=raw["data"], fine_labels=np.asarray(raw["fine_labels"], dtype=np.float64))
    with pytest.raises(UserError, match="labels must be integers"):
        cifar.read(root, cifar.CIFAR100)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(root / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({"fine_label_names": Evil()}, f)
    with pytest.raises(UserError, match="not a readable CIFAR batch"):
        cifar.read(root, cifar.CIFAR100)


def test_missing_meta_and_labels_out_of_range_are_clear_errors(tmp_path):
    root = write_cifar100(tmp_path, 20, 10)
    _rewrite(root, "test", coarse_labels=[25] * 10)
    with pytest.raises(UserError, match=r"labels outside 0..19"):
        cifar.read(root, cifar.CIFAR100_COARSE)
    (root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(UserError, match="meta not found.*cifar-100-python.tar.gz"):
        cifar.read(root, cifar.CIFAR100)


def test_coarse_labels_on_another_dataset_and_unknown_kinds_are_refused():
    for flags, message in ((["--cifar100-labels", "coarse"], "--cifar100-labels coarse needs --dataset cifar100"),
                           (["--dataset", "cifar100", "--cifar100-labels", "super"], "invalid choice: 'super'")):
        assert message in run_here("main", ["--arch", "cnn", *flags], status=2).stderr


def test_absent_without_download_names_the_files(tmp_path):
    with pytest.raises(UserError, match=r"CIFAR-100 not found.*--no-download.*cifar-100-python/train, test, meta"):
        load_dataset(config(tmp_path / "nowhere"))


def test_downloads_torchvisions_archive_when_absent(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu
    asked = []

    def offline(url, download_root, md5=None, **kw):
        asked.append((url, md5))
        raise OSError("network is unreachable")
    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    cfg = build_config(["--arch", "cnn", "--dataset", "cifar100", "--data-dir", str(tmp_path)])
    t = time.time()
    with pytest.raises(UserError, match="downloading it failed.*network is unreachable.*train, test, meta"):
        load_dataset(cfg)
    assert time.time() - t < 30
    assert asked == [("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")]


@pytest.mark.parametrize("arch", [*list_archs(), "tv:resnet18"])
def test_every_arch_takes_100_and_20_classes(arch):
    x = torch.randn(2, 3, 32, 32)
    for k in (100, 20):
        model = build_model(arch, k, 3, 32).eval()
        with torch.no_grad():
            assert model(x).shape == (2, k)


def test_top_k_accuracy_counts_ranks_and_never_falls_below_top1():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3], [0, 1, 2, 3, 4, 5, 6], [1, 1, 1, 1, 1, 1, 1]])
    targets = torch.tensor([4, 0, 6])     # rank 5, rank 7, a tie everywhere
    preds = logits.argmax(1)
    assert top_k_accuracy(logits, targets, preds, 5) == pytest.approx(2 / 3)
    assert top_k_accuracy(logits, torch.tensor([0, 6, 0]), preds, 5) == 1.0


def test_the_cifar100_recipe_is_listed_and_resolves():
    r = run_here("main", ["--list-recipes"])
    assert r.returncode == 0 and "cifar100-resnet18" in r.stdout.split()
    c = build_config(["--recipe", "cifar100-resnet18"])
    assert (c.arch, c.dataset, c.cifar100_labels, c.scheduler, c.milestones) == \
        ("resnet18", "cifar100", "fine", "multistep", [60, 120, 160])


def hits(out, root, kind) -> tuple[int, int, int]:
    """(top-1 hits, top-5 hits, images) of the model in out/last.pt (the one evaluated last) on the test
    images, computed here from the files."""
    from dtrain.models import model_from_checkpoint
    ckpt = torch.load(out / "last.pt", weights_only=True)
    _, test_set = cifar.read(root, kind)
    mean = torch.tensor(ckpt["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(ckpt["std"]).view(1, 3, 1, 1)
    x = (test_set.images.permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        logits = model_from_checkpoint(ckpt)(x)
    y = test_set.labels
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1)
    return int((logits.argmax(1) == y).sum()), int(top5.sum()), len(y)


@pytest.mark.process
@pytest.mark.slow
def test_trains_and_reports_top5_everywhere(c100, tmp_path):
    out = tmp_path / "run"
    extra = ["--plots", "--wandb"] + (["--tensorboard"] if importlib.util.find_spec("tensorboard") else [])
    # a real process: W&B's process-wide set-up reads HOME and WANDB_MODE once and starts a service process
    r = train(base(c100, out, *extra), timeout=300, extra_env={"WANDB_MODE": "offline", "HOME": tmp_path / "home"})
    row = metrics(out)[-1]
    assert 0.0 <= row["val_acc"] <= row["val_top5"] <= 1.0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["num_classes"] == 100 and ckpt["mean"] == pytest.approx([0.5071, 0.4865, 0.4409])
    top1, top5, n = hits(out, c100, cifar.CIFAR100)
    assert row["val_samples"] == n == 100
    assert round(row["val_acc"] * n) == top1 and round(row["val_top5"] * n) == top5
    # the console table has the column and the value
    header = next(line for line in r.stdout.splitlines() if "val_acc" in line)
    values = r.stdout.splitlines()[r.stdout.splitlines().index(header) + 1]
    assert "val_top5" in header and f"{row['val_top5']:.2%}" in values
    wandb_data = b"".join(p.read_bytes() for p in (out / "wandb").glob("offline-run-*/*.wandb"))
    assert b"epoch/val_top5" in wandb_data
    assert (out / "run.png").read_bytes()[:4] == b"\x89PNG"
    if "--tensorboard" in extra:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        acc = EventAccumulator(str(out / "tb"))
        acc.Reload()
        assert [e.value for e in acc.Scalars("epoch/val_top5")] == [pytest.approx(row["val_top5"])]
    s = subprocess.run([sys.executable, "-m", "dtrain.summarize", str(out), "--out", str(tmp_path / "sum")],
                       capture_output=True, text=True, env=env(COLUMNS=200), cwd=REPO, timeout=120)
    assert s.returncode == 0, s.stderr
    assert "final top-5" in s.stdout and f"{row['val_top5']:.2%}" in s.stdout
    with open(tmp_path / "sum" / "summary.csv", newline="") as f:
        assert float(next(csv.DictReader(f))["final_top5_mean"]) == pytest.approx(row["val_top5"])


@pytest.mark.process
def test_coarse_labels_on_two_processes_count_each_image_once(tmp_path):
    """20 superclasses, 101 test images split over 2 processes: top-5 counts each image once."""
    root = write_cifar100(tmp_path / "data", n_train=200, n_test=101)
    out = tmp_path / "run"
    train(base(root, out, "--cifar100-labels", "coarse", "--max-steps", "2"), nproc=2)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["num_classes"] == 20 and ckpt["classes"][:2] == ["coarse0", "coarse1"]
    assert ckpt["model"]["fc.weight"].shape[0] == 20
    row = metrics(out)[-1]
    top1, top5, n = hits(out, root, cifar.CIFAR100_COARSE)
    assert row["val_samples"] == n == 101
    assert round(row["val_acc"] * n) == top1 and round(row["val_top5"] * n) == top5 and top5 >= top1
    # predict scores the same checkpoint on the same split: the same top-1 accuracy
    p = predict_here(["--checkpoint", out / "last.pt", "--dataset", "cifar100", "--data-dir", root, "--split", "test",
                      "--output", tmp_path / "pred.csv"])
    assert f"{top1 / n:.2%}" in p.stdout + p.stderr


def test_ten_classes_have_top5_and_five_or_fewer_have_null(cifar_dir, tmp_path):
    train_here(tiny_run(tmp_path / "c10", "--epochs", "1", "--max-steps", "1", data=cifar_dir, batch=50))
    assert metrics(tmp_path / "c10")[-1]["val_top5"] is not None
    r = train_here(tiny_run(tmp_path / "five", "--num-classes", "5", "--epochs", "1"))
    text = (tmp_path / "five" / "metrics.jsonl").read_text()
    assert '"val_top5": null' in text and json.loads(text)["val_acc"] is not None
    assert "val_top5" not in r.stdout and "val_acc" in r.stdout
