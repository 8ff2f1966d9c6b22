#!/usr/bin/env bash
# Trains an ensemble of SST-2 classifiers, one seed after another, and prints the dev
# accuracy of the mean of their class probabilities.
#
#   bash experiments/sst2_ensemble.sh [WORKDIR] [--config.key=value ...]
#   MEMBERS=4 bash experiments/sst2_ensemble.sh runs/sst2_ensemble
#
# Each member is configs/sst2.py:member (1,000 steps, its 10 checkpoints averaged)
# with --config.seed=0, 1, ..., MEMBERS-1 (default 6) in WORKDIR/seed<i> (default
# runs/sst2_ensemble), on the GLUE SST-2 files in SST2_DIR (default ../shared/data/sst2). Rerun after an interruption: a finished member is not trained
# again. Classify with the ensemble afterwards:
#   .venv/bin/python -m transformer_jax.classify --average_last=10 \
#       --workdir=runs/sst2_ensemble/seed0,runs/sst2_ensemble/seed1,...
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
MEMBERS=${MEMBERS:-6}
SST2_DIR=${SST2_DIR:-../shared/data/sst2}
WORKDIR=runs/sst2_ensemble
if [[ $# -gt 0 && $1 != --* ]]; then
  WORKDIR=$1
  shift
fi

members=()
for ((seed = 0; seed < MEMBERS; seed++)); do
  member="$WORKDIR/seed$seed"
  "$PYTHON" -m transformer_jax.main --config=configs/sst2.py:member --config.seed="$seed" \
      --config.data.data_dir="$SST2_DIR" --workdir="$member" "$@"
  members+=("$member")
done
joined=$(IFS=,; echo "${members[*]}")
echo "Ensemble of $MEMBERS members, each the average of its last 10 checkpoints:"
"$PYTHON" -m transformer_jax.classify --workdir="$joined" --average_last=10 \
    --labelled="$SST2_DIR/dev.tsv.gz"
