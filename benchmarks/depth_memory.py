"""Compile time and peak memory of the train step as depth grows, per remat policy.

  python benchmarks/depth_memory.py                       # XLA:CPU, one device
  python benchmarks/depth_memory.py --topology=v5e-8      # the TPU compiler (libtpu)

For N = 6, 12, 24 encoder and decoder layers and each ``model.remat`` policy
(none, dots, full), compiles the train step of the base model's widths (or, with
``--small``, d_model 256)
(``transformer_jax.dry_run.run``: abstract parameters, nothing allocated) for a batch
of ``--tokens`` tokens a side at length ``--length``, and prints the compile time and
the per-device temporaries and peak from the compiler's memory analysis. Figures
depend on the machine and its load; the script prints both.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

_GIB = 2**30


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--depths', default='6,12,24')
  parser.add_argument('--remat', default='none,dots,full')
  parser.add_argument('--topology', default=None, help='TPU slice, e.g. v5e-8.')
  parser.add_argument('--mesh', default='-1,1,1', help='data,fsdp,tensor sizes.')
  parser.add_argument('--tokens', type=int, default=4096)
  parser.add_argument('--length', type=int, default=128)
  parser.add_argument('--small', action='store_true',
                      help='d_model 256, 4 heads, d_ff 1024, vocab 8000 (faster compiles).')
  args = parser.parse_args()

  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax
  from configs import wmt14_en_de_base
  from transformer_jax import dry_run
  from transformer_jax import topology

  devices = topology.tpu_devices(args.topology) if args.topology else jax.devices()[:1]
  print(f'{len(devices)} x {devices[0].device_kind}; host {os.cpu_count()} cores, '
        f'load average {os.getloadavg()[0]:.1f} at start')
  print('| N | remat | compile s | temporaries GiB | peak GiB |')
  print('|---|---|---|---|---|')
  for depth in map(int, args.depths.split(',')):
    for policy in args.remat.split(','):
      config = wmt14_en_de_base.get_config()
      config.model.num_encoder_layers = config.model.num_decoder_layers = depth
      config.model.remat = policy
      if args.small:
        config.model.d_model, config.model.num_heads, config.model.d_ff = 256, 4, 1024
        config.data.vocab_size = 8000
      config.data.tokens_per_batch = args.tokens
      config.data.bucket_lengths = (args.length,)
      config.data.max_length = args.length
      if args.topology:
        config.model.dtype = 'bfloat16'
      config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (
          int(x) for x in args.mesh.split(','))
      start = time.perf_counter()
      report = dry_run.run(config, devices=devices, compile_only=bool(args.topology))
      seconds = time.perf_counter() - start
      print(f'| {depth} | {policy} | {seconds:.1f} | {report.temp_bytes / _GIB:.3f} | '
            f'{report.peak_bytes / _GIB:.3f} |', flush=True)
  print(f'load average {os.getloadavg()[0]:.1f} at the end')


if __name__ == '__main__':
  main()
