#!/usr/bin/env bash
# Trains on one multi-GPU host, or on several through SLURM, with one process per GPU.
#
# One host (all its GPUs, one process):
#   bash experiments/multi_gpu_slurm.sh configs/wmt14_en_de_big.py runs/ende_big
# A SLURM cluster (e.g. 2 nodes x 8 GPUs = 16 processes, one per GPU):
#   sbatch --nodes=2 experiments/multi_gpu_slurm.sh configs/wmt14_en_de_big.py /shared/runs/ende_big
#
# Extra arguments go to transformer_jax.main, e.g. --config.mesh.fsdp=8.
# TFDS_DATA_DIR (default ~/tensorflow_datasets) must be on a filesystem every node
# sees; the dataset is prepared once, before the processes start.
#
# Under SLURM every process runs the same command; transformer_jax.main calls
# jax.distributed.initialize(), which reads the process count and rank from SLURM's
# environment (SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID picks the GPU) and the
# coordinator from JAX_COORDINATOR_ADDRESS, set below to the job's first node.
#
#SBATCH --job-name=transformer_jax
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=4-00:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: multi_gpu_slurm.sh CONFIG WORKDIR [main.py flags...]}
WORKDIR=${2:?usage: multi_gpu_slurm.sh CONFIG WORKDIR [main.py flags...]}
shift 2
# sbatch runs a copy of this file from the spool directory; SLURM_SUBMIT_DIR is the
# checkout it was submitted from.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-.venv/bin/python}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}

# Download and prepare the TFDS dataset the config names, once (idempotent).
"$PYTHON" experiments/prepare_tfds.py --config="$CONFIG" --data_dir="$TFDS_DATA_DIR"

if [[ -n "${SLURM_JOB_ID:-}" && "${SLURM_NTASKS:-1}" -gt 1 ]]; then
  first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  # A port derived from the job id, so two jobs sharing a node do not collide.
  export JAX_COORDINATOR_ADDRESS="${first_node}:$((20000 + SLURM_JOB_ID % 20000))"
  echo "coordinator ${JAX_COORDINATOR_ADDRESS}, ${SLURM_NTASKS} processes on ${SLURM_JOB_NUM_NODES} nodes"
  srun --kill-on-bad-exit=1 "$PYTHON" -m transformer_jax.main \
    --config="$CONFIG" --workdir="$WORKDIR" \
    --config.data.data_dir="$TFDS_DATA_DIR" "$@"
else
  "$PYTHON" -m transformer_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --config.data.data_dir="$TFDS_DATA_DIR" "$@"
fi
