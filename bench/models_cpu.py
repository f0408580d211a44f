#!/usr/bin/env python3
"""CPU training speed of the CIFAR model families side by side with resnet18, printed as one markdown table.

    OMP_NUM_THREADS=2 python bench/models_cpu.py                        # every arch below, a few steps each
    python bench/models_cpu.py --archs resnet18,wrn40-2 --steps 10      # some archs, more steps

For each arch, in one process: a training step (forward, cross-entropy, backward, SGD with momentum 0.9 and
weight decay 5e-4) on one synthetic batch (--batch 3x32x32 images, 10 classes) in fp32 on the CPU. --warmup
untimed steps first (oneDNN builds its kernels for each shape on the first), then timed steps: up to --steps,
fewer once an arch has spent --budget seconds on them, but at least --min-steps (PyramidNet-272 and WRN-28-10
take 0.5-2 minutes a step at batch 64 on 2 cores). img/s = batch * timed steps / their total time; the best
step's img/s is the least disturbed by other processes on a shared machine.

The header gives the command, the machine (CPU model from /proc/cpuinfo, cores this process may use, the load
average at the start: on a shared machine other processes' load slows every row), torch's version and thread
count, and the date.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dtrain.models import build_model, count_parameters  # noqa: E402

ARCHS = ["resnet18", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "preact-resnet18", "wrn40-2",
         "wrn16-8", "wrn28-10", "pyramidnet110-48", "pyramidnet272-200"]
BASELINE = "resnet18"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def command_line() -> str:
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return prefix + "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One SGD step; returns its wall time in seconds."""
    start = time.perf_counter()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def time_arch(arch: str, args) -> dict:
    """Parameters and timed step times of `arch` after the warm-up."""
    torch.manual_seed(0)
    model = build_model(arch, 10).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    for _ in range(args.warmup):
        training_step(model, optimizer, x, y)
    times: list[float] = []
    while len(times) < args.steps and (len(times) < args.min_steps or sum(times) < args.budget):
        times.append(training_step(model, optimizer, x, y))
    return {"arch": arch, "params": count_parameters(model), "times": times}


def images_per_second(times: list[float], batch: int) -> float:
    return batch * len(times) / sum(times)


def table(rows: list[dict], batch: int) -> str:
    baseline = next((r for r in rows if r["arch"] == BASELINE), None)
    base_rate = images_per_second(baseline["times"], batch) if baseline else None
    lines = ["| arch | parameters | timed steps | s/step (mean; min-max) | img/s | vs resnet18 | img/s, best step |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        times = r["times"]
        rate = images_per_second(times, batch)
        cells = [f"`{r['arch']}`", f"{r['params']:,}", str(len(times)),
                 f"{sum(times) / len(times):.3g}; {min(times):.3g}-{max(times):.3g}", f"{rate:.1f}",
                 f"{rate / base_rate:.2f}x" if base_rate else "-", f"{batch / min(times):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(args) -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return "\n".join([
        f"Command: `{command_line()}`",
        f"Machine: {cpu_model()}, {usable_cores()} cores usable (load average at the start {load})",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; Python {platform.python_version()}",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"Training step at batch {args.batch}, 3x32x32 fp32, SGD; {args.warmup} warm-up step(s) per arch",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated --arch names (default: all above)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per arch (default 1)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per arch at most (default 5)")
    ap.add_argument("--min-steps", type=int, default=2, help="timed steps per arch at least (default 2)")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds of timed steps after which an arch stops at --min-steps (default 60)")
    args = ap.parse_args()
    top = header(args)
    rows = []
    for arch in args.archs.split(","):
        rows.append(time_arch(arch, args))
        print(f"{arch}: {len(rows[-1]['times'])} steps, {sum(rows[-1]['times']):.1f} s", file=sys.stderr, flush=True)
    print(top + "\n\n" + table(rows, args.batch))


if __name__ == "__main__":
    main()
