"""Process setup and cross-process gathering, behind one small interface.

`make_accelerator` builds the HuggingFace Accelerator: on the CPU when there is no CUDA (MULTI_CPU with
gloo, so `accelerate launch --multi_gpu --num_processes 2` gives one 2-process job, not two 1-process runs),
with DDP tuned for speed; models and recipes never see these settings.
"""
from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs


def make_accelerator(precision: str | None = None) -> Accelerator:
    """The Accelerator with the DDP settings for speed.

    gradient_as_bucket_view: gradients live in the all-reduce buckets (no copy in and out of them).
    bucket_cap_mb 25 (torch's default): ResNet18's 45 MB of fp32 gradients go in 2 buckets, the first
      all-reduced while the backward pass still runs; larger buckets overlap less, smaller ones launch
      more collectives.
    find_unused_parameters off: every model here uses all its trainable parameters in every training
      forward (frozen ones, e.g. airbench's whitening, have requires_grad=False and are not reduced),
      so DDP needs no graph traversal per step.
    static_graph off: with find_unused_parameters off and every parameter used it brings no speed, and it
      is wrong with gradient accumulation (DDP.no_sync; pytorch #143580, accelerate #3679: an assertion or
      silently unreduced gradients).
    broadcast_buffers: BatchNorm running statistics stay those of rank 0 (one small broadcast per step).
    cudnn.benchmark on CUDA: input shapes are fixed, so the autotuned convolution algorithms are reused.
    """
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    # precision None: accelerate takes it from its config file / launcher flags / environment
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision,
                       kwargs_handlers=[ddp_kwargs()], step_scheduler_with_optimizer=False)


def ddp_kwargs() -> DistributedDataParallelKwargs:
    """The DDP settings `make_accelerator` uses (see there)."""
    return DistributedDataParallelKwargs(gradient_as_bucket_view=True, bucket_cap_mb=25, broadcast_buffers=True,
                                         find_unused_parameters=False, static_graph=False)


def process_batch_sizes(accelerator: Accelerator, batch_size: int, eval_batch_size: int,
                        grad_accum: int) -> tuple[int, int]:
    """Per-process (training, evaluation) batch sizes for global ones: the training batch divides evenly
    over processes x accumulation steps (a UserError otherwise), the evaluation batch is rounded up."""
    from dtrain.errors import UserError
    world = accelerator.num_processes
    per_process, rem = divmod(batch_size, world * grad_accum)
    if rem or per_process == 0:
        raise UserError(f"--batch-size {batch_size} is the global batch: it must divide evenly over "
                        f"{world} processes x {grad_accum} accumulation steps")
    return per_process, -(-eval_batch_size // world)


def check_sync_bn(accelerator: Accelerator, sync_bn: bool) -> None:
    from dtrain.errors import UserError
    if sync_bn and accelerator.device.type != "cuda":
        raise UserError("--sync-bn needs GPUs (torch's SyncBatchNorm has no CPU implementation); drop the flag "
                        "on the CPU")


def gather_samples(accelerator: Accelerator, index: torch.Tensor, *values: torch.Tensor):
    """Per-sample results of every process, in dataset order, each sample once.

    Shards may differ in length by one: pad with index -1, gather, drop the padding, sort by index.
    Returns (index, *values) on every process (CPU tensors).
    """
    if accelerator.num_processes > 1:
        values = _shape_empty_like_others(values)
        index = accelerator.pad_across_processes(index, dim=0, pad_index=-1)
        values = [accelerator.pad_across_processes(v, dim=0, pad_index=0) for v in values]
        index = accelerator.gather(index)
        values = [accelerator.gather(v) for v in values]
    keep = index >= 0
    index = index[keep]
    order = index.argsort()
    return (index[order].cpu(), *[v[keep][order].cpu() for v in values])


def _shape_empty_like_others(values):
    """A process with no samples has no idea of a value's trailing shape (e.g. the number of classes):
    take it from the processes that have some, or the gather would hang on mismatched shapes."""
    from accelerate.utils import gather_object
    shapes = gather_object([[tuple(v.shape[1:]) if len(v) else None for v in values]])
    fixed = []
    for i, v in enumerate(values):
        trailing = next((s[i] for s in shapes if s[i] is not None), None)
        fixed.append(v.new_zeros((0, *trailing)) if not len(v) and trailing is not None else v)
    return fixed


def broadcast(accelerator: Accelerator, value):
    """The main process's value, on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list
    box = [value]
    broadcast_object_list(box)
    return box[0]


def _main_only(accelerator: Accelerator, fn):
    """fn() on the main process (None elsewhere); a UserError it raises is raised on every process,
    rather than leaving the others waiting forever at their next collective."""
    from dtrain.errors import UserError
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    error = broadcast(accelerator, error)
    if error is not None:
        raise UserError(error)
    return result


def on_main_first(accelerator: Accelerator, fn):
    """Run fn on the main process first (e.g. to download, or to build a cache), then on the others."""
    result = _main_only(accelerator, fn)
    return result if accelerator.is_main_process else fn()


def run_on_main(accelerator: Accelerator, fn):
    """fn() on the main process only; its (picklable) result, or its UserError, on every process."""
    return broadcast(accelerator, _main_only(accelerator, fn))


def first_error(accelerator: Accelerator, error: str | None) -> str | None:
    """Any process's error message (the lowest rank's), on every process."""
    if accelerator.num_processes == 1:
        return error
    from accelerate.utils import gather_object
    errors = [e for e in gather_object([error]) if e is not None]
    return errors[0] if errors else None
