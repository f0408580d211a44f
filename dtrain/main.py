"""Train an image classifier on 1..N processes.

    accelerate launch dtrain/main.py --arch resnet18
    accelerate launch --multi_gpu --num_processes 8 dtrain/main.py --arch googlenet --epochs 100
    python dtrain/main.py --arch cnn --dataset fake --epochs 1          # one process, also fine
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script file: import the package, not this file's neighbours
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    sys.path.insert(0, _root)

import json
import time
from pathlib import Path

import torch



def default_output_dir(cfg) -> Path:
    job, job_id = os.environ.get("SLURM_JOB_NAME"), os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job and job_id:  # stable across requeues of the same job
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return Path("runs") / (f"{job}-{job_id}" + (f"_{task}" if task else ""))
    return Path("runs") / f"{cfg.arch.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"


def find_resume(cfg, out: Path):
    """The checkpoint to resume from, or None for a fresh start."""
    from dtrain.checkpoint import load_checkpoint
    from dtrain.errors import UserError
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        path = out / "last.pt"
        if not path.exists():
            return None
    else:
        path = Path(cfg.resume)
    ckpt = load_checkpoint(path)
    if ckpt["arch"] != cfg.arch:
        raise UserError(f"{path} holds a {ckpt['arch']!r} model but this run trains {cfg.arch!r}: pass the same "
                        f"--arch (or --recipe), or another --output-dir for a fresh run")
    return ckpt


def run(argv=None) -> dict | None:
    from dtrain import config as config_mod
    from dtrain.checkpoint import atomic_write, make_output_dir, remove_stale_temp_files
    from dtrain.data import load_dataset, stats
    from dtrain.data.augment import AugmentSpec, Pipeline
    from dtrain.data.loader import make_loader
    from dtrain.distributed import broadcast, make_accelerator, on_main_first
    from dtrain.engine import Trainer
    from dtrain.errors import UserError
    from dtrain.models import build_model, count_parameters, list_archs
    from dtrain.optim import build_optimizer
    from dtrain.preempt import StopSignal
    from dtrain.report.build import make_reporters

    parser = config_mod.build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "list_archs", False):
        print("\n".join(list_archs()))
        return None
    if getattr(ns, "list_recipes", False):
        print("\n".join(config_mod.list_recipes()))
        return None
    cfg = config_mod.build_config(argv, parser)

    acc = make_accelerator(cfg.precision, cfg.grad_accum)
    world, rank = acc.num_processes, acc.process_index
    per_process, rem = divmod(cfg.batch_size, world * cfg.grad_accum)
    if rem or per_process == 0:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch: it must divide evenly over "
                        f"{world} processes x {cfg.grad_accum} accumulation steps")
    if cfg.sync_bn and acc.device.type != "cuda":
        raise UserError("--sync-bn needs GPUs (torch's SyncBatchNorm has no CPU implementation); drop the flag "
                        "on the CPU")
    torch.manual_seed(cfg.seed)

    out = Path(broadcast(acc, str(Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg))))
    cfg.output_dir = str(out)
    ckpt = find_resume(cfg, out)

    train_set, val_set = on_main_first(acc, lambda: load_dataset(cfg))
    if ckpt is not None:  # the normalisation a run started with stays, whatever the data now says
        mean, std = tuple(ckpt["mean"]), tuple(ckpt["std"])
    else:
        mean, std = broadcast(acc, stats.resolve(cfg.normalize, train_set) if acc.is_main_process else None)
    image_size = train_set.size
    arch_args = {"norm": cfg.norm, "aux_logits": cfg.aux_logits}
    model = build_model(cfg.arch, len(train_set.classes), train_set.channels, image_size,
                        pretrained=cfg.pretrained, weights=cfg.weights, **arch_args)
    device = acc.device
    train_pipe = Pipeline(AugmentSpec.from_config(cfg), mean, std, device, cfg.channels_last)
    eval_pipe = Pipeline(AugmentSpec(), mean, std, device, cfg.channels_last)
    kind = cfg.loader if cfg.loader != "auto" else ("memory" if train_set.in_memory else "files")
    train_loader = make_loader(train_set, kind, device, per_process * 1, rank, world, cfg.seed, True, cfg.workers)
    val_loader = make_loader(val_set, kind, device, -(-cfg.eval_batch_size // world), rank, world, cfg.seed,
                             False, cfg.workers)
    if hasattr(model, "init_from_data") and ckpt is None:
        sample = next(iter(make_loader(train_set, kind, torch.device("cpu"), 5000, 0, 1, cfg.seed, False,
                                       cfg.workers).batches()))[0]
        model.init_from_data(Pipeline(AugmentSpec(), mean, std, "cpu")(sample))
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw = model.to(device)
    optimizer = build_optimizer(cfg, raw, device)
    model, optimizer = acc.prepare(raw, optimizer)
    if cfg.compile:
        model = torch.compile(model)

    meta = {"arch": cfg.arch, "arch_args": arch_args, "num_classes": len(train_set.classes),
            "in_channels": train_set.channels, "image_size": image_size, "classes": list(train_set.classes),
            "mean": list(mean), "std": list(std), "config": cfg.to_dict()}
    if acc.is_main_process:
        remove_stale_temp_files(make_output_dir(out))
        atomic_write(out / "config.json", lambda f: f.write(json.dumps(cfg.to_dict(), indent=2).encode()))
    reporters = make_reporters(cfg, out, None if ckpt is None else ckpt["epoch"], acc.is_main_process)
    stop = StopSignal().install()
    trainer = Trainer(cfg, acc, model, raw, optimizer, train_loader, val_loader, train_pipe, eval_pipe,
                      val_set.labels, meta, out, reporters, stop)
    if ckpt is not None:
        trainer.restore(ckpt)
        reporters.message(f"resumed from {cfg.resume if cfg.resume != 'auto' else out / 'last.pt'} at epoch "
                          f"{ckpt['epoch'] + 1}, step {ckpt['step']}")
    elif cfg.resume == "auto":
        reporters.message(f"no {out / 'last.pt'} yet: starting a fresh run")
    info = {"train_size": len(train_set), "val_size": len(val_set), "num_classes": len(train_set.classes),
            "parameters": count_parameters(raw), "world_size": world, "rank": rank,
            "distributed_type": str(acc.distributed_type).split(".")[-1], "device": str(device),
            "per_process_batch": per_process, "precision": acc.mixed_precision, "output_dir": str(out),
            "classes": list(train_set.classes)}
    reporters.start(cfg, info)
    try:
        summary = trainer.fit()
    finally:
        stop.uninstall()
        reporters.close()
    acc.end_training()
    return summary


def main(argv=None) -> None:
    from dtrain.errors import run_cli
    run_cli(run, argv)


if __name__ == "__main__":
    main()
