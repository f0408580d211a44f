#!/usr/bin/env bash
# bench/gpu.sh: every measurement and check of dtrain that needs a GPU, in one call of at most 9 minutes
# on one H200 (16 cores), data start-up included. Writes under $OUT: summary.md (rewritten after every part,
# so a run cut off still has one), parts.tar.gz (every part's log, raw JSON, the runs' metrics.jsonl and
# config.json; rewritten after every part) and, while a part runs, that part's log $OUT/<part>.log (tee'd as
# it goes; folded into parts.tar.gz when the part ends, so $OUT holds at most 3 files: the device tool
# brings back 8). Checkpoints, caches and PNGs stay in the scratch folder $WORK.
#
#   bash bench/gpu.sh                      # everything (needs the two prepared files below)
#   bash bench/gpu.sh --quick              # every part at toy size on the CPU, a few minutes
#   bash bench/gpu.sh --only f-resnet18-seed1,g-predict   # some parts (a-env and data always run)
#
# Environment: OUT (default runs/gpu-sh), GPU_SH_WORK (scratch, default a new temp folder, removed at the
# end unless GPU_SH_KEEP=1), GPU_SH_DATA (folder holding cifar10_jpeg.npz and export.py, default .devdata,
# else ../shared/data; "generate": a generated npz, --quick only), GPU_SH_BUDGET (seconds, default 520;
# --quick 840), GPU_SH_PYTHON (default python3: on the GPU machine the python3 that holds torch).
#
# Preparation, once, on the CPU machine, in the repository root of the checkout that makes the call
# (both folders are git-ignored; the GPU machine has no package registry, no internet, no wandb login):
#   mkdir -p .devdata && cp ../shared/data/cifar10_jpeg.npz ../shared/data/export.py .devdata/ && python3 -m pip download airbench==0.1.8 --no-deps --no-binary :all: -d .whl
# The call (56 MB of data + ~1 MB of repository, under the 64 MiB that travels):
#   run(command="bash bench/gpu.sh", carry=[".devdata", ".whl"], timeout_s=540)
#
# Parts, in order (ids as in summary.md and the log names). Budget for one H200 with 16 cores; "need" is the
# expected time, "cap" the most a part may take. Before each part starts, its cap is lowered to what the
# budget (520 s, so the call ends inside 540 s with the kill grace and the last summary) leaves after the
# needs of the parts still to come: an overrun eats slack, never a later part's expected time. A part that
# runs past its cap is stopped (timeout: TERM, KILL 10 s later) and recorded as cut, with what it wrote so far
# (a cut training run's summary row reads its metrics.jsonl: epochs reached, img/s, last accuracy); a part
# whose lowered cap is under half its need is not started, and says so.
#   part              need  cap  what, and why that long
#   a-env                6   20  python3 + torch import, torch.cuda.is_available(), versions; nvidia-smi
#   data                12   40  decode the 60,000 JPEGs on 16 cores (~15 s on one) + pickled batches + .pt
#   b-syncs             15   45  one process: start-up ~6 s, 40 steps of resnet18-fast (~11 ms each at
#                                ~45,000 img/s, cudnn autotuning in step 1), the end's TTA evaluation + save
#   c-eager             30   60  ceiling (75 steps of batch 512), fast path (a 2-epoch run: ~6 s start-up +
#                                ~3 s of steps + evaluation), seeds' pipeline (170 steps, 8 PIL workers)
#   c-compiled          90  130  the compiled ceiling (ResNet18 forward + backward: ~40 s of inductor on 16
#                                cores, cold cache) and the compiled fast path (its Triton kernels mostly from
#                                the ceiling's cache, + the evaluation graph ~15 s); the seeds' row not repeated
#   d-fp16              25   50  two processes: 120 steps (stops mid epoch 2), then --resume auto to step 196
#   d-load               5   15  a torch import and one torch.load
#   e-airbench          60   90  airbench94 package: warm-up + 3 runs of ~3 s; --arch airbench: 3 processes
#                                of ~6 s start-up + ~6 s of 10 epochs + evaluation
#   f-resnet18         115  170  one seed of resnet18-fast: 80 epochs, goal <= 120 s of training (~1.1 s an
#                                epoch), + start-up and 8 evaluations; THE BIGGEST
#   f-resnet18-seed1   115  170  the second seed: OPTIONAL, starts only if the parts before leave its whole
#                                need beyond the needs of g, g', h. Expected not to fit (the needs add up to
#                                565 s with it, 450 without), so (f) is cut to 1 seed of the 2 asked; a later
#                                call can run it alone: bash bench/gpu.sh --only f-resnet18-seed1
#   e-muon              25   45  `--recipe airbench94-muon`, one seed (8 epochs, ~10 s + start-up): OPTIONAL
#                                like the second seed; it fits in the slack when that seed does not run
#   g-predict           65  100  export.py writes 300,000 PNGs (~25 s: decoding, distractors and the
#                                shuffle are single-threaded, the PNGs on 16 cores), bench/predict.py: plain
#                                loop on the first 20,000 only, each pipeline stage once (--repeat 1: the
#                                machine is not shared), 3 end-to-end predict.py runs on all 300,000 (~10 s
#                                each; bf16, --no-tta, as the documented goals are measured)
#   g-syncs             12   25  export 20,480 PNGs, build their cache, predict 20 batches of 1,024
#   h-profile           15   30  30 steps of resnet18-fast, the last 20 profiled (torch.profiler)
#   total needs 450 s (565 with the second seed, 475 with e-muon alone); 70 s of slack for start-ups slower than guessed.
#
# Host syncs, (b) and (g'), are counted in-process by bench/gpu_checks.py under
# torch.cuda.set_sync_debug_mode("warn"), per step (per batch) and per call site. --quick runs every part
# at toy size on the CPU (64 train / 32 test images, a few steps, the small `cnn` in place of ResNet18 under
# the same recipes, fp32, OMP_NUM_THREADS=1; budget 840 s, 240 s a part): what needs CUDA (the sync counts,
# fp16, airbench's train94) and the compiled pass (minutes of compiling on a few cores) are skipped with the
# reason in summary.md.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/bench/gpu.sh"
cd "$REPO" || exit 2
ORDER=(a-env data b-syncs c-eager c-compiled d-fp16 d-load e-airbench f-resnet18 f-resnet18-seed1 e-muon
       g-predict g-syncs h-profile)
declare -A NEED=([a-env]=6 [data]=12 [b-syncs]=15 [c-eager]=30 [c-compiled]=90 [d-fp16]=25 [d-load]=5
                 [e-airbench]=60 [f-resnet18]=115 [f-resnet18-seed1]=115 [g-predict]=65 [g-syncs]=12
                 [h-profile]=15 [e-muon]=25)
declare -A CAP=([a-env]=20 [data]=40 [b-syncs]=45 [c-eager]=60 [c-compiled]=130 [d-fp16]=50 [d-load]=15
                [e-airbench]=90 [f-resnet18]=170 [f-resnet18-seed1]=170 [g-predict]=100 [g-syncs]=25
                [h-profile]=30 [e-muon]=45)
OPTIONAL=" f-resnet18-seed1 e-muon "

# ---- helpers shared by the parts (run in a child: bash gpu.sh --part ID) ----------------------------------
shown() {  # a command as the summary shows it: relative to the repository, scratch paths as $WORK
    local text
    text=$(printf '%q ' "$@")
    text=${text//"$GPU_SH_WORK"/\$WORK}
    text=${text//"$REPO/"/}
    printf '%s\n' "${text% }"
}

run_cmd() {  # log the command, note it for the summary, run it
    local text
    text=$(shown "$@")
    echo "+ $text"
    echo "$text" >>"$GPU_SH_STAGE/$PART.cmd"
    "$@"
}

skip() {  # this part does not apply here: the reason goes to the summary
    echo "skipped: $*"
    echo "$*" >"$GPU_SH_STAGE/$PART.skip"
}

note() {  # a figure or remark the summary appends to this part's row
    echo "note: $*"
    echo "$*" >>"$GPU_SH_STAGE/$PART.note"
}

quick() { [[ $GPU_SH_QUICK == 1 ]]; }
cuda() { [[ $GPU_SH_CUDA == 1 ]]; }

train_common() {  # bench/train.py's data arguments (and the toy sizes under --quick)
    TRAIN=(--npz "$GPU_SH_NPZ" --cache "$GPU_SH_WORK/bench-cache")
    if quick; then
        TRAIN+=(--quick --quick-train 64 --quick-test 32 --quick-batch 16 --quick-arch cnn)
    fi
}

dtrain_common() {  # dtrain_common [PRECISION]: the arguments of the dtrain runs here; --quick: toy batches of
    # the small cnn with the same recipe; without CUDA fp32 (bf16 autocast is emulated on most CPUs, ~8x slower)
    local precision=${1:-}
    DTRAIN=(--recipe resnet18-fast --data-dir "$GPU_SH_CIFAR" --no-download --no-wandb --no-plots)
    if quick; then
        DTRAIN+=(--arch cnn -b 16 --eval-batch-size 16 --workers 0)
    fi
    if [[ -z $precision ]] && ! cuda; then
        precision=no
    fi
    if [[ -n $precision ]]; then
        DTRAIN+=(--precision "$precision")
    fi
}

find_checkpoint() {  # CKPT: the best weights this run made ((f)'s best.pt, else (d)'s or (b)'s last.pt), else
    # those of a 5-step run made here (as under --only)
    local c
    for c in "$GPU_SH_WORK/f-resnet18/runs/resnet18-0/best.pt" "$GPU_SH_WORK/d-fp16/last.pt" \
             "$GPU_SH_WORK/b-run/last.pt" "$GPU_SH_WORK/ckpt-run/last.pt"; do
        if [[ -f $c ]]; then
            CKPT=$c
            return 0
        fi
    done
    note "no checkpoint from (b), (d) or (f): a 5-step run made one"
    dtrain_common
    run_cmd "$GPU_SH_PY" dtrain/main.py "${DTRAIN[@]}" --max-steps 5 --output-dir "$GPU_SH_WORK/ckpt-run" || return
    CKPT="$GPU_SH_WORK/ckpt-run/last.pt"
}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---- the parts ----------------------------------------------------------------------------------------------
part_a_env() {
    run_cmd "$GPU_SH_PY" bench/gpu_checks.py env --json "$GPU_SH_STAGE/a-env.json" || return
    if command -v nvidia-smi >/dev/null; then
        run_cmd nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv \
            || echo "nvidia-smi could not answer that query (not counted against this part)"
    else
        echo "nvidia-smi: not on this machine"
    fi
}

part_data() {
    if [[ $GPU_SH_DATA == generate ]]; then
        run_cmd "$GPU_SH_PY" bench/gpu_checks.py make-npz "$GPU_SH_WORK/gen-data" --train 64 --test 32 || return
    fi
    train_common
    local t0
    t0=$(now)
    run_cmd "$GPU_SH_PY" bench/train.py "${TRAIN[@]}" --sections "" --out "$GPU_SH_WORK/data-out" || return
    note "decoded and written in $(since "$t0") s"
    run_cmd "$GPU_SH_PY" bench/gpu_checks.py data-info "$(dirname "$GPU_SH_CIFAR")" --source "$GPU_SH_DATA_DESC" \
        --json "$GPU_SH_STAGE/data.json"
}

part_b_syncs() {
    dtrain_common
    local steps=40 extra=()
    if quick; then
        steps=3
        extra=(--log-every 2)
    fi
    run_cmd "$GPU_SH_PY" bench/gpu_checks.py train-syncs --json "$GPU_SH_STAGE/b-syncs.json" -- "${DTRAIN[@]}" \
        --max-steps "$steps" "${extra[@]}" --output-dir "$GPU_SH_WORK/b-run"
}

part_c_eager() {
    train_common
    run_cmd "$GPU_SH_PY" bench/train.py "${TRAIN[@]}" --sections throughput --out "$GPU_SH_WORK/c-eager"
}

part_c_compiled() {
    if quick; then
        skip "--quick: torch.compile of ResNet18 takes minutes on a few CPU cores; the eager rows (c) ran"
        return 0
    fi
    train_common
    run_cmd "$GPU_SH_PY" bench/train.py "${TRAIN[@]}" --sections throughput --compile --skip-seeds-row \
        --out "$GPU_SH_WORK/c-compiled"
}

part_d_fp16() {
    local precision=fp16 first=120
    if quick; then
        first=6   # 4 steps an epoch: stops in epoch 2
    fi
    if ! cuda; then
        precision=no
        note "fp16 needs CUDA (dtrain refuses it on the CPU): ran fp32, so no GradScaler and no skipped_steps"
    fi
    dtrain_common "$precision"
    local run=("${DTRAIN[@]}" --grad-clip 2 --epochs 2 --output-dir "$GPU_SH_WORK/d-fp16")
    run_cmd "$GPU_SH_PY" dtrain/main.py "${run[@]}" --max-steps "$first" || return
    run_cmd "$GPU_SH_PY" dtrain/main.py "${run[@]}" --resume auto
}

part_d_load() {
    if [[ ! -f $GPU_SH_WORK/d-fp16/last.pt ]]; then
        skip "(d) left no last.pt"
        return 0
    fi
    # the log of (d) is in the stage folder by now
    run_cmd env CUDA_VISIBLE_DEVICES= "$GPU_SH_PY" bench/gpu_checks.py load-cpu "$GPU_SH_WORK/d-fp16/last.pt" \
        --metrics "$GPU_SH_WORK/d-fp16/metrics.jsonl" --log "$GPU_SH_STAGE/logs/d-fp16.log" \
        --json "$GPU_SH_STAGE/d-load.json"
}

part_e_airbench() {
    train_common
    local seeds=(--seeds 3) src=()
    if quick; then
        seeds=()
    fi
    if [[ -f $REPO/.whl/airbench-0.1.8.tar.gz ]]; then
        src=(--airbench-src "$REPO/.whl/airbench-0.1.8.tar.gz")
    else
        note "no .whl/airbench-0.1.8.tar.gz: the installed airbench package, if any"
        src=(--airbench-src "")
    fi
    run_cmd "$GPU_SH_PY" bench/train.py "${TRAIN[@]}" --sections airbench-pkg,airbench "${seeds[@]}" "${src[@]}" \
        --out "$GPU_SH_WORK/e-airbench"
}

f_seed() {
    train_common
    run_cmd "$GPU_SH_PY" bench/train.py "${TRAIN[@]}" --sections resnet18 --recipe-resnet18 resnet18-fast \
        --seeds 1 --first-seed "$1" --out "$GPU_SH_WORK/$PART"
}

part_f_resnet18() { f_seed 0; }

part_f_resnet18_seed1() {
    if quick; then
        skip "--quick runs one seed"
        return 0
    fi
    f_seed 1
}

part_e_muon() {
    train_common
    run_cmd "$GPU_SH_PY" bench/train.py "${TRAIN[@]}" --sections airbench --recipe-airbench airbench94-muon \
        --seeds 1 --out "$GPU_SH_WORK/$PART"
}

part_g_predict() {
    local total=300000 plain=20000 precision=bf16 extra=() t0
    if quick; then
        total=128
        plain=128
        extra=(--batch-size 64 --workers 0)
    fi
    cuda || precision=no
    find_checkpoint || return
    shown "$CKPT" >"$GPU_SH_STAGE/g-predict.checkpoint"
    mkdir -p "$GPU_SH_WORK/tmp"
    if [[ -n $GPU_SH_EXPORT ]]; then
        local sizes=(--train 5000 --test 10000)
        if quick; then
            sizes=(--train 64 --test 32)
        fi
        t0=$(now)
        run_cmd "$GPU_SH_PY" "$GPU_SH_EXPORT" kaggle "$GPU_SH_WORK/kaggle" "${sizes[@]}" --total "$total" || return
        note "export.py wrote the $total test PNGs (real CIFAR-10 test images among distractors) in $(since "$t0") s"
    else
        note "no export.py beside the npz: bench/predict.py made the PNGs"
    fi
    run_cmd env TMPDIR="$GPU_SH_WORK/tmp" "$GPU_SH_PY" bench/predict.py --dir "$GPU_SH_WORK/kaggle" \
        --total "$total" --checkpoint "$CKPT" --repeat 1 --plain-images "$plain" "${extra[@]}" \
        --e2e-args "--precision $precision --no-tta" --json "$GPU_SH_STAGE/g-predict.json"
}

part_g_syncs() {
    local n=20480 batch=1024 precision=bf16
    if quick; then
        n=96
        batch=32
    fi
    cuda || precision=no
    find_checkpoint || return
    rm -rf "$GPU_SH_WORK/kaggle-small" "$GPU_SH_WORK/g-cache"
    if [[ -n $GPU_SH_EXPORT ]]; then
        run_cmd "$GPU_SH_PY" "$GPU_SH_EXPORT" kaggle "$GPU_SH_WORK/kaggle-small" --train 32 --test 32 --total "$n" \
            || return
    else
        run_cmd "$GPU_SH_PY" bench/gpu_checks.py kaggle "$GPU_SH_WORK/kaggle-small" --total "$n" || return
    fi
    run_cmd "$GPU_SH_PY" bench/gpu_checks.py predict-syncs --json "$GPU_SH_STAGE/g-syncs.json" -- \
        --checkpoint "$CKPT" --data-dir "$GPU_SH_WORK/kaggle-small" --output "$GPU_SH_WORK/g-syncs.csv" --force \
        --batch-size "$batch" --cache-dir "$GPU_SH_WORK/g-cache" --precision "$precision"
}

part_h_profile() {
    dtrain_common
    local warmup=10 steps=20
    if quick; then
        warmup=1
        steps=2
    fi
    run_cmd "$GPU_SH_PY" bench/gpu_checks.py profile --json "$GPU_SH_STAGE/h-profile.json" \
        --table "$GPU_SH_STAGE/h-profile.txt" --warmup "$warmup" --steps "$steps" -- "${DTRAIN[@]}" \
        --max-steps $((warmup + steps)) --output-dir "$GPU_SH_WORK/h-run"
}

# ---- the driver -----------------------------------------------------------------------------------------
usage() { sed -n '2,16p' "$SELF" | sed 's/^# \{0,1\}//'; }

summarise() {
    "$GPU_SH_PY" bench/gpu_checks.py summary "$GPU_SH_WORK" "$OUT/summary.md" --elapsed "$(since "$START")" >/dev/null
}

pack() {  # the stage folder and the runs' small files, into $OUT/parts.tar.gz
    (cd "$GPU_SH_WORK" && {
        find stage -type f
        find . \( -path ./stage -o -path ./kaggle -o -path ./kaggle-small -o -path ./bench-cache -o -path ./tmp \) \
            -prune -o -type f \( -name metrics.jsonl -o -name config.json -o -name results.json \
            -o -name table.md \) -print
    } | tar -czf "$GPU_SH_WORK/parts.tar.gz" -T -) && cp "$GPU_SH_WORK/parts.tar.gz" "$OUT/parts.tar.gz"
}

run_part() {  # run_part ID CAP: the part in a child under timeout, tee'd to $OUT/ID.log; then its record
    local id=$1 cap=$2 t0 rc secs
    echo "==== [$id] up to ${cap} s ($(since "$START") s into the run) ===="
    t0=$(now)
    timeout -k 10 "$cap" bash "$SELF" --part "$id" 2>&1 | tee "$OUT/$id.log"
    rc=${PIPESTATUS[0]}
    secs=$(since "$t0")
    mv "$OUT/$id.log" "$GPU_SH_STAGE/logs/$id.log"
    "$GPU_SH_PY" bench/gpu_checks.py status "$GPU_SH_STAGE" "$id" --rc "$rc" --seconds "$secs" --cap "$cap" \
        --log "$GPU_SH_STAGE/logs/$id.log" >/dev/null
    echo "==== [$id] exit $rc after $secs s ===="
    if [[ $id == a-env ]] && grep -q '"cuda_available": true' "$GPU_SH_STAGE/a-env.json" 2>/dev/null; then
        GPU_SH_CUDA=1
    fi
    summarise
    pack
}

needs_after() {  # the needs of the parts after index $1 that will run (optional ones not counted)
    local total=0 j id
    for ((j = $1 + 1; j < ${#ORDER[@]}; j++)); do
        id=${ORDER[j]}
        if selected "$id" && [[ $OPTIONAL != *" $id "* ]]; then
            total=$((total + NEED[$id]))
        fi
    done
    echo "$total"
}

selected() { [[ -z $ONLY || $1 == a-env || $1 == data || ",$ONLY," == *",$1,"* ]]; }

resolve_data() {  # GPU_SH_DATA: a folder with cifar10_jpeg.npz (and export.py), or generate (--quick)
    local d
    if [[ -z ${GPU_SH_DATA:-} ]]; then
        for d in "$REPO/.devdata" "$REPO/../shared/data"; do
            if [[ -f $d/cifar10_jpeg.npz ]]; then
                GPU_SH_DATA=$(cd "$d" && pwd)
                break
            fi
        done
    fi
    if [[ -z ${GPU_SH_DATA:-} || $GPU_SH_DATA == generate ]]; then
        if [[ $GPU_SH_QUICK != 1 ]]; then
            echo "error: no cifar10_jpeg.npz in .devdata or ../shared/data; prepare it as this script's header says" >&2
            exit 2
        fi
        GPU_SH_DATA=generate
        GPU_SH_NPZ="$GPU_SH_WORK/gen-data/cifar10_jpeg.npz"
        GPU_SH_DATA_DESC="generated: random images, 64 train / 32 test"
        GPU_SH_EXPORT=""
    else
        GPU_SH_NPZ="$GPU_SH_DATA/cifar10_jpeg.npz"
        [[ -f $GPU_SH_NPZ ]] || { echo "error: $GPU_SH_NPZ not found" >&2; exit 2; }
        GPU_SH_DATA_DESC="CIFAR-10 (JPEG-75) from $(shown "$GPU_SH_NPZ")"
        GPU_SH_EXPORT=""
        [[ -f $GPU_SH_DATA/export.py ]] && GPU_SH_EXPORT="$GPU_SH_DATA/export.py"
    fi
    local tag=all-all
    [[ $GPU_SH_QUICK == 1 ]] && tag=64-32
    GPU_SH_CIFAR="$GPU_SH_WORK/bench-cache/$tag/cifar"
}

finish() {
    local rc=$?
    summarise
    pack
    if [[ ${GPU_SH_KEEP:-0} != 1 && $MADE_WORK == 1 ]]; then
        if [[ $GPU_SH_QUICK == 1 ]]; then
            rm -rf "$GPU_SH_WORK"
        else   # 300,000 PNGs take seconds to remove: not on the clock of the call
            rm -rf "$GPU_SH_WORK" &
        fi
    fi
    echo "summary: $OUT/summary.md ($(since "$START") s)"
    exit "$rc"
}

main() {
    GPU_SH_QUICK=0
    ONLY=""
    while (($#)); do
        case $1 in
            --quick) GPU_SH_QUICK=1 ;;
            --only) ONLY=$2; shift ;;
            -h | --help) usage; exit 0 ;;
            *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
        esac
        shift
    done
    START=$(now)
    OUT=${OUT:-$REPO/runs/gpu-sh}
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    MADE_WORK=0
    if [[ -z ${GPU_SH_WORK:-} ]]; then
        GPU_SH_WORK=$(mktemp -d "${TMPDIR:-/tmp}/dtrain-gpu-sh.XXXXXX")
        MADE_WORK=1
    fi
    mkdir -p "$GPU_SH_WORK"
    GPU_SH_WORK=$(cd "$GPU_SH_WORK" && pwd)
    GPU_SH_STAGE="$GPU_SH_WORK/stage"
    rm -rf "$GPU_SH_STAGE" "$OUT/summary.md" "$OUT/parts.tar.gz"
    mkdir -p "$GPU_SH_STAGE/logs"
    GPU_SH_PY=${GPU_SH_PYTHON:-python3}
    GPU_SH_CUDA=0
    local budget=${GPU_SH_BUDGET:-520} cuts
    if [[ $GPU_SH_QUICK == 1 ]]; then
        budget=${GPU_SH_BUDGET:-840}
        for id in "${ORDER[@]}"; do
            NEED[$id]=5
            CAP[$id]=240
        done
        cuts="--quick: toy sizes on the CPU, 1 seed; c-compiled and f-resnet18-seed1 skipped, and what needs CUDA"
    else
        cuts="(f) has 1 seed of the 2 asked unless the parts before it leave ${NEED[f-resnet18-seed1]} s beyond the"
        cuts+=" needs of (g), (g'), (h) (expected not: the parts' needs add up to 565 s with it against a 520 s"
        cuts+=" budget); a later call runs it alone with --only f-resnet18-seed1. (g) times the plain loop on the"
        cuts+=" first 20,000 images and each pipeline stage once; its end-to-end runs use bf16 without TTA."
    fi
    resolve_data
    export OUT GPU_SH_QUICK GPU_SH_WORK GPU_SH_STAGE GPU_SH_PY GPU_SH_CUDA GPU_SH_DATA GPU_SH_NPZ GPU_SH_DATA_DESC \
        GPU_SH_EXPORT GPU_SH_CIFAR
    export WANDB_MODE=disabled WANDB_SILENT=true PYTHONUNBUFFERED=1
    if [[ $GPU_SH_QUICK == 1 ]]; then
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # toy models: threads only contend on a small shared CPU
    fi
    trap finish EXIT
    trap 'exit 143' TERM INT
    "$GPU_SH_PY" bench/gpu_checks.py meta "$GPU_SH_STAGE" "started=$(date '+%Y-%m-%d %H:%M:%S %Z')" \
        "budget=$budget" "quick=$([[ $GPU_SH_QUICK == 1 ]] && echo true || echo false)" "host=$(uname -n)" \
        "data=$GPU_SH_DATA_DESC" "cuts=$cuts" "only=${ONLY:-all}"
    local i id left cap floor reason
    for i in "${!ORDER[@]}"; do
        id=${ORDER[i]}
        selected "$id" || continue
        export GPU_SH_CUDA
        left=$(awk -v b="$budget" -v s="$(since "$START")" 'BEGIN { printf "%d", b - s }')
        cap=$((left - $(needs_after "$i")))
        ((cap > CAP[$id])) && cap=${CAP[$id]}
        floor=$((NEED[$id] / 2))
        [[ $OPTIONAL == *" $id "* ]] && floor=${NEED[$id]}
        ((floor < 5)) && floor=5
        if ((cap < floor)); then
            reason="$left s of the ${budget} s budget left, the later parts need $(needs_after "$i") s"
            reason+=", it needs ${NEED[$id]} s"
            echo "==== [$id] not started: $reason ===="
            "$GPU_SH_PY" bench/gpu_checks.py not-started "$GPU_SH_STAGE" "$id" "$reason"
            summarise
            continue
        fi
        run_part "$id" "$cap"
    done
}

if [[ ${1:-} == --part ]]; then
    PART=$2
    fn="part_${PART//-/_}"
    declare -F "$fn" >/dev/null || { echo "no part $PART" >&2; exit 2; }
    "$fn"
    exit
fi
main "$@"
