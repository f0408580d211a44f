"""Train an image classifier on 1..N processes.

    dtrain train --arch resnet18
    accelerate launch -m dtrain train --arch resnet18
    accelerate launch dtrain/main.py --arch resnet18
    accelerate launch --multi_gpu --num_processes 8 dtrain/main.py --arch googlenet --epochs 100
    python dtrain/main.py --arch cnn --dataset fake --epochs 1          # one process, also fine

`run` and `train` read top to bottom: settings -> processes -> does the model take the images -> the output
folder -> what to resume -> data -> model -> trainer -> fit.
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

import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dtrain import compiled, muon, settings
from dtrain.checkpoint import data_fingerprint, model_meta
from dtrain.checkpointer import Checkpointer
from dtrain.compiled import CompileSpec
from dtrain.data import image_size_before_loading, load_dataset, stats
from dtrain.data.augment import AugmentSpec, Pipeline
from dtrain.data.loader import choose_loader, make_loader
from dtrain.data.mixing import Mixer, MixSpec
from dtrain.distributed import (broadcast, check_sync_bn, make_accelerator, on_every_process, on_main_first,
                                process_batch_sizes, run_on_main)
from dtrain.engine import LoopSpec, Trainer, TrainParts
from dtrain.errors import TrainingDiverged, UserError, run_command
from dtrain.files import make_folder, remove_stale_temp_files, write_text
from dtrain.models import DATA_INIT_IMAGES, build_model, check_input_size, count_parameters, init_from_data
from dtrain.optim import OptimSpec, ScheduleSpec, build_optimizer
from dtrain.preempt import StopSignal
from dtrain.report.build import make_reporters
from dtrain.resume import Resume
from dtrain.rundir import default_output_dir, open_output_dir, remember_failure
from dtrain.sweep import run_name


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
        make_folder(out)
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


def build_data(cfg, acc, batch: int, eval_batch: int, resume: Resume | None) -> Data:
    train_set, val_set = on_main_first(acc, lambda: load_dataset(cfg))
    if resume is not None:
        mean, std = resume.normalisation
    else:
        mean, std = broadcast(acc, stats.resolve(cfg.normalize, train_set) if acc.is_main_process else None)
    kind = choose_loader(cfg.loader, train_set, val_set)
    shard = dict(device=acc.device, rank=acc.process_index, world=acc.num_processes, seed=cfg.seed,
                 workers=cfg.workers)
    return Data(train_set, val_set, mean, std, kind,
                train_loader=make_loader(train_set, kind, batch_size=batch, train=True, accum=cfg.grad_accum, **shard),
                val_loader=make_loader(val_set, kind, batch_size=eval_batch, train=False, **shard),
                train_pipe=Pipeline(AugmentSpec.from_config(cfg), mean, std, acc.device, cfg.channels_last,
                                    rank=acc.process_index, world=acc.num_processes, accum=cfg.grad_accum),
                eval_pipe=Pipeline(AugmentSpec(), mean, std, acc.device, cfg.channels_last))


def first_images(cfg, data: Data, n: int) -> torch.Tensor:
    """The first n training images, normalised, on the CPU."""
    loader = make_loader(data.train_set, data.kind, device=torch.device("cpu"), batch_size=n, rank=0, world=1,
                         seed=cfg.seed, train=False, workers=cfg.workers)
    return Pipeline(AugmentSpec(), data.mean, data.std, "cpu")(next(iter(loader.batches()))[0])


def describe_model(cfg, data: Data) -> dict:
    """What a checkpoint holds besides the weights: the model, its input and the data's fingerprint."""
    train_set = data.train_set
    return model_meta(cfg, {"norm": cfg.norm, "aux_logits": cfg.aux_logits, "shakedrop": cfg.shakedrop,
                            "dropout": cfg.dropout}, train_set.classes,
                      in_channels=train_set.channels, image_size=train_set.size, mean=data.mean, std=data.std,
                      data=data_fingerprint(cfg.dataset, train_set.labels))


def build_training_model(cfg, acc, meta: dict, data: Data, *, fresh: bool, compile_spec: CompileSpec | None):
    """(model, module, optimizer): the model of `meta` initialised (from the data on a fresh run, when it
    asks), converted (SyncBN, channels_last), on the device, prepared by accelerate and compiled; module is
    the module beneath DDP / compile. A model that cannot take the data's images is a UserError first."""
    check_input_size(meta["arch"], meta["image_size"], meta["in_channels"])  # an image folder's size: known now
    model = build_model(meta["arch"], meta["num_classes"], meta["in_channels"], meta["image_size"],
                        pretrained=cfg.pretrained, weights=cfg.weights, **meta["arch_args"])
    if fresh:
        init_from_data(model, lambda: first_images(cfg, data, DATA_INIT_IMAGES))
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    module = model.to(acc.device)
    optimizer = build_optimizer(OptimSpec.from_config(cfg), module, acc.device)
    model, optimizer = acc.prepare(module, optimizer)
    if compile_spec is not None:
        compiled.before_compile(acc.num_processes)
        compiled.start_workers()
        model = compiled.compile_module(model, compile_spec)
    return model, module, optimizer


def mixer(cfg, *, num_classes: int, parts: int) -> Mixer | None:
    """MixUp/CutMix of the training batches, when --mixup or --cutmix asks (`parts`: of a step's global
    batch, processes x micro-batches)."""
    spec = MixSpec.from_config(cfg)
    return None if spec is None else Mixer(spec, num_classes, parts)


def run_info(acc, data: Data, module, batch: int, out: Path, compile_spec: CompileSpec | None) -> dict:
    """What the reporters print and log at the start."""
    return {"train_size": len(data.train_set), "val_size": len(data.val_set),
            "num_classes": len(data.train_set.classes), "parameters": count_parameters(module),
            "world_size": acc.num_processes, "rank": acc.process_index,
            "distributed_type": str(acc.distributed_type).split(".")[-1], "device": str(acc.device),
            "per_process_batch": batch, "precision": acc.mixed_precision, "output_dir": str(out),
            "classes": list(data.train_set.classes),
            "compile": None if compile_spec is None else compile_spec.source}


def run(argv=None) -> dict | None:
    cfg = settings.from_command_line(argv)
    if cfg is None:
        return None
    stop = StopSignal().install()   # until training begins, a stop signal ends the start-up at once
    try:
        return train(cfg, stop)
    finally:
        stop.uninstall()


def train(cfg, stop: StopSignal) -> dict:
    acc = make_accelerator(cfg.precision, cfg.dist_timeout, cfg.cpu)
    compile_spec = CompileSpec() if cfg.compile else compiled.launcher_request()
    batch, eval_batch = process_batch_sizes(acc, cfg.batch_size, cfg.eval_batch_size, cfg.grad_accum)
    check_sync_bn(acc, cfg.sync_bn)
    torch.manual_seed(cfg.seed)
    check_input_size(cfg.arch, image_size_before_loading(cfg))
    out = Path(broadcast(acc, str(run_output_dir(cfg))))
    with claimed_output_dir(acc, out, cfg.resume) as resume_mode:
        cfg = dataclasses.replace(cfg, output_dir=str(out), resume=resume_mode)
        resume = Resume.find(cfg, out)

        data = build_data(cfg, acc, batch, eval_batch, resume)
        meta = describe_model(cfg, data)
        if resume is not None:
            resume.check_data(meta)
        model, module, optimizer = build_training_model(cfg, acc, meta, data, fresh=resume is None,
                                                        compile_spec=compile_spec)
        if acc.is_main_process:
            write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))

        reporters = on_every_process(acc, lambda: make_reporters(cfg, out, None if resume is None else resume.epoch,
                                                                 acc.is_main_process))
        parts = TrainParts(model=model, module=module, optimizer=optimizer, train_loader=data.train_loader,
                           val_loader=data.val_loader, train_pipe=data.train_pipe, eval_pipe=data.eval_pipe,
                           val_labels=data.val_set.labels,
                           compile=partial(compiled.compile_module, spec=compile_spec) if compile_spec else None,
                           mix=mixer(cfg, num_classes=meta["num_classes"], parts=acc.num_processes * cfg.grad_accum))
        # two optimisers in one: say which weights each takes, at which LR (before the schedule) and decay
        groups = muon.describe(getattr(optimizer, "optimizer", optimizer)) if cfg.optimizer == "muon" else None
        trainer = Trainer(LoopSpec.from_config(cfg), ScheduleSpec.from_config(cfg), acc, parts,
                          Checkpointer(out, acc, meta, cfg.save_every_minutes), reporters, stop.training())
        if resume is not None:
            trainer.resume_from(resume)
            reporters.message(resume.describe())
        elif cfg.resume == "auto":
            reporters.message(f"no {out / 'last.pt'} yet: starting a fresh run")
        reporters.start(cfg, run_info(acc, data, module, batch, out, compile_spec))
        if groups is not None:
            reporters.message(f"optimiser: {groups}")
        try:
            summary = trainer.fit()
        finally:
            reporters.close()
        acc.end_training()
    return summary


def main(argv=None) -> None:
    run_command(run, argv)


if __name__ == "__main__":
    main()
