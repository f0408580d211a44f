"""Process setup and cross-process gathering, behind one small interface.

`make_accelerator` builds the HuggingFace Accelerator: on the CPU when there is no CUDA (MULTI_CPU with
gloo, so `accelerate launch --multi_gpu --num_processes 2` gives one 2-process job, not two 1-process runs),
with DDP tuned for speed; models and recipes never see these settings.

A process that waits longer than the collective timeout (`--dist-timeout`) for the others gets an error
from torch; `lost_peer_line` turns it into one line naming the rank that stopped answering (the command
then exits with EXIT_PEER_LOST), so a frozen or lost peer ends the job instead of leaving the others
waiting. `leave_process_groups` destroys the gloo process groups before a command's process exits.
"""
from __future__ import annotations

import contextlib
import os
import re
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object

from dtrain.devices import check_device
from dtrain.errors import UserError

DEFAULT_TIMEOUT = 600.0
_timeout = {"seconds": DEFAULT_TIMEOUT}  # the process group's collective timeout, for the groups made later
_gloo_groups = []  # the groups cpu_group made, for leave_process_groups
_saved = {"advice": "nothing was saved before it: run the same command again to start"}  # for lost_peer_message


def note_saved(advice: str) -> None:
    """What a lost peer's line tells about the run's files from now on (the checkpointer says it after a save)."""
    _saved["advice"] = advice


def make_accelerator(precision: str | None = None, timeout: float = DEFAULT_TIMEOUT, cpu: bool = False) -> Accelerator:
    """The Accelerator with the DDP settings for speed, on a process group whose collectives give up after
    `timeout` seconds; on the CPU when there is no CUDA, or with `cpu` (or accelerate's --cpu).

    The device is checked first (`devices.check_device`): a GPU node where torch cannot use CUDA, more
    processes than GPUs, fp16 on the CPU or bf16 on a GPU without it are a UserError before any process
    group exists. `precision` None takes the launcher's (accelerate config, --mixed_precision).

    The process group is created here by accelerate's PartialState with the timeout passed straight to
    torch.distributed.init_process_group (for NCCL, and for gloo on the CPU). Not through
    InitProcessGroupKwargs: its to_kwargs() drops a value equal to the class default (600 s), and torch
    would then use its own default, 30 minutes on gloo.

    Dynamo is off in the accelerator whatever the accelerate config says: dtrain compiles the model itself,
    once (dtrain.compiled).

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
    running = precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    on_cpu = check_device(running, cpu)
    if not on_cpu:
        torch.backends.cudnn.benchmark = True
    _timeout["seconds"] = timeout
    PartialState(on_cpu, timeout=timedelta(seconds=timeout))
    # precision None: accelerate takes it from its config file / launcher flags / environment
    return Accelerator(cpu=on_cpu, mixed_precision=precision, kwargs_handlers=[ddp_kwargs()],
                       step_scheduler_with_optimizer=False, dynamo_backend="no")


def cpu_group():
    """A gloo group of all processes, with the collective timeout of the default group (torch's new_group
    does not inherit it: without one it waits 30 minutes). Every process must call it together."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=_timeout["seconds"]))
    _gloo_groups.append(group)
    return group


def leave_process_groups() -> bool:
    """Destroy the gloo process groups still open, as a command ends (dtrain.errors.run_command calls it),
    whichever way it ends. Gloo's destroy is local to the process; an NCCL group is left as it is (its
    teardown may wait for a peer that is gone). True when this process was one of several: then it must end
    without the interpreter's teardown (dtrain.errors.run_command does so). A gloo worker thread can still be
    dropping the tensors of the last collective, which takes the GIL; during the teardown that thread is
    ended inside torch's C++ code, which aborts the process ("terminate called without an active
    exception", SIGABRT), and the launcher reports a crash instead of the exit status."""
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if dist.is_available() and dist.is_initialized():
        groups = [None] if dist.get_backend() == "gloo" else _gloo_groups  # None: every group
        with contextlib.suppress(Exception):  # the process is exiting: its own error is the one to show
            for group in groups:
                dist.destroy_process_group(group)
    _gloo_groups.clear()
    return several


_TIMED_OUT = re.compile(r"timed out|timeout", re.I)
_CLOSED = re.compile(r"connection (closed|reset)|broken pipe|connectFullMesh failed|communicator was aborted", re.I)
# gloo's text, without its source path, for the other operations on a context where one timed out
_GLOO_UNNAMED = re.compile(r"^Application timeout caused pair closure")
_PEER_ADDRESS = re.compile(r"\[(\d+\.\d+\.\d+\.\d+|[0-9a-f:]+)\]:(\d+)", re.I)


def lost_peer_message(error: BaseException, rank: int, world: int, timeout: float) -> str | None:
    """One line for a collective that failed because another process froze or died, or None for any other
    error. torch's text names no rank (gloo: "Timed out waiting 10000ms for recv operation to complete",
    "Connection closed by peer [10.0.0.2]:4711"): with two processes it is the other one, with more the
    peer's address when the text has one."""
    text = str(error)
    from_collective = isinstance(error, getattr(torch.distributed, "DistError", ())) or \
        isinstance(error, RuntimeError) and (re.search(r"gloo|nccl", text, re.I) or _GLOO_UNNAMED.search(text))
    timed_out = bool(_TIMED_OUT.search(text))
    if not from_collective or not (timed_out or _CLOSED.search(text)):
        return None
    address = _PEER_ADDRESS.search(text)
    if world == 2:
        who = f"rank {1 - rank}"
    elif address:
        who = f"the process at {address.group(1)}:{address.group(2)}"
    else:
        who = "another process"
    what = f"stopped answering for {timeout:g} s (--dist-timeout)" if timed_out else "was lost (its connection closed)"
    reason = re.sub(r"^\[[^\]]*\] *", "", text.strip().splitlines()[0]) if text.strip() else type(error).__name__
    return f"{who} {what}: the job stops; {_saved['advice']} (torch: {reason})"


def lost_peer_line(error: RuntimeError) -> str | None:
    """The one line for a collective that failed on a frozen or lost peer of a job of several processes
    (None: another error). dtrain.errors.run_command ends the process with it and EXIT_PEER_LOST, and a
    launcher then stops, or restarts, the others."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None
    return lost_peer_message(error, int(os.environ.get("RANK", "0")), world, _timeout["seconds"])


def ddp_kwargs() -> DistributedDataParallelKwargs:
    """The DDP settings `make_accelerator` uses (see there)."""
    return DistributedDataParallelKwargs(gradient_as_bucket_view=True, bucket_cap_mb=25, broadcast_buffers=True,
                                         find_unused_parameters=False, static_graph=False)


def process_batch_sizes(accelerator: Accelerator, batch_size: int, eval_batch_size: int,
                        grad_accum: int) -> tuple[int, int]:
    """Per-process (training, evaluation) batch sizes for global ones: the training batch divides evenly
    over processes x accumulation steps (a UserError otherwise), the evaluation batch is rounded up."""
    world = accelerator.num_processes
    per_process, rem = divmod(batch_size, world * grad_accum)
    if rem or per_process == 0:
        raise UserError(f"--batch-size {batch_size} is the global batch: it must divide evenly over "
                        f"{world} processes x {grad_accum} accumulation steps")
    return per_process, -(-eval_batch_size // world)


def check_sync_bn(accelerator: Accelerator, sync_bn: bool) -> None:
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
    shapes = gather_object([[tuple(v.shape[1:]) if len(v) else None for v in values]])
    fixed = []
    for i, v in enumerate(values):
        trailing = next((s[i] for s in shapes if s[i] is not None), None)
        fixed.append(v.new_zeros((0, *trailing)) if not len(v) and trailing is not None else v)
    return fixed


def sync_buffers(accelerator: Accelerator, module: torch.nn.Module) -> None:
    """Make `module`'s buffers (BatchNorm statistics) those of the main process, on every process. Under DDP
    each process's BatchNorm updates its statistics from its own batch after DDP's broadcast at the start of
    a forward, and an EMA averages them per process; the main process's are the ones a checkpoint holds.
    Every process must call this together (one broadcast per buffer, on every process alike)."""
    if accelerator.num_processes == 1:
        return
    works = [dist.broadcast(b.data, src=0, async_op=True) for b in module.buffers()]
    for work in works:
        work.wait()


def broadcast(accelerator: Accelerator, value):
    """The main process's value, on every process."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box)
    return box[0]


def _main_only(accelerator: Accelerator, fn):
    """fn() on the main process (None elsewhere). An error it raises is raised on every process, rather than
    leaving the others waiting at their next collective: a UserError as itself, anything else as the main
    process's original exception there and a RuntimeError naming it elsewhere."""
    result, error, failure = None, None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as e:
            error = ("user", str(e))
        except Exception as e:
            error, failure = ("other", f"{type(e).__name__}: {e}"), e
    error = broadcast(accelerator, error)
    if failure is not None:
        raise failure
    if error is not None:
        kind, message = error
        raise UserError(message) if kind == "user" else RuntimeError(f"the main process failed: {message}")
    return result


def on_main_first(accelerator: Accelerator, fn):
    """Run fn on the main process first (e.g. to download, or to build a cache), then on the others."""
    result = _main_only(accelerator, fn)
    return result if accelerator.is_main_process else fn()


def run_on_main(accelerator: Accelerator, fn):
    """fn() on the main process only; its (picklable) result, or its UserError, on every process."""
    return broadcast(accelerator, _main_only(accelerator, fn))


def on_every_process(accelerator: Accelerator, fn):
    """fn() on every process; a UserError raised on any of them is raised on all (none waits for the others)."""
    try:
        result, error = fn(), None
    except UserError as e:
        result, error = None, str(e)
    error = first_error(accelerator, error)
    if error is not None:
        raise UserError(error)
    return result


def first_error(accelerator: Accelerator, error: str | None) -> str | None:
    """Any process's error message (the lowest rank's), on every process."""
    if accelerator.num_processes == 1:
        return error
    errors = [e for e in gather_object([error]) if e is not None]
    return errors[0] if errors else None
