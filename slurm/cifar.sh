#!/usr/bin/env bash
# Train with dtrain on a Slurm cluster: one DDP job over all nodes and GPUs of the allocation.
#
#   sbatch slurm/cifar.sh --arch resnet18 --epochs 100                    # 1 node
#   sbatch --nodes 4 --gpus-per-node 8 slurm/cifar.sh --arch googlenet    # 4 nodes x 8 GPUs
#   sbatch --array=0-4 slurm/cifar.sh --arch resnet18 --sweep seed=0,1,2,3,4   # 5 seeds, a task each
#
# Every argument after the script name goes to dtrain/main.py; a mistake in them ends the job at
# once with one line. Unless given, the run writes to --output-dir runs/<job name>-<job id> (an
# array task: runs/<job name>-<array job id>_<task>, its --sweep combination) and starts with
# --resume auto, so a requeued job continues where it stopped. Run sbatch from the repository root (or set DTRAIN_ROOT); the log
# goes to logs/<job name>-<job id>.out, an array task's to logs/<job name>-<array job id>_<task>.out, named
# as its run folder (logs/ ships with the checkout: Slurm does not create it). The --output pattern below
# is Slurm's %A_%a, which in a plain job reads <job id>_4294967294: slurm/_launch.sh renames that log to
# logs/<job name>-<job id>.out as the job starts.
#
# Defaults: edit them here, or override any of them on the sbatch command line.
#SBATCH --job-name=dtrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#
# GPUs: not requested here, because `--gpus-per-node` is rejected outright on a cluster without
# GPU GRES (and the CPU test cluster is one). Ask for them when submitting
# (`sbatch --gpus-per-node=8 ...`), or once in your shell (`export SBATCH_GPUS_PER_NODE=8`), or
# turn the next line into `#SBATCH --gpus-per-node=8` on a GPU cluster. One process is started
# per GPU Slurm gives each node (override with GPUS_PER_NODE=N); with none, one CPU process.
##SBATCH --gpus-per-node=8
#
# --cpus-per-task is for the whole node (one launcher task per node, all its processes share the
# CPUs): OMP_NUM_THREADS = CPUs per task / processes per node unless set.
#
# Preemption and time limit: 120 s before the end Slurm sends SIGUSR1 to this shell, which passes
# it to the training processes; they save last.pt at the next step boundary and exit, then the job
# requeues itself and resumes. `scancel --signal=TERM --batch JOBID` saves and stops, no requeue.

set -euo pipefail
DTRAIN_ROOT=${DTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
# shellcheck source-path=SCRIPTDIR source=_launch.sh
source "$DTRAIN_ROOT/slurm/_launch.sh"
set +e
dtrain_launch train dtrain/main.py "$@"
exit $?
