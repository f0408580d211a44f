#!/usr/bin/env python3
"""The Python side of bench/gpu.sh: the checks only a GPU can show, and the summary table.

    python bench/gpu_checks.py env --json A.json                              # (a) CUDA, versions, the machine
    python bench/gpu_checks.py make-npz DIR [--train N] [--test N]            # a generated cifar10_jpeg.npz
    python bench/gpu_checks.py data-info CACHE --json D.json                  # what bench/train.py decoded
    python bench/gpu_checks.py train-syncs --json B.json -- TRAIN-ARGS        # (b) host syncs of `dtrain train`
    python bench/gpu_checks.py load-cpu CKPT --metrics M --log L --json J     # (d') a GPU run's last.pt, no GPU
    python bench/gpu_checks.py kaggle DIR --total N                           # a small Kaggle test folder
    python bench/gpu_checks.py predict-syncs --json G.json -- PREDICT-ARGS    # (g') host syncs of `dtrain predict`
    python bench/gpu_checks.py profile --json H.json --table H.txt --warmup 10 --steps 20 -- TRAIN-ARGS   # (h)
    python bench/gpu_checks.py summary WORK OUT/summary.md                    # the table of bench/gpu.sh's parts

Host syncs are counted with torch.cuda.set_sync_debug_mode("warn"): each synchronising CUDA call (a blocking
copy to or from the device, .item(), .tolist(), torch.cuda.synchronize, ...) raises a UserWarning "called a
synchronizing CUDA operation". The run goes on in this process (dtrain.main.run / dtrain.predict.run) with the
mode switched on for the training loop (Trainer.fit) or the prediction loop (predict_set) only, so the start-up
(data to the device, model) is left out; every warning is counted against the phase under way (a training step,
an epoch's end, a prediction batch) and its call site (the innermost frame, and the innermost frame in dtrain/).
A training step's phase runs from fetching its batch to fetching the next; an epoch has a start and an end
phase. The mode sees torch's own synchronising calls; a non_blocking copy from pageable memory (which the driver
makes synchronous) is not one.
The summary reads nothing but small files, and imports no torch.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import linecache
import os
import re
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SYNC_MESSAGE = "called a synchronizing CUDA operation"


# ---- (a) the machine -------------------------------------------------------------------------------------
def package_versions(names) -> dict:
    """Installed versions (None: not installed), without importing the packages."""
    from importlib import metadata
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def env_info() -> dict:
    """torch.cuda.is_available(), the versions and the devices, as (a) reports them."""
    import platform
    import torch
    info = {"cuda_available": torch.cuda.is_available(), "python": platform.python_version(),
            "python_executable": sys.executable, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": cpu_model(), "devices": [],
            "packages": package_versions(["accelerate", "torchvision", "numpy", "pillow", "rich", "matplotlib",
                                          "safetensors", "triton", "wandb", "tensorboard", "onnx"])}
    for i in range(torch.cuda.device_count() if info["cuda_available"] else 0):
        p = torch.cuda.get_device_properties(i)
        info["devices"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                                "memory_gib": round(p.total_memory / 2**30, 1),
                                "multiprocessors": p.multi_processor_count,
                                "bf16": torch.cuda.is_bf16_supported()})
    return info


# ---- generated data --------------------------------------------------------------------------------------
def make_npz(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A cifar10_jpeg.npz in the development data's format (JPEG bytes, offsets, labels, classes) of random
    class-coloured 32 x 32 images: what --quick trains on where the real one is absent."""
    import io
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    arrays = {"classes": np.array(classes)}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % len(classes)
        blobs = []
        for y in labels:
            colour = 25 * y + rng.integers(0, 20, 3)
            img = np.clip(rng.normal(colour, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=75)
            blobs.append(buf.getvalue())
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "cifar10_jpeg.npz", **arrays)
    return folder / "cifar10_jpeg.npz"


def data_info(cache: Path) -> dict:
    """The sizes of the images bench/train.py decoded into `cache` (its arrays.npz)."""
    import numpy as np
    z = np.load(cache / "arrays.npz")
    return {"train": int(z["ytr"].shape[0]), "test": int(z["yte"].shape[0]), "cache": str(cache),
            "cifar_dir": str(cache / "cifar")}


def kaggle_folder(folder: Path, total: int, seed: int = 0) -> Path:
    """A Kaggle-layout test folder (test/1.png .. total.png) of random images, for the small prediction check
    where export.py is absent."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    (folder / "test").mkdir(parents=True, exist_ok=True)
    for i in range(1, total + 1):
        img = np.clip(rng.normal(rng.integers(30, 220, 3), 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / "test" / f"{i}.png")
    return folder


# ---- host syncs ------------------------------------------------------------------------------------------
def short_path(filename: str) -> str:
    """A frame's file, relative to the repository or to the folder that holds its package."""
    p = Path(filename)
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        pass
    parts = p.parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    return filename


def in_project(filename: str) -> bool:
    rel = short_path(filename)
    return rel.startswith(("dtrain/", "bench/")) and not rel.endswith("gpu_checks.py")


@dataclass
class SyncEvent:
    phase: str
    site: str          # innermost frame: file:line of the call that synchronised
    caller: str        # innermost frame in dtrain/ (or bench/): file:line in function
    code: str          # that frame's source line
    thread: str


@dataclass
class SyncCounter:
    """Collects the warnings of torch.cuda.set_sync_debug_mode("warn"), each with the phase under way (set by
    the hooks below) and its call site. Other warnings are shown as usual."""
    phase: str = "before"
    events: list = field(default_factory=list)
    active: bool = False

    def record(self, stack) -> None:
        frames = [f for f in stack if not f.filename.endswith(("warnings.py", "gpu_checks.py"))]
        top = frames[-1] if frames else None
        own = next((f for f in reversed(frames) if in_project(f.filename)), None)
        site = f"{short_path(top.filename)}:{top.lineno}" if top else "?"
        caller = f"{short_path(own.filename)}:{own.lineno} in {own.name}" if own else "-"
        code = linecache.getline(own.filename, own.lineno).strip() if own else ""
        self.events.append(SyncEvent(self.phase, site, caller, code, threading.current_thread().name))

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if SYNC_MESSAGE in str(message):
            self.record(traceback.extract_stack()[:-1])
        else:
            self._previous(message, category, filename, lineno, file, line)

    @contextlib.contextmanager
    def counting(self, cuda: bool):
        """Count inside the block: the sync debug mode on (CUDA only), every such warning shown to _show."""
        import torch
        with warnings.catch_warnings():  # restores the filters and showwarning on the way out
            warnings.filterwarnings("always", message=SYNC_MESSAGE)
            self._previous = warnings.showwarning
            warnings.showwarning = self._show
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            self.active = True
            try:
                yield self
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
                self.active = False

    def per_phase(self) -> Counter:
        return Counter(e.phase for e in self.events)

    def sites(self) -> list[dict]:
        """Distinct call sites, most frequent first, with the phases they came in."""
        groups: dict = {}
        for e in self.events:
            g = groups.setdefault((e.site, e.caller), {"site": e.site, "caller": e.caller, "code": e.code,
                                                        "count": 0, "phases": Counter(), "threads": set()})
            g["count"] += 1
            g["phases"][e.phase] += 1
            g["threads"].add(e.thread)
        out = sorted(groups.values(), key=lambda g: -g["count"])
        for g in out:
            g["phases"], g["threads"] = dict(g["phases"]), sorted(g["threads"])
        return out


def phase_per_item(loader, counter: SyncCounter, name, done: str) -> None:
    """Make `loader.batches` set counter.phase = name() before fetching each batch, and `done` at its end."""
    original = loader.batches

    def batches(*a, **kw):
        it = original(*a, **kw)
        while True:
            counter.phase = name()
            try:
                item = next(it)
            except StopIteration:
                counter.phase = done
                return
            yield item

    loader.batches = batches


def is_log_step(step: int, log_every: int, steps_per_epoch: int) -> bool:
    """Whether dtrain's loop reads the loss at this optimiser step (grad_accum 1): a --log-every step or the
    last batch of an epoch."""
    return step % log_every == 0 or step % steps_per_epoch == 0


def train_sync_report(counter: SyncCounter, run: dict, cuda: bool, argv) -> dict:
    """(b)'s figures: syncs per step, per other phase, the non-log steps that had any, the call sites."""
    phases = counter.per_phase()
    steps = run.get("steps_done", 0)
    log_every, per_epoch = run.get("log_every", 20), run.get("steps_per_epoch", 1) or 1
    per_step = {s: phases.get(f"step {s}", 0) for s in range(1, steps + 1)}
    log_steps = [s for s in per_step if is_log_step(s, log_every, per_epoch)]
    unexpected = {s: n for s, n in per_step.items() if n and s != 1 and s not in log_steps}
    other = {p: n for p, n in phases.items() if not p.startswith("step ")}
    return {"cuda": cuda, "counted": cuda, "argv": list(argv), "steps": steps, "log_every": log_every,
            "steps_per_epoch": per_epoch, "total": len(counter.events), "per_step": per_step,
            "log_steps": log_steps, "step1": per_step.get(1, 0),
            "in_log_steps": sum(per_step[s] for s in log_steps),
            "non_log_steps_with_syncs": unexpected, "other_phases": other, "sites": counter.sites()}


def train_syncs(argv: list[str]) -> dict:
    """Run `dtrain train ARGV` in this process and count its host syncs from the start of Trainer.fit."""
    import torch
    from dtrain import engine
    from dtrain.main import run
    cuda = torch.cuda.is_available()
    counter, facts = SyncCounter(), {}
    original_fit = engine.Trainer.fit

    def fit(self):
        facts.update(log_every=self.spec.log_every, steps_per_epoch=len(self.train_loader),
                     total_steps=self.total_steps, grad_accum=self.spec.grad_accum)
        phase_per_item(self.train_loader, counter, lambda: f"step {self.state.step + 1}",
                       "epoch end (before the reduction)")
        original_train_epoch, original_end_epoch = self.train_epoch, self.end_epoch

        def train_epoch():
            counter.phase = f"epoch {self.state.epoch + 1} start"
            return original_train_epoch()

        def end_epoch():
            counter.phase = f"epoch {self.state.epoch + 1} end (reduce, evaluate, save)"
            return original_end_epoch()

        self.train_epoch, self.end_epoch = train_epoch, end_epoch
        counter.phase = "fit start"
        with counter.counting(cuda):
            try:
                return original_fit(self)
            finally:
                facts["steps_done"] = self.state.step
                counter.phase = "after fit"

    engine.Trainer.fit = fit
    try:
        summary = run(argv)
    finally:
        engine.Trainer.fit = original_fit
    report = train_sync_report(counter, facts, cuda, argv)
    report["summary"] = {k: v for k, v in (summary or {}).items() if isinstance(v, (int, float, str, type(None)))}
    if not cuda:
        report["skipped"] = "torch.cuda.set_sync_debug_mode needs CUDA: the steps ran, nothing was counted"
    return report


def predict_syncs(argv: list[str]) -> dict:
    """Run `dtrain predict ARGV` in this process and count its host syncs in the prediction loop (predict_set):
    per batch and after the last one; also whether the loader's host batches were pinned."""
    import torch
    import dtrain.predict as P
    from dtrain.data import loader as L
    cuda = torch.cuda.is_available()
    counter, facts = SyncCounter(), {"batches": 0, "pinned": []}
    original_set, original_tracked, original_host = P.predict_set, P.ShardProgress.batches, L.ArrayLoader._host_batch

    def host_batch(self, idx):
        batch = original_host(self, idx)
        if len(facts["pinned"]) < 3:
            facts["pinned"].append([bool(t.is_pinned()) for t in batch])
        return batch

    def tracked_batches(self, *a):
        def name():
            facts["batches"] += 1
            return f"batch {facts['batches']}"
        it = original_tracked(self, *a)
        while True:
            counter.phase = name()
            try:
                item = next(it)
            except StopIteration:
                facts["batches"] -= 1
                counter.phase = "after the batches (concatenate, gather, check)"
                return
            yield item

    def predict_set(args, acc, console, m, imageset, cached):
        facts.update(source="cache" if cached else ("memory" if imageset.in_memory else "files"),
                     images=len(imageset), device=str(acc.device))
        counter.phase = "predict start"
        with counter.counting(cuda):
            return original_set(args, acc, console, m, imageset, cached)

    P.predict_set, P.ShardProgress.batches, L.ArrayLoader._host_batch = predict_set, tracked_batches, host_batch
    try:
        result = P.run(argv)
    finally:
        P.predict_set, P.ShardProgress.batches, L.ArrayLoader._host_batch = original_set, original_tracked, original_host
    phases = counter.per_phase()
    per_batch = {b: phases.get(f"batch {b}", 0) for b in range(1, facts["batches"] + 1)}
    report = {"cuda": cuda, "counted": cuda, "argv": list(argv), "total": len(counter.events), **facts,
              "per_batch": per_batch, "batches_with_syncs": {b: n for b, n in per_batch.items() if n},
              "other_phases": {p: n for p, n in phases.items() if not p.startswith("batch ")},
              "sites": counter.sites(),
              "result": {k: v for k, v in (result or {}).items() if isinstance(v, (int, float, str))}}
    if not cuda:
        report["skipped"] = "torch.cuda.set_sync_debug_mode needs CUDA: prediction ran, nothing was counted"
    return report


def print_sync_report(report: dict, unit: str) -> None:
    per = report.get("per_step") or report.get("per_batch") or {}
    print(f"host syncs{' (NOT counted: ' + report['skipped'] + ')' if report.get('skipped') else ''}: "
          f"{report['total']} in all")
    print(f"per {unit}: " + ", ".join(f"{k}:{v}" for k, v in per.items()))
    for phase, n in report.get("other_phases", {}).items():
        print(f"  {phase}: {n}")
    for s in report["sites"]:
        print(f"  {s['count']:4d} x {s['site']}  <- {s['caller']}  `{s['code']}`  phases {s['phases']}")


# ---- (d') a checkpoint without a GPU ---------------------------------------------------------------------
def tensor_devices(value, counts: Counter | None = None) -> Counter:
    import torch
    counts = Counter() if counts is None else counts
    if isinstance(value, torch.Tensor):
        counts[str(value.device)] += 1
    elif isinstance(value, dict):
        for v in value.values():
            tensor_devices(v, counts)
    elif isinstance(value, (list, tuple)):
        for v in value:
            tensor_devices(v, counts)
    return counts


def startup_lines(log: Path) -> list[str]:
    """The runs' start-up lines (processes/device/precision) and resume messages in a log."""
    if not log.is_file():
        return []
    keep = ("processes:", "resumed from", "no ", "dtrain ")
    return [line.strip() for line in log.read_text(errors="replace").splitlines() if line.startswith(keep)]


def load_cpu(ckpt: Path, metrics: Path, log: Path) -> dict:
    """torch.load(ckpt, weights_only=True), no map_location, in this process (run it with no GPU visible)."""
    import torch
    out = {"checkpoint": str(ckpt), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "cuda_available": torch.cuda.is_available()}
    try:
        state = torch.load(ckpt, weights_only=True)
        out.update(loaded=True, tensor_devices=dict(tensor_devices(state)), step=state.get("step"),
                   epoch=state.get("epoch"), scaler=state.get("scaler"))
    except Exception as e:  # the check's point: what a plain load says
        out.update(loaded=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    out["skipped_steps"] = [{"epoch": r.get("epoch"), "step": r.get("step"), "skipped_steps": r.get("skipped_steps")}
                            for r in rows]
    out["startup_lines"] = startup_lines(log)
    return out


# ---- (h) the profiler ------------------------------------------------------------------------------------
def union_us(intervals) -> float:
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuCtxSynchronize")


def profile_summary(prof, seconds: float, steps: int, cuda: bool, images_per_step: int) -> dict:
    """Wall time per step, GPU kernel time and busy share, kernel launches and runtime sync calls per step,
    the top kernels and CPU ops."""
    from torch.autograd import DeviceType
    events = prof.events()
    kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    kernel_us = sum(b - a for a, b in spans)
    syncs = Counter(e.name for e in events if e.name in SYNC_CALLS)
    launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                   "cuLaunchKernelEx"))
    by_kernel = Counter()
    for e in kernels:
        by_kernel[e.name] += e.time_range.elapsed_us()
    avg = prof.key_averages()
    cpu_ops = sorted(avg, key=lambda e: -e.self_cpu_time_total)[:10]
    wall_us = seconds * 1e6
    return {"steps": steps, "seconds": seconds, "ms_per_step": seconds * 1e3 / steps,
            "images_per_second": images_per_step * steps / seconds if seconds else None, "cuda": cuda,
            "kernel_ms_per_step": kernel_us / 1e3 / steps if cuda else None,
            "gpu_busy": union_us(spans) / wall_us if cuda and wall_us else None,
            "kernels_per_step": len(kernels) / steps if cuda else None, "launches_per_step": launches / steps,
            "runtime_sync_calls": dict(syncs),
            "top_kernels_ms": [(n[:120], round(t / 1e3, 3)) for n, t in by_kernel.most_common(10)],
            "top_cpu_ops_ms": [(e.key[:120], round(e.self_cpu_time_total / 1e3, 3)) for e in cpu_ops]}


def profile_table(prof, cuda: bool) -> str:
    avg = prof.key_averages()
    for key in (("self_device_time_total", "self_cuda_time_total") if cuda else ()) + ("self_cpu_time_total",):
        try:
            return avg.table(sort_by=key, row_limit=30, max_name_column_width=70)
        except Exception:  # the sort key's name differs between torch versions
            continue
    return avg.table(row_limit=30)


def profile_run(argv: list[str], warmup: int, steps: int) -> tuple[dict, str]:
    """Train `dtrain train ARGV` in this process; profile the optimiser steps warmup+1 .. warmup+steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from dtrain import engine
    from dtrain.main import run
    cuda = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    state: dict = {}
    original = engine.Trainer.finish_step

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def finish_step(self, *a, **kw):
        agreed = original(self, *a, **kw)
        if self.state.step == warmup:
            sync()
            state["batch"] = self.train_loader.batch_size
            prof.start()
            state["t0"] = time.perf_counter()
        elif self.state.step == warmup + steps and "t0" in state:
            sync()
            state["seconds"] = time.perf_counter() - state["t0"]
            prof.stop()
        return agreed

    engine.Trainer.finish_step = finish_step
    try:
        run(argv)
    finally:
        engine.Trainer.finish_step = original
    if "seconds" not in state:
        raise SystemExit(f"the run ended before step {warmup + steps}: nothing profiled")
    return profile_summary(prof, state["seconds"], steps, cuda, state["batch"]), profile_table(prof, cuda)


# ---- the summary -----------------------------------------------------------------------------------------
# (part id, row label, what it measures); gpu.sh runs them in this order
PARTS = [
    ("a-env", "a", "torch.cuda.is_available(), versions, the machine"),
    ("data", "data", "CIFAR-10 (JPEG-75) decoded once for every part (bench/train.py's cache)"),
    ("b-syncs", "b", "host syncs in the first steps of `--recipe resnet18-fast` (sync debug mode 'warn')"),
    ("c-eager", "c", "bench/train.py throughput: model-only ceiling, fast path, seeds' pipeline (eager)"),
    ("c-compiled", "c", "the same with --compile: ceiling compiled, fast path compiled"),
    ("d-fp16", "d", "fp16 + --grad-clip, stopped by --max-steps, then --resume auto to the end"),
    ("d-load", "d'", "(d)'s last.pt: plain torch.load(weights_only=True) with no GPU visible; skipped_steps; start-up"),
    ("e-airbench", "e", "airbench94 (the airbench 0.1.8 package, train94) and `--arch airbench`"),
    ("f-resnet18", "f", "time to accuracy, `--recipe resnet18-fast`, seed 0"),
    ("f-resnet18-seed1", "f", "the same, seed 1 (runs only when the time left allows it)"),
    ("e-muon", "e'", "time to accuracy, `--recipe airbench94-muon`, seed 0 (runs only when the time left allows it)"),
    ("g-predict", "g", "bench/predict.py: Kaggle test PNGs made here, from PNGs and from the packed cache"),
    ("g-syncs", "g'", "host syncs of `dtrain predict` on a small set from the cache (pinned, non-blocking copies)"),
    ("h-profile", "h", "torch.profiler over steps of the fast path (`--recipe resnet18-fast`)"),
]


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pct(v) -> str:
    return "-" if v is None else f"{v:.2%}"


def sync_figure(r: dict, unit: str) -> str:
    if r.get("skipped"):
        return f"skipped: {r['skipped']}"
    sites = "; ".join(f"{s['count']} x {s['caller'] if s['caller'] != '-' else s['site']}" for s in r["sites"][:6])
    if unit == "step":
        odd = r["non_log_steps_with_syncs"]
        return (f"{r['total']} syncs over {r['steps']} steps + the end: step 1 (warm-up timing) {r['step1']}, "
                f"log steps {r['log_steps']} {r['in_log_steps']} in all, other steps "
                f"{'NONE' if not odd else odd}; outside steps {r['other_phases']}; sites: {sites}")
    odd = r["batches_with_syncs"]
    return (f"{r['total']} syncs; {r.get('batches', 0)} batches of {r.get('images', '?')} images from "
            f"{r.get('source', '?')}, pinned {r.get('pinned', [])[:1]}; batches with syncs: "
            f"{'NONE' if not odd else odd}; outside batches {r['other_phases']}; sites: {sites}")


def throughput_figure(res: dict) -> str | None:
    t = (res or {}).get("throughput")
    if not t:
        return None
    c, f = t["ceiling"], t["fast"]["images_per_second"]
    out = [f"ceiling {c:,.0f} img/s"]
    if "ceiling_compiled" in t:
        out.append(f"ceiling compiled {t['ceiling_compiled']:,.0f} img/s")
    fast = f"fast path {f:,.0f} img/s = {f / c:.2f} x ceiling (goal >= 0.9)"
    if t["fast"].get("warmup_seconds") is not None:
        fast += f", warm-up {t['fast']['warmup_seconds']:.1f} s"
    out.append(fast)
    if t.get("seeds"):
        out.append(f"seeds' pipeline {t['seeds']:,.0f} img/s; fast = {f / t['seeds']:.1f} x seeds (goal >= 4)")
    return "; ".join(out) + f" (batch {t['batch']})"


def accuracy_runs(r: dict) -> str:
    runs = r["runs"]
    accs = [x["val_acc"] for x in runs]
    secs = [x["train_seconds"] for x in runs]
    text = (f"{sum(accs) / len(accs):.2%} (min {min(accs):.2%}, max {max(accs):.2%}) in "
            f"{sum(secs) / len(secs):.1f} s of training, {len(runs)} seed(s)")
    if runs and "warmup_seconds" in runs[0]:
        text += (f"; warm-up {runs[0]['warmup_seconds']:.1f} s, start-up+exit {runs[0]['startup_seconds']:.1f} s, "
                 f"{runs[0]['epochs']} epochs")
    return text


def logged_throughput(stage: Path, part: str) -> str | None:
    """The throughput figures bench/train.py logged before it was cut off (its results.json comes at the end)."""
    log = stage / "logs" / f"{part}.log"
    found = re.findall(r"\[bench\] throughput: ([a-z ]+ [\d,]+ img/s)", log.read_text(errors="replace")) \
        if log.is_file() else []
    return "; ".join(found) or None


def partial_run(metrics: list[Path]) -> str | None:
    """How far a training run cut off got, from its metrics.jsonl: epochs, time, the last evaluation."""
    if not metrics:
        return None
    rows = [json.loads(x) for x in metrics[0].read_text().splitlines() if x.strip()]
    if not rows:
        return None
    last, evals = rows[-1], [r for r in rows if r.get("val_acc") is not None]
    text = (f"got to epoch {last['epoch']} (step {last['step']}) in {last.get('elapsed_seconds', 0):.1f} s of training "
            f"(warm-up {last.get('warmup_seconds') or 0:.1f} s), last epoch {last.get('images_per_second') or 0:,.0f} "
            f"img/s")
    if evals:
        text += f"; val_acc {evals[-1]['val_acc']:.2%} at epoch {evals[-1]['epoch']}"
    return text


def airbench_figure(res: dict) -> str | None:
    if not res:
        return None
    out = []
    pkg, ab = res.get("airbench-pkg"), res.get("airbench")
    if pkg:
        out.append(f"airbench94 package: skipped: {pkg['skipped']}" if "skipped" in pkg else
                   f"airbench94 package: {accuracy_runs(pkg)}")
    if ab:
        out.append(f"--arch airbench: {accuracy_runs(ab)}")
    if pkg and ab and pkg.get("runs") and ab.get("runs"):
        ratio = (sum(x["train_seconds"] for x in ab["runs"]) / len(ab["runs"])) / \
            (sum(x["train_seconds"] for x in pkg["runs"]) / len(pkg["runs"]))
        out.append(f"time ratio dtrain/airbench94 {ratio:.2f} (goal <= 1.5; accuracy goal >= 90.7%)")
    return "; ".join(out) or None


def fp16_figure(work: Path) -> str | None:
    rows = [json.loads(x) for x in (work / "d-fp16" / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (work / "d-fp16" / "metrics.jsonl").is_file() else []
    if not rows:
        return None
    cfg = read_json(work / "d-fp16" / "config.json") or {}
    lines = [line for line in startup_lines(work / "stage" / "logs" / "d-fp16.log") if line.startswith("resumed")]
    last = rows[-1]
    return (f"precision {cfg.get('precision')}, grad-clip {cfg.get('grad_clip')}; rows (epoch/step/skipped_steps): "
            + ", ".join(f"{r['epoch']}/{r['step']}/{r.get('skipped_steps')}" for r in rows)
            + f"; final val_acc {pct(last.get('val_acc'))}; " + (lines[0] if lines else "no resume line in the log"))


def load_figure(r: dict) -> str:
    head = (f"loaded on a process with CUDA_VISIBLE_DEVICES={r['cuda_visible_devices']!r} (cuda available "
            f"{r['cuda_available']}): tensors {r['tensor_devices']}, step {r['step']}" if r.get("loaded") else
            f"FAILED to load with no GPU visible: {r.get('error')}")
    skipped = ", ".join(f"{x['epoch']}/{x['step']}:{x['skipped_steps']}" for x in r.get("skipped_steps", []))
    start = [line for line in r.get("startup_lines", []) if line.startswith("processes:")]
    return f"{head}; skipped_steps (epoch/step:n) {skipped or '-'}; start-up: {start[0] if start else '-'}"


# bench/predict.py's stages, by a phrase of their names, as the summary names them
PREDICT_STAGES = (("plain loop", "plain loop"), ("FileLoader", "dtrain loader from PNGs"),
                  ("cache build", "cache build"), ("ArrayLoader", "dtrain loader from the cache"),
                  ("--no-cache", "predict.py from PNGs"), ("empty cache", "predict.py, empty cache"),
                  ("cache in place", "predict.py from the cache"))


def predict_figure(r: dict, work: Path) -> str | None:
    if not r:
        return None
    parts = []
    for row in r["rows"]:
        name = next((short for phrase, short in PREDICT_STAGES if phrase in row["stage"]), row["stage"][:40])
        parts.append(f"{name} {row['seconds']:.1f} s ({row['images']:,} at {row['images_per_second']:,.0f} img/s)")
    score = kaggle_score(work)
    return "; ".join(parts) + "; goals: predict.py <= 30 s from PNGs, <= 10 s from the cache (300,000)" + \
        (f"; {score}" if score else "")


def kaggle_score(work: Path) -> str | None:
    """The submission's accuracy on the real test images among the distractors (export.py's answer key)."""
    import csv
    answers, sub = work / "kaggle_answers.csv", work / "tmp" / "dtrain-bench" / "submission.csv"
    if not (answers.is_file() and sub.is_file()):
        return None
    ours = dict(list(csv.reader(open(sub)))[1:])
    key = list(csv.reader(open(answers)))[1:]
    ckpt = (work / "stage" / "g-predict.checkpoint").read_text().strip() \
        if (work / "stage" / "g-predict.checkpoint").is_file() else "?"
    hits = sum(ours.get(i) == label for i, label in key)
    return f"{hits / max(len(key), 1):.2%} of the {len(key):,} real test images right ({ckpt})"


def profile_figure(r: dict) -> str:
    text = f"{r['steps']} steps: {r['ms_per_step']:.2f} ms/step ({r['images_per_second']:,.0f} img/s)"
    if r.get("cuda"):
        text += (f", kernels {r['kernel_ms_per_step']:.2f} ms/step, GPU busy {r['gpu_busy']:.0%}, "
                 f"{r['kernels_per_step']:.0f} kernels/step")
    text += f", runtime sync calls {r['runtime_sync_calls'] or 'none'}"
    if r.get("top_kernels_ms"):
        text += "; top kernels (ms): " + ", ".join(f"{n[:40]} {t}" for n, t in r["top_kernels_ms"][:3])
    return text


def figure(part: str, work: Path) -> str | None:
    """The figures of a part from the files it left, or None when there are none."""
    stage = work / "stage"
    if part == "a-env":
        r = read_json(stage / "a-env.json")
        if not r:
            return None
        dev = r["devices"][0] if r["devices"] else None
        gpu = f"{dev['name']} (sm {dev['capability']}, {dev['memory_gib']} GiB, bf16 {dev['bf16']})" if dev \
            else "no GPU"
        pk = r["packages"]
        return (f"cuda available {r['cuda_available']}; {gpu}; torch {r['torch']} (CUDA {r['cuda']}, cuDNN "
                f"{r['cudnn']}), accelerate {pk['accelerate']}, torchvision {pk['torchvision']}, "
                f"triton {pk['triton']}, "
                f"Python {r['python']}; {r['cpu_cores']} cores ({r['cpu']}); wandb {pk['wandb'] or 'not installed'}")
    if part == "data":
        r = read_json(stage / "data.json")
        return f"{r['train']:,} train + {r['test']:,} test images ({r.get('source', '?')})" if r else None
    if part in ("b-syncs", "g-syncs"):
        r = read_json(stage / f"{part}.json")
        return sync_figure(r, "step" if part == "b-syncs" else "batch") if r else None
    if part in ("c-eager", "c-compiled"):
        return throughput_figure(read_json(work / part / "results.json")) or logged_throughput(stage, part)
    if part == "d-fp16":
        return fp16_figure(work)
    if part == "d-load":
        r = read_json(stage / "d-load.json")
        return load_figure(r) if r else None
    if part == "e-airbench":
        return airbench_figure(read_json(work / part / "results.json"))
    if part.startswith("f-resnet18"):
        r = (read_json(work / part / "results.json") or {}).get("resnet18")
        if r and r.get("runs"):
            return f"{r['recipe']}: {accuracy_runs(r)} (goal >= 93.0% in <= 120 s)"
        return partial_run(sorted((work / part / "runs").glob("*/metrics.jsonl")))
    if part == "e-muon":
        r = (read_json(work / part / "results.json") or {}).get("airbench")
        if r and r.get("runs"):
            return f"{r['recipe']}: {accuracy_runs(r)} (its source: 94.01% on the original images, ~3 points less here)"
        return partial_run(sorted((work / part / "runs").glob("*/metrics.jsonl")))
    if part == "g-predict":
        return predict_figure(read_json(stage / "g-predict.json"), work)
    if part == "h-profile":
        r = read_json(stage / "h-profile.json")
        return profile_figure(r) if r else None
    return None


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def part_row(part: str, label: str, what: str, work: Path, only: str = "all") -> dict:
    """A summary row: the part's status file (written by gpu.sh), its skip reason, figures and command."""
    stage = work / "stage"
    status = read_json(stage / f"{part}.status.json")
    skip = (stage / f"{part}.skip").read_text().strip() if (stage / f"{part}.skip").is_file() else None
    note = (stage / f"{part}.note").read_text().strip().replace("\n", "; ") if (stage / f"{part}.note").is_file() \
        else None
    cmd = (stage / f"{part}.cmd").read_text().strip().replace("\n", "; ") if (stage / f"{part}.cmd").is_file() else ""
    try:
        fig = figure(part, work)
    except Exception as e:  # a half-written file of a part cut short: say so, keep the table
        fig = f"(figures unreadable: {type(e).__name__}: {e})"
    state, seconds = "not run", None
    if status:
        seconds, state = status.get("seconds"), status.get("state", "?")
        if state == "cut":
            fig = f"CUT at its {status.get('cap')} s cap (exit {status.get('rc')}); " + (fig or "no figures")
        elif state == "failed":
            fig = f"FAILED (exit {status.get('rc')}): {status.get('last_line', '')}; " + (fig or "no figures")
        elif state == "not-started":
            fig = f"cut: not started, {status.get('reason', '')}"
    if skip:
        fig = f"skipped: {skip}" + (f"; {fig}" if fig and state in ("ok", "?") else "")
    if not status and not fig:
        fig = f"not run: not among --only {only}" if only != "all" else "not run yet (the run ended before this part)"
    if note:
        fig = f"{fig}; {note}"
    return {"part": part, "label": label, "what": what, "figures": fig or "(no figures: see the part's log)",
            "command": cmd, "seconds": seconds, "state": state if not skip else "skipped"}


def summary(work: Path, out: Path) -> list[dict]:
    """Write out (summary.md) and work/stage/summary.json from what the parts left; return the rows."""
    stage = work / "stage"
    meta = read_json(stage / "run.json") or {}
    rows = [part_row(p, label, what, work, meta.get("only", "all")) for p, label, what in PARTS]
    quick = " --quick (toy sizes on the CPU: the figures mean nothing)" if meta.get("quick") else ""
    lines = [f"# bench/gpu.sh{quick}",
             "", f"Started {meta.get('started', '?')}; budget {meta.get('budget', '?')} s; elapsed "
                 f"{meta.get('elapsed', '?')} s; data {meta.get('data', '?')}; host {meta.get('host', '?')}.", "",
             f"Cut short by design: {meta.get('cuts', '-')}", "",
             "| part | what | figure(s) | command | seconds |", "| --- | --- | --- | --- | ---: |"]
    for r in rows:
        sec = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        cmd = f"`{cell(r['command'])}`" if r["command"] else "-"
        lines.append(f"| {r['label']} | {cell(r['what'])} | {cell(r['figures'])} | {cmd} | {sec} |")
    lines += ["", "Per-part logs, raw JSON and the runs' metrics.jsonl/config.json: parts.tar.gz beside this file "
              "(`tar xzf parts.tar.gz`); commands are relative to the repository, $WORK is the scratch folder."]
    out.write_text("\n".join(lines) + "\n")
    (stage / "summary.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


def last_line(log: Path) -> str:
    """The last non-empty line of a log (the error a failed part ended with), without terminal colours."""
    if not log.is_file():
        return ""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in log.read_text(errors="replace").splitlines()]
    lines = [x for x in lines if x]
    return lines[-1][:300] if lines else ""


def write_status(stage: Path, part: str, rc: int, seconds: float, cap: int, log: Path) -> dict:
    """gpu.sh's record of a part that ran: ok, cut (its timeout: exit 124, or 137 after the kill), failed."""
    state = "ok" if rc == 0 else "cut" if rc in (124, 137) else "failed"
    status = {"part": part, "rc": rc, "seconds": round(seconds, 1), "cap": cap, "state": state,
              "last_line": last_line(log) if state != "ok" else ""}
    (stage / f"{part}.status.json").write_text(json.dumps(status))
    return status


def update_meta(stage: Path, pairs: list[str]) -> dict:
    """Set KEY=VALUE pairs (numbers as numbers) in stage/run.json."""
    path = stage / "run.json"
    meta = read_json(path) or {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            meta[key] = json.loads(value) if re.fullmatch(r"-?\d+(\.\d+)?|true|false", value) else value
        except ValueError:
            meta[key] = value
    path.write_text(json.dumps(meta, indent=1))
    return meta


# ---- the command line ------------------------------------------------------------------------------------
def write_json(path: str | None, data: dict) -> None:
    text = json.dumps(data, indent=1, default=str)
    if path:
        Path(path).write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("env")
    p.add_argument("--json")
    p = sub.add_parser("make-npz")
    p.add_argument("folder", type=Path)
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--test", type=int, default=32)
    p = sub.add_parser("data-info")
    p.add_argument("cache", type=Path)
    p.add_argument("--source", default="?")
    p.add_argument("--json")
    p = sub.add_parser("kaggle")
    p.add_argument("folder", type=Path)
    p.add_argument("--total", type=int, required=True)
    for name in ("train-syncs", "predict-syncs", "profile"):
        p = sub.add_parser(name)
        p.add_argument("--json")
        if name == "profile":
            p.add_argument("--table")
            p.add_argument("--warmup", type=int, default=10)
            p.add_argument("--steps", type=int, default=20)
        p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the dtrain arguments")
    p = sub.add_parser("load-cpu")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--metrics", type=Path, default=Path("-"))
    p.add_argument("--log", type=Path, default=Path("-"))
    p.add_argument("--json")
    p = sub.add_parser("summary")
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--elapsed", help="seconds since the run started, for the header")
    p = sub.add_parser("status")
    p.add_argument("stage", type=Path)
    p.add_argument("part")
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--cap", type=int, required=True)
    p.add_argument("--log", type=Path, required=True)
    p = sub.add_parser("not-started")
    p.add_argument("stage", type=Path)
    p.add_argument("part")
    p.add_argument("reason")
    p = sub.add_parser("meta")
    p.add_argument("stage", type=Path)
    p.add_argument("pairs", nargs="*", help="KEY=VALUE")
    a = ap.parse_args(argv)
    rest = [x for x in getattr(a, "args", []) or []]
    rest = rest[1:] if rest[:1] == ["--"] else rest

    if a.cmd == "env":
        info = env_info()
        print(json.dumps(info, indent=1))
        write_json(a.json, info)
    elif a.cmd == "make-npz":
        print(make_npz(a.folder, a.train, a.test))
    elif a.cmd == "data-info":
        info = {**data_info(a.cache), "source": a.source}
        print(json.dumps(info))
        write_json(a.json, info)
    elif a.cmd == "kaggle":
        print(kaggle_folder(a.folder, a.total))
    elif a.cmd == "train-syncs":
        report = train_syncs(rest)
        print_sync_report(report, "step")
        write_json(a.json, report)
    elif a.cmd == "predict-syncs":
        report = predict_syncs(rest)
        print_sync_report(report, "batch")
        write_json(a.json, report)
    elif a.cmd == "profile":
        result, table = profile_run(rest, a.warmup, a.steps)
        print(table)
        print(json.dumps(result, indent=1))
        write_json(a.json, result)
        if a.table:
            Path(a.table).write_text(table)
    elif a.cmd == "load-cpu":
        result = load_cpu(a.checkpoint, a.metrics, a.log)
        print(json.dumps(result, indent=1, default=str))
        write_json(a.json, result)
        return 0 if result["loaded"] else 1
    elif a.cmd == "status":
        print(json.dumps(write_status(a.stage, a.part, a.rc, a.seconds, a.cap, a.log)))
    elif a.cmd == "not-started":
        (a.stage / f"{a.part}.status.json").write_text(json.dumps({"part": a.part, "state": "not-started",
                                                                   "reason": a.reason, "seconds": 0}))
    elif a.cmd == "meta":
        update_meta(a.stage, a.pairs)
    else:
        if a.elapsed:
            update_meta(a.work / "stage", [f"elapsed={a.elapsed}"])
        for r in summary(a.work, a.out):
            print(f"{r['label']:>4} {r['part']:<17} {r['state']:<11} {str(r['figures'])[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
