"""Resuming: what must match the checkpoint's run is checked before any training, and a difference ends
the run with one line naming it (exit 2); what may change (MAY_CHANGE) is taken from the new run.
Through the real entry point (dtrain.main.main, in process) on real checkpoints."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrain.checkpoint import save_checkpoint
from dtrain.config import FIELDS, MUST_MATCH, RESUME_RULES, SAME_MID_EPOCH, Config, _f, policy
from helpers import cli_error as refused
from helpers import tiny_run, train_here as trained

FAKE = tiny_run(None, "--seed", "0", size=128)


def copy_run(run: Path, to: Path) -> None:
    """A copy of a run's folder to resume in."""
    shutil.copytree(run, to)


@pytest.fixture(scope="module")
def epoch_run(tmp_path_factory) -> Path:
    """A finished 1-epoch run of the cnn on fake data (sgd, BatchNorm, 10 classes, 32 px)."""
    out = tmp_path_factory.mktemp("resume") / "run"
    trained([*FAKE, "--epochs", "1", "--output-dir", out])
    return out / "last.pt"


@pytest.fixture(scope="module")
def mid_epoch_run(tmp_path_factory) -> Path:
    """A run stopped after 2 of the 4 batches of its first epoch."""
    out = tmp_path_factory.mktemp("resume") / "run"
    trained([*FAKE, "--epochs", "1", "--max-steps", "2", "--output-dir", out])
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (0, 2)
    return out / "last.pt"


@pytest.mark.parametrize("flags,message", [
    (["--num-classes", "5"], "the data has 5 classes here but 10 in the checkpoint"),
    (["--norm", "group"], "--norm is 'group' here but 'batch' in the checkpoint"),
    (["--optimizer", "adam"], "--optimizer is 'adam' here but 'sgd' in the checkpoint"),
    (["--image-size", "16"], "--image-size is 16 here but 32 in the checkpoint"),
    (["--fake-size", "160"], "the training data has 160 images here but 128 in the checkpoint's run"),
    (["--dataset", "mnist"], "--dataset is 'mnist' here but 'fake' in the checkpoint"),
    (["--decay-norm-bias=false"], "--decay-norm-bias is False here but True in the checkpoint"),
], ids=["num-classes", "norm", "optimizer", "image-size", "other-data", "dataset", "param-groups"])
def test_a_setting_that_must_match_is_named(epoch_run, tmp_path, flags, message):
    line = refused([*FAKE, "--epochs", "2", "--output-dir", tmp_path / "new", "--resume", epoch_run, *flags])
    assert message in line and f"cannot resume from {epoch_run}" in line, line
    assert not (tmp_path / "new" / "last.pt").exists() and not (tmp_path / "new" / "metrics.jsonl").exists()


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "64"], "--batch-size is 64 here but 32 in the checkpoint"),
    (["--grad-accum", "2"], "--grad-accum is 2 here but 1 in the checkpoint"),
    (["--seed", "1"], "--seed is 1 here but 0 in the checkpoint, which stopped mid-epoch (epoch 1, batch 2)"),
], ids=["batch-size", "grad-accum", "seed"])
def test_mid_epoch_resume_with_another_batch_size_or_order_is_refused(mid_epoch_run, tmp_path, flags, message):
    """Before, another --batch-size silently skipped other samples of the epoch under way."""
    out = tmp_path / "run"
    copy_run(mid_epoch_run.parent, out)
    line = refused([*FAKE, "--epochs", "1", "--output-dir", out, "--resume", "auto", *flags])
    assert message in line, line
    assert torch.load(out / "last.pt", weights_only=True)["batch_in_epoch"] == 2   # the checkpoint is untouched


def test_at_an_epoch_boundary_the_batch_size_must_still_match(epoch_run, tmp_path):
    """Another batch size would leave the step count (and the schedule) counting batches of two sizes: before,
    --epochs 2 with twice the batch size trained nothing and exited 0."""
    out = tmp_path / "run"
    copy_run(epoch_run.parent, out)
    line = refused([*FAKE, "--epochs", "2", "--output-dir", out, "--resume", "auto", "--batch-size", "64"])
    assert "--batch-size is 64 here but 32 in the checkpoint (the run's step count" in line, line
    # the fake data set is drawn from --seed: another seed is other data
    line = refused([*FAKE, "--epochs", "2", "--output-dir", tmp_path / "seed", "--resume", epoch_run, "--seed", "1"])
    assert "as many images as in the checkpoint's run but other labels" in line, line


def test_allowed_changes_resume_and_take_effect(mid_epoch_run, tmp_path):
    """More --epochs, another --lr, --weight-decay, --momentum, --eval-every, logging: the run continues at
    its place, and the optimiser runs with the new settings (not the checkpoint's)."""
    out = tmp_path / "run"
    copy_run(mid_epoch_run.parent, out)
    r = trained([*FAKE, "--epochs", "2", "--output-dir", out, "--resume", "auto", "--lr", "0.05", "--weight-decay",
                 "0", "--momentum", "0.8", "--log-every", "5", "--tensorboard"])
    assert "resumed from" in r.stdout
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]) == (2, 8, 0)
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0 and group["momentum"] == 0.8 and group["lr"] < 0.05
    assert ckpt["config"]["lr"] == 0.05


def image_folder(root: Path, counts: tuple[int, int], seed: int, names=("apple", "kiwi")) -> Path:
    from PIL import Image
    rng = np.random.default_rng(seed)
    for name, n in zip(names, counts):
        for split, k in (("train", n), ("test", 4)):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(k):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_an_image_folder_checkpoint_resumed_on_other_data_is_refused(tmp_path):
    def args(data: Path, out: Path, *more) -> list[str]:
        return tiny_run(out, "--epochs", "1", *more, dataset="imagefolder", data=data, batch=8)
    trained(args(image_folder(tmp_path / "a", (12, 12), 0), tmp_path / "run"))
    ckpt = tmp_path / "run" / "last.pt"

    def resumed_on(data: Path) -> str:
        return refused(args(data, tmp_path / data.name / "run", "--epochs", "2", "--resume", ckpt))
    line = resumed_on(image_folder(tmp_path / "more", (20, 20), 1))
    assert "the training data has 40 images here but 24 in the checkpoint's run" in line, line
    line = resumed_on(image_folder(tmp_path / "same-size", (10, 14), 2))
    assert "the training data has as many images as in the checkpoint's run but other labels" in line, line
    line = resumed_on(image_folder(tmp_path / "renamed", (12, 12), 0, names=("apple", "lime")))
    assert "the class names differ: apple, lime here, apple, kiwi in the checkpoint" in line, line
    line = resumed_on(image_folder(tmp_path / "three", (8, 8, 8), 0, names=("apple", "kiwi", "lime")))
    assert "the data has 3 classes here but 2 in the checkpoint" in line, line


@pytest.mark.parametrize("content", [b"hello, this is a text file\n", bytes(range(256)) * 8, "foreign", "weights"],
                         ids=["text", "random-bytes", "foreign-pt", "weights-only"])
def test_a_file_that_is_no_training_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "given.pt"
    if content == "foreign":
        torch.save({"state_dict": {"w": torch.ones(2)}}, path)
        expected = "is not a dtrain checkpoint"
    elif content == "weights":  # inference metadata and weights, no optimiser or position
        save_checkpoint(path, {"arch": "cnn", "arch_args": {}, "num_classes": 1, "in_channels": 1, "image_size": 8,
                               "classes": ["a"], "mean": [0.5], "std": [0.5], "model": {}})
        expected = "holds weights but no training position"
    else:
        path.write_bytes(content)
        expected = "cannot be read: it is not a PyTorch checkpoint"
    line = refused([*FAKE, "--epochs", "1", "--output-dir", tmp_path / "run", "--resume", path])
    assert expected in line and str(path) in line, line


def test_every_setting_declares_its_resume_rule():
    """A Config field cannot be made without a policy, and a rule that needs the checkpoint's value says why
    (the one-line refusal quotes it)."""
    assert {f.name for f in dataclasses.fields(Config)} == set(FIELDS)
    for name in FIELDS:
        rule = policy(name)
        assert rule.resume in RESUME_RULES, name
        assert bool(rule.why) == (rule.resume in (MUST_MATCH, SAME_MID_EPOCH)), name
    with pytest.raises(TypeError):
        _f(1, "a setting without a policy")
