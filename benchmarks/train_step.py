"""Steady-state speed of the train step: target tokens/s, step time, memory, MFU.

  .venv/bin/python benchmarks/train_step.py [--shapes=tiny,base] [--dtypes=float32,bfloat16]

Runs ``train.TrainSetup``'s jitted step (the one training uses: sharded state,
donation, dropout on) on one device over synthetic full-length batches, after
compiling and warming up. Shapes:

* tiny: d_model 128, 2+2 layers, d_ff 512, 4 heads, vocab 8000, batch 32 x 64;
* base: the paper's base model (Table 3) with vocab 32000, batch 8 x 256.

The shapes are those of the Flax WMT example's train step; its code is not part of
this repository, so compare with it only side by side on one machine (README,
Speed), never against its figure from another machine or load. MFU is against the FLOP/s this
device reaches on a large float32 matmul (measured here first), since CPUs have
no fixed peak; on accelerators the device's bf16 peak from flops.PEAK_FLOPS.
"""

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from transformer_jax import sharding  # noqa: E402
from transformer_jax.train import flops  # noqa: E402
from transformer_jax.train import loop as train  # noqa: E402
import timing  # noqa: E402

SHAPES = {
    # name: (model overrides, vocab, batch, length)
    'tiny': (dict(d_model=128, num_encoder_layers=2, num_decoder_layers=2, d_ff=512,
                  num_heads=4), 8000, 32, 64),
    'base': (dict(), 32000, 8, 256),
}

_SHAPES = flags.DEFINE_list('shapes', ['tiny', 'base'], 'Which shapes to time.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes.')
_STEPS = flags.DEFINE_integer('steps', 0, 'Timed steps (0: 20 for tiny, 4 for base).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed blocks; the fastest is reported.')


def matmul_peak_flops(n: int = 2048, reps: int = 10) -> float:
  """FLOP/s of a float32 [n, n] @ [n, n] matmul on the default device."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(reps):  # The fastest, as for the steps.
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def bench(shape: str, dtype: str, steps: int, warmup: int, peak: float,
          repeats: int = 1) -> dict:
  overrides, vocab, batch, length = SHAPES[shape]
  config = default.get_config()
  config.model.update(overrides)
  config.model.dtype = dtype
  config.model.max_len = max(config.model.max_len, length)
  config.mesh.data = 1
  mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
  setup = train.TrainSetup.create(config, vocab, mesh)
  state = setup.init_state()
  rng = np.random.RandomState(0)
  batches = [train.shard_batch({
      'inputs': rng.randint(4, vocab, (batch, length)).astype(np.int32),
      'targets': rng.randint(4, vocab, (batch, length)).astype(np.int32)}, mesh)
             for _ in range(2)]
  start = time.perf_counter()
  compiled = setup.compiled_train_step(batches[0])
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  for i in range(warmup):
    state, sums = setup.train_step(state, batches[i % 2])
  jax.block_until_ready(sums)
  # Other processes share this machine's cores: time several blocks and keep
  # the fastest (as timeit does), with the median beside it.
  walls, cpus = [], []
  for _ in range(repeats):
    cpu_start, start = timing.cpu_seconds(), time.perf_counter()
    for i in range(steps):
      state, sums = setup.train_step(state, batches[i % 2])
    jax.block_until_ready((state, sums))
    walls.append((time.perf_counter() - start) / steps)
    cpus.append((timing.cpu_seconds() - cpu_start) / steps)
  step_s, cpu_s = min(walls), cpus[int(np.argmin(walls))]
  tokens_s = batch * length / step_s
  step_flops = flops.train_flops(setup.model_cfg, batch, length, length)
  return {
      'shape': shape, 'dtype': dtype, 'step_ms': 1e3 * step_s, 'tokens_s': tokens_s,
      'cpu_ms': 1e3 * cpu_s, 'median_ms': 1e3 * float(np.median(walls)),
      'compile_s': compile_s, 'mfu': step_flops / step_s / peak,
      'step_mem_mib': (mem.argument_size_in_bytes + mem.temp_size_in_bytes +
                       mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**20
      if mem else float('nan'),
      'loss': float(sums['loss_sum'] / sums['tokens']),
  }


def main(argv):
  del argv
  device = jax.devices()[0]
  if device.platform == 'cpu':
    peak, peak_name = matmul_peak_flops(), 'measured float32 matmul'
    machine = f'{os.cpu_count()}-core CPU ({device.device_kind}), 1 device'
  else:
    peak = flops.peak_flops_per_device(default.get_config().train) or matmul_peak_flops()
    peak_name, machine = 'device bf16 peak', f'1 x {device.device_kind}'
  print(f'Machine: {machine}; MFU denominator: {peak / 1e9:,.1f} GFLOP/s ({peak_name}).')
  print(f'Load average before: {os.getloadavg()[0]:.2f} (other processes share the '
        f'cores: "step ms" is the fastest of --repeats timed blocks, "median" their median, '
        f'"CPU ms" this process\'s CPU time per step over all threads).')
  header = (f'{"shape":6} {"dtype":9} {"step ms":>9} {"median":>9} {"CPU ms":>9} '
            f'{"tgt tok/s":>10} '
            f'{"MFU":>6} {"step mem MiB":>12} {"compile s":>9}')
  print(header)
  for shape in _SHAPES.value:
    for dtype in _DTYPES.value:
      steps = _STEPS.value or (10 if shape == 'tiny' else 2)
      r = bench(shape, dtype, steps, _WARMUP.value, peak, _REPEATS.value)
      print(f'{r["shape"]:6} {r["dtype"]:9} {r["step_ms"]:9.1f} {r["median_ms"]:9.1f} '
            f'{r["cpu_ms"]:9.1f} '
            f'{r["tokens_s"]:10,.0f} '
            f'{100 * r["mfu"]:5.1f}% {r["step_mem_mib"]:12.1f} {r["compile_s"]:9.1f}',
            flush=True)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f'Peak resident memory of this process: {rss:,.0f} MiB. Load average after: '
        f'{os.getloadavg()[0]:.2f}.')


if __name__ == '__main__':
  app.run(main)
