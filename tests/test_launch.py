"""launch/ (torchrun.sh, accelerate configs) and the shell scripts' hygiene; no Slurm needed."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*(REPO / "slurm").glob("*.sh"), *(REPO / "launch").rglob("*.sh"),
                  REPO / "tests" / "cluster" / "install.sh"])
CONFIGS = REPO / "launch" / "accelerate"
TINY = ["--arch", "cnn", "--dataset", "fake", "--fake-size", "64", "--batch-size", "16", "--epochs", "1",
        "--no-wandb"]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "GPUS_PER_NODE", "MASTER_", "CUDA_VISIBLE_DEVICES"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled", **extra)
    return env


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_shellcheck_passes_on_every_script():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("shellcheck is missing on CI: bash tests/cluster/install.sh installs it")
        pytest.skip("shellcheck not installed (bash tests/cluster/install.sh installs it)")
    assert len(SCRIPTS) >= 6, SCRIPTS
    r = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_scripts_are_executable_bash():
    for path in SCRIPTS:
        if path.name in ("_launch.sh", "_common.sh"):  # sourced, not run
            continue
        assert path.read_text().startswith("#!/usr/bin/env bash\n"), path
        assert os.access(path, os.X_OK), f"{path} is not executable"


def test_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    # multi_gpu: no process count in the file (-1, accelerate's "not given"), as no count fits every machine
    expected = {"single_gpu": (DistributedType.NO, 1, False, 1), "multi_gpu": (DistributedType.MULTI_GPU, -1, False, 1),
                "multi_node": (DistributedType.MULTI_GPU, 16, False, 2), "cpu": (DistributedType.MULTI_GPU, 2, True, 1)}
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(expected)
    for name, (kind, procs, cpu, machines) in expected.items():
        cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # rejects unknown keys and bad values
        assert (cfg.distributed_type, cfg.num_processes, cfg.use_cpu, cfg.num_machines) == (kind, procs, cpu, machines)
    node = load_config_from_file(str(CONFIGS / "multi_node.yaml"))
    assert node.main_process_ip and node.main_process_port and node.machine_rank == 0


def accelerate_launch_settings(*argv: str):
    """The settings `accelerate launch ARGV... dtrain/main.py` would start the processes with (accelerate's own
    argument checks, no process started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*argv, "dtrain/main.py"]))
    return args


def test_accelerate_counts_the_visible_gpus_without_a_config_and_asks_for_the_count_with_multi_gpu_yaml(
        monkeypatch, tmp_path):
    """What README.md and docs/launching.md tell the user to type, checked against the installed accelerate:
    with no config file it starts one process per GPU torch counts (torch honours CUDA_VISIBLE_DEVICES);
    multi_gpu.yaml makes it ask for --num_processes rather than run a count that fits another machine."""
    import accelerate.commands.launch as launch

    monkeypatch.setattr(launch, "default_config_file", str(tmp_path / "no_default_config.yaml"))
    monkeypatch.setattr(launch, "get_torch_accelerator_backend",
                        lambda: ("cuda", types.SimpleNamespace(device_count=lambda: 3)))
    args = accelerate_launch_settings()
    assert (args.num_processes, args.multi_gpu) == (3, True)
    with pytest.raises(ValueError, match="manually pass in `--num_processes`"):
        accelerate_launch_settings("--config_file", str(CONFIGS / "multi_gpu.yaml"))
    args = accelerate_launch_settings("--config_file", str(CONFIGS / "multi_gpu.yaml"), "--num_processes", "4")
    assert (args.num_processes, args.multi_gpu, args.gpu_ids) == (4, True, "all")


def run_training(cmd: list[str], out: Path, env: dict, timeout: float = 240) -> str:
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text
    assert (out / "last.pt").is_file() and (out / "metrics.jsonl").is_file(), text
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1, rows  # one writer
    return text


@pytest.mark.process
def test_torchrun_sh_one_process_per_gpu_nvidia_smi_reports(tmp_path):
    """launch/torchrun.sh asks nvidia-smi for the GPU count; on this CPU machine a stub reports 2,
    so torchrun starts 2 (CPU, gloo) processes: one DDP run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "nvidia-smi", "#!/bin/sh\necho 'GPU 0: Stub (UUID: GPU-0)'\necho 'GPU 1: Stub (UUID: GPU-1)'\n")
    out = tmp_path / "run"
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # no CUDA_VISIBLE_DEVICES: nvidia-smi counts
    text = run_training(["bash", "launch/torchrun.sh", *TINY, "--cpu", "--output-dir", str(out)], out, env)
    assert "world size 2" in text, text


def no_gpu_path(tmp_path) -> str:
    """PATH with an nvidia-smi that finds no GPU (as on a machine without the driver loaded)."""
    bin_dir = tmp_path / "nogpu"
    bin_dir.mkdir(exist_ok=True)
    executable(bin_dir / "nvidia-smi", "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    return f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"


def eight_gpu_path(tmp_path) -> str:
    """PATH with an nvidia-smi that lists 8 GPUs, whatever CUDA_VISIBLE_DEVICES says (as the real one does)."""
    bin_dir = tmp_path / "eightgpu"
    bin_dir.mkdir(exist_ok=True)
    executable(bin_dir / "nvidia-smi", '#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo "GPU $i: Stub (UUID: GPU-$i)"; done\n')
    return f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"


def fake_python(tmp_path) -> Path:
    """A stand-in python that prints the launcher command line it was given and the environment it matters in."""
    return executable(tmp_path / "python", '#!/bin/sh\necho "OMP=$OMP_NUM_THREADS '
                      'NCCL_ERRORS=${TORCH_NCCL_ASYNC_ERROR_HANDLING-unset} ARGS=$*"\n')


# launch/torchrun.sh, driven with the stand-in python.
def torchrun_sh(tmp_path, **env) -> subprocess.CompletedProcess:
    base = {"PATH": no_gpu_path(tmp_path), "DTRAIN_PYTHON": str(fake_python(tmp_path))}
    return subprocess.run(["bash", "launch/torchrun.sh", "--arch", "cnn"], cwd=REPO, env={**base, **env},
                          capture_output=True, text=True, timeout=30)


@pytest.mark.process
def test_torchrun_sh_without_gpus_is_one_cpu_process(tmp_path):
    r = torchrun_sh(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--standalone" in r.stdout and "--nproc-per-node=1 " in r.stdout, r.stdout
    assert r.stdout.rstrip().endswith("dtrain/main.py --arch cnn"), r.stdout
    assert "no GPU found (nvidia-smi): 1 CPU process" in r.stderr
    assert f"OMP={len(os.sched_getaffinity(0))} " in r.stdout, r.stdout     # all CPUs to the one process


@pytest.mark.process
def test_accelerate_cpu_config_runs_two_processes(tmp_path):
    out = tmp_path / "run"
    text = run_training(["accelerate", "launch", "--config_file", str(CONFIGS / "cpu.yaml"), "dtrain/main.py", *TINY,
                         "--output-dir", str(out)], out, clean_env(CUDA_VISIBLE_DEVICES=""))
    assert "world size 2" in text, text


# slurm/_node.sh, the per-node launcher, driven with the stand-in python.
def node_sh(tmp_path, **env) -> subprocess.CompletedProcess:
    base = {"PATH": no_gpu_path(tmp_path), "DTRAIN_PYTHON": str(fake_python(tmp_path)), "SLURM_JOB_ID": "4242",
            "MASTER_ADDR": "gpu01", "MASTER_PORT": "24242", "DTRAIN_FIRST_HOST": "gpu01"}
    return subprocess.run(["bash", "slurm/_node.sh", "dtrain/main.py", "--arch", "cnn"], cwd=REPO,
                          env={**base, **env}, capture_output=True, text=True, timeout=30)


@pytest.mark.process
def test_node_sh_one_process_per_slurm_gpu_with_rendezvous(tmp_path):
    r = node_sh(tmp_path, SLURM_JOB_NUM_NODES="4", SLURMD_NODENAME="gpu01", SLURM_GPUS_ON_NODE="4",
                SLURM_CPUS_PER_TASK="32")
    assert r.returncode == 0, r.stdout + r.stderr
    args = r.stdout.split("ARGS=")[1].split()
    assert "OMP=8 " in r.stdout                          # 32 CPUs / 4 processes
    for a in ("--nnodes=4", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu01:24242",
              "--rdzv-id=4242", "--rdzv-conf=is_host=1", "--max-restarts=3"):
        assert a in args, args
    assert args[-3:] == ["dtrain/main.py", "--arch", "cnn"]
    other = node_sh(tmp_path, SLURM_JOB_NUM_NODES="4", SLURMD_NODENAME="gpu02", SLURM_GPUS_ON_NODE="4")
    assert "--rdzv-conf=is_host=0" in other.stdout


@pytest.mark.process
def test_node_sh_single_node_cpu_and_overrides(tmp_path):
    r = node_sh(tmp_path, SLURM_JOB_NUM_NODES="1", SLURM_CPUS_PER_TASK="8")
    assert r.returncode == 0, r.stderr
    assert "--standalone" in r.stdout and "--nproc-per-node=1 " in r.stdout and "OMP=8 " in r.stdout
    assert "no GPU visible" in r.stdout
    r = node_sh(tmp_path, SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="3", OMP_NUM_THREADS="5")
    assert "--nproc-per-node=3 " in r.stdout and "OMP=5 " in r.stdout
    r = node_sh(tmp_path, SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="zero")
    assert r.returncode == 2 and "GPUS_PER_NODE" in r.stderr


UUIDS = "GPU-6b1ad4a0-32f5-4e8b-9b1c-1f2e3d4c5b6a,GPU-0c9d8e7f-6a5b-4c3d-2e1f-0a9b8c7d6e5f"
MIG = "MIG-8d6a4c2e-1b3f-5a7c-9e0d-2f4b6d8a0c1e"


@pytest.mark.process
@pytest.mark.parametrize("launcher", [torchrun_sh, node_sh], ids=["torchrun.sh", "_node.sh"])
@pytest.mark.parametrize("env, processes, source", [
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, 2, "CUDA_VISIBLE_DEVICES='0,1'"),
    ({"CUDA_VISIBLE_DEVICES": UUIDS}, 2, f"CUDA_VISIBLE_DEVICES='{UUIDS}'"),
    ({"CUDA_VISIBLE_DEVICES": MIG}, 1, f"CUDA_VISIBLE_DEVICES='{MIG}'"),
    ({"CUDA_VISIBLE_DEVICES": "3,1,-1,0"}, 2, "CUDA_VISIBLE_DEVICES='3,1,-1,0'"),  # the list ends at -1
    ({"CUDA_VISIBLE_DEVICES": ""}, 0, "CUDA_VISIBLE_DEVICES=''"),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, 0, "CUDA_VISIBLE_DEVICES='-1'"),
    ({"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_GPUS_ON_NODE": "8"}, 2, "CUDA_VISIBLE_DEVICES='0,1'"),
    ({"SLURM_STEP_GPUS": "0,1,2"}, 3, "SLURM_STEP_GPUS=0,1,2"),
    ({"GPUS_PER_NODE": "5", "CUDA_VISIBLE_DEVICES": "0,1"}, 5, "GPUS_PER_NODE=5"),
], ids=["indices", "gpu-uuids", "mig-uuid", "ends-at-invalid", "empty", "minus-one", "before-slurm", "slurm-step-gpus",
        "gpus-per-node-wins"])
def test_one_process_per_gpu_the_job_may_use_on_an_8_gpu_machine(tmp_path, launcher, env, processes, source):
    """nvidia-smi lists all 8 GPUs of the machine, but the job may use only those CUDA_VISIBLE_DEVICES (or Slurm)
    names: a process more than the GPUs the processes see puts two ranks on one GPU ("Duplicate GPU detected").
    processes 0: no GPU, one CPU process."""
    r = launcher(tmp_path, PATH=eight_gpu_path(tmp_path), SLURM_JOB_NUM_NODES="1", **env)
    said = r.stdout + r.stderr
    assert r.returncode == 0, said
    assert f"--nproc-per-node={max(processes, 1)} " in r.stdout, said
    if launcher is node_sh:  # its log line names where every count came from
        assert f"({source})" in said, said
    else:                    # launch/torchrun.sh speaks only when it found no GPU
        assert (f"no GPU found ({source}): 1 CPU process" in said) == (processes == 0), said


def slurm_bin(tmp_path) -> Path:
    """A stand-in srun (runs its command here, once) and scontrol (the allocation is host gpu01)."""
    bin_dir = tmp_path / "slurmbin"
    bin_dir.mkdir(exist_ok=True)
    executable(bin_dir / "srun", '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    executable(bin_dir / "scontrol", "#!/bin/sh\necho gpu01\n")
    return bin_dir


@pytest.mark.process
@pytest.mark.parametrize("user_value", [None, "3"])
def test_slurm_leaves_nccl_error_handling_to_torch_and_passes_the_users_setting_through(tmp_path, user_value):
    """slurm/_launch.sh -> srun -> slurm/_node.sh -> the launcher: dtrain sets no TORCH_NCCL_ASYNC_ERROR_HANDLING
    (torchrun then gives its workers its own default); a value the user exports arrives unchanged."""
    env = {"PATH": f"{slurm_bin(tmp_path)}{os.pathsep}{no_gpu_path(tmp_path)}", "DTRAIN_PYTHON": str(fake_python(tmp_path)),
           "DTRAIN_ROOT": str(REPO), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu01", "SLURM_JOB_NUM_NODES": "1"}
    if user_value is not None:
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = user_value
    r = subprocess.run(["bash", "-c", "source slurm/_launch.sh; dtrain_launch predict dtrain/predict.py --image x.png"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ARGS=-m torch.distributed.run " in r.stdout, r.stdout   # the launcher did run, under _node.sh
    assert f"NCCL_ERRORS={user_value or 'unset'} " in r.stdout, r.stdout


def launch_sh(script: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source slurm/_launch.sh; {script}"], cwd=REPO,
                          env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=30)


@pytest.mark.process
def test_launch_sh_requeue_id_and_flags():
    assert launch_sh("dtrain_job_key", SLURM_JOB_ID="77").stdout == "77\n"
    # An array task is requeued as ARRAYJOB_TASK, not by its own job id.
    r = launch_sh("dtrain_job_key", SLURM_JOB_ID="81", SLURM_ARRAY_JOB_ID="80", SLURM_ARRAY_TASK_ID="1")
    assert r.stdout == "80_1\n"
    r = launch_sh("_dtrain_has_flag --output-dir --arch x --output-dir=runs/a && echo yes; "
                  "_dtrain_has_flag --resume --arch x --resume-from y || echo no")
    assert r.stdout.split() == ["yes", "no"]


@pytest.mark.process
def test_slurm_scripts_outside_slurm_say_how_to_submit():
    env = clean_env()
    r = subprocess.run(["bash", "slurm/cifar.sh", "--arch", "cnn"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "sbatch" in r.stderr, r.stderr
