"""Batch inference for a checkpoint written by dtrain/main.py, on 1..N processes.

    python dtrain/predict.py --checkpoint runs/x/best.pt --dataset kaggle --data-dir cifar-10 --output submission.csv
    accelerate launch --multi_gpu --num_processes 4 dtrain/predict.py --checkpoint runs/x/best.pt --data-dir cifar-10
    python dtrain/predict.py --checkpoint best.pt --dataset cifar10 --data-dir data      # accuracy on labelled data
    python dtrain/predict.py --checkpoint best.pt --image a.png b.png                    # top-5 classes per image
    python dtrain/predict.py --prepare --data-dir cifar-10                               # build the decode cache only

The checkpoint alone rebuilds the model (arch, classes, normalisation, input size). Each process predicts
its own shard (every image exactly once); the main process writes the CSV atomically. The CSV is held
(OUTPUT.lock beside it, dtrain.rundir.OutputFileLock) from the start until it is written: a second
`dtrain predict` writing the same file stops at once, naming the first, and never replaces it silently.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__" and sys.path[0] == _HERE:  # run as a file: import this checkout's package (see main.py)
    sys.path[0] = os.path.dirname(_HERE)

import argparse
import csv
import ctypes
import dataclasses
import io
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from dtrain.checkpoint import load_checkpoint
from dtrain.cli import command_name
from dtrain.config import Config, config_from_dict
from dtrain.data import cache, load_dataset
from dtrain.data.augment import AugmentSpec, Pipeline
from dtrain.data.decode import decode_image, default_workers
from dtrain.data.kaggle import test_set
from dtrain.data.loader import ArrayLoader, FileLoader, choose_loader
from dtrain.distributed import first_error, make_accelerator, on_main_first, run_on_main
from dtrain.errors import UserError, run_command
from dtrain.files import write_text
from dtrain.inference import eval_logits, predict_logits
from dtrain.models import model_from_checkpoint
from dtrain.report.console import MainConsole, ProgressBar
from dtrain.rundir import OutputFileLock


PER_PROCESS_BATCH = 1024   # images per process and batch unless --batch-size says otherwise: keeps a GPU busy
OTHER_OUTPUT = "pass another --output"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command_name("dtrain/predict.py"),
        description="Predict with a dtrain checkpoint: a Kaggle CIFAR-10 submission CSV (--dataset kaggle), "
                    "accuracy on a labelled split (--dataset cifar10|cifar100|imagefolder), or single images "
                    "(--image). Runs under plain python, accelerate launch or torchrun.")
    p.add_argument("--checkpoint", help="a last.pt/best.pt written by dtrain train, or a .safetensors written by "
                                          "dtrain export (it rebuilds the model)")
    p.add_argument("--dataset", default="kaggle", choices=["kaggle", "cifar10", "cifar100", "imagefolder"],
                   help="data format (default kaggle)")
    p.add_argument("--data-dir", default="data", help="dataset root; kaggle: the folder holding test/ (default data)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"],
                   help="which images: kaggle test = the unlabelled test folder; val/train (and test for "
                        "cifar10/cifar100/imagefolder) are labelled and give an accuracy (default test)")
    p.add_argument("--output", help="CSV to write (default submission.csv for the kaggle test split, else "
                                    "predictions.csv)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"GLOBAL batch size, split over the processes (default {PER_PROCESS_BATCH} per process)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode processes per process (default: the CPU cores shared out among processes)")
    p.add_argument("--precision", choices=["no", "fp16", "bf16"], default=None,
                   help="mixed precision (default: the accelerate config/launcher's)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where GPUs are (as accelerate launch --cpu)")
    p.add_argument("--tta", default=None, action=argparse.BooleanOptionalAction,
                   help="average the logits of each image and its mirror (default: as the checkpoint's run "
                        "evaluated)")
    p.add_argument("--tta-shift", type=int, default=None, metavar="N",
                   help="with TTA: also average the mirrored pairs of the image shifted by N pixels (default: "
                        "the checkpoint run's --tta-shift)")
    p.add_argument("--cache", default=True, action=argparse.BooleanOptionalAction,
                   help="keep the decoded images in a packed cache file (built on the first run, reused after)")
    p.add_argument("--cache-dir", default=None, help="folder for the cache (default DATA_DIR/.dtrain-cache)")
    p.add_argument("--force", action="store_true", help="replace an existing --output CSV")
    p.add_argument("--prepare", action="store_true", help="only build the decoded-image cache, predict nothing")
    p.add_argument("--image", nargs="+", metavar="PNG", help="print the top classes of these image files")
    p.add_argument("--top-k", type=int, default=5, help="--image: how many classes to show (default 5)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, with every mistake that needs no file caught here."""
    args = build_parser().parse_args(argv)
    if not args.checkpoint and not args.prepare:
        raise UserError("--checkpoint is required: give the best.pt or last.pt of a dtrain/main.py run")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch-size must be positive")
    if args.image and args.prepare:
        raise UserError("--prepare builds a data set's cache; it does not go with --image")
    if args.tta_shift is not None and (args.tta_shift < 0 or args.tta is False):
        raise UserError("--tta-shift N needs TTA (not --no-tta) and N >= 0")
    if args.image:
        check_image_paths(args.image)
    refuse_existing_output(args)
    return args


def check_image_paths(paths: list[str]) -> None:
    """A UserError, one line, naming the --image paths that are folders or do not exist and what to do."""
    problems = []
    for path in paths:
        if os.path.isdir(path):
            problems.append(f"{path} is a folder, not an image file: give its image files (--image "
                            f"{path.rstrip('/')}/*.png), or predict a folder laid out as DIR/test/<class>/<image> "
                            f"with --dataset imagefolder --data-dir DIR")
        elif not os.path.exists(path):
            problems.append(f"{path} does not exist (check the path)")
    if problems:
        raise UserError("--image: " + "; ".join(problems))


def refuse_existing_output(args) -> None:
    """A UserError when the CSV exists (an earlier prediction) and --force was not given."""
    output = output_path(args)
    if output is not None and output.exists() and not args.force:
        raise UserError(f"{output} exists (an earlier prediction): pass --force to replace it, or another --output")


def output_path(args) -> Path | None:
    """The CSV this command writes: --output, else submission.csv for the unlabelled Kaggle test set and
    predictions.csv for labelled data; None for --image and --prepare."""
    if args.image or args.prepare:
        return None
    unlabelled = args.dataset == "kaggle" and args.split == "test"
    return Path(args.output or ("submission.csv" if unlabelled else "predictions.csv"))


# ---- the model ----------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """What prediction takes from the checkpoint: the model, its input, its classes and how its run
    evaluated (TTA), with this command's overrides."""
    config: Config
    arch: str = ""
    model: torch.nn.Module | None = None
    pipeline: Pipeline | None = None
    classes: list[str] = field(default_factory=list)
    size: int = 32
    channels: int = 3
    tta: bool = False
    tta_shift: int = 0


def load_model(args, device) -> LoadedModel:
    """The checkpoint's model on `device` (defaults for --prepare without a checkpoint)."""
    if not args.checkpoint:
        return LoadedModel(Config())
    ckpt = load_checkpoint(args.checkpoint)
    saved = config_from_dict(ckpt["config"]) if isinstance(ckpt.get("config"), dict) else Config()
    tta = saved.tta if args.tta is None else args.tta
    tta_shift = args.tta_shift if args.tta_shift is not None else saved.tta_shift if tta else 0
    if tta_shift and not tta:
        raise UserError("--tta-shift N needs --tta (the checkpoint's run evaluated without TTA)")
    fmt = torch.channels_last if saved.channels_last else torch.contiguous_format  # as the run trained
    return LoadedModel(saved, ckpt["arch"], model_from_checkpoint(ckpt).to(device, memory_format=fmt).eval(),
                        Pipeline(AugmentSpec(), ckpt["mean"], ckpt["std"], device, saved.channels_last),
                        list(ckpt["classes"]),
                        int(ckpt["image_size"]), int(ckpt["in_channels"]), tta, tta_shift)


def tta_words(m: LoadedModel) -> str:
    if not m.tta:
        return ""
    return f", TTA (mirror, shift {m.tta_shift})" if m.tta_shift else ", TTA (mirror)"


class ShardProgress:
    """A loader whose batches advance a progress bar, and which ends its shard early (keeping the error)
    instead of raising, so that every process still reaches the gather and none waits forever.

    A process whose shard is empty (fewer images than processes, or an error at once) yields one empty
    batch, so that its logits have the model's number of columns like everyone else's for the gather."""

    def __init__(self, loader, progress: ProgressBar | None, world: int, shape: tuple[int, int, int], device):
        self.loader, self.progress, self.world = loader, progress, world
        self.shape, self.device = shape, device
        self.error: str | None = None

    def batches(self, *a):
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

def _data_config(args, saved: Config, size: int) -> Config:
    """The training run's Config (from the checkpoint) with this run's data overrides."""
    cfg = dataclasses.replace(saved, dataset=args.dataset, data_dir=args.data_dir, image_size=size)
    if args.split == "test":
        cfg.val_split = 0      # the test folder/batch, not the training run's hold-out (that is --split val)
    if args.dataset == "imagefolder":
        cfg.loader = "files"   # decode only the split asked for (into the packed cache), not train + test
    if args.cache_dir:
        cfg.cache_dir = args.cache_dir
    if args.workers is not None:
        cfg.workers = args.workers
    return cfg


def load_images(args, acc, console: MainConsole, m: LoadedModel):
    """(ImageSet, labelled?, kaggle folder or None) for --dataset/--split."""
    if args.dataset == "kaggle" and args.split == "test":
        warn = (lambda msg: console.print(f"[yellow]warning[/]: {msg}"))
        imageset = test_set(args.data_dir, m.size, m.channels, warn=warn)
        return imageset, False, Path(imageset.meta["root"])
    cfg = _data_config(args, m.config, m.size)
    train, val = on_main_first(acc, lambda: load_dataset(cfg))
    imageset = train if args.split == "train" else val
    if not imageset.in_memory:
        imageset.channels = m.channels   # decoding converts to what the model takes (e.g. greyscale -> RGB)
    if imageset.channels != m.channels:
        raise UserError(f"the checkpoint's model takes {m.channels}-channel images, {args.data_dir} has "
                        f"{imageset.channels}-channel ones")
    return imageset, True, None


def attach_cache(args, acc, console: MainConsole, imageset) -> Path | None:
    """Decoded images for a file-backed set: the main process finds or builds the cache, every process
    memory-maps it. Returns its path, or None when it cannot be written (then images are decoded as they
    are read)."""
    root = Path(imageset.meta.get("root") or args.data_dir)
    name = f"{root.name}-{imageset.size}px" if args.dataset == "kaggle" else f"{args.dataset}-{args.split}"
    base = root.parent if args.dataset == "kaggle" else Path(args.data_dir)
    n, size, channels = len(imageset.files), imageset.size, imageset.channels

    def find_or_build():
        with console.progress("decoding", n) as bar:
            arr = cache.load_or_build(imageset.files, base, name, size, channels, args.cache_dir,
                                      progress=bar.advance, log=console.print, unwritable="none")
        if arr is not None and bar.done:
            console.print(f"cached {n:,} decoded images in {arr.filename} ({arr.nbytes / 2**20:,.0f} MiB) "
                          f"in {bar.seconds:.1f} s ({bar.rate:,.0f} img/s)")
        return None if arr is None else str(arr.filename)

    path = run_on_main(acc, find_or_build)   # the others wait
    if path is None:
        return None
    arr = cache.open_cache(cache.CacheFile(Path(path), (n, size, size, channels), ""))
    if arr is None:
        raise UserError(f"the image cache {path} vanished while this run was starting; run again")
    imageset.images = torch.from_numpy(arr)
    return Path(path)


def targets_in_checkpoint_classes(args, imageset, classes: list[str]) -> torch.Tensor:
    """The data's labels as indices into the checkpoint's class list."""
    unknown = [c for c in imageset.classes if c not in classes]
    mapping = torch.tensor([classes.index(c) if c in classes else -1 for c in imageset.classes])
    targets = mapping[imageset.labels]
    if unknown and bool((targets < 0).any()):
        raise UserError(f"{args.data_dir} has classes the checkpoint does not know: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return targets


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
    write_text(path, text, remedy=OTHER_OUTPUT)


@contextmanager
def held_output(acc, args):
    """The CSV held for this command (main process; nothing for --image and --prepare) for the `with`
    block: a second `dtrain predict` writing it meanwhile stops with one line naming this one, and one
    left by a killed run is taken over (dtrain.rundir). Under the lock the CSV is checked again not to
    exist without --force: a run that finished in between is not replaced."""
    output, held = output_path(args), []

    def claim():
        if output is None:
            return
        lock = OutputFileLock(output, "dtrain predict", OTHER_OUTPUT).acquire()
        try:
            refuse_existing_output(args)
        except UserError:
            lock.release()
            raise
        held.append(lock)

    run_on_main(acc, claim)
    try:
        yield
    finally:
        for lock in held:
            lock.release()


def _row_ids(imageset, data_dir: str) -> list:
    if imageset.ids is not None:
        return list(imageset.ids)
    if imageset.files is not None:
        return [os.path.relpath(f, data_dir) for f in imageset.files]
    return list(range(len(imageset)))


def report_accuracy(console: MainConsole, classes: list[str], preds: torch.Tensor, targets: torch.Tensor) -> dict:
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
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 * 2**20)
        libc.mallopt(m_trim_threshold, 512 * 2**20)
    except (OSError, AttributeError):
        pass


# ---- the modes ----------------------------------------------------------------------------------------

def predict_images(args, console: MainConsole, m: LoadedModel) -> dict:
    arrays, bad = [], []
    for path in args.image:
        try:
            arrays.append(torch.from_numpy(decode_image(path, m.size, m.channels)))
        except UserError as e:
            bad.append(str(e))
    if bad:
        raise UserError("; ".join(bad))
    device = m.pipeline.mean.device
    with torch.no_grad():
        x = m.pipeline(torch.stack(arrays).permute(0, 3, 1, 2).to(device))
        probs = eval_logits(m.model, x, m.tta, m.tta_shift).softmax(1).cpu()
    k = max(1, min(args.top_k, len(m.classes)))
    top = probs.topk(k, dim=1)
    result = {}
    for path, p, i in zip(args.image, top.values, top.indices):
        result[path] = [(m.classes[j], float(v)) for v, j in zip(p.tolist(), i.tolist())]
        console.print(f"[bold]{path}[/]")
        for name, v in result[path]:
            console.print(f"  {v:7.2%}  {name}")
    return result


def predict_set(args, acc, console: MainConsole, m: LoadedModel, imageset, cached: Path | None):
    """(predicted class per image, seconds): every process predicts its shard, the main process gets all."""
    world, rank, device = acc.num_processes, acc.process_index, acc.device
    per_process = PER_PROCESS_BATCH if args.batch_size is None else -(-args.batch_size // world)
    if choose_loader("files", imageset) == "memory":
        loader = ArrayLoader(imageset, device, batch_size=per_process, rank=rank, world=world)
        source = "cache" if cached else "memory"
    else:
        workers = args.workers if args.workers is not None else max(1, min(default_workers() // world, 16))
        loader = FileLoader(imageset, device, batch_size=per_process, rank=rank, world=world, train=False,
                            workers=workers)
        source = f"PNG files ({workers} decode workers per process)"
    console.print(f"[bold]dtrain predict[/] {m.arch} ({Path(args.checkpoint)}) on {len(imageset):,} images "
                  f"from {source}; {world} process(es) ({str(acc.distributed_type).split('.')[-1]}, "
                  f"{device}), batch {per_process * world} ({per_process} per process), "
                  f"precision {acc.mixed_precision}" + tta_words(m))
    with console.progress("predicting", len(imageset)) as bar:
        tracked = ShardProgress(loader, bar if acc.is_main_process else None, world,
                           (m.channels, imageset.size, imageset.size), device)
        t_pred = time.perf_counter()
        index, logits = predict_logits(m.model, tracked, m.pipeline, acc, tta=m.tta, tta_shift=m.tta_shift)
        seconds = time.perf_counter() - t_pred
    error = first_error(acc, tracked.error)
    if error is not None:
        raise UserError(f"{error} (no CSV written)")
    if len(index) != len(imageset) or (len(index) and not torch.equal(index, torch.arange(len(imageset)))):
        raise RuntimeError(f"internal error: {len(index)} predictions for {len(imageset)} images")
    return (logits.argmax(1) if len(index) else torch.zeros(0, dtype=torch.long)), seconds


def write_predictions(args, console: MainConsole, classes: list[str], imageset, preds: torch.Tensor,
                      targets: torch.Tensor | None, kaggle_dir: Path | None) -> dict:
    """The CSV (and, for labelled data, the accuracy table); main process only."""
    ids = _row_ids(imageset, args.data_dir)
    names = [classes[p] for p in preds.tolist()]
    result = {}
    if targets is not None:
        result = report_accuracy(console, classes, preds, targets)
        text = csv_text(["id", "label", "true_label"],
                        ([i, n, classes[t]] for i, n, t in zip(ids, names, targets.tolist())))
    else:
        text = csv_text(["id", "label"], zip(ids, names), line_terminator(kaggle_dir))
    output = output_path(args)
    write_csv(output, text)
    console.print(f"wrote {output} ({len(ids):,} rows)")
    return {**result, "output": str(output)}


def predict_data(args, acc, console: MainConsole, m: LoadedModel) -> dict:
    """--dataset/--split: the cache (only that, with --prepare), the predictions, the CSV."""
    t0 = time.perf_counter()
    imageset, labelled, kaggle_dir = load_images(args, acc, console, m)
    cached = None
    if imageset.files is not None and not imageset.in_memory and args.cache:
        cached = attach_cache(args, acc, console, imageset)
    if args.prepare:
        console.print(f"prepared {len(imageset):,} images: {cached or 'memory only (no cache)'}")
        return {"images": len(imageset), "cache": str(cached) if cached else None}

    targets = targets_in_checkpoint_classes(args, imageset, m.classes) if labelled else None
    preds, seconds = predict_set(args, acc, console, m, imageset, cached)
    result = {"images": len(imageset), "seconds": seconds, "images_per_second": len(imageset) / max(seconds, 1e-9)}
    console.print(f"predicted {len(imageset):,} images in {seconds:.1f} s "
                  f"({result['images_per_second']:,.0f} img/s; {time.perf_counter() - t0:.1f} s with loading)")
    result.update(run_on_main(acc, lambda: write_predictions(args, console, m.classes, imageset, preds, targets,
                                                             kaggle_dir)))
    acc.wait_for_everyone()
    return result


def run(argv=None) -> dict | None:
    args = parse_args(argv)
    keep_freed_memory()
    acc = make_accelerator(args.precision, cpu=args.cpu)
    console = MainConsole(acc.is_main_process)
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with held_output(acc, args):   # a second dtrain predict writing the same CSV stops here, naming this one
        m = load_model(args, acc.device)
        if args.image:
            result = {"images": run_on_main(acc, lambda: predict_images(args, console, m))}
        else:
            result = predict_data(args, acc, console, m)
    acc.end_training()
    return result


def main(argv=None) -> None:
    run_command(run, argv)


if __name__ == "__main__":
    main()
