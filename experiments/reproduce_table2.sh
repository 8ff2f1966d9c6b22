#!/usr/bin/env bash
# Reproduces Table 2 of the paper end to end: train, average the last checkpoints,
# translate newstest2014 with beam search, and score it with both BLEUs.
#
#   bash experiments/reproduce_table2.sh                  # all four models
#   bash experiments/reproduce_table2.sh en_de_base       # one of them
#   RUNS=/big/disk/runs TFDS_DATA_DIR=/data/tfds \
#     bash experiments/reproduce_table2.sh en_de_big --config.optim.grad_accum_steps=2
#
# Models: en_de_base, en_de_big, en_fr_base, en_fr_big (configs/wmt14_<model>.py).
# Extra arguments go to transformer_jax.main (e.g. gradient accumulation on fewer
# devices than the paper's 8 GPUs). Rerun after an interruption: training resumes
# from its last checkpoint, and a model whose newstest2014 score exists is skipped. It trains on this host's
# devices; on a TPU pod or a SLURM cluster train with experiments/tpu_vm_pod.sh or
# experiments/multi_gpu_slurm.sh into the same RUNS folder, then rerun this script to
# average and evaluate.
#
# Paper (newstest2014, tokenized BLEU): EN-DE base 27.3, big 28.4; EN-FR base 38.1,
# big 41.8. Base models average the last 5 checkpoints, big ones the last 20 (Sec 6.1).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}

MODELS=(en_de_base en_de_big en_fr_base en_fr_big)
if [[ $# -gt 0 && $1 != --* ]]; then
  MODELS=("$1")
  shift
fi
declare -A PAPER_BLEU=([en_de_base]=27.3 [en_de_big]=28.4 [en_fr_base]=38.1 [en_fr_big]=41.8)

for model in "${MODELS[@]}"; do
  config="configs/wmt14_${model}.py"
  [[ -f $config ]] || { echo "unknown model '$model' (no $config)" >&2; exit 2; }
  workdir="$RUNS/$model"
  if compgen -G "$workdir/averaged_last*/eval/test.json" > /dev/null; then
    echo "== $model: already evaluated, skipping"
    continue
  fi
  # Sec 6.1: the last 5 checkpoints for base models, 20 for big ones.
  average_last=$("$PYTHON" -c "
import sys; sys.path.insert(0, '.')
from configs import wmt14_${model} as c; print(c.get_config().eval.average_last)")

  echo "== $model: data"
  "$PYTHON" experiments/prepare_tfds.py --config="$config" --data_dir="$TFDS_DATA_DIR"

  echo "== $model: training in $workdir (resumes from its last checkpoint)"
  "$PYTHON" -m transformer_jax.main --config="$config" --workdir="$workdir" \
    --config.data.data_dir="$TFDS_DATA_DIR" "$@"

  echo "== $model: averaging the last $average_last checkpoints"
  averaged="$workdir/averaged_last$average_last"
  rm -rf "$averaged"  # A partial average from an interrupted run.
  "$PYTHON" -m transformer_jax.checkpoint --workdir="$workdir" \
    --average_last="$average_last" --output="$averaged"

  echo "== $model: newstest2014, beam 4, alpha 0.6"
  # The averaged workdir carries the run's config.json (data_dir included).
  "$PYTHON" -m transformer_jax.evaluate --workdir="$averaged" --split=test
done

echo
echo "| model | paper BLEU | tokenized BLEU | sacreBLEU | sentences | step |"
echo "|---|---|---|---|---|---|"
for model in "${MODELS[@]}"; do
  "$PYTHON" - "$RUNS/$model" "$model" "${PAPER_BLEU[$model]}" <<'PY'
import glob, json, sys
workdir, model, paper = sys.argv[1:]
found = sorted(glob.glob(f'{workdir}/averaged_last*/eval/test.json'))
if not found:
  print(f'| {model} | {paper} | (not evaluated) | | | |')
else:
  r = json.load(open(found[-1]))
  print(f"| {model} | {paper} | {r['tok_bleu']:.2f} | {r['sacrebleu']:.2f} | "
        f"{r['num_sentences']} | {r['step']} |")
PY
done
