"""SAM, SWA and Muon: each update against its formula, and end to end in real runs (resumed exactly; SAM on
one process with --grad-accum 2 takes the steps of two processes)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dtrain import sam
from dtrain.checkpoint import load_checkpoint
from dtrain.muon import MuonWithAuxiliary, matrix, muon_groups
from dtrain.swa import SWA
from helpers import tiny_run, train, train_here


def tiny_net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_gradient_is_the_two_pass_formula(adaptive):
    """By hand: g1 at w; e = rho g1 / ||g1|| (adaptive: rho T^2 g1 / ||T g1||, T = |w| + 0.01 for weights and 1
    for biases, as ASAM's authors' code); the gradient taken at w + e; the weights back at w afterwards."""
    net, rho = tiny_net(), 0.3
    x, y = torch.randn(8, 5, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss_of = lambda: nn.functional.cross_entropy(net(x), y)  # noqa: E731
    params = list(net.parameters())
    w = [p.detach().clone() for p in params]
    g1 = torch.autograd.grad(loss_of(), params)
    weights = [name.endswith("weight") for name, _ in net.named_parameters()]
    t = [wi.abs() + 0.01 if adaptive and is_weight else torch.ones_like(wi) for wi, is_weight in zip(w, weights)]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g1)))
    e_hand = [rho * ti * ti * gi / norm for ti, gi in zip(t, g1)]
    shifted = copy.deepcopy(net)
    with torch.no_grad():
        for p, e in zip(shifted.parameters(), e_hand):
            p.add_(e)
    g2_hand = torch.autograd.grad(nn.functional.cross_entropy(shifted(x), y), list(shifted.parameters()))

    e = sam.perturbation(params, list(g1), rho, weights if adaptive else None)
    with sam.moved(params, e):
        g2 = torch.autograd.grad(loss_of(), params)
    for a, b in zip(e, e_hand):
        torch.testing.assert_close(a, b)
    for a, b in zip(g2, g2_hand):
        torch.testing.assert_close(a, b)
    assert all(torch.equal(p, wi) for p, wi in zip(params, w))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_an_overflowed_first_pass_moves_nothing(bad):
    """fp16: the scaled first-pass gradient overflowed (the GradScaler will skip the step); moving the weights
    by inf * 0 would leave NaN in BatchNorm's buffers through the second pass, so e is 0."""
    net = tiny_net()
    params = list(net.parameters())
    grads = [torch.ones_like(p) for p in params]
    grads[1][0] = bad
    for adaptive in (None, [True] * len(params)):
        e = sam.perturbation(params, grads, 0.05, adaptive)
        assert all(torch.equal(x, torch.zeros_like(x)) for x in e)


def test_sam_leaves_batchnorm_statistics_to_the_first_pass():
    bn = nn.BatchNorm1d(3)
    bn(torch.randn(16, 3))
    before = bn.running_mean.clone()
    with sam.running_stats_frozen(bn):
        bn(torch.randn(16, 3) + 5)
    assert torch.equal(bn.running_mean, before) and bn.momentum == 0.1


def test_swa_averages_the_weights_and_recomputes_batchnorm_like_torch():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    swa, snapshots = SWA(net), []
    for k in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.full_like(p, 0.1 * (k + 1)))
        swa.update(net)
        snapshots.append([p.detach().clone() for p in net.parameters()])
    for p, *versions in zip(swa.module.parameters(), *snapshots):
        torch.testing.assert_close(p, torch.stack(versions).mean(0))
    batches = [torch.randn(10, 4, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    reference = copy.deepcopy(swa.average)
    torch.optim.swa_utils.update_bn(batches, reference)
    swa.recompute_batchnorm(iter(batches), accelerator=type("One", (), {"num_processes": 1})())
    torch.testing.assert_close(swa.module[1].running_mean, reference.module[1].running_mean)
    torch.testing.assert_close(swa.module[1].running_var, reference.module[1].running_var)


@pytest.mark.parametrize("layout", ["matrix", "conv", "conv channels_last"])
def test_muon_update_of_a_weight_is_orthogonal(layout):
    """The step of a weight of 2+ dimensions, as the (out, in x kh x kw) matrix, has singular values near 1
    (Newton-Schulz's quintic puts them in about 0.5..1.5); the head goes to SGD, like the biases."""
    torch.manual_seed(0)
    if layout == "matrix":
        body = nn.Linear(48, 16)
        x = torch.randn(32, 48)
    else:
        body = nn.Conv2d(8, 16, 3)
        x = torch.randn(32, 8, 5, 5)
    net = nn.Sequential(body, nn.Flatten(), nn.LazyLinear(3))
    net(x)
    if layout == "conv channels_last":
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    groups = muon_groups(net, muon_lr=0.1, muon_weight_decay=0.0, aux="sgd", lr=0.01, weight_decay=0.0)
    assert [g["algorithm"] for g in groups] == ["muon", "sgd", "sgd"]
    assert groups[0]["params"] == [body.weight] and groups[1]["params"] == [net[2].weight]
    opt = MuonWithAuxiliary(groups, momentum=0.0, nesterov=False)
    before = body.weight.detach().clone()
    for p in net.parameters():   # full-rank gradients (a real batch's are often of low rank here)
        p.grad = torch.randn_like(p)
    opt.step()
    step = matrix(before - body.weight.detach()) / 0.1     # adjust_lr: sqrt(max(1, rows / columns)) = 1 here
    s = torch.linalg.svdvals(step.float())
    assert s.min() > 0.4 and s.max() < 1.6, s


def tiny(out, *extra):
    return tiny_run(out, "--epochs", "3", "--scheduler", "none", "--lr", "0.05", *extra, size=96, batch=16)


@pytest.mark.parametrize("extra", [["--sam", "0.05", "--sam-adaptive"], ["--swa-start", "1", "--swa-lr", "0.02"],
                                   ["--optimizer", "muon", "--muon-lr", "0.02", "--bias-lr-scale", "4"]],
                         ids=["sam", "swa", "muon"])
def test_resume_is_exact_with(extra, tmp_path):
    """Stopped mid-epoch 2 (--max-steps) and resumed == straight, bit for bit (SWA's average included)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    r = train_here(tiny(straight, *extra))
    train_here(tiny(split, *extra, "--max-steps", "9"))
    train_here(tiny(split, *extra, "--resume", "auto"))
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert a["step"] == b["step"] == 18
    for key in ("model", "train_model") if "train_model" in a else ("model",):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    if "--swa-start" in extra:
        assert a["swa"]["count"] == b["swa"]["count"] == 2
    if "muon" in extra:  # the start-up names each group: Muon's at --muon-lr, the rest at --lr (x4 for biases)
        line = next(x for x in r.stdout.splitlines() if x.startswith("optimiser: "))
        assert line.startswith("optimiser: muon on ") and "(lr 0.02," in line and "sgd on" in line, line
        assert "(lr 0.05," in line and "(lr 0.2," in line, line


@pytest.mark.process
def test_sam_on_one_process_with_two_micro_batches_trains_like_two_processes(cifar_dir, tmp_path):
    """SAM's first pass is each process's own (m-sharpness): one process with --grad-accum 2 takes the
    steps two processes take."""
    args = ["--arch", "cnn", "--data-dir", cifar_dir, "--no-download", "-b", "40", "--eval-batch-size", "64",
            "--workers", "0", "--norm", "group", "--epochs", "1", "--lr", "0.05", "--sam", "0.1", "--no-augment"]
    train_here([*args, "--grad-accum", "2", "--output-dir", tmp_path / "one"])
    train([*args, "--output-dir", tmp_path / "two"], nproc=2)
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("one", "two"))
    assert max((a[k] - b[k]).abs().max() for k in a) <= 1e-5


def test_the_alternating_flip_flips_each_image_every_other_epoch():
    from dtrain.data.augment import alternating
    index = torch.arange(10000)
    first, second, third = (alternating(index, e, seed=3) for e in (0, 1, 2))
    assert torch.equal(first, ~second) and torch.equal(first, third)
    assert 0.48 < first.float().mean() < 0.52
    assert not torch.equal(first, alternating(index, 0, seed=4))


def test_muon_resumed_with_another_memory_layout_steps_as_if_never_stopped():
    """A checkpoint of a channels_last run resumed without --channels-last: the momentum buffers take the
    weights' layout (Muon flattens both the same way), so the next step is the one the first run takes."""
    import copy
    from dtrain.optim import OptimSpec, build_optimizer
    from dtrain.settings import build_config
    spec = OptimSpec.from_config(build_config(["--arch", "cnn", "--optimizer", "muon"]))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last)
    opt = build_optimizer(spec, net, torch.device("cpu"))
    for _ in range(2):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    other = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    resumed = build_optimizer(spec, other, torch.device("cpu"))
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((net, opt), (other, resumed)):
        o.zero_grad()
        m(x.contiguous()).square().mean().backward()
        o.step()
    for a, b in zip(net.parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_muon_groups_are_named_at_their_own_lr_under_warm_up(tmp_path):
    """The start-up line gives each group's configured LR, not the first warm-up step's."""
    r = train_here(tiny(tmp_path / "run", "--optimizer", "muon", "--muon-lr", "0.02", "--warmup-epochs", "2",
                        "--max-steps", "1"))
    line = next(x for x in r.stdout.splitlines() if x.startswith("optimiser: "))
    assert "(lr 0.02," in line and "(lr 0.05," in line, line
