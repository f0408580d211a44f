"""Step time of a 2-process CPU training run, two dtrain checkouts side by side.

    python bench/steptime.py --before ../dtrain-old --after . --runs 3

Each run is `accelerate launch --multi_gpu --num_processes 2` (gloo, one thread per process) of a small
`cnn` on `--dataset fake` for 2 epochs; its step time is the second epoch's `epoch_seconds` over its
steps (the first epoch pays the start). The checkouts run in turn (before, after, before, after, ...) so
that a drift in the machine's speed reaches both alike; the table gives each one's median and range and
the median of the per-pair ratios. Small images and a small per-process batch make the step short, so
that what is paid per step outside the model (the processes' agreement on stop signals) shows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = ["--arch", "cnn", "--dataset", "fake", "--image-size", "16", "--workers", "0", "--epochs", "2",
       "--eval-every", "2", "--save-every", "2", "--no-wandb", "--no-plots"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_seconds(checkout: Path, out: Path, images: int, batch: int) -> float:
    """Seconds per optimiser step in epoch 2 of one 2-process run of `checkout`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(checkout / "dtrain" / "main.py"), *RUN, "--fake-size", str(images),
           "-b", str(batch), "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(checkout), "WANDB_MODE": "disabled"}
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=checkout)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[1]["epoch_seconds"] / (rows[1]["step"] - rows[0]["step"])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, type=Path, help="the reference checkout")
    ap.add_argument("--after", required=True, type=Path, help="the checkout measured against it")
    ap.add_argument("--runs", type=int, default=3, help="runs of each checkout")
    ap.add_argument("--images", type=int, default=2048, help="training images (fake)")
    ap.add_argument("--batch", type=int, default=32, help="global batch (half per process)")
    args = ap.parse_args(argv)
    times = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.runs):
            for name in ("before", "after"):
                checkout = getattr(args, name).resolve()
                times[name].append(step_seconds(checkout, Path(tmp) / f"{name}{k}", args.images, args.batch))
                print(f"run {k + 1} {name}: {times[name][-1] * 1000:.2f} ms/step", file=sys.stderr, flush=True)
    ratios = [a / b for a, b in zip(times["after"], times["before"])]
    print(f"2 CPU processes (gloo, 1 thread each), `cnn` at 16x16, global batch {args.batch}, {args.images} fake "
          f"images; {os.cpu_count()}-core {cpu_model()}; Python {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d')}; `python bench/steptime.py --before B --after A --runs {args.runs}`\n")
    print("| checkout | ms per step, median (min..max) |\n| --- | --- |")
    for name in ("before", "after"):
        ms = [t * 1000 for t in times[name]]
        print(f"| {name} ({getattr(args, name)}) | {statistics.median(ms):.2f} ({min(ms):.2f}..{max(ms):.2f}) |")
    print(f"\nafter / before, per pair: median {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}..{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
