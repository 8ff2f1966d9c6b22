"""Train-step time of config variants, side by side: which shapes buy more updates an hour.

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/config_variants.py \
      --variant=dff512:model.d_ff=512 --variant=4+2:model.num_encoder_layers=4,model.num_decoder_layers=2

Each ``--variant`` is ``NAME:KEY=VALUE[,KEY=VALUE...]``, overrides of
``configs/multi30k.py`` (``--config_arg`` picks its variant) written as on the
training command line without ``--config.``; ``config`` (no overrides) is always
timed first. Every variant's jitted train step (``train.TrainSetup``, the one
training runs: dropout on, donation) is compiled for one packed batch of random
token ids (``data.tokens_per_batch`` / ``data.max_length`` rows of
``data.max_length``), then all variants are timed in interleaved blocks, so that
they see the same load. Printed per variant: the fastest block's wall ms a step and
the median, CPU ms a step (moves least when other processes share the cores), target
token slots a second, the parameter count, and the updates a 60-minute budget holds at
the fastest block's pace relative to ``config`` (the ratio is what carries to
another machine; the absolute count depends on this machine's speed).

A variant that changes the vocabulary changes how many tokens a sentence takes, so
its per-step figure says nothing about sentences a second by itself.
"""

import ast
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import multi30k  # noqa: E402
from transformer_jax import sharding  # noqa: E402
from transformer_jax.train import loop as train  # noqa: E402

import machine  # noqa: E402
import timing  # noqa: E402

_VARIANTS = flags.DEFINE_multi_string(
    'variant', [], 'NAME:KEY=VALUE[,KEY=VALUE...], config overrides without "--config.".')
_CONFIG_ARG = flags.DEFINE_string('config_arg', '', 'configs/multi30k.py argument.')
_STEPS = flags.DEFINE_integer('steps', 4, 'Steps a timed block.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed blocks a variant, interleaved.')


def parse_variant(spec: str) -> tuple[str, dict[str, object]]:
  """'name:a.b=1,c.d=x' -> ('name', {'a.b': 1, 'c.d': 'x'}); values as Python
  literals where they parse as one, else strings."""
  name, sep, body = spec.partition(':')
  if not sep or not name or not body:
    raise app.UsageError(f'--variant={spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]')
  overrides = {}
  for item in body.split(','):
    key, eq, value = item.partition('=')
    if not eq:
      raise app.UsageError(f'--variant={spec!r}: {item!r} is not KEY=VALUE')
    try:
      overrides[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      overrides[key.strip()] = value.strip()
  return name, overrides


def variant_config(overrides: dict[str, object]):
  """configs/multi30k.py with ``overrides`` applied, on one device."""
  config = multi30k.get_config(_CONFIG_ARG.value or None)
  for key, value in overrides.items():
    *path, leaf = key.split('.')
    target = config
    for part in path:
      if not hasattr(target, 'keys') or part not in target:
        raise app.UsageError(f'no config field {key!r}')
      target = target[part]
    if not hasattr(target, 'keys') or leaf not in target:
      raise app.UsageError(f'no config field {key!r}')
    target[leaf] = value
  config.mesh.data = 1
  return config


def main(argv):
  del argv
  specs = [('config', {})] + [parse_variant(s) for s in _VARIANTS.value]
  mesh = sharding.create_mesh(variant_config({}).mesh, jax.devices()[:1])
  rng = np.random.RandomState(0)
  variants = {}
  for name, overrides in specs:
    config = variant_config(overrides)
    vocab = config.data.vocab_size
    rows = config.data.tokens_per_batch // config.data.max_length
    length = config.data.max_length
    batch = train.shard_batch({
        'inputs': rng.randint(4, vocab, (rows, length)).astype(np.int32),
        'targets': rng.randint(4, vocab, (rows, length)).astype(np.int32)}, mesh)
    setup = train.TrainSetup.create(config, vocab, mesh)
    compiled = setup.compiled_train_step(batch)
    holder = {'state': setup.init_state()}

    def run(compiled=compiled, holder=holder, batch=batch):
      with jax.set_mesh(mesh):
        holder['state'], sums = compiled(holder['state'], batch)
      jax.block_until_ready(sums)

    run()
    run()
    params = sum(x.size for x in jax.tree.leaves(holder['state']['params']))
    variants[name] = {'run': run, 'slots': rows * length, 'params': params}
  load_before = os.getloadavg()[0]
  times = timing.interleaved({n: v['run'] for n, v in variants.items()}, _STEPS.value,
                             _REPEATS.value)
  for name, v in variants.items():
    v.update(times[name])
  print(f'Machine: {machine.cpu_model()}, {os.cpu_count()} cores, one device; load average '
        f'{load_before:.2f} before, {os.getloadavg()[0]:.2f} after; '
        f'{_REPEATS.value} interleaved blocks of {_STEPS.value} steps, fp32.')
  print(f'{"variant":12} {"params":>11} {"wall ms (fastest)":>18} {"wall median":>12} '
        f'{"CPU ms/step":>12} {"slots/s":>9} {"updates/h vs config":>20}')
  base = min(variants['config']['walls'])
  for name, v in variants.items():
    fastest = min(v['walls'])
    print(f'{name:12} {v["params"]:11,} {1e3 * fastest:18.0f} '
          f'{1e3 * np.median(v["walls"]):12.0f} {1e3 * min(v["cpus"]):12.0f} '
          f'{v["slots"] / fastest:9,.0f} {3600 / fastest:9,.0f} ({base / fastest:5.2f}x)')


if __name__ == '__main__':
  app.run(main)
