"""Process setup and cross-process gathering, behind one small interface.

`make_accelerator` builds the HuggingFace Accelerator: on the CPU when there is no CUDA (MULTI_CPU with
gloo, so `accelerate launch --multi_gpu --num_processes 2` gives one 2-process job, not two 1-process runs),
with DDP tuned for speed; models and recipes never see these settings.
"""
from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs


def make_accelerator(precision: str | None = None, grad_accum: int = 1) -> Accelerator:
    ddp = DistributedDataParallelKwargs(
        gradient_as_bucket_view=True,   # gradients live in the all-reduce buckets: no extra copy
        bucket_cap_mb=25,
        broadcast_buffers=True,         # BatchNorm running statistics stay those of rank 0
        find_unused_parameters=False,
    )
    # precision None: accelerate takes it from its config file / launcher flags / environment
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision,
                       kwargs_handlers=[ddp], step_scheduler_with_optimizer=False)


def gather_samples(accelerator: Accelerator, index: torch.Tensor, *values: torch.Tensor):
    """Per-sample results of every process, in dataset order, each sample once.

    Shards may differ in length by one: pad with index -1, gather, drop the padding, sort by index.
    Returns (index, *values) on every process (CPU tensors).
    """
    if accelerator.num_processes > 1:
        index = accelerator.pad_across_processes(index, dim=0, pad_index=-1)
        values = [accelerator.pad_across_processes(v, dim=0, pad_index=0) for v in values]
        index = accelerator.gather(index)
        values = [accelerator.gather(v) for v in values]
    keep = index >= 0
    index = index[keep]
    order = index.argsort()
    return (index[order].cpu(), *[v[keep][order].cpu() for v in values])
