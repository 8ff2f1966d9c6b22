"""The train step with and without glibc's huge-page malloc tunable (host_memory).

  .venv/bin/python benchmarks/host_memory.py [--steps=10] [--repeats=3]

Each repeat starts two fresh processes, one after the other: ``off`` with
``TRANSFORMER_JAX_HUGE_PAGES=0`` semantics (no ``glibc.malloc.hugetlb``) and ``on``
with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, the environment training re-executes
itself with. Each compiles ``train.TrainSetup``'s jitted step for configs/multi30k.py
on one packed batch of 40 rows of 100 tokens (the shape of the README's figures;
configs/multi30k.py takes 20 rows a step), runs 3 untimed steps and then ``--steps``
timed ones, and reports wall time per step, its own user and system CPU seconds per
step, minor page faults per step and the loss after the last step (the same in both:
the tunable changes where memory comes from, not what is computed). Interleaved, so
both see the same load.
"""

import json
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import machine  # noqa: E402  (benchmarks/machine.py)

_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per process.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Process pairs, interleaved.')
_CHILD = flags.DEFINE_bool('child', False, 'Internal: time the step in this process.')

ROWS, LENGTH, VOCAB = 40, 100, 8000
VARIANTS = ('off', 'on')


def _time_step_here(steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import multi30k  # pylint: disable=g-import-not-at-top
  from transformer_jax import sharding  # pylint: disable=g-import-not-at-top
  from transformer_jax.train import loop as train  # pylint: disable=g-import-not-at-top

  config = multi30k.get_config()
  config.mesh.data = 1
  mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
  rng = np.random.RandomState(0)
  # Two packed pairs a row: segment ids 1 and 2, positions restarting at the second.
  segments = np.repeat([[1, 2]], LENGTH // 2, axis=1).repeat(ROWS, axis=0).astype(np.int32)
  positions = np.tile(np.arange(LENGTH // 2), 2)[None].repeat(ROWS, axis=0).astype(np.int32)
  batch = {'inputs': rng.randint(4, VOCAB, (ROWS, LENGTH)).astype(np.int32),
           'targets': rng.randint(4, VOCAB, (ROWS, LENGTH)).astype(np.int32),
           'inputs_segmentation': segments, 'targets_segmentation': segments,
           'inputs_position': positions, 'targets_position': positions}
  batch = train.shard_batch(batch, mesh)
  setup = train.TrainSetup.create(config, VOCAB, mesh)
  compiled = setup.compiled_train_step(batch)
  state = setup.init_state()

  def run(n):
    nonlocal state
    for _ in range(n):
      with jax.set_mesh(mesh):
        state, sums = compiled(state, batch)
      jax.block_until_ready(sums)
    return sums

  run(3)
  usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  sums = run(steps)
  usage1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  return {'wall': (wall1 - wall0) / steps,
          'user': (usage1.ru_utime - usage0.ru_utime) / steps,
          'system': (usage1.ru_stime - usage0.ru_stime) / steps,
          'faults': (usage1.ru_minflt - usage0.ru_minflt) / steps,
          'loss': float(sums['loss_sum'] / sums['tokens'])}


def _child_environment(variant: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  if variant == 'on':
    env['GLIBC_TUNABLES'] = 'glibc.malloc.hugetlb=1'
  return env


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(_time_step_here(_STEPS.value)))
    return
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      thp = f.read().strip()
  except OSError:
    thp = 'unavailable'
  load_before = os.getloadavg()
  results = {v: [] for v in VARIANTS}
  for _ in range(_REPEATS.value):
    for variant in VARIANTS:
      out = subprocess.run([sys.executable, os.path.abspath(__file__), '--child',
                            f'--steps={_STEPS.value}'], capture_output=True, text=True,
                           env=_child_environment(variant), check=True)
      results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
  print(f'Machine: {os.cpu_count()} x {machine.cpu_model()}, '
        f'{platform.libc_ver()[0]} {platform.libc_ver()[1]}, transparent huge pages: {thp}; '
        f'load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after.')
  print(f'configs/multi30k.py train step, packed batch {ROWS}x{LENGTH}, vocab {VOCAB}, fp32; '
        f'{_STEPS.value} steps per process, {_REPEATS.value} processes per variant '
        '(interleaved), medians:')
  print(f'{"hugetlb":8} {"wall ms/step":>13} {"tgt tok/s":>10} {"user ms":>8} '
        f'{"system ms":>10} {"faults/step":>12} {"loss":>9}')
  for variant in VARIANTS:
    rows = results[variant]

    def median(key, rows=rows):
      return sorted(r[key] for r in rows)[len(rows) // 2]
    print(f'{variant:8} {1e3 * median("wall"):13.0f} {ROWS * LENGTH / median("wall"):10,.0f} '
          f'{1e3 * median("user"):8.0f} {1e3 * median("system"):10.0f} '
          f'{median("faults"):12,.0f} {rows[-1]["loss"]:9.6f}')
  print('Each process, wall ms/step: ' + '; '.join(
      f'{v} ' + ' '.join(f'{1e3 * r["wall"]:.0f}' for r in results[v]) for v in VARIANTS))


if __name__ == '__main__':
  app.run(main)
