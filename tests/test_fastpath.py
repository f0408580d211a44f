"""The fast path on the CPU: GPU-resident loader (sharding, resume), resumable augmentation, bf16 +
channels_last, torch.compile, the airbench arch and recipe, weight averaging (EMA, lookahead), TTA, and
the optimiser/DDP settings behind them."""
import shutil
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from helpers import metrics, tiny_run, train, train_here

from dtrain.settings import build_config
from dtrain.data import fake
from dtrain.data.loader import MemoryLoader
from dtrain.distributed import ddp_kwargs
from dtrain.ema import WeightAverage
from dtrain.inference import predict_logits, tta_logits
from dtrain.optim import LRSchedule, OptimSpec, ScheduleSpec, build_optimizer



# ---- the GPU-resident loader ------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3])
def test_memory_loader_shards_and_resumes(world):
    data = fake.make(103, 10, 8, 3, seed=0)
    loaders = [MemoryLoader(data, torch.device("cpu"), batch_size=8, rank=rank, world=world, seed=5) for rank in range(world)]
    for epoch in range(2):
        seen = []
        for loader in loaders:
            full = list(loader.batches(epoch))
            assert len(full) == len(loader)
            for k in (0, 1, len(full) - 1):
                resumed = list(loader.batches(epoch, k))
                assert len(resumed) == len(full) - k
                for (x, y, i), (x2, y2, i2) in zip(full[k:], resumed):
                    assert torch.equal(i, i2) and torch.equal(x, x2) and torch.equal(y, y2)
            for x, y, i in full:
                assert torch.equal(x, data.images[i].permute(0, 3, 1, 2)) and torch.equal(y, data.labels[i])
                seen.append(i)
        seen = torch.cat(seen)
        assert set(seen.tolist()) == set(range(103))                   # every image, each epoch
        assert len(seen) == -(-103 // world) * world                    # DistributedSampler's padding only
    order = [torch.cat([i for _, _, i in loaders[0].batches(e)]) for e in range(2)]
    assert not torch.equal(order[0], order[1])                          # reshuffled per epoch


def test_memory_loader_eval_shards_count_each_image_once():
    data = fake.make(101, 10, 8, 3, seed=0)
    idx = torch.cat([i for r in range(3) for _, _, i in MemoryLoader(data, "cpu", batch_size=16, rank=r, world=3, train=False).batches()])
    assert sorted(idx.tolist()) == list(range(101))


def test_resumed_run_draws_the_same_augmentations(tmp_path):
    """Stopped after 3 steps (mid-epoch) and resumed to 6 == 6 steps straight, with crop, flip, Cutout on."""
    common = tiny_run(None, "--eval-batch-size", "40", "--epochs", "2", "--crop-padding", "4", "--pad-mode", "reflect",
                      "--cutout-holes", "1", "--cutout-length", "8", "--scheduler", "none", "--lr", "0.05", size=160)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_here([*common, "--max-steps", "6", "--output-dir", str(straight)])
    train_here([*common, "--max-steps", "3", "--output-dir", str(split)])
    train_here([*common, "--max-steps", "6", "--output-dir", str(split), "--resume", "auto"])
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k


# ---- precision, memory format, compile ------------------------------------------------------------------
def test_bf16_channels_last_trains_on_cpu(tmp_path):
    out = tmp_path / "run"
    train_here(tiny_run(out, "--eval-batch-size", "48", "--epochs", "1", "--precision", "bf16", "--channels-last",
                        size=128))
    (row,) = metrics(out)
    assert row["step"] == 4 and 0 < row["train_loss"] < 10 and row["val_acc"] is not None
    assert row["warmup_seconds"] > 0 and row["elapsed_seconds"] >= row["warmup_seconds"]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["precision"] == "bf16" and all(v.dtype != torch.bfloat16 for v in ckpt["model"].values())


def _have_compiler() -> str | None:
    if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        return "no C++ compiler for torch inductor's CPU backend"
    return None


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.skipif(_have_compiler() is not None, reason=str(_have_compiler()))
def test_compile_trains_without_recompiling(tmp_path):
    """--compile: the epoch's short last training batch and the short last evaluation batch run eagerly,
    so nothing is recompiled; the warm-up (compile) is reported; checkpoint keys carry no _orig_mod."""
    out = tmp_path / "run"
    # a real process: torch reads TORCH_LOGS when it is imported, and inductor starts its compile workers
    r = train(tiny_run(out, "--eval-batch-size", "16", "--epochs", "2", "--compile", size=100), timeout=900,
              extra_env={"TORCH_LOGS": "recompiles"})
    log = r.stdout + r.stderr
    # two graphs: evaluation (compiled in the warm-up) and training, which dynamo logs as one recompile
    # triggered by the grad mode; none for the short batches (size/stride guards)
    assert log.count("Recompiling function") <= 1, log[-3000:]
    assert "mismatch" not in log, log[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [4, 8] and rows[-1]["val_acc"] is not None
    assert rows[0]["warmup_seconds"] > 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert not [k for k in ckpt["model"] if k.startswith(("_orig_mod.", "module."))]
    from dtrain.models import model_from_checkpoint
    model_from_checkpoint(ckpt)  # loads strictly


# ---- airbench ------------------------------------------------------------------------------------------
def test_airbench_recipe_settings():
    cfg = build_config(["--arch", "airbench"])
    assert cfg.recipe == "airbench" and cfg.batch_size == 1024 and cfg.label_smoothing == 0.2
    assert cfg.nesterov and cfg.momentum == 0.85 and cfg.bias_lr_scale == 64
    assert cfg.crop_padding == 2 and cfg.pad_mode == "reflect" and cfg.hflip and cfg.tta and cfg.tta_shift == 1
    # the paper's decoupled hyper-parameters: lr*wd per step = 0.0153 * 1024 / (1024 * (1 + 1 / 0.15))
    assert cfg.lr * cfg.weight_decay == pytest.approx(0.0153 / (1 + 1 / 0.15), rel=1e-3)
    assert cfg.lr == pytest.approx(11.5 / (1 + 1 / 0.15), rel=1e-3)
    fast = build_config(["--recipe", "resnet18-fast"])
    assert fast.arch == "resnet18" and fast.precision == "bf16" and fast.channels_last and fast.batch_size == 512


def test_airbench_recipe_trains_on_cpu(tmp_path):
    """The whole arch with its recipe (bf16, channels_last, lookahead, BN-bias LR, shift TTA), briefly."""
    out = tmp_path / "run"
    train_here(tiny_run(out, "--eval-batch-size", "16", "--max-steps", "6", arch="airbench", size=96, batch=32))
    row = metrics(out)[-1]                      # 3 steps an epoch; evaluated at the end only (24 images: 16 + 8)
    assert row["step"] == 6 and row["val_acc"] is not None and row["train_loss"] < 10
    ckpt = torch.load(out / "last.pt", weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(64 * groups[0]["lr"])
    assert groups[1]["weight_decay"] == pytest.approx(groups[0]["weight_decay"] / 64)
    assert ckpt["ema_n"] == 6 and "train_model" in ckpt
    # lookahead at step 5 set the trained weights to the average; step 6 moved them again
    w, avg = ckpt["train_model"]["head.weight"], ckpt["model"]["head.weight"]
    assert not torch.equal(w, avg)


# ---- weight averaging ------------------------------------------------------------------------------------
def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def perturb(model, k):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * (k + 1))
        model[1].running_mean.add_(0.5)
        model[1].num_batches_tracked.add_(1)


def test_ema_matches_torch_averaged_model():
    model = small_net()
    model(torch.randn(2, 3, 6, 6))
    ours = WeightAverage(model, 0.9)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for k in range(5):
        perturb(model, k)
        ours.update_parameters(model)
        ref.update_parameters(model)
    for (name, a), b in zip(ours.module.state_dict().items(), ref.module.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-6), name
        else:  # integer buffers (BatchNorm's step count) are copied, not averaged
            assert torch.equal(a, model.state_dict()[name]), name
    assert int(ours.n_averaged) == 5 and ours.n_averaged.device.type == "cpu"


def test_lookahead_jumps_every_k_steps():
    model = small_net()
    model(torch.randn(2, 3, 6, 6))
    avg = WeightAverage(model, 0.9, lookahead=3)
    w = model[0].weight
    history = []
    for k in range(6):
        perturb(model, k)
        before = w.detach().clone()
        avg.update_parameters(model, progress=1.0)
        history.append((before, w.detach().clone(), avg.module[0].weight.detach().clone()))
    # step 1 copies; steps 2 (n=1) and 4: nothing; step 3 and 6: average with decay 0.9**3, weights jump to it
    assert torch.equal(history[0][2], history[0][0])
    assert torch.equal(history[1][2], history[0][2]) and torch.equal(history[1][1], history[1][0])
    expect = history[1][2] + (1 - 0.9 ** 3) * (history[2][0] - history[1][2])
    assert torch.allclose(history[2][2], expect, atol=1e-6) and torch.equal(history[2][1], history[2][2])
    # ramp: at progress 0 the decay is 0, the average is the model
    m2 = small_net()
    m2(torch.randn(2, 3, 6, 6))
    a2 = WeightAverage(m2, 0.9, lookahead=1)
    a2.update_parameters(m2, 0.0)
    perturb(m2, 0)
    a2.update_parameters(m2, 0.0)
    assert torch.equal(a2.module[0].weight, m2[0].weight)


def test_ema_checkpoint_round_trip(tmp_path):
    out = tmp_path / "run"
    train_here(tiny_run(out, "--eval-batch-size", "48", "--epochs", "1", "--ema", "0.5", size=96))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["ema_n"] == 3 and set(ckpt["model"]) == set(ckpt["train_model"])
    assert any(not torch.equal(ckpt["model"][k], ckpt["train_model"][k]) for k in ckpt["model"])
    train_here(tiny_run(out, "--eval-batch-size", "48", "--epochs", "2", "--ema", "0.5", "--resume", "auto", size=96))
    assert torch.load(out / "last.pt", weights_only=True)["ema_n"] == 6


# ---- evaluation: TTA, compiled models --------------------------------------------------------------------
def test_tta_logits_flip_and_shift():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(3, 3, 8, 8)
    model(x)
    both = (model(x) + model(x.flip(3))) / 2
    assert torch.allclose(tta_logits(model, x), both, atol=1e-6)
    p = F.pad(x, (1,) * 4, mode="reflect")
    t1, t2 = p[:, :, :8, :8], p[:, :, 2:, 2:]
    mirror = lambda t: (model(t) + model(t.flip(3))) / 2  # noqa: E731
    expect = 0.5 * mirror(x) + 0.25 * mirror(t1) + 0.25 * mirror(t2)   # airbench's TTA level 2
    assert torch.allclose(tta_logits(model, x, 1), expect, atol=1e-5)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(tta_logits(model, xc, 1), expect, atol=1e-5)


class Counting(nn.Module):
    def __init__(self, inner, name, calls):
        super().__init__()
        self.inner, self.name, self.calls = inner, name, calls

    def forward(self, x):
        self.calls.append((self.name, len(x)))
        return self.inner(x)


def test_predict_runs_the_short_batch_eagerly():
    """A torch.compile wrapper (anything with _orig_mod) only ever sees full batches."""
    calls = []
    inner = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    wrapper = Counting(inner, "compiled", calls)
    wrapper._orig_mod = Counting(inner, "eager", calls)
    data = fake.make(50, 10, 8, 3, seed=1)
    loader = MemoryLoader(data, "cpu", batch_size=16, train=False)
    from dtrain.data.augment import AugmentSpec, Pipeline
    acc = types.SimpleNamespace(autocast=lambda: torch.autocast("cpu", enabled=False), num_processes=1,
                                device=torch.device("cpu"))
    index, logits = predict_logits(wrapper, loader, Pipeline(AugmentSpec(), (0.5,) * 3, (0.25,) * 3, "cpu"), acc,
                                   tta=True, tta_shift=1)
    assert index.tolist() == list(range(50)) and logits.shape == (50, 10)
    assert {c for c in calls if c[0] == "compiled"} == {("compiled", 16)}
    assert {c for c in calls if c[0] == "eager"} == {("eager", 2)}


# ---- optimiser and DDP settings ----------------------------------------------------------------------------
def test_bias_lr_scale_groups_keep_decay_per_step():
    cfg = build_config(["--arch", "cnn", "--lr", "0.5", "--weight-decay", "0.01", "--bias-lr-scale", "8",
                        "--scheduler", "onecycle", "--onecycle-start", "0.2", "--onecycle-peak", "0.25",
                        "--onecycle-end", "0.1"])
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    opt = build_optimizer(OptimSpec.from_config(cfg), model, torch.device("cpu"))
    (g0, g1) = opt.param_groups
    assert g0["lr"] * g0["weight_decay"] == pytest.approx(g1["lr"] * g1["weight_decay"])
    assert g1["lr"] == pytest.approx(8 * g0["lr"]) and len(g1["params"]) == 3
    s = LRSchedule(opt, ScheduleSpec.from_config(cfg), 10, 100)
    lrs = []
    for _ in range(101):
        lrs.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        s.step()
    assert lrs[0][0] == pytest.approx(0.1) and lrs[25][0] == pytest.approx(0.5) and lrs[100][0] == pytest.approx(0.05)
    assert all(b == pytest.approx(8 * a) for a, b in lrs)


def test_ddp_static_graph_never_with_gradient_accumulation():
    k = ddp_kwargs()
    assert k.gradient_as_bucket_view and not k.find_unused_parameters and not k.static_graph


# ---- bench/train.py: data converters and output parsing (the GPU rows themselves need an H100) ------------
def _bench():
    import importlib.util
    from helpers import REPO
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_data_converters(tmp_path, shared_data):
    bench = _bench()
    x, y, classes = bench.decode_npz(shared_data / "cifar10_jpeg.npz", "test", 40, workers=1)
    assert x.shape == (40, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64 and len(classes) == 10
    bench.write_cifar_batches(tmp_path / "c", (x[:30], y[:30]), (x[30:], y[30:]), classes)
    from dtrain.data.cifar import read
    tr, te = read(tmp_path / "c")
    assert torch.equal(tr.images, torch.from_numpy(x[:30])) and torch.equal(te.labels, torch.from_numpy(y[30:]))
    bench.write_airbench_data(tmp_path / "a", (x[:30], y[:30]), (x[30:], y[30:]), classes)
    d = torch.load(tmp_path / "a" / "cifar10" / "train.pt", weights_only=True)  # as airbench's CifarLoader
    assert set(d) == {"images", "labels", "classes"} and d["images"].dtype == torch.uint8
    assert d["images"].shape == (30, 32, 32, 3) and d["labels"].dtype == torch.int64 and d["classes"] == classes


TRAIN94_OUTPUT = """\
---------------------------------------------------------------------------------------------
|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |
---------------------------------------------------------------------------------------------
|       0  |      0  |      0.0023  |     0.5010  |   0.4917  |               |              0.5112  |
|          |      9  |      0.0011  |     0.9102  |   0.8953  |               |              2.4511  |
|          |   eval  |      0.0011  |     0.9102  |   0.8953  |       0.9071  |              2.6204  |
---------------------------------------------------------------------------------------------
"""


def test_bench_parses_train94_output_and_prints_table():
    bench = _bench()
    r = bench.parse_train94(TRAIN94_OUTPUT)
    assert r == {"val_acc": 0.9071, "train_seconds": 2.6204, "untta_val_acc": 0.8953}
    results = {"meta": {"device": "H100", "date": "today", "command": "x"},
               "throughput": {"batch": 512, "ceiling": 54000.0, "fast": {"images_per_second": 50000.0},
                              "seeds": 10800.0, "seeds_batch": 128, "seeds_workers": 8},
               "airbench": {"arch": "airbench", "recipe": "airbench", "runs": [
                   {"seed": 0, "val_acc": 0.91, "epochs": 10, "steps": 490, "train_seconds": 3.0,
                    "warmup_seconds": 0.5, "startup_seconds": 9.0}]},
               "airbench-pkg": {"runs": [{"seed": 0, **r}]}}
    text = bench.table(results)
    assert "0.93 x ceiling" in text and "4.6 x seeds" in text and "91.00% mean" in text and "1.14 x" in text
