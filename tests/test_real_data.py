"""Training on real CIFAR-10 images (../shared/data; skipped where absent)."""
import subprocess
import sys

import pytest

from helpers import metrics, tiny_run, train_here


@pytest.mark.process
@pytest.mark.slow
def test_cnn_learns_real_cifar(shared_data, tmp_path):
    """5,000 real training images, 3 epochs (about a minute on one core): >= 40% on 1,000 real test images
    (47% when measured; 10% is chance)."""
    subprocess.run([sys.executable, str(shared_data / "export.py"), "cifar", str(tmp_path / "c"), "--train", "5000",
                    "--test", "1000"], check=True, capture_output=True)
    out = tmp_path / "run"
    train_here(tiny_run(out, "--epochs", "3", "--lr", "0.05", "--scheduler", "onecycle", data=tmp_path / "c", batch=64))
    rows = metrics(out)
    assert rows[-1]["val_samples"] == 1000
    assert rows[-1]["val_acc"] >= 0.40, rows[-1]
