"""Which device a process trains on, checked before anything starts.

A GPU node where torch cannot use CUDA (a wheel built for a newer driver, a CPU-only wheel, a container
started without `--gpus`) would otherwise train on the CPU, one process per GPU and a hundred times slower,
with "device cpu" as the only trace. `check_device` refuses that with one line, and refuses the other
mismatches a user meets in the first minute on a GPU node: more processes on a node than GPUs it shows
(two ranks on one GPU: NCCL's "Duplicate GPU detected"), fp16 on the CPU (accelerate would run fp32 and
call it fp16), bf16 on a GPU without it. Running on the CPU on purpose stays one switch away: `--cpu`, or
accelerate's own (`accelerate launch --cpu`, ACCELERATE_USE_CPU=1).

The evidence of GPUs comes from the environment, the device files and `nvidia-smi`, each passed in, so
that tests can give any machine.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from dtrain.errors import UserError

TRUE = ("1", "true", "yes", "on")


def visible_devices(value: str) -> int:
    """How many GPUs a CUDA_VISIBLE_DEVICES value names: indices, GPU-/MIG- UUIDs, comma-separated; the
    list ends at the first entry that is neither (NVIDIA's rule: "0,1,-1,2" names two), "" names none."""
    count = 0
    for entry in value.split(","):
        entry = entry.strip()
        if not (re.fullmatch(r"\d+", entry) or re.match(r"(GPU|MIG)-", entry)):
            break
        count += 1
    return count


@dataclass
class Machine:
    """What the machine and its scheduler say about GPUs; `probe()` reads the real one."""
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    exists: Callable[[str], bool] = os.path.exists
    which: Callable[[str], str | None] = shutil.which

    def nvidia_smi(self, *args: str) -> str | None:
        """nvidia-smi's output, or None where it is missing or fails."""
        exe = self.which("nvidia-smi")
        if exe is None:
            return None
        try:
            r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout if r.returncode == 0 else None

    def gpu_evidence(self) -> list[str]:
        """What says this machine has GPUs for this process (empty: a machine without any)."""
        visible = self.env.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and not visible_devices(visible):
            return []  # every GPU hidden from this process ("" or -1): the CPU on purpose
        evidence = [f"CUDA_VISIBLE_DEVICES={visible}"] if visible is not None else []
        slurm = self.env.get("SLURM_GPUS_ON_NODE", "")
        if slurm.isdigit() and int(slurm) > 0:
            evidence.append(f"SLURM_GPUS_ON_NODE={slurm}")
        if self.exists("/dev/nvidia0"):
            evidence.append("/dev/nvidia0 exists")
        listed = self.nvidia_smi("-L")
        gpus = len([line for line in (listed or "").splitlines() if line.startswith("GPU")])
        if gpus:
            evidence.append(f"nvidia-smi lists {gpus} GPU{'s' if gpus > 1 else ''}")
        return evidence

    def driver_version(self) -> str | None:
        out = self.nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
        return out.splitlines()[0].strip() if out and out.strip() else None

    def cpu_requested(self) -> bool:
        """accelerate's own switch to the CPU (`accelerate launch --cpu` sets it)."""
        return self.env.get("ACCELERATE_USE_CPU", "").strip().lower() in TRUE

    def local_processes(self) -> int:
        """Processes the launcher started on this node (torchrun and accelerate set LOCAL_WORLD_SIZE)."""
        value = self.env.get("LOCAL_WORLD_SIZE", "1")
        return int(value) if value.isdigit() else 1


@dataclass(frozen=True)
class Torch:
    """What torch can do here; `probe()` asks the real one."""
    cuda_available: bool
    gpu_count: int
    cuda_version: str | None        # the CUDA the wheel was built for; None: a CPU-only wheel
    version: str
    why_no_cuda: str | None = None  # torch's own reason, when it cannot use CUDA
    bf16: bool = True               # the GPUs do bf16 natively (Ampere or newer)
    gpu_name: str = ""

    @classmethod
    def probe(cls) -> "Torch":
        available = torch.cuda.is_available()
        why, bf16, name = None, True, ""
        if available:
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            major, minor = torch.cuda.get_device_capability(0)
            name = f"{torch.cuda.get_device_name(0)}, compute capability {major}.{minor}"
        else:
            try:
                torch.cuda.init()
            except Exception as e:  # torch says why: no driver, driver too old, no device, CPU-only build
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return cls(available, torch.cuda.device_count() if available else 0, torch.version.cuda,
                   torch.__version__, why, bf16, name)


def check_device(precision: str | None, cpu: bool, machine: Machine | None = None,
                 torch_: Torch | None = None) -> bool:
    """Whether this process runs on the CPU; a UserError, one line with the fix, where the machine, the
    processes or the precision do not fit. `precision` is the one that will run (flag or launcher's)."""
    machine = machine or Machine()
    torch_ = torch_ or Torch.probe()
    on_cpu = cpu or machine.cpu_requested() or not torch_.cuda_available
    if not torch_.cuda_available and not (cpu or machine.cpu_requested()):
        evidence = machine.gpu_evidence()
        if evidence:
            raise UserError(no_cuda_message(evidence, torch_, machine.driver_version()))
    if not on_cpu and machine.local_processes() > torch_.gpu_count:
        raise UserError(f"{machine.local_processes()} processes were started on this node but it shows "
                        f"{torch_.gpu_count} GPU{'s' if torch_.gpu_count != 1 else ''}"
                        f"{visible_note(machine.env)}: start at most {torch_.gpu_count} per node "
                        f"(--num_processes / --nproc-per-node / GPUS_PER_NODE), or make more GPUs visible")
    if precision == "fp16" and on_cpu:
        raise UserError("--precision fp16 needs a GPU: on the CPU it would run in fp32; use --precision bf16 (the "
                        "CPU's autocast) or --precision no")
    if precision == "bf16" and not on_cpu and not torch_.bf16:
        raise UserError(f"--precision bf16 needs a GPU with native bf16 (Ampere or newer); this one is "
                        f"{torch_.gpu_name or 'older'}: use --precision fp16, or --precision no")
    return on_cpu


def visible_note(env: Mapping[str, str]) -> str:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    return f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""


def no_cuda_message(evidence: list[str], torch_: Torch, driver: str | None) -> str:
    build = f"built for CUDA {torch_.cuda_version}" if torch_.cuda_version else "a CPU-only build"
    seen = f"; torch says: {torch_.why_no_cuda}" if torch_.why_no_cuda else ""
    return (f"this machine has GPUs ({'; '.join(evidence)}) but torch {torch_.version} ({build}) cannot use them"
            f"{seen}; NVIDIA driver {driver or 'unknown (nvidia-smi did not tell)'}. Install a torch wheel built for "
            f"a CUDA this driver supports, start the container with --gpus all, or run on the CPU on purpose with "
            f"--cpu")
