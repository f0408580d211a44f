"""A run whose loss or weights become NaN or infinite stops at once on every process, with exit status 3
and a line naming the step and the last good checkpoint; nothing non-finite is ever saved."""
import json
import math
import re

import pytest
import torch

from dtrain.errors import EXIT_DIVERGED
from helpers import tiny_run, train, train_here


def diverging(out, *more):
    """The tiny run (4 steps an epoch) whose epoch 1 trains at lr 0.01 and whose multistep schedule then
    multiplies the LR by 1e12: epoch 2 diverges."""
    return tiny_run(out, "--log-every", "1", "--epochs", "3", "--lr", "0.01", "--scheduler", "multistep",
                    "--milestones", "1", "--gamma", "1e12", *more, batch=16)

ADVICE = "lower --lr, add --grad-clip, or warm up (--warmup-epochs)"


def refuse(name):
    raise ValueError(f"not strict JSON: {name}")


def strict_rows(out):
    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_finite_checkpoint(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    tensors = [*ckpt["model"].values(), *[t for s in ckpt["optimizer"]["state"].values() for t in s.values()]]
    assert tensors and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), path
    return ckpt


def error_lines(r):
    return [line for line in r.stderr.splitlines() if line.startswith("error: ")]


def diverged_exit(r, nproc):
    """One process (run in this process): its exit status; under accelerate launch, that of the first worker
    to end (the launcher then stops the others), from its report."""
    if nproc == 1:
        return r.returncode
    root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", r.stderr, re.S)
    return int(root.group(1)) if root else r.returncode


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.process)])
def test_divergence_exits_3_naming_the_step_and_the_last_good_checkpoint(tmp_path, nproc):
    out = tmp_path / "run"
    if nproc == 1:
        r = train_here(diverging(out), status=None)
    else:
        r = train(diverging(out), nproc=nproc, check=False, timeout=240)
    assert diverged_exit(r, nproc) == EXIT_DIVERGED == 3, r.stdout + r.stderr
    lines = error_lines(r)
    # the same one line from every rank (a launcher may end a rank before its line reaches the pipe)
    assert 1 <= len(lines) <= nproc and len(set(lines)) == 1, r.stderr
    assert "Traceback" not in r.stderr.split("exitcode")[0], r.stderr
    m = re.fullmatch(r"error: the (training loss|weights) became NaN or infinite (at|by) step (\d+) \(epoch 2\): "
                     r"stopped without saving; the last good checkpoint is (\S+) \(end of epoch 1, step 4\); "
                     + re.escape(ADVICE), lines[0])
    assert m, lines[0]
    assert 4 < int(m.group(3)) <= 8 and m.group(4) == str(out / "last.pt")
    last, best = assert_finite_checkpoint(out / "last.pt"), assert_finite_checkpoint(out / "best.pt")
    assert (last["epoch"], last["step"]) == (1, 4) and best["step"] == 4
    rows = strict_rows(out)
    assert rows and rows[0]["epoch"] == 1 and math.isfinite(rows[0]["train_loss"])


@pytest.mark.process
def test_divergence_in_the_first_epoch_saves_nothing_and_says_so(tmp_path):
    """A real process (python dtrain/main.py): exit status 3 as the shell sees it."""
    out = tmp_path / "run"
    r = train(tiny_run(out, "--epochs", "2", "--lr", "1e4", batch=16), check=False, timeout=240)
    assert r.returncode == 3, r.stdout + r.stderr
    (line,) = error_lines(r)
    assert re.fullmatch(r"error: the (training loss|weights) became NaN or infinite (at|by) step \d+ \(epoch 1\): "
                        r"stopped without saving; no checkpoint was saved before it, so there is nothing to "
                        r"resume; " + re.escape(ADVICE), line), line
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()
    if (out / "metrics.jsonl").exists():
        strict_rows(out)


def test_a_nan_learning_rate_is_refused_before_training(tmp_path):
    r = train_here(["--arch", "cnn", "--dataset", "fake", "--lr", "nan", "--output-dir", tmp_path / "run"], status=2)
    assert r.returncode == 2 and "--lr" in r.stderr, r.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_non_finite_states_are_told_apart(tmp_path):
    from dtrain.checkpoint import all_finite
    good = {"w": torch.ones(3), "n": torch.tensor(5), "opt": {"state": {0: {"m": torch.zeros(2)}}}}
    assert all_finite(good, None)
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not all_finite(good, {"state": {0: {"m": torch.tensor([0.0, bad])}}})
