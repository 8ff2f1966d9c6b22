"""The TPU table: base and big on several slices and meshes, from the real TPU compiler.

  python benchmarks/tpu_dry_run.py --out=experiments/TPU_DRY_RUN.md

compiles the train step (``transformer_jax.dry_run.run``, the paper's ~25k-token
batch at the longest bucket, bf16 compute, fp32 parameters and Adam) for each slice
and mesh with libtpu on this machine, which needs no TPU, and writes a markdown table:
per-chip peak HBM against capacity, whether it fits (the TPU compiler refuses a
program that does not, saying by how much), the compiler's estimated step time and
the MFU it implies, and the recommended mesh (the fastest that fits). Needs
``pip install -e ".[tpu]"``. Each compile takes minutes of CPU; ``--models``,
``--slices`` and ``--meshes`` select a part.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
import machine  # benchmarks/machine.py

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

_GIB = 2**30
MODELS = {'base': 'configs/wmt14_en_de_base.py', 'big': 'configs/wmt14_en_de_big.py'}
# (data, fsdp, tensor) with -1 for "the rest of the devices".
MESHES = {'dp': (-1, 1, 1), 'fsdp': (1, -1, 1), 'fsdp+tp2': (1, -1, 2),
          'dp2+fsdp': (2, -1, 1)}


@dataclasses.dataclass
class Row:
  model: str
  slice: str
  mesh: str
  sizes: tuple[int, int, int] = ()
  chips: int = 0
  hbm_gib: float = 0.0  # Per device.
  peak_gib: float | None = None
  fits: bool | None = None
  step_ms: float | None = None
  mfu: float | None = None
  compile_s: float = 0.0
  note: str = ''


def _load_config(path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _oom(message: str) -> float | None:
  """GiB the TPU compiler says the program needed, from its out-of-memory error."""
  m = re.search(r'Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm', message)
  if not m:
    return None
  scale = {'K': 2**-20, 'M': 2**-10, 'G': 1.0, 'T': 2**10}
  return float(m.group(1)) * scale[m.group(2)]


def measure(model: str, slice_name: str, mesh_name: str) -> Row:
  from transformer_jax import dry_run
  from transformer_jax import sharding
  from transformer_jax import topology
  devices = topology.tpu_devices(slice_name)
  spec = topology.chip_spec(devices)
  config = _load_config(MODELS[model])
  config.model.dtype = 'bfloat16'
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = MESHES[mesh_name]
  row = Row(model, slice_name, mesh_name, chips=len(devices),
            hbm_gib=spec.hbm_bytes / _GIB if spec else 0.0)
  try:
    row.sizes = sharding.mesh_shape_from_config(config.mesh, len(devices))
  except ValueError as e:
    row.note = str(e)
    return row
  start = time.perf_counter()
  try:
    report = dry_run.run(config, devices=devices, compile_only=True,
                         config_name=model)
  except ValueError as e:  # The mesh does not divide the batch or heads.
    row.note = str(e).split(': ', 1)[-1]
    return row
  except Exception as e:  # XlaRuntimeError from the TPU compiler.
    row.compile_s = time.perf_counter() - start
    needed = _oom(str(e))
    if needed is None:
      raise
    row.peak_gib, row.fits = needed, False
    row.note = 'TPU compiler: out of HBM'
    return row
  row.compile_s = time.perf_counter() - start
  row.peak_gib = report.peak_bytes / _GIB
  row.fits = report.fits
  if report.cost.estimated_seconds:
    row.step_ms = 1e3 * report.cost.estimated_seconds
  row.mfu = report.mfu
  return row


def _fmt(row: Row) -> str:
  mesh = 'x'.join(map(str, row.sizes)) if row.sizes else MESHES[row.mesh]
  if row.peak_gib is None:
    return (f'| {row.model} | {row.slice} | {row.mesh} {mesh} | | n/a | | | '
            f'{row.note} |')
  fits = {True: 'yes', False: 'no'}.get(row.fits, '?')
  step = f'{row.step_ms:.0f} ms' if row.step_ms else ''
  mfu = f'{100 * row.mfu:.0f}%' if row.mfu else ''
  return (f'| {row.model} | {row.slice} | {row.mesh} {mesh} | '
          f'{row.peak_gib:.1f} / {row.hbm_gib:.0f} GiB | {fits} | {step} | {mfu} | '
          f'{row.note or f"compiled in {row.compile_s:.0f} s"} |')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='base,big')
  parser.add_argument('--slices', default='v4-8,v5e-8,v5e-16,v5p-32,v6e-8')
  parser.add_argument('--meshes', default='dp,fsdp,fsdp+tp2')
  parser.add_argument('--out', default=None, help='Also write the table here.')
  args = parser.parse_args()
  rows: list[Row] = []
  header = ['| model | slice | mesh (data x fsdp x tensor) | peak HBM per device | fits '
            '| est. step | implied MFU | note |', '|---|---|---|---|---|---|---|---|']
  print('\n'.join(header), flush=True)
  for model in args.models.split(','):
    for slice_name in args.slices.split(','):
      for mesh_name in args.meshes.split(','):
        row = measure(model, slice_name, mesh_name)
        rows.append(row)
        print(_fmt(row), flush=True)
  best = []
  for model in args.models.split(','):
    for slice_name in args.slices.split(','):
      ok = [r for r in rows if r.model == model and r.slice == slice_name and r.fits
            and r.step_ms]
      if ok:
        r = min(ok, key=lambda r: r.step_ms)
        best.append(f'| {model} | {slice_name} | {r.mesh} '
                    f'{"x".join(map(str, r.sizes))} | {r.step_ms:.0f} ms | '
                    f'{r.peak_gib:.1f} / {r.hbm_gib:.0f} GiB |')
  summary = ['| model | slice | recommended mesh | est. step | peak HBM per device |',
             '|---|---|---|---|---|'] + best
  print('\n' + '\n'.join(summary))
  load = os.getloadavg()
  host = (f'{machine.cpu_model()}, {os.cpu_count()} cores, '
          f'load average {load[0]:.1f} at the end')
  if args.out:
    with open(args.out, 'w') as f:
      f.write('# TPU dry runs: the real TPU compiler, no TPU\n\n'
              f'Written by `python benchmarks/tpu_dry_run.py --models={args.models} '
              f'--slices={args.slices} --meshes={args.meshes} --out={args.out}` on a '
              f'CPU machine ({host}) with libtpu 0.0.42.1.\n\n'
              + '\n'.join(header + [_fmt(r) for r in rows]) + '\n\n'
              '## Recommended mesh (fits, lowest estimated step time)\n\n'
              + '\n'.join(summary) + '\n')


if __name__ == '__main__':
  main()
