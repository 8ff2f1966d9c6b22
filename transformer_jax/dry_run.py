"""Will it fit? Compile one train step for a mesh we do not have, and report memory.

  python -m transformer_jax.dry_run --config=configs/wmt14_en_de_big.py \
      --num_devices=16 --mesh=1,16,1

builds a ('data', 'fsdp', 'tensor') mesh over ``--num_devices`` fake CPU devices,
creates the parameters and optimizer state abstractly (``nnx.eval_shape`` and
``jax.eval_shape`` inside ``train.TrainSetup``: shapes and shardings, no weights),
lowers and compiles the very train step ``train.py`` runs for the batch shape the
config gives (the paper's ~25000 tokens a side), and prints per device:

* parameters and optimizer state, from each array's shard shape;
* arguments, outputs, temporaries (activations, gradients, XLA scratch) and the peak
  ``arguments + outputs - donated + temporaries``, from ``compiled.memory_analysis()``;
* the sharding of each parameter (layers with the same shapes shown once).

On fake CPU devices the figures come from XLA's CPU compiler: its fusion and buffer
assignment differ from the TPU and GPU compilers', so temporaries approximate what an
accelerator needs (parameters and optimizer state are exact). Without
``--num_devices`` the step is compiled for the real devices of the default backend,
which gives that backend's own figures.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Sequence

_GIB = 2**30


def use_fake_cpu_devices(num_devices: int) -> None:
  """Makes jax see ``num_devices`` CPU devices; call before anything touches jax.

  Raises:
    RuntimeError: when jax's backends already started with another device count.
  """
  flag = f'--xla_force_host_platform_device_count={num_devices}'
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 os.environ.get('XLA_FLAGS', ''))
  os.environ['XLA_FLAGS'] = f'{flags} {flag}'.strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # Only now: the flags above are read when the CPU backend starts.
  jax.config.update('jax_platforms', 'cpu')
  if len(jax.devices()) != num_devices:
    raise RuntimeError(
        f'jax already started with {len(jax.devices())} devices; the dry run needs '
        f'{num_devices}. Run it in a fresh process.')


@dataclasses.dataclass(frozen=True)
class ParamSharding:
  """How one parameter (or a group of same-shaped layers) is split over the mesh."""
  path: str  # Layer indices replaced by '*' when several layers share the line.
  shape: tuple[int, ...]
  spec: str  # The PartitionSpec over ('data', 'fsdp', 'tensor').
  shard_shape: tuple[int, ...]  # What one device holds.
  count: int  # Parameters this line stands for.


@dataclasses.dataclass(frozen=True)
class DryRunReport:
  """Per-device memory of one compiled train step (bytes)."""
  config_name: str
  mesh: dict[str, int]
  device_kind: str
  batch_shape: tuple[int, int]  # [B, L] global, source and target alike.
  tokens_per_batch: int  # B * L target tokens (padding included).
  num_params: int
  params_bytes: int  # This device's shards of the parameters.
  opt_state_bytes: int  # ... of the optimizer state (Adam moments, accumulators).
  argument_bytes: int  # Everything passed in: state and batch.
  output_bytes: int
  alias_bytes: int  # Outputs written over donated inputs.
  temp_bytes: int  # Activations, gradients and scratch live during the step.
  code_bytes: int
  param_shardings: tuple[ParamSharding, ...]

  @property
  def peak_bytes(self) -> int:
    """What the step holds at once: inputs, new outputs not aliased, temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def format(self) -> str:
    """The human-readable report the command prints."""
    mesh = ' x '.join(f'{k}={v}' for k, v in self.mesh.items())
    b, length = self.batch_shape
    lines = [
        f'{self.config_name}: {self.num_params / 1e6:.1f}M parameters, mesh {mesh} '
        f'({self.device_kind}), batch [{b}, {length}] = {self.tokens_per_batch} tokens '
        'a side',
        'per device:',
        f'  parameters        {self.params_bytes / _GIB:8.3f} GiB',
        f'  optimizer state   {self.opt_state_bytes / _GIB:8.3f} GiB',
        f'  temporaries       {self.temp_bytes / _GIB:8.3f} GiB  (activations, '
        'gradients, scratch)',
        f'  arguments         {self.argument_bytes / _GIB:8.3f} GiB  (state + batch)',
        f'  outputs           {self.output_bytes / _GIB:8.3f} GiB  '
        f'({self.alias_bytes / _GIB:.3f} GiB written over donated inputs)',
        f'  peak              {self.peak_bytes / _GIB:8.3f} GiB',
        'parameter shardings (path, shape, spec over (data, fsdp, tensor), per device):',
    ]
    width = max(len(p.path) for p in self.param_shardings)
    for p in self.param_shardings:
      lines.append(f'  {p.path:<{width}}  {str(p.shape):<20} {p.spec:<32} '
                   f'{p.shard_shape}')
    return '\n'.join(lines)


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest)."""
  import jax
  import numpy as np
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def _param_shardings(abstract_params) -> tuple[ParamSharding, ...]:
  """One line per parameter; identical layers (same path up to the index) merged."""
  import jax
  import numpy as np
  merged: dict[tuple, ParamSharding] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
            for k in path]
    keys = [k for k in keys if k != 'value']
    name = '.'.join('*' if k.isdigit() else k for k in keys)
    spec = leaf.sharding.spec
    entry = (name, leaf.shape, str(spec))
    size = int(np.prod(leaf.shape, dtype=np.int64))
    if entry in merged:
      size += merged[entry].count
    merged[entry] = ParamSharding(name, tuple(leaf.shape), str(tuple(spec)),
                                  tuple(leaf.sharding.shard_shape(leaf.shape)), size)
  return tuple(merged.values())


def batch_shape(config, mesh, length: int | None = None) -> tuple[int, int]:
  """[B, L] of the training batch at bucket ``length`` (default: the longest).

  The same rows the input pipeline gives: ``tokens_per_batch // L`` rounded down to
  a multiple of the number of batch shards. The longest bucket has the largest
  attention matrices ([B, N, L, L] with B * L fixed), so the most activation memory.
  """
  from transformer_jax import input_pipeline
  from transformer_jax import sharding
  spec = input_pipeline.BatchSpec.from_config(
      config.data, process_count=1, batch_multiple=sharding.batch_divisor(mesh))
  shapes = dict(zip(spec.lengths, spec.rows))
  length = max(shapes) if length is None else length
  if length not in shapes:
    raise ValueError(f'Bucket length {length} is not one of the config\'s batch '
                     f'lengths {sorted(shapes)}.')
  return shapes[length], length


def run(config, *, devices: Sequence | None = None, vocab_size: int | None = None,
        length: int | None = None, config_name: str = 'config') -> DryRunReport:
  """Compiles ``train.TrainSetup``'s train step abstractly and measures it.

  Args:
    config: the experiment ConfigDict; ``config.mesh`` gives the mesh sizes.
    devices: devices to build the mesh over (default: all of jax's devices).
    vocab_size: V (default ``config.data.vocab_size``: no tokenizer is needed).
    length: bucket length L to compile for (default: the longest bucket).
    config_name: what the report calls the config.

  Returns:
    The per-device memory report. Nothing but the model's RNG keys is allocated.
  """
  import jax
  import jax.numpy as jnp
  from transformer_jax import sharding
  from transformer_jax import train

  mesh = sharding.create_mesh(config.mesh, devices)
  vocab_size = int(vocab_size or config.data.vocab_size)
  b, length = batch_shape(config, mesh, length)
  sharding.check_divides(mesh, global_batch=b)
  setup = train.TrainSetup.create(config, vocab_size, mesh)
  keys = (('inputs', 'targets') if not config.data.packing else train.BATCH_KEYS)
  batch_spec = sharding.batch_sharding(mesh, 2)
  batch = {k: jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=batch_spec)
           for k in keys}
  compiled = setup.compiled_train_step(batch)
  mem = compiled.memory_analysis()
  if mem is None:
    raise RuntimeError(f'The {jax.default_backend()} backend gives no memory analysis.')
  state = setup.abstract_state
  return DryRunReport(
      config_name=config_name,
      mesh=dict(mesh.shape),
      device_kind=f'{mesh.devices.size} x {mesh.devices.flat[0].device_kind}',
      batch_shape=(b, length),
      tokens_per_batch=b * length,
      num_params=sum(x.size for x in jax.tree.leaves(state['params'])),
      params_bytes=_shard_bytes(state['params']),
      opt_state_bytes=_shard_bytes(state['opt_state']),
      argument_bytes=mem.argument_size_in_bytes,
      output_bytes=mem.output_size_in_bytes,
      alias_bytes=mem.alias_size_in_bytes,
      temp_bytes=mem.temp_size_in_bytes,
      code_bytes=mem.generated_code_size_in_bytes,
      param_shardings=_param_shardings(state['params']),
  )


def _mesh_sizes(text: str) -> tuple[int, int, int]:
  parts = text.split(',')
  try:
    sizes = tuple(int(p) for p in parts)
  except ValueError:
    sizes = ()
  if len(sizes) != 3:
    raise ValueError(f'--mesh={text!r}: expected three sizes data,fsdp,tensor such as '
                     '"1,8,1" (one may be -1).')
  return sizes


def main(argv: Sequence[str]) -> None:
  from absl import app
  from absl import flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file('config', None, 'Experiment config.')
  num_devices = flags.DEFINE_integer(
      'num_devices', None, 'Fake CPU devices to compile for; default: the real ones.')
  mesh_flag = flags.DEFINE_string(
      'mesh', None, 'Mesh sizes "data,fsdp,tensor" (one may be -1); default: '
      'config.mesh.')
  length_flag = flags.DEFINE_integer(
      'length', None, 'Bucket length L of the batch; default: the longest bucket.')
  flags.mark_flag_as_required('config')

  def run_main(_):
    if num_devices.value:
      use_fake_cpu_devices(num_devices.value)
    config = config_flag.value
    if mesh_flag.value:
      config.mesh.data, config.mesh.fsdp, config.mesh.tensor = _mesh_sizes(
          mesh_flag.value)
    report = run(config, length=length_flag.value,
                 config_name=config_flags.get_config_filename(flags.FLAGS['config']))
    print(report.format())

  app.run(run_main, argv)


if __name__ == '__main__':
  main(sys.argv)
