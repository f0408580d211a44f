"""Train an image classifier on 1..N processes.

    dtrain train --arch resnet18
    accelerate launch -m dtrain train --arch resnet18
    accelerate launch dtrain/main.py --arch resnet18
    accelerate launch --multi_gpu --num_processes 8 dtrain/main.py --arch googlenet --epochs 100
    python dtrain/main.py --arch cnn --dataset fake --epochs 1          # one process, also fine

`run` reads top to bottom: arguments -> Config -> accelerator -> data -> model -> trainer -> fit.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__" and sys.path[0] == _HERE:
    # Run as a file, Python put dtrain/ first on sys.path: its config.py, data/, models/... would shadow
    # installed modules of those names, and `import dtrain` could find another installed copy. Put this
    # checkout's root there instead.
    sys.path[0] = os.path.dirname(_HERE)

import json
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dtrain import compiled
from dtrain import config as config_mod
from dtrain.compiled import CompileSpec
from dtrain.checkpoint import (atomic_write, check_resumable, data_fingerprint, find_resume, make_output_dir,
                               model_meta, remove_stale_temp_files, restore_training)
from dtrain.data import load_dataset, stats
from dtrain.data.augment import AugmentSpec, Pipeline
from dtrain.data.loader import choose_loader, make_loader
from dtrain.distributed import (broadcast, check_sync_bn, leaving_gloo_groups, make_accelerator, on_every_process,
                                on_main_first, process_batch_sizes, run_on_main, stop_on_lost_peer)
from dtrain.engine import Trainer, TrainParts
from dtrain.errors import TrainingDiverged, UserError
from dtrain.models import DATA_INIT_IMAGES, build_model, count_parameters, init_from_data, list_archs
from dtrain.optim import OptimSpec, build_optimizer
from dtrain.preempt import StopSignal
from dtrain.report.build import make_reporters
from dtrain.rundir import default_output_dir, open_output_dir, remember_failure
from dtrain.sweep import listing, run_name


def run_output_dir(cfg) -> Path:
    """--output-dir, or the default folder. A sweep's combination gets a folder named by its values: inside
    --output-dir when one is given, else in runs/ (or the Slurm array task's runs/<job>-<array job>_<task>)."""
    name = run_name(cfg) if cfg.sweep else None
    if cfg.output_dir:
        return Path(cfg.output_dir) / name if name else Path(cfg.output_dir)
    return default_output_dir(cfg.arch, name)


@contextmanager
def claimed_output_dir(acc, out: Path, resume: str | None):
    """The run's folder, claimed by the main process for the `with` block: created, locked, checked not to
    hold another run's results, cleared of the temp files of interrupted writes. Yields the --resume to use.
    An error that ends the run and that a restart cannot fix is noted there for torchrun's restarts."""
    held = []

    def claim():
        make_output_dir(out)
        lock, use = open_output_dir(out, resume)
        held.append(lock)
        remove_stale_temp_files(out)
        return use

    use = run_on_main(acc, claim)
    try:
        yield use
    except (UserError, TrainingDiverged) as e:
        if held:
            remember_failure(out, e)
        raise
    finally:
        for lock in held:
            lock.release()


def parse_config(argv):
    """The run's Config, or None when the arguments only asked for a listing (printed here)."""
    parser = config_mod.build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "list_archs", False):
        print("\n".join(list_archs()))
        return None
    if getattr(ns, "list_recipes", False):
        print("\n".join(config_mod.list_recipes()))
        return None
    if getattr(ns, "sweep_list", False):
        print(listing(getattr(ns, "sweep", [])))
        return None
    return config_mod.build_config(argv, parser)


@dataclass
class Data:
    train_set: Any
    val_set: Any
    mean: tuple
    std: tuple
    kind: str                   # the loader kind: memory or files
    train_loader: Any
    val_loader: Any
    train_pipe: Pipeline
    eval_pipe: Pipeline


def build_data(cfg, acc, batch: int, eval_batch: int, ckpt) -> Data:
    train_set, val_set = on_main_first(acc, lambda: load_dataset(cfg))
    if ckpt is not None:  # the normalisation a run started with stays, whatever the data now says
        mean, std = tuple(ckpt["mean"]), tuple(ckpt["std"])
    else:
        mean, std = broadcast(acc, stats.resolve(cfg.normalize, train_set) if acc.is_main_process else None)
    kind = choose_loader(cfg.loader, train_set, val_set)
    world, rank, device = acc.num_processes, acc.process_index, acc.device
    return Data(train_set, val_set, mean, std, kind,
                make_loader(train_set, kind, device, batch, rank, world, cfg.seed, True, cfg.workers),
                make_loader(val_set, kind, device, eval_batch, rank, world, cfg.seed, False, cfg.workers),
                Pipeline(AugmentSpec.from_config(cfg), mean, std, device, cfg.channels_last),
                Pipeline(AugmentSpec(), mean, std, device, cfg.channels_last))


def first_images(cfg, data: Data, n: int) -> torch.Tensor:
    """The first n training images, normalised, on the CPU."""
    loader = make_loader(data.train_set, data.kind, torch.device("cpu"), n, 0, 1, cfg.seed, False, cfg.workers)
    return Pipeline(AugmentSpec(), data.mean, data.std, "cpu")(next(iter(loader.batches()))[0])


def build_training_model(cfg, acc, meta: dict, data: Data, fresh: bool, compile_spec: CompileSpec | None):
    """(model, raw, optimizer): the model of `meta` initialised (from the data on a fresh run, when it
    asks), converted (SyncBN, channels_last), on the device, prepared by accelerate and compiled; raw is
    the module beneath DDP / compile."""
    model = build_model(meta["arch"], meta["num_classes"], meta["in_channels"], meta["image_size"],
                        pretrained=cfg.pretrained, weights=cfg.weights, **meta["arch_args"])
    if fresh:
        init_from_data(model, lambda: first_images(cfg, data, DATA_INIT_IMAGES))
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw = model.to(acc.device)
    optimizer = build_optimizer(OptimSpec.from_config(cfg), raw, acc.device)
    model, optimizer = acc.prepare(raw, optimizer)
    if compile_spec is not None:
        compiled.before_compile(acc.num_processes)
        compiled.start_workers()
        model = compiled.compile_module(model, compile_spec)
    return model, raw, optimizer


def run_info(acc, data: Data, raw, batch: int, out: Path, compile_spec: CompileSpec | None) -> dict:
    """What the reporters print and log at the start."""
    return {"train_size": len(data.train_set), "val_size": len(data.val_set),
            "num_classes": len(data.train_set.classes), "parameters": count_parameters(raw),
            "world_size": acc.num_processes, "rank": acc.process_index,
            "distributed_type": str(acc.distributed_type).split(".")[-1], "device": str(acc.device),
            "per_process_batch": batch, "precision": acc.mixed_precision, "output_dir": str(out),
            "classes": list(data.train_set.classes),
            "compile": None if compile_spec is None else compile_spec.source}


def run(argv=None) -> dict | None:
    cfg = parse_config(argv)
    if cfg is None:
        return None
    acc = make_accelerator(cfg.precision, cfg.dist_timeout, cfg.cpu)
    compile_spec = CompileSpec() if cfg.compile else compiled.launcher_request()
    batch, eval_batch = process_batch_sizes(acc, cfg.batch_size, cfg.eval_batch_size, cfg.grad_accum)
    check_sync_bn(acc, cfg.sync_bn)
    torch.manual_seed(cfg.seed)
    out = Path(broadcast(acc, str(run_output_dir(cfg))))
    cfg.output_dir = str(out)
    with claimed_output_dir(acc, out, cfg.resume) as cfg.resume:
        resume_from, ckpt = find_resume(cfg, out)

        data = build_data(cfg, acc, batch, eval_batch, ckpt)
        train_set = data.train_set
        meta = model_meta(cfg, {"norm": cfg.norm, "aux_logits": cfg.aux_logits}, train_set.classes,
                          train_set.channels, train_set.size, data.mean, data.std,
                          data_fingerprint(cfg.dataset, train_set.labels))
        check_resumable(ckpt, meta, resume_from)
        model, raw, optimizer = build_training_model(cfg, acc, meta, data, fresh=ckpt is None,
                                                     compile_spec=compile_spec)

        if acc.is_main_process:
            atomic_write(out / "config.json", lambda f: f.write(json.dumps(cfg.to_dict(), indent=2).encode()))
        resumed_epoch = None if ckpt is None else ckpt["epoch"]
        reporters = on_every_process(acc, lambda: make_reporters(cfg, out, resumed_epoch, acc.is_main_process))
        stop = StopSignal().install()
        parts = TrainParts(model, raw, optimizer, data.train_loader, data.val_loader, data.train_pipe,
                           data.eval_pipe, data.val_set.labels, meta,
                           compile=partial(compiled.compile_module, spec=compile_spec) if compile_spec else None)
        trainer = Trainer(cfg, acc, parts, out, reporters, stop)
        if ckpt is not None:
            restore_training(trainer, ckpt)
            reporters.message(f"resumed from {resume_from} at epoch {ckpt['epoch'] + 1}, step {ckpt['step']}")
        elif cfg.resume == "auto":
            reporters.message(f"no {out / 'last.pt'} yet: starting a fresh run")
        reporters.start(cfg, run_info(acc, data, raw, batch, out, compile_spec))
        try:
            summary = trainer.fit()
        finally:
            stop.uninstall()
            reporters.close()
        acc.end_training()
    return summary


def main(argv=None) -> None:
    from dtrain.errors import run_cli
    with leaving_gloo_groups(), stop_on_lost_peer():
        run_cli(run, argv)


if __name__ == "__main__":
    main()
