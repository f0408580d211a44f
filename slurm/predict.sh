#!/usr/bin/env bash
# Inference with dtrain on Slurm (e.g. the 300,000 Kaggle CIFAR-10 test images): one node, one
# process per GPU, each predicting its share of the images.
#
#   sbatch --gpus-per-node=8 slurm/predict.sh --checkpoint runs/dtrain-123/best.pt \
#       --data-dir cifar-10 --output submission.csv
#
# Every argument after the script name goes to dtrain/predict.py. Run sbatch from the repository
# root (or set DTRAIN_ROOT); the log goes to logs/<job name>-<job id>.out (logs/ ships with the checkout).
# GPUs are requested on the command line for the reason given in slurm/cifar.sh; the launcher
# logic (processes per node, threads, rendezvous) is shared with it: slurm/_launch.sh.
#
#SBATCH --job-name=dtrain-predict
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
##SBATCH --gpus-per-node=8

set -euo pipefail
DTRAIN_ROOT=${DTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
# shellcheck source-path=SCRIPTDIR source=_launch.sh
source "$DTRAIN_ROOT/slurm/_launch.sh"
set +e
dtrain_launch predict dtrain/predict.py "$@"
exit $?
