"""TPU topologies without TPUs, chip specs, and what a compiled step communicates.

With ``libtpu`` installed (the ``jax[tpu]`` extra; here the ``tpu`` and ``test``
extras of pyproject.toml) the real TPU compiler runs on any Linux machine:
``jax.experimental.topologies.get_topology_desc`` returns compile-only devices of a
named slice, and a ``jax.jit`` lowered with ShapeDtypeStructs sharded over a Mesh of
them compiles for it. ``dry_run`` uses that to report a step's per-chip memory,
FLOPs, collectives and the compiler's time estimate before anyone pays for chips.

Topology names are the TPU runtime's ``<generation>:<chips per axis>``, e.g.
``v5e:2x4`` (8 chips), ``v4:2x2x1`` (4 chips), ``v5p:2x2x4`` (16 chips); the usual
slice names (``v5e-8``, ``v4-8``, ``v5p-32``, ``v6e-8``) are accepted too and
translated by :data:`SLICES`.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
from collections.abc import Sequence

_GIB = 2**30

# Cloud slice names -> the runtime's topology names. v4 and v5p count TensorCores
# (two per chip) in their slice names, v5e and v6e count chips.
SLICES = {
    'v4-8': 'v4:2x2x1', 'v4-16': 'v4:2x2x2', 'v4-32': 'v4:2x2x4',
    'v5e-1': 'v5e:1x1', 'v5e-4': 'v5e:2x2', 'v5e-8': 'v5e:2x4', 'v5e-16': 'v5e:4x4',
    'v5e-32': 'v5e:4x8', 'v5e-64': 'v5e:8x8', 'v5e-256': 'v5e:16x16',
    'v5p-8': 'v5p:2x2x1', 'v5p-16': 'v5p:2x2x2', 'v5p-32': 'v5p:2x2x4',
    'v5p-64': 'v5p:2x4x4', 'v5p-128': 'v5p:4x4x4',
    'v6e-1': 'v6e:1x1', 'v6e-4': 'v6e:2x2', 'v6e-8': 'v6e:2x4', 'v6e-16': 'v6e:4x4',
    'v6e-32': 'v6e:4x8', 'v6e-64': 'v6e:8x8', 'v6e-256': 'v6e:16x16',
}


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Published figures of one TPU chip (Cloud TPU system architecture pages)."""
  name: str
  hbm_bytes: int  # Per chip.
  peak_flops: float  # Dense bf16 FLOP/s per chip.


# Keyed by jax's device_kind of the compile-only devices.
CHIPS = {
    'TPU v4': ChipSpec('v4', 32 * _GIB, 275e12),
    'TPU v5 lite': ChipSpec('v5e', 16 * _GIB, 197e12),
    'TPU v5': ChipSpec('v5p', 95 * _GIB, 459e12),
    'TPU v6 lite': ChipSpec('v6e', 32 * _GIB, 918e12),
}


def _has_local_tpu() -> bool:
  """Whether this machine has TPU chips (the paths the TPU runtime opens)."""
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def quiet_libtpu_off_tpu() -> None:
  """Keeps an installed libtpu quiet and lock-free on a machine without TPU chips.

  Off a TPU VM libtpu, loaded whenever jax starts its backends, asks the absent
  metadata server who its workers are (a page of warnings on stderr) and takes
  /tmp/libtpu_lockfile, so a second process (a test worker, another dry run) could
  not compile for a TPU topology. A compile-only client needs neither. Called on
  import of the package; env vars already set win. No-op on a TPU VM.
  """
  if _has_local_tpu():
    return
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


def tpu_devices(name: str) -> list:
  """The compile-only devices of TPU slice ``name`` (``v5e:4x4`` or ``v5e-16``).

  Raises:
    RuntimeError: when libtpu is not installed.
    ValueError: when the runtime does not know the topology.
  """
  quiet_libtpu_off_tpu()
  from jax._src import cloud_tpu_init  # The lookup jax itself uses for libtpu.
  from jax.experimental import topologies
  if cloud_tpu_init.get_tpu_library_path() is None:
    raise RuntimeError(
        'Compiling for a TPU topology needs libtpu: pip install -e ".[tpu]" '
        '(libtpu==0.0.42.1, the jax[tpu] extra of jax 0.10.2).')
  topology = SLICES.get(name, name)
  try:
    return list(topologies.get_topology_desc(
        platform='tpu', topology_name=topology).devices)
  except Exception as e:  # The runtime raises XlaRuntimeError with a long message.
    raise ValueError(f'Unknown TPU topology {name!r} ({str(e).splitlines()[0][:200]}); '
                     f'use e.g. v5e:2x4 or one of {", ".join(sorted(SLICES))}.') from None


def devices_per_chip(devices: Sequence) -> int:
  """Devices sharing one chip: 2 for compile-only v4 (each TensorCore a device)."""
  coords = collections.Counter(tuple(getattr(d, 'coords', (d.id,))) for d in devices)
  return max(coords.values())


def chip_spec(devices: Sequence) -> ChipSpec | None:
  """The spec of the devices' chip, per *device* (halved where two share a chip)."""
  spec = CHIPS.get(devices[0].device_kind)
  if spec is None:
    return None
  share = devices_per_chip(devices)
  return ChipSpec(spec.name, spec.hbm_bytes // share, spec.peak_flops / share)


# -----------------------------------------------------------------------------
# Collectives in compiled HLO.

_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                'collective-permute', 'ragged-all-to-all', 'collective-broadcast')
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+(?P<op>' +
    '|'.join(_COLLECTIVES) + r')(?P<start>-start)?\(')
_ARRAY = re.compile(r'\b(pred|[subf]\d+|bf16|f8\w*)\[([\d,]*)\]')
_ITEMSIZE = {'pred': 1, 'bf16': 2}


def _array_bytes(dtype: str, dims: str) -> int:
  size = _ITEMSIZE.get(dtype)
  if size is None:
    bits = re.search(r'\d+', dtype)
    size = max(1, int(bits.group()) // 8) if bits else 4
  n = 1
  for d in filter(None, dims.split(',')):
    n *= int(d)
  return n * size


@dataclasses.dataclass(frozen=True)
class Collective:
  """Collectives of one kind in a compiled module (static count, not executions)."""
  kind: str
  count: int
  bytes: int  # Sum of their per-device results.


def collectives(hlo_text: str) -> tuple[Collective, ...]:
  """Counts the collectives in ``compiled.as_text()``, by kind, with result bytes.

  Async pairs count once (at ``-start``). The result of a ``-start`` is a tuple
  (operand, result, sync flags): its largest array is taken. Collectives inside a
  loop body (the decode loop) count once, not once per iteration.
  """
  counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    arrays = [_array_bytes(t, d) for t, d in _ARRAY.findall(m.group('shape'))]
    if not arrays:
      continue
    entry = counts[m.group('op')]
    entry[0] += 1
    entry[1] += max(arrays) if m.group('start') else sum(arrays)
  return tuple(Collective(k, c, b) for k, (c, b) in sorted(counts.items()))
