#!/usr/bin/env python3
"""Benchmark Kaggle test-set inference: the input pipeline alone, and dtrain/predict.py end to end.

    python bench/predict.py                          # 300,000-image Kaggle test folder (generated once)
    python bench/predict.py --total 20000            # a quicker run
    python bench/predict.py --dir /data/cifar-10 --checkpoint runs/x/best.pt --e2e-nproc 4

Generates (or reuses, with --dir) a Kaggle test folder of --total PNGs: with ../shared/data/export.py
(real CIFAR-10 test images among distractors) when it exists, else synthetic PNGs. Then, in one run:

 (a) the input pipeline alone, decoded and normalised batches on the device, over the test folder (best of
     --repeat runs; this process keeps freed memory as dtrain/predict.py does, see keep_freed_memory):
     - plain: the straightforward loop, an ImageFolder-style Dataset (PIL + torchvision ToTensor/Normalize),
       DataLoader batch 128, no workers;
     - png: dtrain's FileLoader (decoding in DataLoader workers) + the batched normalisation;
     - cache build: decoding everything into the packed cache file (a one-off, also done by --prepare);
     - cached: dtrain's ArrayLoader over the memory-mapped cache + the batched normalisation;
 (b) `dtrain/predict.py` end to end (a subprocess; wall time including start-up and writing the CSV) for a
     checkpoint (--checkpoint, or a tiny `cnn` trained for a few steps on fake data): from the PNGs
     (--no-cache), with an empty cache (decode + cache + predict), and with the cache in place.

Prints a markdown table (and --json FILE writes the figures).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


# ---- data ---------------------------------------------------------------------------------------------

def _synthetic_chunk(job):
    import numpy as np
    from PIL import Image
    folder, start, stop, seed = job
    rng = np.random.default_rng(seed)
    for i in range(start, stop):
        colour = rng.integers(30, 220, 3)
        x = np.clip(rng.normal(colour, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(x).save(os.path.join(folder, f"{i}.png"))


def generate(folder: Path, total: int) -> str:
    """A Kaggle folder with test/1.png .. total.png; returns how it was made."""
    if (SHARED / "export.py").is_file():
        cmd = [sys.executable, str(SHARED / "export.py"), "kaggle", str(folder), "--train", "5000",
               "--test", str(min(total, 10000)), "--total", str(total)]
        subprocess.run(cmd, check=True)
        return "export.py kaggle (real CIFAR-10 test images among distractors)"
    from concurrent.futures import ProcessPoolExecutor
    (folder / "test").mkdir(parents=True, exist_ok=True)
    step = 5000
    jobs = [(str(folder / "test"), s, min(s + step, total + 1), s) for s in range(1, total + 1, step)]
    with ProcessPoolExecutor() as ex:
        list(ex.map(_synthetic_chunk, jobs))
    return "synthetic PNGs"


def count_pngs(folder: Path) -> int:
    from dtrain.data.kaggle import list_pngs
    return len(list_pngs(folder)) if folder.is_dir() else 0


def subset_folder(src: Path, dst: Path, n: int) -> Path:
    """dst/test/1..n.png as hard links to src/test (cheap), for an end-to-end run on fewer images."""
    if count_pngs(dst / "test") == n:
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "test").mkdir(parents=True)
    for i in range(1, n + 1):
        try:
            os.link(src / "test" / f"{i}.png", dst / "test" / f"{i}.png")
        except OSError:
            shutil.copy2(src / "test" / f"{i}.png", dst / "test" / f"{i}.png")
    return dst


# ---- (a) input pipelines ------------------------------------------------------------------------------

class PlainDataset:
    """The straightforward way: one image per item, PIL + torchvision transforms."""

    def __init__(self, files, mean, std):
        import torchvision.transforms as T
        self.files = files
        self.transform = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")), 0


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_plain(files, mean, std, device) -> tuple[float, int]:
    import torch
    loader = torch.utils.data.DataLoader(PlainDataset(files, mean, std), batch_size=128, num_workers=0)
    t = time.perf_counter()
    batches = 0
    for x, _ in loader:
        x = x.to(device)
        batches += 1
    _sync(device)
    return time.perf_counter() - t, batches


def time_dtrain(loader, pipeline, device) -> tuple[float, int]:
    t = time.perf_counter()
    batches = 0
    for x, _, _ in loader.batches():
        x = pipeline(x)
        batches += 1
    _sync(device)
    return time.perf_counter() - t, batches


# ---- (b) end to end -----------------------------------------------------------------------------------

def make_checkpoint(work: Path) -> Path:
    out = work / "ckpt-run"
    if not (out / "last.pt").is_file():
        subprocess.run([sys.executable, str(REPO / "dtrain" / "main.py"), "--arch", "cnn", "--dataset", "fake",
                        "--fake-size", "256", "--max-steps", "3", "--batch-size", "32", "--output-dir", str(out),
                        "--no-wandb", "--no-plots", "--workers", "0"], check=True, capture_output=True)
    return out / "last.pt"


def run_predict(args: list[str], nproc: int) -> float:
    if nproc > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--dynamo_backend", "no", str(REPO / "dtrain" / "predict.py"), *args]
    else:
        cmd = [sys.executable, str(REPO / "dtrain" / "predict.py"), *args]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return seconds


def machine() -> str:
    import torch
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cores} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total", type=int, default=300_000, help="test images to generate (default 300,000)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="Kaggle folder to use (generated there when it lacks test/1..total.png; default "
                         "TMPDIR/dtrain-bench/kaggle-TOTAL)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="checkpoint for (b) (default: a tiny cnn)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: all cores)")
    ap.add_argument("--batch-size", type=int, default=1024, help="(b): predict.py --batch-size (default 1024)")
    ap.add_argument("--pipeline-batch", type=int, default=None,
                    help="(a): dtrain's batch size (default: --batch-size, as predict.py runs it)")
    ap.add_argument("--plain-images", type=int, default=None,
                    help="time the straightforward loop on the first N images only (default: all)")
    ap.add_argument("--e2e-images", type=int, default=None,
                    help="(b) on the first N test images only (a folder of hard links; default: all)")
    ap.add_argument("--e2e-nproc", type=int, default=1, help="(b): processes (accelerate launch when > 1)")
    ap.add_argument("--e2e-args", default="", help="(b): more predict.py flags, e.g. '--precision bf16 --tta'")
    ap.add_argument("--repeat", type=int, default=3, help="(a): best of this many runs of each stage (default 3)")
    ap.add_argument("--skip-e2e", action="store_true", help="only (a)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()

    import torch
    from dtrain.data import cache, decode
    from dtrain.data.augment import AugmentSpec, Pipeline
    from dtrain.data.cifar import MEAN, STD
    from dtrain.data.kaggle import test_set
    from dtrain.data.loader import ArrayLoader, FileLoader
    from dtrain.predict import keep_freed_memory

    keep_freed_memory()   # as dtrain/predict.py does: for every stage measured in this process
    work = Path(tempfile.gettempdir()) / "dtrain-bench"
    folder = a.dir or work / f"kaggle-{a.total}"
    made = "reused"
    t = time.perf_counter()
    if count_pngs(folder / "test") < a.total:
        made = generate(folder, a.total)
    gen_seconds = time.perf_counter() - t
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = a.workers if a.workers is not None else decode.default_workers()
    s = test_set(folder, 32, 3, warn=lambda m: None)
    n = len(s)
    print(f"# {n:,} test PNGs in {folder} ({made}{f', {gen_seconds:.0f} s' if made != 'reused' else ''}); "
          f"{machine()}; device {device}; {workers} decode workers", flush=True)
    pipeline = Pipeline(AugmentSpec(), MEAN, STD, device)
    pb = a.pipeline_batch or a.batch_size
    rows = []

    def add(name, seconds, images, batches, batch, note="", runs=None):
        rows.append({"stage": name, "images": images, "seconds": seconds, "images_per_second": images / seconds,
                     "batches_per_second": batches / seconds, "batch": batch, "note": note, "runs_seconds": runs})
        print(f"  {name}: {images:,} images in {seconds:.1f} s = {images / seconds:,.0f} img/s"
              + (f" (best of {', '.join(f'{r:.1f}' for r in runs)} s)" if runs and len(runs) > 1 else ""),
              flush=True)

    def best(fn):
        """Best of --repeat runs: the machine may be shared, and other tenants' load only slows a run down."""
        runs = [fn() for _ in range(a.repeat)]
        return min(r[0] for r in runs), runs[0][1], [r[0] for r in runs]

    # (a)
    plain_n = min(a.plain_images or n, n)
    sec, nb, runs = best(lambda: time_plain(s.files[:plain_n], MEAN, STD, device))
    add("(a) plain loop: PIL + ToTensor/Normalize, batch 128, no workers", sec, plain_n, nb, 128, runs=runs)
    sec, nb, runs = best(lambda: time_dtrain(FileLoader(s, device, batch_size=pb, train=False, workers=workers), pipeline, device))
    add(f"(a) dtrain FileLoader from PNGs, {workers} workers, batch {pb}", sec, n, nb, pb, runs=runs)
    c = cache.locate(s.files, folder, "bench", 32, 3, work / "cache")

    def build():
        c.path.unlink(missing_ok=True)
        t = time.perf_counter()
        cache.build(c, s.files, workers)
        return time.perf_counter() - t, -(-n // decode.CHUNK)
    sec, nb, runs = best(build)
    add(f"(a) packed cache build (decode in {workers} workers + write, once)", sec, n, nb, decode.CHUNK,
        f"{c.nbytes / 2**20:,.0f} MiB", runs=runs)

    def cached():
        s.images = torch.from_numpy(cache.open_cache(c))   # a fresh mapping each time, as a new run has
        return time_dtrain(ArrayLoader(s, device, batch_size=pb), pipeline, device)
    sec, nb, runs = best(cached)
    add(f"(a) dtrain ArrayLoader from the packed cache (memory-mapped), batch {pb}", sec, n, nb, pb, runs=runs)
    s.images = None
    c.path.unlink(missing_ok=True)

    # (b)
    if not a.skip_e2e:
        ckpt = a.checkpoint or make_checkpoint(work)
        e2e_dir = folder if not a.e2e_images or a.e2e_images >= n else \
            subset_folder(folder, work / f"kaggle-e2e-{a.e2e_images}", a.e2e_images)
        e2e_n = count_pngs(e2e_dir / "test")
        common = ["--checkpoint", str(ckpt), "--data-dir", str(e2e_dir), "--output", str(work / "submission.csv"),
                  "--force", "--batch-size", str(a.batch_size), "--cache-dir", str(work / "e2e-cache"), *a.e2e_args.split()]
        shutil.rmtree(work / "e2e-cache", ignore_errors=True)
        tag = f"{a.e2e_nproc} process(es)"
        tag += f", batch {a.batch_size}"
        add(f"(b) predict.py end to end from PNGs (--no-cache), {tag}", run_predict(common + ["--no-cache"],
            a.e2e_nproc), e2e_n, 0, a.batch_size, "wall, start-up + CSV included")
        add(f"(b) predict.py end to end, empty cache (decode + cache + predict), {tag}",
            run_predict(common, a.e2e_nproc), e2e_n, 0, a.batch_size, "wall, start-up + CSV included")
        add(f"(b) predict.py end to end, cache in place, {tag}", run_predict(common, a.e2e_nproc), e2e_n, 0,
            a.batch_size, "wall, start-up + CSV included")
        shutil.rmtree(work / "e2e-cache", ignore_errors=True)

    plain = rows[0]["images_per_second"]
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine()}, device {device}\n")
    print("| what | images | seconds | img/s | vs plain loop |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        ratio = f"{r['images_per_second'] / plain:.1f}x" if r["stage"].startswith("(a)") else ""
        print(f"| {r['stage']}{' (' + r['note'] + ')' if r['note'] else ''} | {r['images']:,} | "
              f"{r['seconds']:.1f} | {r['images_per_second']:,.0f} | {ratio} |")
    if a.json:
        a.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                                      "device": str(device), "folder": str(folder), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
