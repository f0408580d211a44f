# shellcheck shell=bash
# Launcher logic shared by slurm/cifar.sh and slurm/predict.sh. Sourced in the batch shell; not a
# job script itself.
#
#   dtrain_launch train   dtrain/main.py    ARGS...   # training: default --resume auto,
#                                                     # USR1 -> save + requeue, TERM -> save
#   dtrain_launch predict dtrain/predict.py ARGS...   # inference
#
# One `srun` starts slurm/_node.sh once per node; it runs torchrun there (c10d rendezvous on the
# first host of the allocation), restarting a lost worker group (see launch/_common.sh), and relays
# signals to the worker processes.
#
# Environment a user may set (before sbatch; sbatch exports the submitting environment):
#   DTRAIN_ROOT       repository root (default: the directory sbatch was run from; the batch
#                     script works it out before sourcing this file)
#   GPUS_PER_NODE     processes per node (default: one per GPU the step may use, from
#                     CUDA_VISIBLE_DEVICES, else Slurm's counts, else nvidia-smi; else 1 CPU process)
#   MASTER_ADDR       rendezvous host (default: first host of the allocation)
#   MASTER_PORT       rendezvous port (default: 20000 + job id % 10000)
#   OMP_NUM_THREADS   threads per process (default: CPUs per task / processes per node)
#   DTRAIN_PYTHON     Python interpreter (default: python, else python3)
#   TORCHRUN_ARGS     extra torchrun options (e.g. "--max-restarts 0": no restart of a lost worker)
#   NCCL_* / TORCH_NCCL_*  passed through (NCCL_DEBUG defaults to WARN); on several nodes set
#                     GLOO_SOCKET_IFNAME beside NCCL_SOCKET_IFNAME: dtrain's side channel is gloo

# shellcheck source-path=SCRIPTDIR source=../launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/_common.sh"

_dtrain_log() {
    printf '[dtrain %s] %s\n' "$(date +%H:%M:%S)" "$*"
}

# _dtrain_has_flag FLAG ARGS...: true if ARGS hold FLAG or FLAG=VALUE.
_dtrain_has_flag() {
    local flag=$1 arg
    shift
    for arg in "$@"; do
        if [[ $arg == "$flag" || $arg == "$flag="* ]]; then
            return 0
        fi
    done
    return 1
}

# The id that `scontrol requeue` needs: array tasks are ARRAYJOB_TASK, not $SLURM_JOB_ID.
dtrain_job_key() {
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
        printf '%s_%s\n' "$SLURM_ARRAY_JOB_ID" "$SLURM_ARRAY_TASK_ID"
    else
        printf '%s\n' "$SLURM_JOB_ID"
    fi
}

# Slurm fills the log pattern's %a with NO_VAL (4294967294) in a job that is not an array task, so
# slurm/cifar.sh's logs/%x-%A_%a.out names a plain job's log logs/<name>-<job id>_4294967294.out.
DTRAIN_NOT_AN_ARRAY_TASK=4294967294

# dtrain_name_log: in a plain job, rename a log named <...>_4294967294<...> (the batch shell's stdout or
# stderr) to the name without _4294967294, logs/<name>-<job id>.out: Slurm keeps writing to the file
# under its new name (its own lines too, such as a cancel). A requeued job, which Slurm gives a fresh
# <...>_4294967294 file, finds the first run's log under the name: the first run's lines and this run's
# are copied into the file Slurm writes to, which then takes the name (so a requeued plain job's log is
# appended to, as with the script's --open-mode=append, whatever the mode). An array task's log has its
# real task number there and is left alone; a rename that fails is said in the log and the job goes on.
dtrain_name_log() {
    local fd path name clean
    for fd in 1 2; do
        path=$(readlink "/proc/$$/fd/$fd" 2>/dev/null) || continue
        name=${path##*/}
        if [[ $name != *_"$DTRAIN_NOT_AN_ARRAY_TASK"* || ! -f $path ]]; then
            continue
        fi
        clean=${path%/*}/${name//_"$DTRAIN_NOT_AN_ARRAY_TASK"/}
        if [[ -f $clean ]]; then
            cat "$path" >>"$clean" && cat "$clean" >"$path"
        fi
        if ! mv -f "$path" "$clean"; then
            _dtrain_log "could not rename the log $path to $clean; it stays under its Slurm name"
        fi
    done
}

# Called by the traps: remember the signal and pass it on to the tasks (slurm/_node.sh on every
# node) through srun, which forwards most signals it receives to its tasks. Not SIGTERM: srun
# answers that by killing the step. So SIGTERM goes on as SIGUSR2, which slurm/_node.sh turns
# back into SIGTERM for the training processes.
_dtrain_on_signal() {
    local sig=$1 fwd=$1
    DTRAIN_TRAPPED=1
    _DTRAIN_SIGNALS="$_DTRAIN_SIGNALS $sig"
    _dtrain_log "batch shell got SIG$sig: telling the training processes to save and stop"
    if [[ $sig == TERM ]]; then
        fwd=USR2
    fi
    if [[ -n ${_DTRAIN_SRUN_PID:-} ]]; then
        kill -s "$fwd" "$_DTRAIN_SRUN_PID" 2>/dev/null || true
    fi
}

dtrain_launch() {
    local mode=$1 entry=$2
    shift 2
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        echo "dtrain: this is a Slurm batch script: submit it with sbatch (e.g. sbatch slurm/cifar.sh --arch resnet18)," >&2
        echo "dtrain: or use bash launch/torchrun.sh ... on a single machine." >&2
        return 2
    fi
    local root=$DTRAIN_ROOT     # the batch script sets it (to find this file)
    if [[ ! -f $root/$entry ]]; then
        echo "dtrain: $root/$entry not found: run sbatch from the dtrain repository root or set DTRAIN_ROOT=/path/to/dtrain." >&2
        return 2
    fi
    cd "$root" || return 2
    export DTRAIN_ROOT=$root
    dtrain_name_log

    local job_key
    job_key=$(dtrain_job_key)
    local args=("$@")
    # Training writes to runs/<job name>-<job id> unless given --output-dir (dtrain/main.py's
    # default under Slurm, stable across requeues), where --resume auto finds last.pt.
    if [[ $mode == train ]]; then
        if ! _dtrain_has_flag --resume "${args[@]}"; then
            args+=(--resume auto)
        fi
        # The settings are read once here, before any process starts: a mistake (a bad flag, an
        # array task past the end of the --sweep grid) ends the job with its one line, where
        # torchrun would restart the training processes on it.
        if ! "$(dtrain_python)" -m dtrain.settings "${args[@]}"; then
            return 2
        fi
    fi

    local nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    DTRAIN_FIRST_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export DTRAIN_FIRST_HOST
    export MASTER_ADDR=${MASTER_ADDR:-$DTRAIN_FIRST_HOST}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
    export DTRAIN_RDZV_ID=$job_key
    # Defaults only where the user has not set them. NCCL's error handling is left to torch
    # (TORCH_NCCL_ASYNC_ERROR_HANDLING, if the user sets it, passes through).
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}

    local srun_args=(--nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
    # srun does not inherit --cpus-per-task from the batch job in every Slurm version.
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    fi

    _dtrain_log "job $job_key (restart ${SLURM_RESTART_COUNT:-0}) on $nnodes node(s): $SLURM_JOB_NODELIST;" \
        "rendezvous $MASTER_ADDR:$MASTER_PORT"
    _dtrain_log "command: $entry ${args[*]}"

    _DTRAIN_SIGNALS=""
    _DTRAIN_SRUN_PID=""
    if [[ $mode == train ]]; then   # dtrain/main.py saves and stops on USR1/TERM; predict just ends
        trap '_dtrain_on_signal USR1' USR1
        trap '_dtrain_on_signal TERM' TERM
    fi
    # In the background: bash runs a trap only between commands, so it must be in `wait`.
    srun "${srun_args[@]}" bash "$root/slurm/_node.sh" "$entry" "${args[@]}" &
    _DTRAIN_SRUN_PID=$!
    dtrain_wait "$_DTRAIN_SRUN_PID"
    local rc=$DTRAIN_RC
    trap - USR1 TERM

    if [[ $mode == train && $_DTRAIN_SIGNALS == *USR1* && $_DTRAIN_SIGNALS != *TERM* ]]; then
        if [[ $rc -ne 0 ]]; then
            _dtrain_log "training exited with status $rc after SIGUSR1: not requeueing (see the errors above)"
            return "$rc"
        fi
        # The checkpoint is complete (the training processes exited 0 after saving). Requeue
        # kills this job at once, so it must come last.
        _dtrain_log "checkpoint saved; requeueing job $job_key (it resumes with --resume auto)"
        if ! scontrol requeue "$job_key"; then
            _dtrain_log "scontrol requeue $job_key failed: resubmit by hand with the same --output-dir to resume"
            return 1
        fi
        return 0
    fi
    if [[ -n $_DTRAIN_SIGNALS ]]; then
        _dtrain_log "stopped by signal(s):$_DTRAIN_SIGNALS (exit status $rc); not requeued"
    fi
    return "$rc"
}
