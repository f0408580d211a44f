"""dtrain export: safetensors weights that predict like the checkpoint, ONNX that agrees with torch."""
import csv
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, env, predict_here, run_here, tiny_run, train_here, write_cifar


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cnn trained briefly with EMA on a generated CIFAR-10 folder: (data root, best.pt)."""
    root = tmp_path_factory.mktemp("export")
    data = write_cifar(root / "data", n_train=96, n_test=40)
    out = root / "run"
    train_here(tiny_run(out, "--epochs", "2", "--ema", "0.9", data=data))
    return data, out / "best.pt"


def export(*args):
    """dtrain export ARGS, in this process (its exit status, stdout and stderr)."""
    return run_here("export", list(args), status=None)


def labelled_split(ckpt, data):
    """The generated test split as the checkpoint's run reads it: (uint8 N x C x H x W, labels)."""
    from dtrain.config import config_from_dict
    from dtrain.data import load_dataset
    cfg = config_from_dict(ckpt["config"])
    cfg.data_dir = str(data)
    _, val = load_dataset(cfg)
    return val.images.permute(0, 3, 1, 2).contiguous(), val.labels


def torch_logits(ckpt, images):
    from dtrain.data.augment import AugmentSpec, Pipeline
    from dtrain.models import model_from_checkpoint
    with torch.no_grad():
        return model_from_checkpoint(ckpt)(Pipeline(AugmentSpec(), ckpt["mean"], ckpt["std"], "cpu")(images))


def test_safetensors_holds_the_ema_weights_and_predicts_like_the_checkpoint(trained, tmp_path):
    from dtrain.checkpoint import load_checkpoint
    from dtrain.checkpoint import load_safetensors
    data, best = trained
    r = export(best, "--format", "safetensors", "--output", tmp_path / "model.safetensors")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    ckpt, exported = load_checkpoint(best), load_safetensors(tmp_path / "model.safetensors")
    for key in ("arch", "arch_args", "num_classes", "in_channels", "image_size", "classes", "mean", "std", "config"):
        assert exported[key] == ckpt[key], key
    assert set(exported["model"]) == set(ckpt["model"])
    assert all(torch.equal(exported["model"][k], ckpt["model"][k]) for k in ckpt["model"])
    trained_weights = ckpt["train_model"]        # the EMA run kept both: the export holds the average
    assert any(not torch.equal(exported["model"][k], trained_weights[k]) for k in trained_weights)
    images, labels = labelled_split(ckpt, data)
    want, got = torch_logits(ckpt, images), torch_logits(exported, images)
    assert len(labels) == 40
    assert torch.equal(got, want)
    assert torch.equal(got.argmax(1), want.argmax(1))


@pytest.mark.slow
def test_predict_reads_the_safetensors_like_the_checkpoint(trained, tmp_path):
    data, best = trained
    model = tmp_path / "model.safetensors"
    assert export(best, "--format", "safetensors", "--output", model).returncode == 0
    for ckpt, name in ((best, "pt.csv"), (model, "st.csv")):
        predict_here(["--checkpoint", ckpt, "--dataset", "cifar10", "--data-dir", data, "--split", "test",
                      "--output", tmp_path / name])
    assert (tmp_path / "pt.csv").read_text() == (tmp_path / "st.csv").read_text()


def test_onnx_agrees_with_torch_on_generated_images_at_any_batch_size(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from dtrain.checkpoint import load_checkpoint
    from dtrain.export import onnx_session
    data, best = trained
    r = export(best, "--format", "onnx", "--output", tmp_path / "model.onnx")
    assert r.returncode == 0, r.stderr
    assert "max abs difference" in r.stdout
    ckpt = load_checkpoint(best)
    images, _ = labelled_split(ckpt, data)
    want = torch_logits(ckpt, images).numpy()
    session = onnx_session(tmp_path / "model.onnx")
    assert [i.name for i in session.get_inputs()] == ["images"]
    x = images.float().numpy() / 255
    for batch in (x[:1], x[:7], x):
        got = session.run(["logits"], {"images": batch})[0]
        assert got.shape == (len(batch), 10)
        np.testing.assert_allclose(got, want[: len(batch)], atol=1e-4, rtol=0)
        assert (got.argmax(1) == want[: len(batch)].argmax(1)).all()


@pytest.mark.process
@pytest.mark.slow
def test_onnx_gives_the_top1_of_dtrain_predict_on_real_images(trained, shared_data, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from PIL import Image
    from dtrain.checkpoint import load_checkpoint
    from dtrain.export import onnx_session
    _, best = trained
    real = tmp_path / "real"
    subprocess.run([sys.executable, str(shared_data / "export.py"), "imagefolder", str(real), "--train", "100",
                    "--test", "60"], check=True, capture_output=True, timeout=300)
    predict_here(["--checkpoint", best, "--dataset", "imagefolder", "--data-dir", real, "--split", "test",
                  "--output", tmp_path / "predictions.csv", "--no-cache"])
    with open(tmp_path / "predictions.csv", newline="") as f:
        predicted = {row["id"]: row["label"] for row in csv.DictReader(f)}
    assert len(predicted) == 60
    assert export(best, "--format", "onnx", "--output", tmp_path / "model.onnx").returncode == 0
    ids = sorted(predicted)
    x = np.stack([np.asarray(Image.open(real / i).convert("RGB"), dtype=np.float32) / 255 for i in ids])
    logits = onnx_session(tmp_path / "model.onnx").run(["logits"], {"images": x.transpose(0, 3, 1, 2)})[0]
    classes = load_checkpoint(best)["classes"]
    assert [classes[k] for k in logits.argmax(1)] == [predicted[i] for i in ids]


def test_errors_are_one_clear_line(trained, tmp_path):
    _, best = trained
    r = export(best, "--format", "tflite", "--output", tmp_path / "m.tflite")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown --format 'tflite'" in r.stderr
    broken = tmp_path / "broken.pt"
    broken.write_bytes(best.read_bytes()[:5000])
    r = export(broken, "--format", "safetensors", "--output", tmp_path / "b.safetensors")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot be read" in r.stderr
    assert not (tmp_path / "b.safetensors").exists()
    (tmp_path / "file").write_text("x")
    r = export(best, "--format", "safetensors", "--output", tmp_path / "file" / "m.safetensors")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a writable folder" in r.stderr
    r = export(best, "--format", "safetensors", "--output", tmp_path / "file")
    assert r.returncode == 2 and "exists" in r.stderr and (tmp_path / "file").read_text() == "x"
    r = export(best, "--format", "safetensors", "--output", best)
    assert r.returncode == 2 and "the checkpoint itself" in r.stderr
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"not safetensors at all")
    from dtrain.errors import UserError
    from dtrain.checkpoint import load_safetensors
    with pytest.raises(UserError, match="cannot be read as safetensors"):
        load_safetensors(fake)


@pytest.mark.process
def test_onnx_without_the_extra_says_how_to_install_it(trained, tmp_path):
    _, best = trained
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named onnxruntime')\n")
    # a real process: an interpreter that finds the shadow package first
    r = subprocess.run([sys.executable, "-m", "dtrain.export", str(best), "--format", "onnx", "--output",
                        str(tmp_path / "m.onnx")], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=env(PYTHONPATH=f"{tmp_path / 'shadow'}:{REPO}"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert 'pip install -e ".[export]"' in r.stderr
    assert not (tmp_path / "m.onnx").exists()
