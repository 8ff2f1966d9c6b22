#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice (e.g. v4-32: 4 hosts x 4 chips; v5e-16: 4 hosts x 4
# chips) by running the same command on every host.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b BUCKET=gs://my-bucket \
#     bash experiments/tpu_vm_pod.sh configs/wmt14_en_de_big.py ende_big [main.py flags...]
#
# Steps: copy this checkout (the committed HEAD) to every host, install the pinned
# requirements with TPU jax, prepare the TFDS dataset once into the bucket, then start
# transformer_jax.main on all hosts at once (--worker=all). JAX_COORDINATOR_ADDRESS
# (host 0's internal address) makes main call jax.distributed.initialize(), which
# reads the process count and each host's rank from the TPU VM metadata.
# The workdir (checkpoints, TensorBoard) and the dataset live in the bucket, which
# every host reads and writes; a preempted slice resumes from the last checkpoint when
# the same command is run again.
#
# Create the slice first, for example:
#   gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
#     --accelerator-type=v4-32 --version=tpu-ubuntu2204-base
set -euo pipefail

CONFIG=${1:?usage: tpu_vm_pod.sh CONFIG RUN_NAME [main.py flags...]}
RUN_NAME=${2:?usage: tpu_vm_pod.sh CONFIG RUN_NAME [main.py flags...]}
shift 2
: "${TPU_NAME:?set TPU_NAME to the TPU VM slice name}"
: "${ZONE:?set ZONE to the slice zone}"
: "${BUCKET:?set BUCKET to a gs:// bucket in the same region}"
TFDS_DATA_DIR=${TFDS_DATA_DIR:-$BUCKET/tensorflow_datasets}
WORKDIR=${WORKDIR:-$BUCKET/runs/$RUN_NAME}
REMOTE_DIR=transformer_jax

cd "$(dirname "$0")/.."
tpu_ssh() {  # tpu_ssh WORKER COMMAND
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="$1" --command="$2"
}

echo "== copying $(git rev-parse --short HEAD) to every host of $TPU_NAME"
archive=$(mktemp --suffix=.tar.gz)
git archive --format=tar.gz --prefix="$REMOTE_DIR/" -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":transformer_jax.tar.gz \
  --zone="$ZONE" --worker=all
rm -f "$archive"

echo "== installing on every host"
tpu_ssh all "rm -rf $REMOTE_DIR && tar xzf transformer_jax.tar.gz && cd $REMOTE_DIR && \
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && \
  .venv/bin/pip install -q 'jax[tpu]==$(grep '^jax==' requirements.txt | cut -d= -f3)' && \
  .venv/bin/pip install -q --no-deps -e ."

echo "== preparing the dataset once (host 0)"
tpu_ssh 0 "cd $REMOTE_DIR && .venv/bin/python experiments/prepare_tfds.py \
  --config=$CONFIG --data_dir=$TFDS_DATA_DIR"

echo "== training on every host: $CONFIG -> $WORKDIR"
coordinator=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
  --format='value(networkEndpoints[0].ipAddress)')
# printf %q keeps flag values with spaces or quotes intact through the remote shell.
tpu_ssh all "cd $REMOTE_DIR && JAX_COORDINATOR_ADDRESS=$coordinator:8476 \
  .venv/bin/python -m transformer_jax.main \
  --config=$CONFIG --workdir=$WORKDIR --config.data.data_dir=$TFDS_DATA_DIR $(printf '%q ' "$@")"
