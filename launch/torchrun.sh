#!/usr/bin/env bash
# Train on this one machine with all its GPUs, one process per GPU, through torchrun:
#
#   bash launch/torchrun.sh --arch resnet18 --epochs 100
#
# Every argument goes to dtrain/main.py. Processes: GPUS_PER_NODE if set, else nvidia-smi's GPU
# count, else 1 (CPU). OMP_NUM_THREADS defaults to this machine's CPUs / processes. Extra
# torchrun options go in TORCHRUN_ARGS (e.g. TORCHRUN_ARGS="--master-port 29600").
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ -n ${GPUS_PER_NODE:-} ]]; then
    if ! [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]]; then
        echo "launch/torchrun.sh: GPUS_PER_NODE='$GPUS_PER_NODE' is not a positive number of processes" >&2
        exit 2
    fi
    nproc=$GPUS_PER_NODE
else
    nproc=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [[ ${nproc:-0} -eq 0 ]]; then
        echo "launch/torchrun.sh: no GPU found (nvidia-smi): 1 CPU process" >&2
        nproc=1
    fi
fi

if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    cpus=$(nproc 2>/dev/null || echo 1)
    threads=$((cpus / nproc))
    export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi

python=${DTRAIN_PYTHON:-}
if [[ -z $python ]]; then
    if command -v python >/dev/null 2>&1; then python=python; else python=python3; fi
fi

# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options, split on purpose
exec "$python" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$nproc" \
    ${TORCHRUN_ARGS:-} "$root/dtrain/main.py" "$@"
