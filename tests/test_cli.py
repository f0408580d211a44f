"""The `dtrain` command: `python -m dtrain`, the `dtrain.cli:main` console-script function, and
`accelerate launch -m dtrain train` / `torchrun -m dtrain train` on CPU processes (gloo)."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dtrain import cli
from dtrain.checkpoint import load_checkpoint
from helpers import REPO, env, free_port, launch, metrics, tiny_run

FAKE = tiny_run(None, "--epochs", "1", size=32, batch=16)


def run(cmd, timeout=300):
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def assert_one_run(out, text):
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]
    assert [row["epoch"] for row in metrics(out)] == [1]              # one writer
    assert text.count("done:") == 1                                    # one console
    assert load_checkpoint(out / "last.pt")["arch"] == "cnn"


@pytest.mark.process
def test_help_lists_the_commands():
    r = run([sys.executable, "-m", "dtrain", "--help"], timeout=60)
    assert "train" in r.stdout and "predict" in r.stdout


def test_cli_main_function(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and all(name in text for name in ("train", "predict"))
    cli.main(["train", "--list-archs"])                                # the train command's own options
    assert "resnet18" in capsys.readouterr().out.split()
    with pytest.raises(SystemExit) as e:
        cli.main(["trian"])
    assert e.value.code == 2 and "unknown command 'trian'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


@pytest.mark.process
def test_python_m_dtrain_train_then_predict(tmp_path):
    out = tmp_path / "run"
    r = run([sys.executable, "-m", "dtrain", "train", *FAKE, "--output-dir", str(out)])
    assert "world size 1" in r.stdout
    assert_one_run(out, r.stdout)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    r = run([sys.executable, "-m", "dtrain", "predict", "--checkpoint", str(out / "best.pt"), "--image",
             str(tmp_path / "a.png"), "--top-k", "3"])
    lines = r.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.endswith("a.png"))
    assert all(line.split()[0].endswith("%") for line in lines[at + 1: at + 4]), r.stdout


@pytest.mark.process
def test_python_m_dtrain_reports_a_user_error_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dtrain", "train", "--arch", "resnet1000", "--dataset", "fake"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown arch 'resnet1000'"), r.stderr


@pytest.mark.process
def test_accelerate_launch_m_dtrain_train_is_one_two_process_run(tmp_path):
    out = tmp_path / "run"
    r = launch("-m", ["dtrain", "train", *FAKE, "--output-dir", str(out)], nproc=2)
    assert "world size 2" in r.stdout
    assert_one_run(out, r.stdout)


@pytest.mark.process
@pytest.mark.slow
def test_torchrun_m_dtrain_train_is_one_two_process_run(tmp_path):
    out = tmp_path / "run"
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
             "-m", "dtrain", "train", *FAKE, "--output-dir", str(out)])
    assert "world size 2" in r.stdout
    assert_one_run(out, r.stdout)
