"""Batch inference for a checkpoint written by dtrain/main.py, on 1..N processes.

    python dtrain/predict.py --checkpoint runs/x/best.pt --dataset kaggle --data-dir cifar-10 --output submission.csv
    accelerate launch --multi_gpu --num_processes 4 dtrain/predict.py --checkpoint runs/x/best.pt --data-dir cifar-10
    python dtrain/predict.py --checkpoint best.pt --dataset cifar10 --data-dir data      # accuracy on labelled data
    python dtrain/predict.py --checkpoint best.pt --image a.png b.png                    # top-5 classes per image
    python dtrain/predict.py --prepare --data-dir cifar-10                               # build the decode cache only

The checkpoint alone rebuilds the model (arch, classes, normalisation, input size). Each process predicts
its own shard (every image exactly once); the main process writes the CSV atomically.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script file: import the package, not this file's neighbours
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    sys.path.insert(0, _root)

import argparse
import csv
import io
import time
from pathlib import Path

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dtrain/predict.py",
        description="Predict with a dtrain checkpoint: a Kaggle CIFAR-10 submission CSV (--dataset kaggle), "
                    "accuracy on a labelled split (--dataset cifar10|imagefolder), or single images (--image). "
                    "Runs under plain python, accelerate launch or torchrun.")
    p.add_argument("--checkpoint", help="a last.pt/best.pt written by dtrain/main.py (it rebuilds the model)")
    p.add_argument("--dataset", default="kaggle", choices=["kaggle", "cifar10", "imagefolder"],
                   help="data format (default kaggle)")
    p.add_argument("--data-dir", default="data", help="dataset root; kaggle: the folder holding test/ (default data)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"],
                   help="which images: kaggle test = the unlabelled test folder; val/train (and test for "
                        "cifar10/imagefolder) are labelled and give an accuracy (default test)")
    p.add_argument("--output", help="CSV to write (default submission.csv for the kaggle test split, else "
                                    "predictions.csv)")
    p.add_argument("--batch-size", type=int, default=1024, help="GLOBAL batch size (default 1024)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode processes per process (default: the CPU cores shared out among processes)")
    p.add_argument("--precision", choices=["no", "fp16", "bf16"], default=None,
                   help="mixed precision (default: the accelerate config/launcher's)")
    p.add_argument("--tta", action="store_true", help="average the logits of each image and its mirror")
    p.add_argument("--cache", default=True, action=argparse.BooleanOptionalAction,
                   help="keep the decoded images in a packed cache file (built on the first run, reused after)")
    p.add_argument("--cache-dir", default=None, help="folder for the cache (default DATA_DIR/.dtrain-cache)")
    p.add_argument("--prepare", action="store_true", help="only build the decoded-image cache, predict nothing")
    p.add_argument("--image", nargs="+", metavar="PNG", help="print the top classes of these image files")
    p.add_argument("--top-k", type=int, default=5, help="--image: how many classes to show (default 5)")
    return p



# ---- console ------------------------------------------------------------------------------------------

class Console:
    """rich output on the main process; silent elsewhere."""

    def __init__(self, active: bool):
        self.active = active
        self.rich = None
        if active:
            from rich.console import Console as RichConsole
            self.rich = RichConsole(highlight=False)

    def print(self, *a, **kw) -> None:
        if self.rich is not None:
            self.rich.print(*a, **kw)

    def progress(self, description: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, \
            TimeElapsedColumn, TimeRemainingColumn
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task):
                return Text(f"{task.speed:,.0f} img/s" if task.speed else "")

        return _Progress(Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), Rate(),
                                  TimeElapsedColumn(), TimeRemainingColumn(), console=self.rich, transient=True,
                                  disable=self.rich is None or not self.rich.is_terminal), total)


class _Progress:
    def __init__(self, progress, total: int):
        self.p, self.total = progress, total
        self.task = progress.add_task("", total=total)
        self.done, self.t0 = 0, time.perf_counter()

    def __enter__(self):
        self.p.start()
        return self

    def __exit__(self, *exc):
        self.p.stop()

    def advance(self, n: int) -> None:
        self.done += n
        self.p.update(self.task, completed=min(self.done, self.total))

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.t0, 1e-9)


class _Tracked:
    """A loader whose batches advance a progress bar, and which ends its shard early (keeping the error)
    instead of raising, so that every process still reaches the gather and none waits forever.

    A process whose shard is empty (fewer images than processes, or an error at once) yields one empty
    batch, so that its logits have the model's number of columns like everyone else's for the gather."""

    def __init__(self, loader, progress: _Progress | None, world: int, shape: tuple[int, int, int], device):
        self.loader, self.progress, self.world = loader, progress, world
        self.shape, self.device = shape, device
        self.error: str | None = None

    def batches(self, *a):
        from dtrain.errors import UserError
        yielded = False
        try:
            for x, y, idx in self.loader.batches(*a):
                yielded = True
                yield x, y, idx
                if self.progress is not None:
                    self.progress.advance(len(idx) * self.world)
        except UserError as e:
            self.error = str(e)
        if not yielded:
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            yield torch.zeros((0, *self.shape), dtype=torch.uint8, device=self.device), empty, empty


# ---- the data -----------------------------------------------------------------------------------------

def _data_config(args, ckpt: dict | None, size: int):
    """The training run's Config (from the checkpoint) with this run's data overrides."""
    from dtrain.config import Config, config_from_dict
    cfg = config_from_dict(ckpt["config"]) if ckpt and isinstance(ckpt.get("config"), dict) else Config()
    cfg.dataset, cfg.data_dir, cfg.image_size = args.dataset, args.data_dir, size
    if args.split == "test":
        cfg.val_split = 0      # the test folder/batch, not the training run's hold-out (that is --split val)
    if args.dataset == "imagefolder":
        cfg.loader = "files"   # decode only the split asked for (into the packed cache), not train + test
    if args.cache_dir:
        cfg.cache_dir = args.cache_dir
    if args.workers is not None:
        cfg.workers = args.workers
    return cfg


def load_images(args, acc, console: Console, ckpt: dict | None, size: int, channels: int):
    """(ImageSet, labelled?, kaggle folder or None) for --dataset/--split."""
    from dtrain.data import load_dataset
    from dtrain.data.kaggle import test_set
    from dtrain.distributed import on_main_first
    if args.dataset == "kaggle" and args.split == "test":
        warn = (lambda m: console.print(f"[yellow]warning[/]: {m}")) if acc.is_main_process else (lambda m: None)
        imageset = test_set(args.data_dir, size, channels, warn=warn)
        return imageset, False, Path(imageset.meta["root"])
    cfg = _data_config(args, ckpt, size)
    train, val = on_main_first(acc, lambda: load_dataset(cfg))
    imageset = train if args.split == "train" else val
    if not imageset.in_memory:
        imageset.channels = channels   # decoding converts to what the model takes (e.g. greyscale -> RGB)
    if imageset.channels != channels:
        from dtrain.errors import UserError
        raise UserError(f"the checkpoint's model takes {channels}-channel images, {args.data_dir} has "
                        f"{imageset.channels}-channel ones")
    return imageset, True, None


def attach_cache(args, acc, console: Console, imageset, workers: int):
    """Decoded images for a file-backed set: the main process builds the cache (if needed), every process
    memory-maps it. Returns (path, built?), or None when no cache can be used (then images are decoded as they are read)."""
    from dtrain.data import cache
    from dtrain.distributed import run_on_main
    root = Path(imageset.meta.get("root") or args.data_dir)
    name = f"{root.name}-{imageset.size}px" if args.dataset == "kaggle" else f"{args.dataset}-{args.split}"
    base = root.parent if args.dataset == "kaggle" else Path(args.data_dir)

    def build():
        c = cache.locate(imageset.files, base, name, imageset.size, imageset.channels, args.cache_dir)
        if cache.open_cache(c) is not None:
            return str(c.path), c.shape, c.prefix, False
        if not cache.writable(c):
            console.print(f"note: cannot write the image cache in {c.path.parent} (pass --cache-dir DIR); "
                          f"decoding the images as they are read")
            return None
        with console.progress("decoding", len(imageset.files)) as bar:
            cache.build(c, imageset.files, workers, bar.advance)
        console.print(f"cached {len(imageset.files):,} decoded images in {c.path} ({c.nbytes / 2**20:,.0f} MiB) "
                      f"in {time.perf_counter() - bar.t0:.1f} s ({bar.rate:,.0f} img/s)")
        return str(c.path), c.shape, c.prefix, True

    found = run_on_main(acc, build)
    if found is None:
        return None
    path, shape, prefix, built = found
    arr = cache.open_cache(cache.CacheFile(Path(path), tuple(shape), prefix))
    if arr is None:
        from dtrain.errors import UserError
        raise UserError(f"the image cache {path} vanished while this run was starting; run again")
    imageset.images = torch.from_numpy(arr)
    return Path(path), built


# ---- output -------------------------------------------------------------------------------------------

def line_terminator(kaggle_dir: Path | None) -> str:
    """Kaggle's sampleSubmission.csv's line ending when it is there (so the CSV matches it), else \\n."""
    if kaggle_dir is not None:
        for d in (kaggle_dir.parent, kaggle_dir):
            sample = d / "sampleSubmission.csv"
            if sample.is_file():
                with open(sample, "rb") as f:
                    head = f.readline()
                return "\r\n" if head.endswith(b"\r\n") else "\n"
    return "\n"


def csv_text(header: list[str], rows, terminator: str = "\n") -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=terminator)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_csv(path: Path, text: str) -> None:
    from dtrain.checkpoint import atomic_write
    from dtrain.data.cache import share
    from dtrain.errors import UserError
    try:
        atomic_write(path, lambda f: f.write(text.encode()))
        share(path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e}") from None


def _row_ids(imageset, data_dir: str) -> list:
    if imageset.ids is not None:
        return list(imageset.ids)
    if imageset.files is not None:
        return [os.path.relpath(f, data_dir) for f in imageset.files]
    return list(range(len(imageset)))


def report_accuracy(console: Console, classes: list[str], preds: torch.Tensor, targets: torch.Tensor) -> dict:
    from rich.table import Table
    acc = (preds == targets).float().mean().item()
    table = Table(title=None, box=None, pad_edge=False)
    for col, just in (("class", "left"), ("images", "right"), ("correct", "right"), ("accuracy", "right")):
        table.add_column(col, justify=just)
    per_class = {}
    for k, name in enumerate(classes):
        mask = targets == k
        n = int(mask.sum())
        if n == 0:
            continue
        correct = int((preds[mask] == k).sum())
        per_class[name] = correct / n
        table.add_row(name, f"{n:,}", f"{correct:,}", f"{correct / n:.2%}")
    console.print(table)
    console.print(f"[bold]accuracy[/]: {acc:.2%} ({int((preds == targets).sum()):,} of {len(targets):,})")
    return {"accuracy": acc, "per_class": per_class}


def keep_freed_memory() -> None:
    """Let glibc keep large freed blocks instead of handing each back to the OS at once.

    By default a block over 128 KiB is its own mmap, unmapped when freed, so every batch-sized CPU tensor
    (a 1024-image float batch is 12 MiB) is fresh memory whose pages fault in again, batch after batch; on
    a virtual machine that costs more than the normalisation itself (measured: 85,000 against 390,000
    cached images/s on 2 cores). A no-op where the C library is not glibc."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 * 2**20)
        libc.mallopt(m_trim_threshold, 512 * 2**20)
    except (OSError, AttributeError):
        pass


# ---- the modes ----------------------------------------------------------------------------------------

def predict_images(args, console: Console, model, pipeline, classes: list[str], size: int, channels: int) -> dict:
    from dtrain.data.loader import decode_image
    from dtrain.engine import eval_logits
    from dtrain.errors import UserError
    arrays, bad = [], []
    for path in args.image:
        try:
            arrays.append(torch.from_numpy(decode_image(path, size, channels)))
        except UserError as e:
            bad.append(str(e))
    if bad:
        raise UserError("; ".join(bad))
    device = pipeline.mean.device
    with torch.no_grad():
        x = pipeline(torch.stack(arrays).permute(0, 3, 1, 2).to(device))
        probs = eval_logits(model, x, args.tta).softmax(1).cpu()
    k = max(1, min(args.top_k, len(classes)))
    top = probs.topk(k, dim=1)
    result = {}
    for path, p, i in zip(args.image, top.values, top.indices):
        result[path] = [(classes[j], float(v)) for v, j in zip(p.tolist(), i.tolist())]
        console.print(f"[bold]{path}[/]")
        for name, v in result[path]:
            console.print(f"  {v:7.2%}  {name}")
    return result


def run(argv=None) -> dict | None:
    from dtrain.checkpoint import load_checkpoint
    from dtrain.data import cache
    from dtrain.data.augment import AugmentSpec, Pipeline
    from dtrain.data.loader import FileLoader
    from dtrain.distributed import first_error, make_accelerator, run_on_main
    from dtrain.engine import predict
    from dtrain.errors import UserError
    from dtrain.models import model_from_checkpoint

    args = build_parser().parse_args(argv)
    keep_freed_memory()
    if not args.checkpoint and not args.prepare:
        raise UserError("--checkpoint is required: give the best.pt or last.pt of a dtrain/main.py run")
    if args.batch_size < 1:
        raise UserError("--batch-size must be positive")
    if args.image and args.prepare:
        raise UserError("--prepare builds a data set's cache; it does not go with --image")

    acc = make_accelerator(args.precision)
    world, rank, device = acc.num_processes, acc.process_index, acc.device
    console = Console(acc.is_main_process)
    workers = args.workers if args.workers is not None else max(1, min(cache.default_workers() // world, 16))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    ckpt = load_checkpoint(args.checkpoint) if args.checkpoint else None
    size = int(ckpt["image_size"]) if ckpt else 32
    channels = int(ckpt["in_channels"]) if ckpt else 3
    classes = list(ckpt["classes"]) if ckpt else []
    model = pipeline = None
    if ckpt is not None:
        model = model_from_checkpoint(ckpt).to(device).eval()
        pipeline = Pipeline(AugmentSpec(), ckpt["mean"], ckpt["std"], device)

    if args.image:
        result = run_on_main(acc, lambda: predict_images(args, console, model, pipeline, classes, size, channels))
        acc.end_training()
        return {"images": result}

    t0 = time.perf_counter()
    imageset, labelled, kaggle_dir = load_images(args, acc, console, ckpt, size, channels)
    cached = None
    if imageset.files is not None and not imageset.in_memory and args.cache:
        cached = attach_cache(args, acc, console, imageset, cache.default_workers())  # the others wait
    if args.prepare:
        where = cached[0] if cached else "memory only (no cache)"
        console.print(f"prepared {len(imageset):,} images: {where}")
        acc.end_training()
        return {"images": len(imageset), "cache": str(cached[0]) if cached else None}

    targets = None
    if labelled:  # the data's class indices in the checkpoint's class list
        unknown = [c for c in imageset.classes if c not in classes]
        mapping = torch.tensor([classes.index(c) if c in classes else -1 for c in imageset.classes])
        targets = mapping[imageset.labels]
        if unknown and bool((targets < 0).any()):
            raise UserError(f"{args.data_dir} has classes the checkpoint does not know: "
                            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    per_process = -(-args.batch_size // world)
    if imageset.in_memory:
        loader = cache.ArrayLoader(imageset, device, per_process, rank, world)
        source = "cache" if cached else "memory"
    else:
        loader = FileLoader(imageset, device, per_process, rank, world, 0, False, workers)
        source = f"PNG files ({workers} decode workers per process)"
    console.print(f"[bold]dtrain predict[/] {ckpt['arch']} ({Path(args.checkpoint)}) on {len(imageset):,} images "
                  f"from {source}; {world} process(es) ({str(acc.distributed_type).split('.')[-1]}, "
                  f"{device}), batch {args.batch_size}, precision {acc.mixed_precision}"
                  + (", TTA (mirror)" if args.tta else ""))
    with console.progress("predicting", len(imageset)) as bar:
        tracked = _Tracked(loader, bar if acc.is_main_process else None, world,
                           (channels, imageset.size, imageset.size), device)
        t_pred = time.perf_counter()
        index, logits = predict(model, tracked, pipeline, acc, tta=args.tta)
        seconds = time.perf_counter() - t_pred
    error = first_error(acc, tracked.error)
    if error is not None:
        raise UserError(f"{error} (no CSV written)")
    if len(index) != len(imageset) or (len(index) and not torch.equal(index, torch.arange(len(imageset)))):
        raise UserError(f"internal error: {len(index)} predictions for {len(imageset)} images")
    preds = logits.argmax(1) if len(index) else torch.zeros(0, dtype=torch.long)
    result = {"images": len(imageset), "seconds": seconds, "images_per_second": len(imageset) / max(seconds, 1e-9)}
    console.print(f"predicted {len(imageset):,} images in {seconds:.1f} s "
                  f"({result['images_per_second']:,.0f} img/s; {time.perf_counter() - t0:.1f} s with loading)")

    def finish():
        ids = _row_ids(imageset, args.data_dir)
        names = [classes[p] for p in preds.tolist()]
        if labelled:
            result.update(report_accuracy(console, classes, preds, targets))
            text = csv_text(["id", "label", "true_label"],
                            ([i, n, classes[t]] for i, n, t in zip(ids, names, targets.tolist())))
            output = Path(args.output or "predictions.csv")
        else:
            text = csv_text(["id", "label"], zip(ids, names), line_terminator(kaggle_dir))
            output = Path(args.output or "submission.csv")
        write_csv(output, text)
        console.print(f"wrote {output} ({len(ids):,} rows)")
        return {**result, "output": str(output)}

    result = run_on_main(acc, finish)
    acc.wait_for_everyone()
    acc.end_training()
    return result


def main(argv=None) -> None:
    from dtrain.errors import run_cli
    run_cli(run, argv)


if __name__ == "__main__":
    main()
