"""Compile time and memory of the train step as depth grows, per layout and remat policy.

  python benchmarks/depth_memory.py --small                  # XLA:CPU, one device
  python benchmarks/depth_memory.py --topology=v5e-8 --remat=none --depths=6,24
                                                             # the TPU compiler (libtpu)

For N = 6, 12, 24 encoder and decoder layers, ``model.scan_layers`` off and on and
each ``model.remat`` policy (none, dots, full), compiles the train step of the base
model's widths (or, with ``--small``, d_model 256, 4 heads, d_ff 1024, vocabulary
8000) through ``transformer_jax.dry_run.run`` (abstract parameters, nothing
allocated) for a batch of ``--tokens`` tokens a side at length ``--length``, and
prints a markdown row per configuration: the wall time of building and compiling
the step, and the compiler's per-device memory analysis: arguments (parameters,
Adam state, batch), temporaries (activations kept for the backward pass, gradients,
scratch) and the peak ``arguments + outputs - donated + temporaries``. On a TPU
topology the compute dtype is bfloat16 and the mesh is ``--mesh``. Compile time
depends on the machine and its load; the script prints both, and ``--out`` appends
the rows to a file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import machine  # benchmarks/machine.py

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

_GIB = 2**30


def _config(depth: int, scan: bool, policy: str, args):
  from configs import wmt14_en_de_base
  config = wmt14_en_de_base.get_config()
  config.model.num_encoder_layers = config.model.num_decoder_layers = depth
  config.model.remat = policy
  config.model.scan_layers = scan
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
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--depths', default='6,12,24')
  parser.add_argument('--scan', default='off,on', help='model.scan_layers values.')
  parser.add_argument('--remat', default='none,dots,full')
  parser.add_argument('--topology', default=None, help='TPU slice, e.g. v5e-8.')
  parser.add_argument('--mesh', default='-1,1,1', help='data,fsdp,tensor sizes.')
  parser.add_argument('--tokens', type=int, default=4096)
  parser.add_argument('--length', type=int, default=128)
  parser.add_argument('--small', action='store_true',
                      help='d_model 256, 4 heads, d_ff 1024, vocab 8000 (faster compiles).')
  parser.add_argument('--out', default=None, help='Append the table rows to this file.')
  args = parser.parse_args()

  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax
  from transformer_jax import dry_run
  from transformer_jax import topology

  devices = topology.tpu_devices(args.topology) if args.topology else jax.devices()[:1]
  head = (f'{len(devices)} x {devices[0].device_kind}, mesh {args.mesh}, '
          f'{"d_model 256" if args.small else "base widths"}, {args.tokens} tokens '
          f'a side at length {args.length}; host {machine.cpu_model()} '
          f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start')
  lines = [head, '',
           '| N | scan | remat | compile s | arguments GiB | temporaries GiB | peak GiB |',
           '|---|---|---|---|---|---|---|']
  print('\n'.join(lines), flush=True)
  for depth in map(int, args.depths.split(',')):
    for scan in args.scan.split(','):
      for policy in args.remat.split(','):
        config = _config(depth, scan == 'on', policy, args)
        start = time.perf_counter()
        report = dry_run.run(config, devices=devices, compile_only=bool(args.topology))
        seconds = time.perf_counter() - start
        row = (f'| {depth} | {scan} | {policy} | {seconds:.1f} | '
               f'{report.argument_bytes / _GIB:.3f} | {report.temp_bytes / _GIB:.3f} | '
               f'{report.peak_bytes / _GIB:.3f} |')
        lines.append(row)
        print(row, flush=True)
        jax.clear_caches()  # Each row compiles from scratch.
  tail = f'load average {os.getloadavg()[0]:.1f} at the end'
  lines.append(tail)
  print(tail)
  if args.out:
    with open(args.out, 'a') as f:
      f.write('\n'.join(lines) + '\n\n')


if __name__ == '__main__':
  main()
