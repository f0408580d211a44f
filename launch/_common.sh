# shellcheck shell=bash disable=SC2034  # DTRAIN_* variables are set for the scripts that source this
# What launch/torchrun.sh and slurm/_node.sh share (sourced, not run): how many processes this
# machine runs, their threads, the Python interpreter and the torchrun command line.
#
# Environment a user may set:
#   GPUS_PER_NODE     processes on this machine (default: one per GPU this job may use, see
#                     dtrain_gpu_count; with none, 1 CPU process)
#   OMP_NUM_THREADS   threads per process (default: Slurm's CPUs per task, else this machine's
#                     CPUs, divided by the processes)
#   DTRAIN_PYTHON     Python interpreter (default: python, else python3)
#   TORCHRUN_ARGS     extra torchrun options, after the defaults, so they win
#                     (e.g. TORCHRUN_ARGS="--max-restarts 0" to stop at the first lost worker)

# Worker group restarts after a lost worker (torchrun --max-restarts); the restarted group
# continues from last.pt.
DTRAIN_MAX_RESTARTS=3

# _dtrain_listed_gpus LIST: prints how many GPUs a CUDA_VISIBLE_DEVICES value names, as the CUDA
# driver reads it: comma-separated entries, each an index, GPU-<uuid> or MIG-<uuid>; the list ends
# at the first entry that is none of these (e.g. -1), and an empty LIST names no GPU.
_dtrain_listed_gpus() {
    local entry n=0
    local -a entries
    IFS=, read -ra entries <<<"$1"
    for entry in "${entries[@]}"; do
        [[ $entry =~ ^([0-9]+|(GPU|MIG)-.+)$ ]] || break
        n=$((n + 1))
    done
    echo "$n"
}

# dtrain_gpu_count: sets DTRAIN_GPUS, the GPUs this job may use, and DTRAIN_GPU_SOURCE, where that
# count came from, for messages. The first of: CUDA_VISIBLE_DEVICES when set (empty: none), Slurm's
# SLURM_GPUS_ON_NODE, Slurm's SLURM_STEP_GPUS (a list of indices), nvidia-smi's list, else 0.
dtrain_gpu_count() {
    if [[ -v CUDA_VISIBLE_DEVICES ]]; then
        DTRAIN_GPUS=$(_dtrain_listed_gpus "$CUDA_VISIBLE_DEVICES")
        DTRAIN_GPU_SOURCE="CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES'"
    elif [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then
        DTRAIN_GPUS=$SLURM_GPUS_ON_NODE
        DTRAIN_GPU_SOURCE="SLURM_GPUS_ON_NODE=$SLURM_GPUS_ON_NODE"
    elif [[ -n ${SLURM_STEP_GPUS:-} ]]; then
        DTRAIN_GPUS=$(_dtrain_listed_gpus "$SLURM_STEP_GPUS")
        DTRAIN_GPU_SOURCE="SLURM_STEP_GPUS=$SLURM_STEP_GPUS"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        DTRAIN_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        DTRAIN_GPU_SOURCE=nvidia-smi
    else
        DTRAIN_GPUS=0
        DTRAIN_GPU_SOURCE="no nvidia-smi"
    fi
}

# dtrain_processes NAME: sets DTRAIN_NPROC (processes on this machine: GPUS_PER_NODE, else one per
# GPU of dtrain_gpu_count), DTRAIN_NPROC_SOURCE (where that number came from, for messages) and
# DTRAIN_ON_CPU (1 when no GPU was found: one CPU process, for the caller to say so). A bad
# GPUS_PER_NODE: one line on stderr, prefixed with NAME, and status 2.
dtrain_processes() {
    DTRAIN_ON_CPU=0
    if [[ -n ${GPUS_PER_NODE:-} ]]; then
        if ! [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]]; then
            echo "$1: GPUS_PER_NODE='$GPUS_PER_NODE' is not a positive number of processes per node" >&2
            return 2
        fi
        DTRAIN_NPROC=$GPUS_PER_NODE
        DTRAIN_NPROC_SOURCE="GPUS_PER_NODE=$GPUS_PER_NODE"
        return 0
    fi
    dtrain_gpu_count
    DTRAIN_NPROC=$DTRAIN_GPUS
    DTRAIN_NPROC_SOURCE=$DTRAIN_GPU_SOURCE
    if [[ $DTRAIN_NPROC -eq 0 ]]; then
        DTRAIN_NPROC=1
        DTRAIN_ON_CPU=1
    fi
}

# Exports OMP_NUM_THREADS, unless set: the CPUs of this task shared by DTRAIN_NPROC processes.
dtrain_threads() {
    local cpus threads
    if [[ -z ${OMP_NUM_THREADS:-} ]]; then
        cpus=${SLURM_CPUS_PER_TASK:-$(nproc 2>/dev/null || echo 1)}
        threads=$((cpus / DTRAIN_NPROC))
        export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
    fi
}

# dtrain_wait PID: wait until process PID has ended and set DTRAIN_RC to its exit status. A signal
# whose trap runs interrupts `wait`; the trap handler sets DTRAIN_TRAPPED=1 and the wait starts
# again (bash keeps the status of a child reaped meanwhile).
dtrain_wait() {
    local pid=$1
    while :; do
        DTRAIN_TRAPPED=0
        DTRAIN_RC=0
        wait "$pid" || DTRAIN_RC=$?
        [[ $DTRAIN_TRAPPED == 1 ]] || break
    done
}

# dtrain_launcher_ended RC: when torchrun ended with a failure (not a signal), the line that says what
# happened and what to do: torchrun's own report ends with a traceback. It ends that way once the
# worker group has failed more often than it may restart (or an attempt failed with an error dtrain
# knows a restart cannot fix, which ends the restarts at once).
dtrain_launcher_ended() {
    local rc=$1
    if [[ $rc -ne 0 && $rc -lt 128 ]]; then
        echo "dtrain: the job failed and torchrun's restarts are used up (torchrun exit $rc): the cause is" \
            "above (the workers' 'error:' lines, or the first failure in torchrun's report); once it is" \
            "fixed, run the same command again (training continues from its last save with --resume auto" \
            "--output-dir <the folder its start printed as 'output: ...'>)" >&2
    fi
}

# The Python interpreter: DTRAIN_PYTHON, else python, else python3.
dtrain_python() {
    if [[ -n ${DTRAIN_PYTHON:-} ]]; then
        echo "$DTRAIN_PYTHON"
    elif command -v python >/dev/null 2>&1; then
        echo python
    else
        echo python3
    fi
}

# dtrain_torchrun NNODES RENDEZVOUS_OPTIONS...: sets the array DTRAIN_LAUNCHER, torchrun with
# DTRAIN_NPROC processes on this node, restarts on a lost worker, then TORCHRUN_ARGS.
dtrain_torchrun() {
    local nnodes=$1 python
    shift
    python=$(dtrain_python)
    # torchrun's agent hosts one TCP store for all the restarts of a worker group, and the workers'
    # process group keys in it (gloo's peer addresses, NCCL's unique id) carry no restart number:
    # a restarted worker can read its peer's address from before the restart and fail ("Gloo
    # connectFullMesh failed") or hang connecting to it (pytorch/pytorch#135712). Without the
    # shared store every restart bootstraps from a fresh one.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
    local extra=()
    # shellcheck disable=SC2206  # TORCHRUN_ARGS is a list of options, split on purpose
    extra=(${TORCHRUN_ARGS:-})
    DTRAIN_LAUNCHER=("$python" -m torch.distributed.run --nnodes="$nnodes" --nproc-per-node="$DTRAIN_NPROC"
        --max-restarts="$DTRAIN_MAX_RESTARTS" "$@" "${extra[@]}")
}
