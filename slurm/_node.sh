#!/usr/bin/env bash
# shellcheck disable=SC2317  # the signal handlers are called from traps
# Per-node launcher, started once per node by slurm/_launch.sh through srun (not for direct use):
#   bash slurm/_node.sh ENTRY ARGS...
# Runs torchrun with GPUS_PER_NODE processes on this node (c10d rendezvous across the nodes of
# the job; a lost worker restarts the worker group, see launch/_common.sh) and relays SIGUSR1 and SIGTERM (SIGUSR2 stands for a SIGTERM the batch shell got) to
# the worker processes: torchrun's agent does not forward SIGUSR1 (it would die of it), so it is
# started with SIGUSR1/SIGUSR2 ignored and this script signals its children, the training
# processes, directly. They set a flag, save at the next step boundary and exit 0, so torchrun
# and this script exit 0 too.
set -uo pipefail

if [[ $# -lt 1 || -z ${SLURM_JOB_ID:-} ]]; then
    echo "usage (inside a Slurm job step): bash slurm/_node.sh ENTRY ARGS..." >&2
    exit 2
fi
entry=$1
shift

log() {
    printf '[dtrain %s %s] %s\n' "$(date +%H:%M:%S)" "${SLURMD_NODENAME:-$(hostname)}" "$*"
}

# shellcheck source-path=SCRIPTDIR source=../launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/_common.sh"
dtrain_processes dtrain || exit 2
if [[ $DTRAIN_ON_CPU == 1 ]]; then
    log "no GPU visible on this node ($DTRAIN_NPROC_SOURCE): 1 CPU process (gloo). To use GPUs, submit with --gpus-per-node=N."
fi
dtrain_threads

nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
rendezvous=(--standalone)
if [[ $nnodes -gt 1 ]]; then
    # The node named first in the allocation hosts the rendezvous store; saying so explicitly
    # avoids torch's guess from hostnames and addresses.
    rendezvous=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
        --rdzv-id="${DTRAIN_RDZV_ID:-$SLURM_JOB_ID}")
    if [[ ${SLURMD_NODENAME:-} == "$MASTER_ADDR" ]]; then
        rendezvous+=(--rdzv-conf=is_host=1)
    elif [[ ${DTRAIN_FIRST_HOST:-} == "$MASTER_ADDR" ]]; then
        rendezvous+=(--rdzv-conf=is_host=0)
    fi
fi
dtrain_torchrun "$nnodes" "${rendezvous[@]}"
launcher=("${DTRAIN_LAUNCHER[@]}")

log "$DTRAIN_NPROC process(es) on this node ($DTRAIN_NPROC_SOURCE), OMP_NUM_THREADS=$OMP_NUM_THREADS: ${launcher[*]} $entry ..."

# The launcher and (by inheritance) its workers start with SIGUSR1/SIGUSR2 ignored: a signal
# Slurm delivers to the whole step (it signals every process of a task) must not kill torchrun,
# nor a worker that has not installed its handler yet. The relay below signals each worker once
# its handler is in place.
trap '' USR1 USR2
"${launcher[@]}" "$entry" "$@" &
launcher_pid=$!

stop_signal=""
repeater_pid=""
declare -A delivered=()

# The launcher's children: the training processes.
workers() {
    if command -v pgrep >/dev/null 2>&1; then
        pgrep -P "$launcher_pid" 2>/dev/null || true
        return
    fi
    local stat line rest
    for stat in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$stat" || continue
        rest=${line##*) }          # after "PID (COMM) ": STATE PPID ...
        read -r _ ppid _ <<<"$rest"
        if [[ $ppid == "$launcher_pid" ]]; then
            echo "${line%% *}"
        fi
    done
}

# True if process $1 has a handler installed for signal number $2 (SigCgt in /proc/PID/status).
catches() {
    local mask
    mask=$(awk '/^SigCgt:/ { print $2 }' "/proc/$1/status" 2>/dev/null)
    [[ -n $mask ]] && (((16#$mask >> ($2 - 1)) & 1))
}

# Send signal $1 to each training process once, and only once it has its handler: before that
# (still importing torch) SIGTERM would kill it, and after training has ended the handler is gone.
# Returns 1 while some worker is still waiting for it (or none has started yet).
relay() {
    local sig=$1 num pid pids pending=0
    num=$(kill -l "$sig")
    pids=$(workers)
    if [[ -z $pids ]]; then
        return 1                    # not started yet (rendezvous)
    fi
    for pid in $pids; do
        [[ -z ${delivered[$pid]:-} ]] || continue
        if catches "$pid" "$num"; then
            kill -s "$sig" "$pid" 2>/dev/null || true
            delivered[$pid]=1
        else
            pending=1
        fi
    done
    return "$pending"
}

on_signal() {
    DTRAIN_TRAPPED=1
    if [[ -z $stop_signal ]]; then
        log "got SIG$1: relaying it to the training processes"
    fi
    stop_signal=$1
    if relay "$1"; then
        return
    fi
    # Some worker has no handler yet: try again every 0.5 s while the launcher runs.
    if [[ -n $repeater_pid ]]; then
        kill "$repeater_pid" 2>/dev/null || true
    fi
    (
        # Stopped with SIGTERM at the end, taking its sleep along: Slurm ends the step only once
        # every process of the task has gone.
        sleeper=""
        trap - USR1 USR2
        trap 'kill $sleeper 2>/dev/null; wait; exit 0' TERM
        while kill -0 "$launcher_pid" 2>/dev/null; do
            sleep 0.5 &
            sleeper=$!
            wait "$sleeper"
            if relay "$1"; then
                break
            fi
        done
    ) &
    repeater_pid=$!
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
trap 'on_signal TERM' USR2      # SIGTERM to the batch shell, forwarded by srun (see _launch.sh)

dtrain_wait "$launcher_pid"
rc=$DTRAIN_RC
if [[ -n $repeater_pid ]]; then
    kill "$repeater_pid" 2>/dev/null || true
fi
if [[ -n $stop_signal || $rc -ne 0 ]]; then
    log "launcher exited with status $rc"
fi
dtrain_launcher_ended "$rc"
exit "$rc"
