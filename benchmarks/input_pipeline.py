"""Throughput of the input pipeline alone (no model) on Multi30k.

Prints examples/s and target tokens/s of training batches, and the ratio to the
train step's speed (``--step_tokens_per_s``: target tokens a second of the base
model's train step on the same machine, about 210 on a 2-core CPU), which the
pipeline must beat by 5x or more so that it never stalls training::

  MULTI30K_DIR=../shared/data/multi30k .venv/bin/python benchmarks/input_pipeline.py \
      --config=configs/multi30k.py --workdir=/tmp/bench_data [--config.data.packing=True]
"""

import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from transformer_jax.data import pipeline as input_pipeline
import machine  # benchmarks/machine.py

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/multi30k.py', 'Run config.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/bench_input_pipeline',
                               'Holds the vocabulary (trained on first use).')
_BATCHES = flags.DEFINE_integer('batches', 300, 'Training batches to time.')
_STEP_TOKENS = flags.DEFINE_float('step_tokens_per_s', 210.0,
                                  "Target tokens/s of the base config's train step here.")


def _machine() -> str:
  return f'{machine.cpu_model()}, {os.cpu_count()} cores'


def main(argv):
  del argv
  config = _CONFIG.value
  start = time.perf_counter()
  _, train_iter, _ = input_pipeline.get_datasets(config, _WORKDIR.value, process_index=0,
                                                 process_count=1)
  setup_s = time.perf_counter() - start
  next(train_iter)  # Start the prefetch thread outside the timing.
  examples = tokens = padded = 0
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    batch = next(train_iter)
    targets = batch['targets']
    if 'targets_segmentation' in batch:
      examples += int(targets.shape[0] and batch['targets_segmentation'].max(1).sum())
    else:
      examples += int((targets[:, 0] > 0).sum())
    tokens += int((targets > 0).sum())
    padded += targets.size
  seconds = time.perf_counter() - start
  train_iter.close()
  d = config.data
  print(f'Machine: {_machine()}')
  print(f'Source: {d.source} ({train_iter.num_pairs} training pairs), packing={d.packing}, '
        f'tokens_per_batch={d.tokens_per_batch}, batch shapes {train_iter.spec.shapes()}')
  print(f'Setup (data preparation + vocabulary): {setup_s:.1f} s')
  print(f'{_BATCHES.value} batches in {seconds:.2f} s: {examples / seconds:,.0f} examples/s, '
        f'{tokens / seconds:,.0f} target tokens/s ({padded / seconds:,.0f} with padding; '
        f'{tokens / padded:.0%} of slots are real tokens)')
  print(f'Ratio to the train step ({_STEP_TOKENS.value:g} target tokens/s): '
        f'{tokens / seconds / _STEP_TOKENS.value:,.0f}x (needs >= 5x)')


if __name__ == '__main__':
  app.run(main)
