"""The learning-rate schedule: warm-up, shapes, and the plateau rule."""

import pytest
import torch

from dtrain.settings import build_config
from dtrain.optim import LRSchedule, OptimSpec, ScheduleSpec, build_optimizer


def schedule(*flags, steps_per_epoch=10, total=100):
    cfg = build_config(["--arch", "cnn", "--lr", "1.0", *flags])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    return LRSchedule(opt, ScheduleSpec.from_config(cfg), steps_per_epoch, total)


def lrs(s, n):
    out = [s.lr]
    for _ in range(n):
        s.step()
        out.append(s.lr)
    return out


def test_cosine_with_warmup():
    v = lrs(schedule("--scheduler", "cosine", "--warmup-epochs", "1"), 100)
    assert v[0] == pytest.approx(0.1) and v[9] == pytest.approx(1.0)      # linear warm-up over 10 steps
    assert v[10] == pytest.approx(1.0) and v[55] == pytest.approx(0.5, abs=0.01) and v[100] == pytest.approx(0.0)


def test_multistep_and_onecycle():
    v = lrs(schedule("--scheduler", "multistep", "--milestones", "3", "6", "--gamma", "0.1"), 100)
    assert v[29] == 1.0 and v[30] == pytest.approx(0.1) and v[60] == pytest.approx(0.01)
    v = lrs(schedule("--scheduler", "onecycle"), 100)
    assert v[0] == pytest.approx(0.04) and max(v) == pytest.approx(1.0) and v[100] == 0.0


def test_plateau_halves_after_patience_and_round_trips():
    s = schedule("--scheduler", "plateau", "--plateau-patience", "2", "--plateau-factor", "0.5")
    for loss in [1.0, 0.9, 0.95, 0.95]:
        s.end_epoch({"val_loss": loss})
    assert s.lr == 1.0                        # 2 bad epochs: patience not yet exceeded
    s.end_epoch({"val_loss": 0.95})
    assert s.lr == 0.5
    s2 = schedule("--scheduler", "plateau")
    s2.load_state_dict(s.state_dict())
    assert s2.lr == 0.5


def test_no_weight_decay_on_norm_and_bias():
    cfg = build_config(["--arch", "cnn", "--no-decay-norm-bias", "--weight-decay", "0.1"])
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    opt = build_optimizer(OptimSpec.from_config(cfg), model, torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert len(opt.param_groups[0]["params"]) == 1 and len(opt.param_groups[1]["params"]) == 3


@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_with_swa_a_decaying_schedule_ends_at_swa_lr_where_the_averaging_starts(shape):
    """--swa-start 6 --swa-lr 0.25 over 10 epochs: the schedule runs over the first 6 epochs from 1.0 down to
    0.25 (never below it, and no jump up at the start of the averaging), then holds 0.25."""
    v = lrs(schedule("--scheduler", shape, "--epochs", "10", "--swa-start", "6", "--swa-lr", "0.25"), 100)
    assert v[0] == pytest.approx(1.0) and v[30] == pytest.approx(0.625)
    assert all(a >= b for a, b in zip(v, v[1:])) and min(v) == pytest.approx(0.25)
    assert v[59] > 0.25 and v[60:] == [pytest.approx(0.25)] * 41


def test_swa_at_lr_0_trains_nothing_without_failing():
    assert set(lrs(schedule("--lr", "0", "--epochs", "10", "--swa-start", "5", "--swa-lr", "0.1"), 100)) == {0.0}
