"""best.pt always holds the state whose accuracy the run records as best: a kill -9 between writing
last.pt and copying it to best.pt is repaired at the next resume."""
import shutil

import pytest
import torch

from helpers import tiny_run, train_here


def run_args(cifar_dir, out, *more):
    return tiny_run(out, "--lr", "0.05", "--seed", "0", *more, data=cifar_dir, batch=40)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_best_matches(out):
    last, best = load(out / "last.pt"), load(out / "best.pt")
    assert best["step"] == last["best_step"] and best["best_acc"] == last["best_acc"]
    assert best["best_step"] == best["step"]
    return last, best


@pytest.mark.slow
def test_a_kill_between_last_and_best_is_repaired_at_resume(cifar_dir, tmp_path):
    out = tmp_path / "run"
    train_here(run_args(cifar_dir, out, "--epochs", "1"))
    epoch1 = tmp_path / "epoch1-best.pt"
    shutil.copy(out / "best.pt", epoch1)
    train_here(run_args(cifar_dir, out, "--epochs", "2", "--resume", "auto"))
    last = load(out / "last.pt")
    assert last["best_step"] == last["step"] == 10, "epoch 2 must be the best for this scenario"
    # the state a kill -9 after last.pt's write and before best.pt's copy leaves: best.pt still epoch 1's
    shutil.copy(epoch1, out / "best.pt")
    r = train_here(run_args(cifar_dir, out, "--epochs", "2", "--resume", "auto"))
    assert f"{out / 'best.pt'} was older than the best state" in r.stdout, r.stdout
    _, best = assert_best_matches(out)
    assert best["step"] == 10
    for k, v in last["model"].items():
        assert torch.equal(best["model"][k], v), k
    # in sync now: a further resume leaves best.pt alone
    before = (out / "best.pt").stat().st_mtime_ns
    r = train_here(run_args(cifar_dir, out, "--epochs", "2", "--resume", "auto"))
    assert "was older" not in r.stdout and (out / "best.pt").stat().st_mtime_ns == before


def test_a_missing_best_pt_is_rewritten_when_last_pt_is_the_best(cifar_dir, tmp_path):
    out = tmp_path / "run"
    train_here(run_args(cifar_dir, out, "--epochs", "1"))
    (out / "best.pt").unlink()                       # the kill came before best.pt's first copy
    train_here(run_args(cifar_dir, out, "--epochs", "1", "--resume", "auto"))
    assert_best_matches(out)
