"""torch.compile as dtrain uses it: static shapes, one compile, stop signals kept, a safe floor on DDP.

* Static shapes (`dynamic=False`). Training and evaluation run with different batch sizes; one compiled
  module seeing both would mark the batch dimension dynamic and compile a symbolic-shape graph. Training
  and evaluation each get their own compiled module, and a batch shorter than the module's full batch
  (an epoch's last) runs on the eager module beneath (`engine.for_batch`), so each graph sees one shape.
* One compile. An accelerate config that asks for dynamo (`dynamo_config` in the yaml, `--dynamo_backend`)
  would compile the model inside `accelerator.prepare`, and `--compile` again on top. The accelerator is
  always built with dynamo off (`distributed.make_accelerator`); a launcher's request counts as `--compile`
  with its backend and mode (`launcher_request`).
* Stop signals. Inductor compiles in a pool of worker processes (a sidecar and its workers) in the
  training process's group, so a Ctrl-C, or a SIGTERM/SIGUSR1 sent to the group, would kill them mid-compile
  and end the run with a traceback. `start_workers` starts the pool with the stop signals blocked; the
  workers inherit the blocked mask and ignore them, while this process gets any signal that arrived
  meanwhile once they are unblocked, and saves at the next step like at any other moment.
* DDP on torch older than 2.9 with compile could train on wrong gradients (pytorch PR #160745: the
  DDPOptimizer's graph split and donated buffers); `before_compile` turns donated buffers off there.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dtrain.signals import SIGNALS

DONATED_BUFFERS_FIXED = (2, 9)


@dataclass(frozen=True)
class CompileSpec:
    backend: str = "inductor"
    mode: str | None = None
    source: str = "--compile"    # what asked for it, for the start-up line


def launcher_request(env=os.environ) -> CompileSpec | None:
    """The compile an accelerate config or `accelerate launch --dynamo_backend` asks for, or None."""
    backend = env.get("ACCELERATE_DYNAMO_BACKEND", "no").strip()
    if backend.lower() in ("", "no", "none"):
        return None
    mode = env.get("ACCELERATE_DYNAMO_MODE") or None
    return CompileSpec(backend.lower(), None if mode == "default" else mode, "the accelerate config's dynamo_backend")


def torch_version(text: str = torch.__version__) -> tuple[int, int]:
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def before_compile(world_size: int, version: tuple[int, int] | None = None) -> bool:
    """Prepare torch for compiling a DDP model; returns whether donated buffers were turned off."""
    version = version or torch_version()
    if world_size > 1 and version < DONATED_BUFFERS_FIXED:
        import torch._functorch.config as functorch_config
        if hasattr(functorch_config, "donated_buffer"):  # older torch has no donated buffers, hence no fault
            functorch_config.donated_buffer = False
            return True
    return False


@contextmanager
def signals_blocked(signals=SIGNALS):
    """Block `signals` in this thread for the block; a process started inside inherits them blocked.
    A signal that arrives meanwhile is delivered when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_workers() -> None:
    """Start inductor's compile worker pool now, with the stop signals blocked in it (see the module)."""
    from torch._inductor.async_compile import AsyncCompile
    with signals_blocked():
        AsyncCompile.warm_pool()


def compile_module(module: torch.nn.Module, spec: CompileSpec) -> torch.nn.Module:
    """`module` compiled with static shapes; the eager module stays reachable as `._orig_mod`."""
    return torch.compile(module, dynamic=False, backend=spec.backend, mode=spec.mode)
