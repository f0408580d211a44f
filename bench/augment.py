#!/usr/bin/env python3
"""Per-image augmentation throughput: dtrain.data.policies on whole batches against torchvision's v2
transforms applied image by image, side by side in one run, printed as one markdown table.

    OMP_NUM_THREADS=1 python bench/augment.py                       # batch 512 of 3 x 32 x 32, CPU (+ CUDA)
    OMP_NUM_THREADS=1 python bench/augment.py --keep-freed-memory   # glibc keeps freed memory (no page faults)
    python bench/augment.py --devices cpu --repeats 3

Rows, each timed on uint8 batches (random images) as the training loop would hand them over:
  trivialaugment+mix   the headline comparison: TrivialAugmentWide, then to float and normalised, then MixUp or
                       CutMix (alphas 0.8 and 1.0, even odds). torchvision: TrivialAugmentWide() called on each
                       image in a loop, the images stacked, then v2.RandomChoice([MixUp, CutMix]) on the batch;
                       policies.py: AugmentPolicy("trivialaugment") on the batch, then mixing.mix_batch.
  trivialaugment, randaugment, autoaugment
                       the policy alone (RandAugment: 2 operations at bin 9 of 31; AutoAugment: CIFAR-10).
  trivialaugment, every op + where
                       the static-shape alternative policies.py does not use: each of the 14 operations computed
                       on the whole batch and kept where selected (torch.where), for the record of that choice.
Times: the median of --repeats timed batches after one warm-up batch, wall-clock and this process's CPU time
(user + system: the steadier figure on a shared machine; on CUDA it is the host's time only); CUDA timings
synchronise once per batch. The batched path's CPU time includes page faults: glibc returns the freed memory of
large temporaries to the OS and faults it back in the next batch (see --keep-freed-memory).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtrain.data import mixing, policies  # noqa: E402
from dtrain.data.augment import batch_seed  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
MIXUP_ALPHA, CUTMIX_ALPHA = 0.8, 1.0


def normaliser(device: str):
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    return lambda x: x.float().sub_(mean).div_(std)


def torchvision_per_image(transform):
    def run(x, y, step):
        return torch.stack([transform(img) for img in x])
    return run


def torchvision_per_image_then_mix(transform, device: str):
    mix = v2.RandomChoice([v2.MixUp(alpha=MIXUP_ALPHA, num_classes=NUM_CLASSES),
                           v2.CutMix(alpha=CUTMIX_ALPHA, num_classes=NUM_CLASSES)])
    normalise = normaliser(device)

    def run(x, y, step):
        return mix(normalise(torch.stack([transform(img) for img in x])), y)
    return run


def batched(policy, generator):
    def run(x, y, step):
        return policy(x, generator.manual_seed(step))
    return run


def batched_then_mix(policy, generator, device: str):
    normalise = normaliser(device)

    def run(x, y, step):
        out = normalise(policy(x, generator.manual_seed(step)))
        return mixing.mix_batch(out, y, NUM_CLASSES, batch_seed(0, 0, step, -1), MIXUP_ALPHA, CUTMIX_ALPHA, 1.0)
    return run


def every_op_then_select(policy, generator):
    """Each operation on the whole batch, kept where drawn: the alternative to policies.apply_ops' families."""
    def run(x, y, step):
        (layer,) = policy.draw(x.shape[0], x.shape[2], x.shape[3], generator.manual_seed(step))
        out = x
        for name in policy.op_names:
            selected = (layer.op == policies.OP_NAMES.index(name)).view(-1, 1, 1, 1)
            out = torch.where(selected, policies.OPS[name](x, layer.magnitude), out)
        return out
    return run


def keep_freed_memory() -> None:
    """glibc only: keep freed memory in the heap instead of returning it to the OS (mallopt M_TRIM_THRESHOLD
    1 GiB, M_MMAP_THRESHOLD 32 MiB), as jemalloc or tcmalloc would. With glibc's defaults every batch's large
    temporaries come back as fresh pages, and the page faults (kernel time, counted in the CPU time) vary from
    run to run; the per-image path's small tensors never leave the heap."""
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(-1, 1 << 30) and libc.mallopt(-3, 32 << 20)):
        raise SystemExit("mallopt refused the settings")


def seconds_per_batch(run, x, y, repeats: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per batch, each the median over `repeats` batches after a warm-up batch."""
    def once(step):
        wall, cpu = time.perf_counter(), time.process_time()
        run(x, y, step)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu
    once(0)
    times = [once(step) for step in range(1, repeats + 1)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def rows_for(device: str, batch: int, repeats: int):
    """(pipeline, implementation, (wall, CPU) seconds per batch, torchvision's for the same pipeline or None)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    gen = torch.Generator(device=device)
    ta = policies.build_policy("trivialaugment")
    cases = [
        ("trivialaugment+mix", torchvision_per_image_then_mix(v2.TrivialAugmentWide(), device),
         batched_then_mix(ta, gen, device)),
        ("trivialaugment", torchvision_per_image(v2.TrivialAugmentWide()), batched(ta, gen)),
        ("randaugment", torchvision_per_image(v2.RandAugment()), batched(policies.build_policy("randaugment"), gen)),
        ("autoaugment", torchvision_per_image(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)),
         batched(policies.build_policy("autoaugment"), gen)),
    ]
    for name, reference, ours in cases:
        ref_s = seconds_per_batch(reference, x, y, repeats)
        yield name, "torchvision v2, per image", ref_s, None
        yield name, "policies.py, batched", seconds_per_batch(ours, x, y, repeats), ref_s
    yield ("trivialaugment", "policies.py, every op + where", seconds_per_batch(every_op_then_select(ta, gen), x, y,
                                                                                  repeats), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per row (median); default 5")
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped where absent")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc: keep freed memory instead of returning it to the OS (see keep_freed_memory)")
    args = parser.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]

    print(f"command: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python {' '.join(sys.argv)}")
    print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores usable, torch threads "
          f"{torch.get_num_threads()}" + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{datetime.datetime.now().astimezone().isoformat(timespec='minutes')}, batch {args.batch} x 3 x 32 x 32")
    print()
    print("| pipeline | device | implementation | wall ms / batch | images / s | speed-up | CPU ms / batch "
          "| images / CPU s | speed-up (CPU time) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for device in devices:
        for name, impl, (wall, cpu), ref in rows_for(device, args.batch, args.repeats):
            speedup = (f"{ref[0] / wall:.1f} x", f"{ref[1] / cpu:.1f} x") if ref else ("", "")
            print(f"| {name} | {device} | {impl} | {wall * 1e3:.1f} | {args.batch / wall:,.0f} | {speedup[0]} "
                  f"| {cpu * 1e3:.1f} | {args.batch / cpu:,.0f} | {speedup[1]} |", flush=True)


if __name__ == "__main__":
    main()
