#!/usr/bin/env python3
"""Training speed and time-to-accuracy on one machine, printed as one markdown table.

    python bench/train.py --npz ../shared/data/cifar10_jpeg.npz                  # everything (GPU: ~10 min)
    python bench/train.py --npz ../shared/data/cifar10_jpeg.npz --quick          # CPU smoke run, minutes
    python bench/train.py --npz ... --sections throughput,airbench-pkg           # some sections; results
                                                                                  # accumulate in --out

Sections (rows of the table):
  throughput    ResNet18 training images/s, steady state:
                  model-only ceiling: the training step alone (bf16 autocast, channels_last, batch 512,
                    fused SGD) on synthetic data already on the device;
                  fast path: dtrain/main.py --recipe resnet18-fast (GPU-resident uint8 images, on-device
                    crop/flip/Cutout, bf16, channels_last, batch 512), the second epoch's images/s from
                    metrics.jsonl (the first holds cudnn autotuning and, with --compile, compilation);
                  seeds' pipeline: a torchvision-style Dataset over the uint8 images with PIL transforms
                    RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor + Normalize, DataLoader with 8
                    workers, batch 128, fp32, and the per-step loss.item()/accuracy .item() of the seeds'
                    training loops.
  resnet18,     time-to-accuracy of `dtrain/main.py --arch resnet18` / `--arch airbench` (their default
  airbench      recipes unless --recipe-resnet18/--recipe-airbench), one process per seed: final test
                accuracy (mean and min..max over seeds), training time from the first step to the end of
                the last evaluation with the warm-up (first optimiser step: cudnn autotuning, compilation)
                and the start-up (process start to the first step, plus exit) shown apart.
  airbench-pkg  the PyPI package airbench (0.1.8, Keller Jordan)'s train94 on the same images
                (cifar10/{train,test}.pt written by this script), its own timing (it excludes its warm-up
                run and per-epoch logging evaluations, includes whitening init and the final TTA
                evaluation). Needs CUDA; the package is imported from --airbench-src (sdist .tar.gz or a
                folder) or the environment. Skipped with the reason when either is missing.

Data: --npz decodes the JPEG-75 CIFAR-10 (../shared/data/cifar10_jpeg.npz) once into --cache; --data-dir
takes an exported cifar-10-batches-py folder instead.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MAIN = REPO / "dtrain" / "main.py"
SECTIONS = ["throughput", "resnet18", "airbench", "airbench-pkg"]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# ---- data ------------------------------------------------------------------------------------------------
def _decode_chunk(job):
    from PIL import Image
    blob, offsets = job
    return np.stack([np.asarray(Image.open(io.BytesIO(blob[offsets[i] - offsets[0]:offsets[i + 1] - offsets[0]]))
                                .convert("RGB")) for i in range(len(offsets) - 1)])


def decode_npz(path: Path, split: str, n: int | None, workers: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    z = np.load(path)
    off, lab = z[f"{split}_offsets"], z[f"{split}_labels"].astype(np.int64)
    n = len(lab) if n is None else min(n, len(lab))
    data = z[f"{split}_jpeg"]
    step = 2000
    jobs = [(data[off[i]:off[min(i + step, n)]].tobytes(), off[i:min(i + step, n) + 1]) for i in range(0, n, step)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as ex:
            parts = list(ex.map(_decode_chunk, jobs))
    else:
        parts = [_decode_chunk(j) for j in jobs]
    return np.concatenate(parts), lab[:n], [str(c) for c in z["classes"]]


def write_cifar_batches(root: Path, train, test, classes) -> None:
    """The standard pickled-batch layout, which dtrain's cifar reader reads."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in (("train", train), ("test", test)):
        flat = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
        parts = np.array_split(np.arange(len(x)), 5) if split == "train" else [np.arange(len(x))]
        for k, idx in enumerate(parts):
            name = f"data_batch_{k + 1}" if split == "train" else "test_batch"
            with open(d / name, "wb") as f:
                pickle.dump({"batch_label": f"{split} {k + 1}", "labels": [int(v) for v in y[idx]],
                             "data": flat[idx], "filenames": [f"{split}_{i}.png" for i in idx]}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes, "num_cases_per_batch": 10000, "num_vis": 3072}, f)


def write_airbench_data(root: Path, train, test, classes) -> Path:
    """airbench's CifarLoader reads DIR/cifar10/{train,test}.pt with torch.load: a dict of 'images' (uint8
    N x 32 x 32 x 3, torchvision's CIFAR10.data layout), 'labels' (int64 N) and 'classes' (list of str)."""
    d = root / "cifar10"
    d.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in (("train", train), ("test", test)):
        torch.save({"images": torch.from_numpy(np.ascontiguousarray(x)), "labels": torch.from_numpy(y).long(),
                    "classes": list(classes)}, d / f"{split}.pt")
    return root


def prepare_data(args) -> dict:
    """Decoded arrays (for the in-process throughput rows) and the folders the subprocesses read."""
    n_train, n_test = (args.quick_train, args.quick_test) if args.quick else (None, None)
    tag = f"{n_train or 'all'}-{n_test or 'all'}"
    cache = Path(args.cache) / tag
    stamp = cache / "arrays.npz"
    if args.data_dir:
        from dtrain.data.cifar import read
        tr, te = read(args.data_dir)
        train = (tr.images.numpy()[:n_train], tr.labels.numpy()[:n_train])
        test = (te.images.numpy()[:n_test], te.labels.numpy()[:n_test])
        classes = list(tr.classes)
    elif stamp.is_file():
        z = np.load(stamp)
        train, test, classes = (z["xtr"], z["ytr"]), (z["xte"], z["yte"]), [str(c) for c in z["classes"]]
    else:
        if not args.npz or not Path(args.npz).is_file():
            sys.exit(f"error: no data: give --npz PATH/cifar10_jpeg.npz (not found: {args.npz}) or --data-dir")
        t0 = time.perf_counter()
        xtr, ytr, classes = decode_npz(Path(args.npz), "train", n_train, args.decode_workers)
        xte, yte, _ = decode_npz(Path(args.npz), "test", n_test, args.decode_workers)
        train, test = (xtr, ytr), (xte, yte)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(stamp, xtr=xtr, ytr=ytr, xte=xte, yte=yte, classes=np.array(classes))
        log(f"decoded {len(ytr)} + {len(yte)} JPEGs in {time.perf_counter() - t0:.1f} s -> {cache}")
    cifar_dir = cache / "cifar"
    if not (cifar_dir / "cifar-10-batches-py" / "test_batch").is_file():
        write_cifar_batches(cifar_dir, train, test, classes)
    ab_dir = cache / "airbench"
    if not (ab_dir / "cifar10" / "test.pt").is_file():
        write_airbench_data(ab_dir, train, test, classes)
    return {"train": train, "test": test, "classes": classes, "cifar_dir": cifar_dir, "airbench_dir": ab_dir}


# ---- helpers ---------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()} x {os.cpu_count()} (torch {torch.__version__}), no CUDA"


def child_env() -> dict:
    env = dict(os.environ)
    env.update({"WANDB_MODE": "disabled", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_main(argv: list[str], out: Path, timeout: float) -> tuple[list[dict], float]:
    """dtrain/main.py in its own process; (metrics rows, wall seconds)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(MAIN), *argv, "--output-dir", str(out), "--no-wandb", "--no-plots"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout, cwd=REPO)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows, wall


# ---- section 1: throughput -------------------------------------------------------------------------------
def row_model(device, channels_last: bool, arch: str = "resnet18"):
    from dtrain.models import build_model
    model = build_model(arch, 10).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def quick_argv(args, arch_override: bool = False) -> list[str]:
    """dtrain flags of a --quick run: tiny batches; fp32 without CUDA (bf16 autocast on a CPU without bf16 units
    is emulated, ~8x slower than fp32); --quick-arch instead of resnet18 where arch_override."""
    if not args.quick:
        return []
    argv = ["-b", str(args.quick_batch), "--eval-batch-size", str(args.quick_batch)]
    if not torch.cuda.is_available():
        argv += ["--precision", "no"]
    if arch_override and args.quick_arch != "resnet18":
        argv += ["--arch", args.quick_arch]
    return argv


def ceiling(device, batch: int, warmup: int, steps: int, compile: bool, arch: str = "resnet18") -> float:
    """The training step alone: synthetic normalised images already on the device, channels_last, bf16 on CUDA
    (fp32 on the CPU, where bf16 is emulated)."""
    import torch.nn.functional as F
    model = row_model(device, True, arch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    step_model = torch.compile(model) if compile else model
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device, generator=g)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(step_model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


class SeedsDataset(torch.utils.data.Dataset):
    """torchvision's CIFAR10 __getitem__: uint8 H x W x C array -> PIL image -> transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def seeds_pipeline(device, images, labels, batch: int, workers: int, warmup: int, steps: int,
                   arch: str = "resnet18") -> float:
    import torch.nn.functional as F
    import torchvision.transforms as T
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(SeedsDataset(images, labels, transform), batch_size=batch, shuffle=True,
                                         num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=workers > 0)
    model = row_model(device, False, arch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    done, t0, running_loss, correct = 0, None, 0.0, 0
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                sync(device)
                t0 = time.perf_counter()
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            running_loss += loss.item()                      # the seeds' loops read loss and accuracy
            correct += out.argmax(1).eq(y).sum().item()      # every step (a host synchronisation each)
            done += 1
            if done == warmup + steps:
                break
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def fast_path(args, data, device) -> dict:
    """dtrain itself: 2 epochs of the resnet18-fast recipe; the second epoch's images/s."""
    argv = ["--recipe", args.recipe_fast, "--data-dir", str(data["cifar_dir"]), "--no-download", "--epochs", "2",
            "--eval-every", "2", "--save-every", "2", *quick_argv(args, arch_override=True)]
    if args.compile:
        argv += ["--compile"]
    rows, wall = run_main(argv, Path(args.out) / "runs" / "fastpath", args.timeout)
    return {"images_per_second": rows[-1]["images_per_second"], "first_epoch_images_per_second":
            rows[0]["images_per_second"], "warmup_seconds": rows[0].get("warmup_seconds"), "wall_seconds": wall}


def section_throughput(args, data, device) -> dict:
    q = args.quick
    batch = args.quick_batch if q else 512
    warm, steps = (1, 2) if q else (15, 60)
    arch = args.quick_arch if q else "resnet18"
    res = {"batch": batch}
    log("throughput: model-only ceiling")
    res["ceiling"] = ceiling(device, batch, warm, steps, False, arch)
    log(f"throughput: ceiling {res['ceiling']:,.0f} img/s")
    if args.compile:
        log("throughput: model-only ceiling, compiled")
        res["ceiling_compiled"] = ceiling(device, batch, max(warm, 3), steps, True, arch)
        log(f"throughput: ceiling compiled {res['ceiling_compiled']:,.0f} img/s")
    log("throughput: fast path (dtrain/main.py, 2 epochs)")
    res["fast"] = fast_path(args, data, device)
    log(f"throughput: fast path {res['fast']['images_per_second']:,.0f} img/s")
    if args.skip_seeds_row:
        return res
    log("throughput: the seeds' pipeline")
    sb = args.quick_batch if q else 128
    res["seeds_batch"], res["seeds_workers"] = sb, args.workers
    res["seeds"] = seeds_pipeline(device, *data["train"], sb, args.workers, 1 if q else 20, 2 if q else 150, arch)
    return res


# ---- section 2: time to accuracy -------------------------------------------------------------------------
def time_to_accuracy(args, data, arch: str, recipe: str | None) -> dict:
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        argv = ["--arch", arch, "--data-dir", str(data["cifar_dir"]), "--no-download", "--seed", str(seed)]
        if recipe:
            argv += ["--recipe", recipe]
        if args.compile:
            argv += ["--compile"]
        if args.quick:
            argv += ["--max-steps", "2", *quick_argv(args, arch_override=arch == "resnet18")]
        log(f"{arch}: seed {seed}")
        rows, wall = run_main(argv, Path(args.out) / "runs" / f"{arch}-{seed}", args.timeout)
        evaluated = [r for r in rows if r.get("val_acc") is not None]
        last = evaluated[-1]
        elapsed, warmup = last["elapsed_seconds"], last.get("warmup_seconds") or 0.0
        runs.append({"seed": seed, "val_acc": last["val_acc"], "epochs": last["epoch"], "steps": last["step"],
                     "train_seconds": elapsed - warmup, "warmup_seconds": warmup,
                     "startup_seconds": wall - elapsed, "wall_seconds": wall})
    cfg_recipe = recipe
    if cfg_recipe is None:
        from dtrain.config import ARCH_DEFAULT_RECIPE
        cfg_recipe = ARCH_DEFAULT_RECIPE.get(arch, "(defaults)")
    return {"arch": arch, "recipe": cfg_recipe, "runs": runs}


# ---- section 3: the airbench package ---------------------------------------------------------------------
DRIVER = r"""
import contextlib, io, json, sys, torch
import airbench
with contextlib.redirect_stdout(io.StringIO()):
    airbench.warmup94()
for seed in map(int, sys.argv[1:]):
    torch.manual_seed(seed)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        airbench.train94(run=seed)
    print(json.dumps({"seed": seed, "stdout": buf.getvalue()}), flush=True)
"""


def parse_train94(text: str) -> dict:
    """The final row of train94's printed table: | run | epoch ('eval') | train_loss | train_acc | val_acc |
    tta_val_acc | total_time_seconds |."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    final = [r for r in rows if len(r) == 7 and r[1] == "eval"]
    if not final:
        raise ValueError(f"no final 'eval' row in train94's output:\n{text[-1500:]}")
    r = final[-1]
    return {"val_acc": float(r[5]), "train_seconds": float(r[6]), "untta_val_acc": float(r[4]) if r[4] else None}


def airbench_import_path(src: str | None, out: Path) -> tuple[str | None, str | None]:
    """(folder to put on PYTHONPATH or '' for the environment's package, reason it is unavailable)."""
    if src:
        p = Path(src)
        if p.is_dir():
            return str(p), None
        if p.is_file() and p.name.endswith((".tar.gz", ".whl")):
            dest = out / "airbench-src"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            if p.name.endswith(".whl"):
                import zipfile
                zipfile.ZipFile(p).extractall(dest)
                return str(dest), None
            with tarfile.open(p) as t:
                try:
                    t.extractall(dest, filter="data")
                except TypeError:  # Python without extraction filters
                    t.extractall(dest)
            tops = [d for d in dest.iterdir() if (d / "airbench" / "__init__.py").is_file()]
            return (str(tops[0]), None) if tops else (None, f"no airbench package inside {p}")
        return None, f"--airbench-src {src} not found"
    try:
        import importlib.util
        if importlib.util.find_spec("airbench") is not None:
            return "", None
    except Exception:
        pass
    return None, "airbench package not installed (pip download airbench==0.1.8; pass --airbench-src)"


def section_airbench_pkg(args, data, device) -> dict:
    if device.type != "cuda":
        return {"skipped": "airbench's train94 needs CUDA (it calls .cuda() and times with CUDA events)"}
    path, reason = airbench_import_path(args.airbench_src, Path(args.out))
    if reason:
        return {"skipped": reason}
    env = child_env()
    if path:
        env["PYTHONPATH"] = path + os.pathsep + env["PYTHONPATH"]
    seeds = [str(s) for s in range(args.first_seed, args.first_seed + args.seeds)]
    log(f"airbench package: warm-up + {len(seeds)} runs of train94")
    r = subprocess.run([sys.executable, "-c", DRIVER, *seeds], capture_output=True, text=True, env=env,
                       cwd=data["airbench_dir"], timeout=args.timeout)
    if r.returncode != 0:
        return {"skipped": f"train94 failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:] }"}
    runs = [{"seed": j["seed"], **parse_train94(j["stdout"])}
            for j in map(json.loads, (line for line in r.stdout.splitlines() if line.startswith("{")))]
    return {"runs": runs, "version": "0.1.8" if "0.1.8" in str(args.airbench_src) else "installed"}


# ---- the table -------------------------------------------------------------------------------------------
def fmt_s(v):
    return "-" if v is None else f"{v:.2f} s" if v < 100 else f"{v:.0f} s"


def summarise(runs, key):
    v = [r[key] for r in runs if r.get(key) is not None]
    return (sum(v) / len(v), min(v), max(v)) if v else (None, None, None)


def table(results: dict) -> str:
    meta = results.get("meta", {})
    lines = [f"Device: {meta.get('device', '?')}; date {meta.get('date', '?')}; command `{meta.get('command', '?')}`"
             + ("; QUICK smoke settings (tiny subsets, 2 steps): not a measurement" if meta.get("quick") else ""),
             "", "| row | what | result |", "| --- | --- | --- |"]
    t = results.get("throughput")
    if t:
        c, f, s = t["ceiling"], t["fast"]["images_per_second"], t.get("seeds")
        lines.append(f"| 1a | ResNet18 training step alone, synthetic data on the device (bf16, channels_last, "
                     f"batch {t['batch']}): the ceiling | {c:,.0f} img/s |")
        if "ceiling_compiled" in t:
            lines.append(f"| 1a' | the same, torch.compile | {t['ceiling_compiled']:,.0f} img/s |")
        lines.append(f"| 1b | dtrain fast path (resnet18-fast recipe: GPU-resident uint8, on-device augmentation, bf16, "
                     f"channels_last, batch {t['batch']}{', compiled' if meta.get('compile') else ''}), epoch 2 | "
                     f"{f:,.0f} img/s = {f / c:.2f} x ceiling" + (f", {f / s:.1f} x seeds |" if s else " |"))
        if s:
            lines.append(f"| 1c | the seeds' pipeline (PIL transforms, DataLoader {t['seeds_workers']} workers, batch "
                         f"{t['seeds_batch']}, fp32) | {s:,.0f} img/s |")
    for key, label in (("resnet18", "2a"), ("airbench", "2b"), ("airbench-pkg", "3")):
        r = results.get(key)
        if not r:
            continue
        if "skipped" in r:
            lines.append(f"| {label} | {key} | skipped: {r['skipped']} |")
            continue
        runs = r["runs"]
        acc, lo, hi = summarise(runs, "val_acc")
        tr = summarise(runs, "train_seconds")[0]
        what = (f"`--arch {r['arch']}` (recipe {r['recipe']}), {len(runs)} seed(s)" if key != "airbench-pkg" else
                f"airbench package {r.get('version', '')} train94, {len(runs)} seed(s), its own timing")
        res = f"{acc:.2%} mean ({lo:.2%}..{hi:.2%}) in {fmt_s(tr)} of training"
        if key != "airbench-pkg":
            res += (f"; warm-up {fmt_s(summarise(runs, 'warmup_seconds')[0])}, start-up+exit "
                    f"{fmt_s(summarise(runs, 'startup_seconds')[0])}, {runs[0]['epochs']} epochs / {runs[0]['steps']} steps")
        lines.append(f"| {label} | {what} | {res} |")
    ab, pkg = results.get("airbench"), results.get("airbench-pkg")
    if ab and pkg and "runs" in pkg and pkg["runs"] and "runs" in ab:
        ratio = summarise(ab["runs"], "train_seconds")[0] / summarise(pkg["runs"], "train_seconds")[0]
        lines.append(f"| 2b/3 | dtrain airbench time / airbench94 time (goal <= 1.5) | {ratio:.2f} x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--npz", default=str(REPO.parent / "shared" / "data" / "cifar10_jpeg.npz"),
                    help="the packed JPEG CIFAR-10 (decoded once into --cache)")
    ap.add_argument("--data-dir", help="an exported CIFAR-10 folder (cifar-10-batches-py) instead of --npz")
    ap.add_argument("--cache", default=str(REPO / ".devdata" / "bench-cache"), help="decoded data folder")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench"), help="runs, results.json and table.md")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--seeds", type=int, default=3, help="runs per time-to-accuracy row (>= 3 for the README)")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run are FIRST..FIRST+SEEDS-1 (one seed per "
                    "call: each call's --out keeps its own results)")
    ap.add_argument("--skip-seeds-row", action="store_true", help="throughput: leave out row 1c (it compiles "
                    "nothing, so a second, --compile pass need not repeat it)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile (ceiling, fast path, recipes)")
    ap.add_argument("--recipe-resnet18", default=None, help="recipe for row 2a (default: the arch's default)")
    ap.add_argument("--recipe-airbench", default=None, help="recipe for row 2b (default: the arch's default)")
    ap.add_argument("--recipe-fast", default="resnet18-fast", help="recipe of the fast-path throughput row")
    ap.add_argument("--airbench-src", default=str(REPO / ".whl" / "airbench-0.1.8.tar.gz"),
                    help="airbench sdist/wheel/folder (pip download airbench==0.1.8); '' = the installed one")
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers of the seeds' pipeline")
    ap.add_argument("--decode-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per training process")
    ap.add_argument("--fresh", action="store_true", help="forget earlier sections' results in --out")
    ap.add_argument("--quick", action="store_true", help="CPU smoke settings: tiny subsets, 1 seed, 2 steps")
    ap.add_argument("--quick-train", type=int, default=256)
    ap.add_argument("--quick-test", type=int, default=64)
    ap.add_argument("--quick-batch", type=int, default=32)
    ap.add_argument("--quick-arch", default="resnet18", help="with --quick: the model of the throughput rows and "
                    "of the resnet18 row (e.g. cnn: a smoke run that takes seconds on a CPU)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds = 1 if "--seeds" not in (argv or sys.argv) else args.seeds
        args.workers = min(args.workers, 2)
    default_src = ap.get_default("airbench_src")
    if not args.airbench_src or (args.airbench_src == default_src and not Path(default_src).exists()):
        args.airbench_src = None  # the installed package, if any
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = {} if args.fresh or not results_path.is_file() else json.loads(results_path.read_text())
    if results.get("meta", {}).get("device") not in (None, device_name(device)):
        log("earlier results in --out come from another device: starting afresh")
        results = {}
    results["meta"] = {"device": device_name(device), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                       "command": "python bench/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
                       "quick": args.quick, "compile": args.compile}
    data = prepare_data(args)
    for name in sections:
        t0 = time.perf_counter()
        if name == "throughput":
            results[name] = section_throughput(args, data, device)
        elif name == "resnet18":
            results[name] = time_to_accuracy(args, data, "resnet18", args.recipe_resnet18)
        elif name == "airbench":
            results[name] = time_to_accuracy(args, data, "airbench", args.recipe_airbench)
        else:
            results[name] = section_airbench_pkg(args, data, device)
        log(f"{name}: {time.perf_counter() - t0:.0f} s")
        results_path.write_text(json.dumps(results, indent=1))
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
