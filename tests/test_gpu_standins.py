"""Stand-ins for the GPU: every path that a GPU run takes and a CPU can run, run here.

What only a GPU can show (NCCL, CUDA tensors in checkpoints, pinned copies, host syncs) is a line of
bench/gpu.sh instead; docs/performance.md lists which is which.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from dtrain.checkpoint import load_checkpoint
from dtrain.devices import Machine, Torch, check_device, visible_devices
from dtrain.errors import UserError
from helpers import MAIN, REPO, cli_error, env, launch, metrics, signal_mid_run, tiny_run, train, train_here


def have_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


needs_compiler = pytest.mark.skipif(not have_compiler(), reason="no C++ compiler for torch inductor's CPU backend")


# ---- processes and GPUs agree; no silent CPU ------------------------------------------------------------

def fake_nvidia_smi(folder: Path, gpus: int, driver: str = "550.54.15") -> Path:
    """An nvidia-smi that lists `gpus` GPUs (-L) and tells its driver version, as the real one prints them."""
    folder.mkdir(parents=True, exist_ok=True)
    listing = "".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d}-aaaa-bbbb-cccc-dddddddddddd)'\n"
                      for i in range(gpus))
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n"
                      'case "$1" in\n'
                      f"  -L) {listing or 'true'}\n;;\n"
                      f"  --query-gpu=driver_version) for i in $(seq {gpus}); do echo {driver}; done ;;\n"
                      "esac\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


def machine(env_=None, devices=(), smi_gpus=None, tmp_path=None) -> Machine:
    path = None if smi_gpus is None else str(fake_nvidia_smi(tmp_path / "bin", smi_gpus) / "nvidia-smi")
    return Machine(env=dict(env_ or {}), exists=lambda p: p in devices, which=lambda name: path)


NO_CUDA = Torch(cuda_available=False, gpu_count=0, cuda_version="12.8", version="2.14.1",
                why_no_cuda="The NVIDIA driver on your system is too old (found version 11040)")
FOUR_GPUS = Torch(cuda_available=True, gpu_count=4, cuda_version="12.8", version="2.14.1", bf16=True)


@pytest.mark.parametrize("value, count", [("0,1", 2), ("", 0), ("-1", 0), ("0,1,-1,2", 2), ("3", 1),
                                          ("GPU-8a3b,GPU-77c1", 2), ("MIG-1234", 1), ("0, 1", 2), ("x", 0)])
def test_cuda_visible_devices_counts_like_nvidia(value, count):
    assert visible_devices(value) == count


@pytest.mark.parametrize("env_, devices, smi, named", [
    ({"CUDA_VISIBLE_DEVICES": "0"}, (), None, "CUDA_VISIBLE_DEVICES=0"),
    ({"SLURM_GPUS_ON_NODE": "4"}, (), None, "SLURM_GPUS_ON_NODE=4"),
    ({}, ("/dev/nvidia0",), None, "/dev/nvidia0 exists"),
    ({}, (), 8, "nvidia-smi lists 8 GPUs"),
])
def test_gpu_node_where_torch_has_no_cuda_is_refused(tmp_path, env_, devices, smi, named):
    with pytest.raises(UserError) as e:
        check_device(None, cpu=False, machine=machine(env_, devices, smi, tmp_path), torch_=NO_CUDA)
    line = str(e.value)
    assert "\n" not in line and named in line and "torch 2.14.1 (built for CUDA 12.8)" in line
    assert "driver on your system is too old" in line and "--cpu" in line
    assert ("NVIDIA driver 550.54.15" in line) == (smi is not None)


def test_the_cpu_on_purpose_and_machines_without_gpus_run_on_the_cpu(tmp_path):
    gpu_node = ({"SLURM_GPUS_ON_NODE": "4"}, ("/dev/nvidia0",), 4)
    assert check_device(None, cpu=True, machine=machine(*gpu_node, tmp_path), torch_=NO_CUDA)
    assert check_device(None, cpu=False, torch_=NO_CUDA,
                        machine=machine({"ACCELERATE_USE_CPU": "true", "SLURM_GPUS_ON_NODE": "4"}, (), 4, tmp_path))
    # every GPU hidden from the process: the CPU on purpose, whatever the device files say
    assert check_device(None, cpu=False, machine=machine({"CUDA_VISIBLE_DEVICES": ""}, ("/dev/nvidia0",)),
                        torch_=NO_CUDA)
    assert check_device("bf16", cpu=False, machine=machine(), torch_=NO_CUDA)  # a laptop: CPU, bf16 autocast
    assert not check_device("bf16", cpu=False, machine=machine(), torch_=FOUR_GPUS)


def test_more_processes_than_gpus_is_refused_naming_both():
    m = machine({"LOCAL_WORLD_SIZE": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    with pytest.raises(UserError) as e:
        check_device(None, cpu=False, machine=m, torch_=FOUR_GPUS)
    assert "8 processes were started on this node but it shows 4 GPUs (CUDA_VISIBLE_DEVICES=0,1,2,3)" in str(e.value)
    assert check_device(None, cpu=True, machine=m, torch_=FOUR_GPUS)  # --cpu: 8 CPU processes are fine
    assert not check_device(None, cpu=False, machine=machine({"LOCAL_WORLD_SIZE": "4"}), torch_=FOUR_GPUS)


def test_precisions_the_device_lacks_are_one_line():
    with pytest.raises(UserError, match=r"--precision fp16 needs a GPU: on the CPU it would run in fp32"):
        check_device("fp16", cpu=False, machine=machine(), torch_=NO_CUDA)
    with pytest.raises(UserError, match=r"--precision fp16 needs a GPU"):
        check_device("fp16", cpu=True, machine=machine(), torch_=FOUR_GPUS)
    v100 = Torch(True, 1, "12.8", "2.14.1", bf16=False, gpu_name="Tesla V100-SXM2-16GB, compute capability 7.0")
    with pytest.raises(UserError) as e:
        check_device("bf16", cpu=False, machine=machine(), torch_=v100)
    assert "Tesla V100" in str(e.value) and "use --precision fp16, or --precision no" in str(e.value)


def test_train_on_a_gpu_node_without_cuda_exits_2_before_anything(tmp_path, monkeypatch):
    """The real command, the real torch (no CUDA here), a GPU node faked by nvidia-smi and Slurm's variable."""
    bin_dir = fake_nvidia_smi(tmp_path / "bin", 2)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    out = tmp_path / "run"
    line = cli_error(tiny_run(out, "--epochs", "1"))
    assert "this machine has GPUs (SLURM_GPUS_ON_NODE=2; nvidia-smi lists 2 GPUs)" in line, line
    assert f"torch {torch.__version__}" in line and "NVIDIA driver 550.54.15" in line, line
    assert not out.exists()  # refused before the folder was claimed
    summary = train_here(tiny_run(out, "--max-steps", "1", "--cpu", size=32, batch=16)).result
    assert summary["steps"] == 1


def test_fp16_on_the_cpu_is_refused_not_run_as_fp32(tmp_path):
    line = cli_error(tiny_run(tmp_path / "run", "--precision", "fp16"))
    assert line.startswith("error: --precision fp16 needs a GPU")


# ---- precision: bf16 autocast, fp16's GradScaler (torch.amp.GradScaler("cpu")), fused optimisers --------

def output_dtypes(record: list):
    """A build_model that records the dtype of every convolution's and linear layer's output (the model's
    own output is cast back to float32 by accelerate)."""
    from dtrain.models import build_model

    def build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        for layer in model.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                layer.register_forward_hook(lambda m, i, o: record.append((m.training, o.dtype)))
        return model
    return build


def test_bf16_autocast_runs_training_and_evaluation(tmp_path):
    record = []
    out = tmp_path / "run"
    train_here(tiny_run(out, "--epochs", "1", "--precision", "bf16", size=64, batch=16),
               build_model=output_dtypes(record))
    assert {dtype for _, dtype in record} == {torch.bfloat16}
    assert {training for training, _ in record} == {True, False}  # training and evaluation forwards
    (row,) = metrics(out)
    assert row["skipped_steps"] is None and row["val_acc"] is not None
    assert all(t.dtype == torch.float32 for t in load_checkpoint(out / "last.pt")["model"].values() if t.is_floating_point())


def cpu_fp16_accelerator(precision=None, timeout=600.0, cpu=False):
    """accelerate's fp16 path on the CPU: fp16 autocast and torch.amp.GradScaler("cpu"), wired where
    accelerate wires the CUDA scaler (backward, clip_grad_norm_'s unscale, the prepared optimizer's step)."""
    from accelerate import Accelerator, PartialState
    from datetime import timedelta
    from dtrain.distributed import ddp_kwargs
    PartialState(True, timeout=timedelta(seconds=timeout))
    acc = Accelerator(cpu=True, mixed_precision="fp16", kwargs_handlers=[ddp_kwargs()],
                      step_scheduler_with_optimizer=False, dynamo_backend="no")
    acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu")
    return acc


def fused_optimizer():
    from dtrain.optim import build_optimizer
    return partial(build_optimizer, fused=True)


def changed_at(forwards: set, change):
    """A build_model whose model's training output goes through `change` at the given training forwards
    (1-based)."""
    from dtrain.models import build_model
    calls = {"n": 0}

    def build(*args, **kwargs):
        model = build_model(*args, **kwargs)

        def hook(module, inputs, output):
            if not module.training:
                return output
            calls["n"] += 1
            return change(output) if calls["n"] in forwards else output
        model.register_forward_hook(hook)
        return model
    return build


def overflow_at(forwards: set):
    """The training output is infinite at these forwards."""
    return changed_at(forwards, lambda output: output * float("inf"))


class _InfiniteGradient(torch.autograd.Function):
    """The identity forward; its backward makes every gradient infinite (a scaled gradient that overflowed)."""
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def gradient_overflow_at(forwards: set):
    """The gradients overflow at these forwards, the loss still finite."""
    return changed_at(forwards, _InfiniteGradient.apply)


def fp16(out, *more):
    """The fp16 stand-in's run: 6 steps an epoch, every step logged, clipped SGD; 16-pixel images (fp16 on the
    CPU is slow, and what is checked is the scaler's bookkeeping, not the convolutions)."""
    return tiny_run(out, "--log-every", "1", "--grad-clip", "1.0", "--optimizer", "sgd", "--image-size", "16", *more,
                    size=96, batch=16)


def test_fp16_scaler_skips_an_overflowed_step_and_counts_it(tmp_path):
    """One infinite loss at a log step: the GradScaler skips that step and halves its scale; the run goes
    on (not "diverged"), the epoch row counts the skipped step, the checkpoint holds the scaler's state."""
    out = tmp_path / "run"
    summary = train_here(fp16(out, "--epochs", "2"), make_accelerator=cpu_fp16_accelerator,
                         build_optimizer=fused_optimizer(), build_model=overflow_at({3})).result
    assert summary["steps"] == 12
    rows = metrics(out)
    assert [r["skipped_steps"] for r in rows] == [1, 0]
    assert all(r["train_loss"] is not None and r["train_loss"] < 10 for r in rows)  # the skipped loss left out
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["scaler"]["scale"] == 65536.0 / 2


def test_sam_under_fp16_an_overflowed_first_pass_moves_nothing_and_batchnorm_stays_finite(tmp_path):
    """SAM's first pass of step 3 overflows under the GradScaler (forward 5: two forwards a step): the weights
    are not moved by inf * 0 = NaN for the second pass, whose forward would write NaN into BatchNorm's running
    statistics for good (the run then stopped as "diverged" at its save)."""
    out = tmp_path / "run"
    summary = train_here(fp16(out, "--epochs", "1", "--sam", "0.05"), make_accelerator=cpu_fp16_accelerator,
                         build_optimizer=fused_optimizer(), build_model=gradient_overflow_at({5})).result
    assert summary["steps"] == 6
    model = load_checkpoint(out / "last.pt")["model"]
    assert any("running_mean" in k for k in model)
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_fp16_scaler_resume_is_exact(tmp_path):
    """Stopped at step 5 (after a skipped step), resumed: the same weights, scale and growth tracker as a
    run never stopped; fused SGD and clipping under the scaler."""
    common = ["--epochs", "2", "--scheduler", "none"]  # --max-steps would change a decaying schedule
    patches = dict(make_accelerator=cpu_fp16_accelerator, build_optimizer=fused_optimizer())
    train_here(fp16(tmp_path / "whole", *common), build_model=overflow_at({2}), **patches)
    part = tmp_path / "part"
    train_here(fp16(part, *common, "--max-steps", "5"), build_model=overflow_at({2}), **patches)
    train_here(fp16(part, *common, "--resume", "auto"), **patches)
    whole, resumed = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(part / "last.pt")
    assert resumed["step"] == whole["step"] == 12
    assert resumed["scaler"] == whole["scaler"] and whole["scaler"]["scale"] == 32768.0
    for k, v in whole["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


def test_fp16_scale_collapse_is_divergence(tmp_path):
    out = tmp_path / "run"
    r = train_here(fp16(out, "--epochs", "6"), status=3, make_accelerator=cpu_fp16_accelerator,  # TrainingDiverged
                   build_optimizer=fused_optimizer(), build_model=overflow_at(set(range(7, 100))))
    # every step from the 7th overflows: the scale halves each time and is below 1 after 17 of them
    (line,) = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    m = re.match(r"error: the training loss became NaN or infinite (by step (\d+)|in epoch \d+) .*: stopped without "
                 r"saving; the last good checkpoint is \S+last.pt \(end of epoch \d, step \d+\)", line)
    assert m, r.stderr
    assert [r["skipped_steps"] for r in metrics(out)][:3] == [0, 6, 6]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_optimizers_match_foreach_on_our_parameter_groups(name):
    """The fused kernels (CUDA's default) on dtrain's parameter groups (no decay on 1-D parameters, a scaled
    bias LR, Nesterov) take the same steps as foreach (the CPU's default)."""
    from dtrain.optim import OptimSpec, build_optimizer
    spec = OptimSpec(name, 0.05, 0.9, name == "sgd", 5e-4, False, 4.0)
    torch.manual_seed(0)
    # (no bias right before a BatchNorm: its gradient is rounding noise, which Adam would normalise to +-lr)
    nets = [torch.nn.Sequential(torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))]
    nets.append(__import__("copy").deepcopy(nets[0]))
    opts = [build_optimizer(spec, nets[0], torch.device("cpu"), fused=True),
            build_optimizer(spec, nets[1], torch.device("cpu"), fused=False)]
    assert opts[0].defaults.get("fused") and opts[1].defaults.get("foreach")
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(5):
        for net, opt in zip(nets, opts):
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- compile -----------------------------------------------------------------------------------------

def counting_compile(calls: list):
    """torch.compile that records its keyword arguments and compiles nothing (the module is returned)."""
    def fake(model=None, **kwargs):
        calls.append(kwargs)
        return model
    return fake


@pytest.mark.parametrize("launcher_dynamo", [None, "INDUCTOR"])
def test_compile_once_with_static_shapes_whatever_accelerate_asks(tmp_path, monkeypatch, launcher_dynamo):
    """--compile with an accelerate config that also asks for dynamo: one compile of the training model and
    one of the evaluated one, both with static shapes; accelerate's prepare compiles nothing."""
    calls = []
    monkeypatch.setattr(torch, "compile", counting_compile(calls))
    if launcher_dynamo:
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", launcher_dynamo)
    train_here(tiny_run(tmp_path / "run", "--max-steps", "1", "--compile", size=32, batch=16))
    assert [c.get("dynamic") for c in calls] == [False, False], calls


def test_launcher_dynamo_alone_compiles_once_and_says_so(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", counting_compile(calls))
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    r = train_here(tiny_run(tmp_path / "run", "--max-steps", "1", size=32, batch=16))
    assert [(c.get("dynamic"), c.get("backend")) for c in calls] == [(False, "inductor")] * 2
    assert "compiled (static shapes; asked by the accelerate config's dynamo_backend)" in r.stdout


def test_compile_on_old_torch_with_ddp_turns_donated_buffers_off(monkeypatch):
    import torch._functorch.config as functorch_config
    from dtrain.compiled import before_compile, torch_version
    monkeypatch.setattr(functorch_config, "donated_buffer", True)
    assert not before_compile(2, (2, 9)) and not before_compile(1, (2, 6))
    assert functorch_config.donated_buffer
    assert before_compile(2, (2, 8)) and not functorch_config.donated_buffer
    assert torch_version("2.8.0+cu128") == (2, 8) and torch_version("2.10.0a0") == (2, 10)


@pytest.mark.process
@pytest.mark.slow
@needs_compiler
def test_compiled_bf16_accumulation_has_no_symbolic_shapes(tmp_path):
    """The real compile on the CPU, bf16 and --grad-accum: the training (micro-)batches of 16 and the
    evaluation batches of 24 differ in size (the evaluation graph is compiled first, in the warm-up), and
    no graph has a symbolic (dynamic) batch dimension."""
    out = tmp_path / "run"
    # a real process: torch reads TORCH_LOGS when it is imported, and inductor starts its compile workers
    r = train(tiny_run(out, "--grad-accum", "2", "--eval-batch-size", "24", "--epochs", "2", "--compile",
                       "--precision", "bf16", size=100, batch=32), timeout=900,
              extra_env={"TORCH_LOGS": "dynamic,recompiles"})
    log = r.stdout + r.stderr
    # a symbol for a size (the batch dimension made dynamic); BatchNorm's num_batches_tracked.item() gets a
    # scalar symbol of its own, which is not a shape
    sized = [line for line in log.splitlines() if "create_symbol" in line and ".size()" in line]
    assert not sized, sized[:3]
    assert "create_symbol" in log  # the log is on (num_batches_tracked has its symbol)
    assert "compiled (static shapes" in r.stdout
    rows = metrics(out)
    assert [row["step"] for row in rows] == [4, 8] and rows[-1]["val_acc"] is not None


@pytest.mark.process
@pytest.mark.slow
@needs_compiler
def test_sigterm_during_the_compile_warm_up_saves_at_the_first_step(tmp_path):
    """SIGTERM to the whole process group (Slurm, docker stop, timeout) while inductor compiles: its compile
    workers survive it, and the run saves at its first step boundary and exits 0 like at any other moment."""
    out = tmp_path / "run"
    cmd = [sys.executable, MAIN, *tiny_run(out, "--epochs", "2", "--compile", size=200, batch=40)]
    cold = env(TORCHINDUCTOR_CACHE_DIR=tmp_path / "inductor")   # a compile cached by an earlier run is over in 2 s
    rc, text = signal_mid_run(cmd, signal.SIGTERM, environ=cold, delay=2.0, timeout=600)
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text and "stopped by signal 15 at step 1" in text, text[-3000:]
    assert load_checkpoint(out / "last.pt")["step"] == 1


@pytest.mark.process
@pytest.mark.slow
@needs_compiler
def test_compile_on_two_processes_trains_like_eager(tmp_path, cifar_dir):
    """DDP under compile (the DDPOptimizer's graph split) on 2 processes, with the EMA evaluated through its
    own compiled module and TTA, ends with the weights of the eager 2-process run (fp32, the same global
    batch) and evaluates alike."""
    args = ["--arch", "cnn", "--data-dir", cifar_dir, "--no-download", "-b", "40", "--eval-batch-size", "64",
            "--workers", "0", "--epochs", "1", "--no-augment", "--ema", "0.9", "--tta"]
    train([*args, "--output-dir", tmp_path / "eager"], nproc=2)
    train([*args, "--compile", "--output-dir", tmp_path / "compiled"], nproc=2, timeout=900)
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("eager", "compiled"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    eager_row, compiled_row = (metrics(tmp_path / d)[-1] for d in ("eager", "compiled"))
    assert compiled_row["val_loss"] == pytest.approx(eager_row["val_loss"], rel=1e-3)


# ---- several processes: empty shards, EMA's statistics, channels_last ------------------------------------

def logging_collectives(tmp_path) -> dict:
    """The environment under which every process logs its collective calls (tests/collectives/)."""
    folder = tmp_path / "collectives"
    folder.mkdir()
    return {"PYTHONPATH": f"{REPO / 'tests' / 'collectives'}{os.pathsep}{REPO}", "DTRAIN_COLLECTIVES": folder}


def assert_same_collectives(env_: dict, nproc: int) -> list[str]:
    calls = [(Path(env_["DTRAIN_COLLECTIVES"]) / f"rank{r}.txt").read_text().split() for r in range(nproc)]
    for rank in range(1, nproc):
        assert calls[rank] == calls[0], f"rank {rank} made other collective calls than rank 0"
    return calls[0]


@pytest.mark.process
@pytest.mark.parametrize("nproc", [2, 3])
def test_empty_validation_shard_makes_the_same_collective_calls(tmp_path, nproc):
    """One validation image on 2 or 3 processes: the others' shards are empty, and they make the same
    collective calls as the rank that evaluates (NCCL pairs collectives strictly: one skipped, e.g. DDP's
    buffer broadcast in a forward, and the next ones mismatch)."""
    out = tmp_path / "run"
    logged = logging_collectives(tmp_path)
    train(tiny_run(out, "--eval-batch-size", "8", "--epochs", "2", size=4, batch=nproc), nproc=nproc, extra_env=logged,
          timeout=300)
    assert [row["val_samples"] for row in metrics(out)] == [1, 1]
    calls = assert_same_collectives(logged, nproc)
    assert "all_gather" in calls  # the evaluation's gather (the log works)


@pytest.mark.process
def test_empty_prediction_shards_make_the_same_collective_calls(tmp_path):
    run = tmp_path / "run"
    train_here(tiny_run(run, "--max-steps", "1", size=16, batch=8))
    image = tmp_path / "kaggle" / "test" / "1.png"   # one test image for 3 processes
    image.parent.mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    logged = logging_collectives(tmp_path)
    r = launch(str(REPO / "dtrain" / "predict.py"),
               ["--checkpoint", run / "last.pt", "--dataset", "kaggle", "--data-dir", tmp_path / "kaggle",
                "--no-cache", "--workers", "0", "--output", tmp_path / "p.csv"], nproc=3, extra_env=logged, timeout=300)
    assert (tmp_path / "p.csv").read_text().splitlines()[1].startswith("1,")
    assert "all_gather" in assert_same_collectives(logged, 3)
    assert "batch 3072 (1024 per process)" in r.stdout  # the default batch is per process: a GPU each stays busy


def test_prediction_runs_channels_last_when_the_checkpoint_trained_so(tmp_path):
    from dtrain.predict import load_model, parse_args
    for channels_last in (False, True):
        out = tmp_path / f"run{channels_last}"
        train_here(tiny_run(out, "--max-steps", "1", *(["--channels-last"] if channels_last else []), size=16, batch=8))
        m = load_model(parse_args(["--checkpoint", str(out / "last.pt"), "--output", str(tmp_path / "p.csv")]),
                       torch.device("cpu"))
        conv = next(p for p in m.model.parameters() if p.dim() == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        x = m.pipeline(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last


def val_loss_of(checkpoint: Path, cifar_dir: Path) -> float:
    """The validation loss of a checkpoint's model, computed here from the files, as dtrain evaluates."""
    from dtrain.config import config_from_dict
    from dtrain.data import load_dataset
    from dtrain.data.augment import AugmentSpec, Pipeline
    from dtrain.models import model_from_checkpoint
    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt["config"])
    cfg.data_dir = str(cifar_dir)
    _, val = load_dataset(cfg)
    x = Pipeline(AugmentSpec(), ckpt["mean"], ckpt["std"], "cpu")(val.images.permute(0, 3, 1, 2))
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model_from_checkpoint(ckpt)(x), val.labels).item()


@pytest.mark.process
@pytest.mark.parametrize("ema", [False, True])
def test_reported_validation_loss_is_the_saved_models_on_two_processes(tmp_path, cifar_dir, ema):
    """With BatchNorm on 2 processes each rank's statistics (and its EMA's) drift apart after DDP's
    per-forward broadcast; the evaluation uses rank 0's, which are the ones saved."""
    out = tmp_path / "run"
    args = tiny_run(out, "--eval-batch-size", "64", "--epochs", "1", *(["--ema", "0.5"] if ema else []), data=cifar_dir,
                    batch=40)
    train(args, nproc=2)
    (row,) = metrics(out)
    assert row["val_loss"] == pytest.approx(val_loss_of(out / "last.pt", cifar_dir), rel=1e-6)


@pytest.mark.process
def test_channels_last_under_two_process_ddp_trains_like_one_process(tmp_path, cifar_dir):
    """channels_last weights in DDP's gradient buckets (gradient_as_bucket_view): no stride mismatch, and the
    2-process run takes the 1-process run's steps. (Not to 1e-7 as in NCHW: the CPU's channels_last
    convolutions sum a batch of 20 in another order than one of 40, a few 1e-6 per step.)"""
    args = tiny_run(None, "--eval-batch-size", "64", "--epochs", "2", "--no-augment", "--norm", "group", "--lr", "0.05",
                    "--channels-last", data=cifar_dir, batch=40)
    train_here([*args, "--output-dir", tmp_path / "p1"])
    r = train([*args, "--output-dir", tmp_path / "p2"], nproc=2)
    assert "Grad strides do not match bucket view strides" not in r.stderr
    one, two = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("p1", "p2"))
    torch.manual_seed(0)
    from dtrain.models import build_model
    init = build_model("cnn", 10, norm="group").state_dict()
    for k in one:
        assert (one[k] - two[k]).abs().max() < 1e-3, k
    assert max((one[k] - init[k]).abs().max() for k in one) > 0.02  # and training moved the weights


# ---- the stop-signal agreement --------------------------------------------------------------------------

AGREEMENT = r"""
import sys, time
from pathlib import Path
from dtrain.distributed import make_accelerator
from dtrain.errors import run_command
from dtrain.preempt import StopSignal
marker = Path(sys.argv[1])
def run(argv):
    acc = make_accelerator(None, 30)
    stop = StopSignal().install().training()
    rank = acc.process_index
    if rank == 1:
        time.sleep(3)
        marker.write_text("rank 1 posts now")
    first = stop.exchange(save_due=rank == 1)
    if rank == 0:
        print("rank 0 passed its first exchange", "before" if not marker.exists() else "after", "rank 1 posted")
    second = stop.exchange()
    last = stop.settle()
    print(f"rank {rank}: {tuple(first)} {tuple(second)} {tuple(last)}", flush=True)
    stop.uninstall()
run_command(run, sys.argv[1:])
"""


@pytest.mark.process
def test_stop_agreement_posts_without_waiting_and_acts_one_step_later(tmp_path):
    """Rank 1 reaches its first step 3 s after rank 0: rank 0 does not wait for it there (no rendezvous per
    step); both act on step 1's flags (rank 1's save request) at step 2, the same step on every rank."""
    script = tmp_path / "agree.py"
    script.write_text(AGREEMENT)
    r = launch(str(script), [tmp_path / "marker"], nproc=2, timeout=120)
    assert "rank 0 passed its first exchange before rank 1 posted" in r.stdout, r.stdout
    for rank in (0, 1):
        assert f"rank {rank}: (0, False, False) (0, False, True) (0, False, False)" in r.stdout, r.stdout
