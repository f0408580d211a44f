#!/usr/bin/env bash
# Train on this one machine with all its GPUs, one process per GPU, through torchrun:
#
#   bash launch/torchrun.sh --arch resnet18 --epochs 100
#
# Every argument goes to dtrain/main.py. Processes: GPUS_PER_NODE if set, else one per GPU this job
# may use (CUDA_VISIBLE_DEVICES when set, else Slurm's GPUs, else nvidia-smi's list), else 1 (CPU).
# OMP_NUM_THREADS defaults to this machine's CPUs / processes. A lost worker (killed, crashed)
# restarts the worker group, up to 3 times, and the restarted group continues from the run's
# last.pt. Extra torchrun options go in TORCHRUN_ARGS (e.g. TORCHRUN_ARGS="--master-port 29600" or
# "--max-restarts 0"); see launch/_common.sh.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$root/launch/_common.sh"

dtrain_processes launch/torchrun.sh || exit 2
if [[ $DTRAIN_ON_CPU == 1 ]]; then
    echo "launch/torchrun.sh: no GPU found ($DTRAIN_NPROC_SOURCE): 1 CPU process" >&2
fi
dtrain_threads
dtrain_torchrun 1 --standalone
# torchrun runs as a child, so that its end can be reported. Ctrl-C in a terminal reaches torchrun
# itself (the whole process group gets it); a SIGTERM sent to this script alone (timeout, docker
# stop, kill) is passed on to torchrun, which passes it to the training processes.
"${DTRAIN_LAUNCHER[@]}" "$root/dtrain/main.py" "$@" &
launcher_pid=$!
trap 'DTRAIN_TRAPPED=1' INT
trap 'DTRAIN_TRAPPED=1; kill -TERM "$launcher_pid" 2>/dev/null' TERM
dtrain_wait "$launcher_pid"
dtrain_launcher_ended "$DTRAIN_RC"
exit "$DTRAIN_RC"
