"""Where the train step's time goes on this machine: a per-part breakdown from jax's profiler.

  .venv/bin/python benchmarks/train_profile.py [--config=multi30k|multi30k_tiny] [--batch=85x48] \
      [--d_ff=1024]

Compiles ``train.TrainSetup``'s jitted step (the one training uses) for one batch
shape of the Multi30k bucketing, runs it under ``jax.profiler`` and sums the
duration of every executed XLA thunk (one per fused kernel). Each thunk is assigned
to a part of the model from the Python call stack XLA keeps in the HLO metadata
(the innermost frame that names a part wins; backward kernels carry the stack of
the forward operation they differentiate):

  output projection  Decoder.logits / Embedding.attend ([B, T, D] x [D, V])
  loss               label-smoothed cross-entropy over [B, T, V]
  attention          scores, mask, softmax and the weighted sum of values
  attention proj.    the Q, K, V and output projections
  FFN                the two position-wise layers
  layer norm, dropout (mask bits and scaling), embeddings, optimizer (Adam,
  global norm), other (masks, shifting, bookkeeping).

Two variants run interleaved in the same process: ``before``, the loss as it was
(optax's cross-entropy against a [B, T, V] smoothed one-hot plus a second,
integer-label pass for the NLL) and ``after``, ``optim.label_smoothed_loss`` (one
logsumexp pass). Whole steps are timed outside the profiler as the fastest of
several blocks, with this process's CPU seconds per step beside the wall time:
CPU seconds move least when other processes share the cores. The input pipeline's
cost per batch (host time, overlapped with the step by its prefetch thread) comes
from ``benchmarks/input_pipeline.py``.
"""

import collections
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import multi30k  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from transformer_jax import sharding  # noqa: E402
from transformer_jax.train import loop as train  # noqa: E402
from transformer_jax.train import optim  # noqa: E402

import timing  # noqa: E402

CONFIGS = {
    # configs/multi30k.py's default (3+3 layers, d_model 256, d_ff 512) and its
    # Transformer-Tiny variant (configs/multi30k.py:tiny).
    'multi30k': None,
    'multi30k_tiny': 'tiny',
}

# (part, function names that mark it), innermost match first.
PARTS = (
    ('output projection', ('Decoder.logits', 'Embedding.attend', 'OutputProjection.__call__')),
    ('loss', ('label_smoothed_loss', 'softmax_cross_entropy',
              'softmax_cross_entropy_with_integer_labels', 'smooth_labels')),
    ('attention', ('MultiHeadAttention.attend', 'einsum_attention')),
    ('attention proj.', ('MultiHeadAttention._project', 'MultiHeadAttention.output',
                         'MultiHeadAttention.project_query',
                         'MultiHeadAttention.project_key_value')),
    ('FFN', ('FeedForward.__call__',)),
    ('layer norm', ('LayerNorm.__call__', '_compute_stats', '_normalize')),
    ('dropout', ('Dropout.__call__', 'reseed', 'RngStream.__call__')),
    ('embeddings', ('Embedding.__call__', 'PositionalEncoding.__call__',
                    'sinusoidal_positions')),
    ('optimizer', ('update_fn', 'apply_updates', 'global_norm', 'tree_update_moment',
                   'tree_update_moment_per_elem_norm', 'safe_increment', 'tree_norm',
                   'tree_sum', 'bias_correction', 'tree_bias_correction')),
)
# Executor bookkeeping events that enclose the kernels' own events.
_CONTAINERS = ('ThunkExecutor', 'SlinkyThreadPool', 'ThreadpoolListener')

_CONFIG = flags.DEFINE_enum('config', 'multi30k', list(CONFIGS), 'Model shapes.')
_BATCH = flags.DEFINE_string('batch', '85x48', 'Rows x padded length (a Multi30k '
                             'bucket of 4096 tokens).')
_VOCAB = flags.DEFINE_integer('vocab', 8000, 'Vocabulary size.')
_D_FF = flags.DEFINE_integer('d_ff', 0, "FFN width (0: the config's).")
_STEPS = flags.DEFINE_integer('steps', 5, 'Profiled steps.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed blocks of --steps steps.')


def instruction_parts(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> part, from the stack frames in the module's metadata."""
  sections = {}
  current = None
  for line in hlo_text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      current = sections.setdefault(line, {})
      continue
    if current is not None:
      m = re.match(r'^(\d+) (.*)$', line)
      if not m:
        current = None
        continue
      current[int(m.group(1))] = m.group(2)
  functions = {k: v.strip('"') for k, v in sections.get('FunctionNames', {}).items()}
  location_function = {}
  for k, v in sections.get('FileLocations', {}).items():
    location_function[k] = functions.get(int(re.search(r'function_name_id=(\d+)', v)[1]))
  frames = {}
  for k, v in sections.get('StackFrames', {}).items():
    frames[k] = (int(re.search(r'file_location_id=(\d+)', v)[1]),
                 int(re.search(r'parent_frame_id=(\d+)', v)[1]))

  # Some XLA versions print a frame's parent as the parent's id plus one (every
  # root frame then names itself, which the other reading cannot mean).
  offset = 1 if any(k == parent for k, (_, parent) in frames.items()) else 0

  def stack(frame_id):
    names, seen = [], set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      location, parent = frames[frame_id]
      names.append(location_function.get(location, ''))
      frame_id = parent - offset
    return names  # Innermost first.

  def part_of(frame_id):
    for name in stack(frame_id):
      base = name.split('.<locals>')[0]
      for part, markers in PARTS:
        if any(base == m or base.endswith('.' + m) for m in markers):
          return part
    return 'other'

  parts = {}
  # Fusions and custom calls are what thunks are named after; a fusion's
  # metadata is its root instruction's.
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?stack_frame_id=(\d+)',
                       hlo_text, re.M):
    parts[m.group(1)] = part_of(int(m.group(2)))
  return parts


def profile_thunks(run, steps: int) -> dict[str, float]:
  """Runs ``run()`` ``steps`` times under the profiler: thunk name -> seconds in all."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  folder = tempfile.mkdtemp(prefix='train_profile_')
  jax.profiler.start_trace(folder)
  for _ in range(steps):
    run()
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(folder, '**', '*.xplane.pb'), recursive=True))[-1]
  space = xplane_pb2.XSpace()
  with open(path, 'rb') as f:
    space.ParseFromString(f.read())
  totals = collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      if not line.name.startswith('tf_XLA'):  # XLA's CPU executor threads.
        continue
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if not name.startswith(_CONTAINERS):
          totals[name] += event.duration_ps * 1e-12
  return totals


def one_hot_label_smoothed_loss(logits, targets, label_smoothing, pad_id=0):
  """The loss before: optax's cross-entropy against a [B, T, V] smoothed one-hot."""
  weights = (targets != pad_id).astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  soft = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), label_smoothing)
  loss = optax.softmax_cross_entropy(logits, soft)
  return jnp.sum(loss * weights), jnp.sum(nll * weights), jnp.sum(weights)


def _variant(config, vocab, mesh, batch, loss_fn):
  """A TrainSetup whose step uses ``loss_fn``, compiled for ``batch``."""
  original = optim.label_smoothed_loss
  optim.label_smoothed_loss = loss_fn  # Read when the step is traced.
  try:
    setup = train.TrainSetup.create(config, vocab, mesh)
    compiled = setup.compiled_train_step(batch)
  finally:
    optim.label_smoothed_loss = original
  return setup, compiled


def main(argv):
  del argv
  rows, length = (int(x) for x in _BATCH.value.split('x'))
  config = multi30k.get_config(CONFIGS[_CONFIG.value])
  if _D_FF.value < 0:
    raise app.UsageError(f"--d_ff={_D_FF.value}: the FFN width must be positive "
                         "(0: the config's)")
  if _D_FF.value:
    config.model.d_ff = _D_FF.value
  config.mesh.data = 1
  mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
  rng = np.random.RandomState(0)
  batch = train.shard_batch({
      'inputs': rng.randint(4, _VOCAB.value, (rows, length)).astype(np.int32),
      'targets': rng.randint(4, _VOCAB.value, (rows, length)).astype(np.int32)}, mesh)
  variants = {}
  for name, loss_fn in (('before', one_hot_label_smoothed_loss),
                        ('after', optim.label_smoothed_loss)):
    setup, compiled = _variant(config, _VOCAB.value, mesh, batch, loss_fn)
    holder = {'state': setup.init_state()}

    def run(setup=setup, compiled=compiled, holder=holder):
      with jax.set_mesh(mesh):
        holder['state'], sums = compiled(holder['state'], batch)
      holder['sums'] = sums
      jax.block_until_ready(sums)

    run()
    run()
    variants[name] = {'run': run, 'parts': instruction_parts(compiled.as_text()),
                      'holder': holder}
  params = sum(x.size for x in jax.tree.leaves(variants['after']['holder']['state']['params']))
  load_before = os.getloadavg()[0]
  times = timing.interleaved({n: v['run'] for n, v in variants.items()}, _STEPS.value,
                             _REPEATS.value)
  for name, v in variants.items():
    v.update(times[name])
  for v in variants.values():
    thunks = profile_thunks(v['run'], _STEPS.value)
    v['by_part'] = collections.Counter()
    for thunk, seconds in thunks.items():
      v['by_part'][v['parts'].get(thunk, 'other')] += seconds / _STEPS.value
  print(f'Machine: {os.cpu_count()}-core CPU ({jax.devices()[0].device_kind}), one device; '
        f'load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after. Config '
        f'{_CONFIG.value} (d_ff {config.model.d_ff}, {params:,} parameters), batch '
        f'{rows}x{length}, vocab {_VOCAB.value}, fp32.')
  print(f'{"variant":8} {"CPU ms/step":>12} {"wall ms (fastest)":>18} {"wall median":>12} '
        f'{"tgt tok/s":>10} {"loss":>8}')
  for name, v in variants.items():
    best = int(np.argmin(v['walls']))
    loss = float(v['holder']['sums']['loss_sum'] / v['holder']['sums']['tokens'])
    print(f'{name:8} {1e3 * np.min(v["cpus"]):12.0f} {1e3 * v["walls"][best]:18.0f} '
          f'{1e3 * np.median(v["walls"]):12.0f} {rows * length / v["walls"][best]:10,.0f} '
          f'{loss:8.4f}')
  print('Kernel time per step by part (ms, summed over executor threads; under load it '
        'includes time the threads were preempted):')
  names = list(variants)
  print(f'  {"part":18} ' + ' '.join(f'{n:>14}' for n in names))
  order = [p for p, _ in variants['before']['by_part'].most_common()]
  for part in order + [p for p in variants['after']['by_part'] if p not in order]:
    cells = []
    for n in names:
      by_part = variants[n]['by_part']
      cells.append(f'{1e3 * by_part[part]:7.0f} ({100 * by_part[part] / sum(by_part.values()):3.0f}%)')
    print(f'  {part:18} ' + ' '.join(f'{c:>14}' for c in cells))


if __name__ == '__main__':
  app.run(main)
