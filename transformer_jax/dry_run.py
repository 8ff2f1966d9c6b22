"""Will it fit? Compile one train step for a mesh we do not have, and report memory.

  python -m transformer_jax.dry_run --config=configs/wmt14_en_de_big.py \
      --num_devices=16 --mesh=1,16,1

builds a ('data', 'fsdp', 'tensor') mesh over ``--num_devices`` fake CPU devices,
creates the parameters and optimizer state abstractly (``nnx.eval_shape`` and
``jax.eval_shape`` inside ``train.TrainSetup``: shapes and shardings, no weights),
lowers and compiles the very train step ``train/loop.py`` runs for the batch shape the
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

With ``--topology`` (needs libtpu: ``pip install -e ".[tpu]"``) the step is compiled
by the real TPU compiler for a TPU slice this machine does not have:

  python -m transformer_jax.dry_run --config=configs/wmt14_en_de_big.py \
      --topology=v5e:4x4 --mesh=1,16,1

and the report adds, per chip: HBM use against the chip's capacity, the FLOPs of
the step from the compiler's cost analysis, the collectives in the compiled HLO
(kind, count, bytes), the compiler's estimated step time and the MFU it implies;
then the same for the beam-search decode of one evaluation batch.
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


# Custom-call targets of the fused attention kernels in compiled HLO.
_FUSED_KERNEL_TARGETS = ('custom_call_target="tpu_custom_call"',
                         'custom_call_target="__cudnn$fmha')


@dataclasses.dataclass(frozen=True)
class CompiledCost:
  """What the compiler says about one compiled program, per device."""
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # Outputs written over donated inputs.
  temp_bytes: int  # Activations, gradients and scratch live during the program.
  code_bytes: int
  flops: float | None  # cost_analysis()['flops'] (loop bodies counted once).
  estimated_seconds: float | None  # cost_analysis()['optimal_seconds'] (TPU only).
  collectives: tuple  # topology.Collective per kind.
  fused_kernels: int = 0  # Pallas/Mosaic (TPU) and cuDNN attention custom calls.

  @property
  def peak_bytes(self) -> int:
    """What the program holds at once: inputs, new outputs not aliased, temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @classmethod
  def of(cls, compiled) -> 'CompiledCost':
    import jax
    from transformer_jax import topology
    mem = compiled.memory_analysis()
    if mem is None:
      raise RuntimeError(f'The {jax.default_backend()} backend gives no memory analysis.')
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # Older jax: one dict per computation.
      cost = cost[0] if cost else {}
    seconds = cost.get('optimal_seconds')
    text = compiled.as_text() or ''
    return cls(
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes,
        flops=cost.get('flops'),
        estimated_seconds=seconds if seconds and seconds > 0 else None,
        collectives=topology.collectives(text),
        fused_kernels=sum(text.count(target) for target in _FUSED_KERNEL_TARGETS))

  def format_collectives(self) -> list[str]:
    lines = ([f'  collectives       {c.kind} x{c.count} ({c.bytes / 2**20:.1f} MiB)'
              for c in self.collectives] or ['  collectives       none'])
    if self.fused_kernels:
      lines.append(f'  fused kernels     {self.fused_kernels} custom calls '
                   '(Pallas/cuDNN attention)')
    return lines


@dataclasses.dataclass(frozen=True)
class DecodeReport:
  """Per-device cost of one compiled beam search over an evaluation batch."""
  batch_shape: tuple[int, int]  # [B, S] source ids.
  beam_size: int
  max_decode_len: int
  cost: CompiledCost

  def format(self, hbm_bytes: int | None) -> str:
    b, s = self.batch_shape
    c = self.cost
    lines = [f'beam search (K={self.beam_size}) over a [{b}, {s}] source batch, up to '
             f'{self.max_decode_len} target tokens, per device:',
             f'  arguments         {c.argument_bytes / _GIB:8.3f} GiB  (parameters + '
             'batch)',
             f'  temporaries       {c.temp_bytes / _GIB:8.3f} GiB  (cache, beams, scratch)',
             f'  peak              {c.peak_bytes / _GIB:8.3f} GiB' + _of_capacity(
                 c.peak_bytes, hbm_bytes)]
    if c.flops is not None:
      lines.append(f'  flops             {c.flops:.3e}  (the loop body counted once)')
    return '\n'.join(lines + c.format_collectives())


def _of_capacity(used: int, capacity: int | None) -> str:
  if not capacity:
    return ''
  verdict = 'fits' if used <= capacity else 'DOES NOT FIT'
  return f'  of {capacity / _GIB:.1f} GiB HBM: {100 * used / capacity:.0f}%, {verdict}'


@dataclasses.dataclass(frozen=True)
class DryRunReport:
  """Per-device memory (bytes) and cost of one compiled train step."""
  config_name: str
  mesh: dict[str, int]
  device_kind: str
  batch_shape: tuple[int, int]  # [B, L] global, source and target alike.
  tokens_per_batch: int  # B * L target tokens (padding included).
  num_params: int
  params_bytes: int  # This device's shards of the parameters.
  opt_state_bytes: int  # ... of the optimizer state (Adam moments, accumulators).
  cost: CompiledCost
  param_shardings: tuple[ParamSharding, ...]
  model_flops: float = 0.0  # flops.train_flops of the global batch (all devices).
  hbm_bytes: int | None = None  # Per device, when the chip is known.
  peak_flops: float | None = None  # Per device, dense bf16.
  decode: DecodeReport | None = None

  # The memory figures, as before the cost moved into CompiledCost.
  argument_bytes = property(lambda self: self.cost.argument_bytes)
  output_bytes = property(lambda self: self.cost.output_bytes)
  alias_bytes = property(lambda self: self.cost.alias_bytes)
  temp_bytes = property(lambda self: self.cost.temp_bytes)
  peak_bytes = property(lambda self: self.cost.peak_bytes)

  @property
  def fits(self) -> bool | None:
    return None if not self.hbm_bytes else self.peak_bytes <= self.hbm_bytes

  @property
  def mfu(self) -> float | None:
    """Model FLOPs over (devices x peak x the compiler's estimated step time)."""
    seconds = self.cost.estimated_seconds
    if not (seconds and self.peak_flops and self.model_flops):
      return None
    return self.model_flops / (_devices(self.mesh) * self.peak_flops * seconds)

  def format(self) -> str:
    """The human-readable report the command prints."""
    mesh = ' x '.join(f'{k}={v}' for k, v in self.mesh.items())
    b, length = self.batch_shape
    c = self.cost
    lines = [
        f'{self.config_name}: {self.num_params / 1e6:.1f}M parameters, mesh {mesh} '
        f'({self.device_kind}), batch [{b}, {length}] = {self.tokens_per_batch} tokens '
        'a side',
        'train step, per device:',
        f'  parameters        {self.params_bytes / _GIB:8.3f} GiB',
        f'  optimizer state   {self.opt_state_bytes / _GIB:8.3f} GiB',
        f'  temporaries       {c.temp_bytes / _GIB:8.3f} GiB  (activations, '
        'gradients, scratch)',
        f'  arguments         {c.argument_bytes / _GIB:8.3f} GiB  (state + batch)',
        f'  outputs           {c.output_bytes / _GIB:8.3f} GiB  '
        f'({c.alias_bytes / _GIB:.3f} GiB written over donated inputs)',
        f'  peak              {c.peak_bytes / _GIB:8.3f} GiB' + _of_capacity(
            c.peak_bytes, self.hbm_bytes),
    ]
    if c.flops is not None:
      lines.append(f'  flops             {c.flops:.3e}  (compiler; model: '
                   f'{self.model_flops / _devices(self.mesh):.3e})')
    if c.estimated_seconds is not None:
      mfu = self.mfu
      lines.append(f'  estimated time    {1e3 * c.estimated_seconds:8.1f} ms  '
                   + (f'(implies {100 * mfu:.0f}% MFU)' if mfu is not None else ''))
    lines += c.format_collectives()
    if self.decode is not None:
      lines.append(self.decode.format(self.hbm_bytes))
    lines.append('parameter shardings (path, shape, spec over (data, fsdp, tensor), per '
                 'device):')
    width = max(len(p.path) for p in self.param_shardings)
    for p in self.param_shardings:
      lines.append(f'  {p.path:<{width}}  {str(p.shape):<20} {p.spec:<32} '
                   f'{p.shard_shape}')
    return '\n'.join(lines)


def _devices(mesh: dict[str, int]) -> int:
  n = 1
  for size in mesh.values():
    n *= size
  return n


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
  from transformer_jax import sharding
  from transformer_jax.data import pipeline
  spec = pipeline.BatchSpec.from_config(
      config.data, process_count=1, batch_multiple=sharding.batch_divisor(mesh))
  shapes = dict(zip(spec.lengths, spec.rows))
  length = max(shapes) if length is None else length
  if length not in shapes:
    raise ValueError(f'Bucket length {length} is not one of the config\'s batch '
                     f'lengths {sorted(shapes)}.')
  return shapes[length], length


def run(config, *, devices: Sequence | None = None, vocab_size: int | None = None,
        length: int | None = None, config_name: str = 'config',
        compile_only: bool = False, decode: bool = False) -> DryRunReport:
  """Compiles ``train.TrainSetup``'s train step abstractly and measures it.

  Args:
    config: the experiment ConfigDict; ``config.mesh`` gives the mesh sizes.
    devices: devices to build the mesh over (default: all of jax's devices), e.g.
      ``topology.tpu_devices('v5e:2x4')``.
    vocab_size: V (default ``config.data.vocab_size``, the model's ids in every
      family, [MASK] included: no tokenizer is needed).
    length: bucket length L to compile for (default: the longest bucket).
    config_name: what the report calls the config.
    compile_only: the devices can compile but not run (a TPU topology).
    decode: also compile the beam search over one evaluation batch
      (``config.data.eval_batch_size`` sentences of length L).

  Returns:
    The per-device report. Nothing but the model's RNG keys is allocated.
  """
  import jax
  import jax.numpy as jnp
  from transformer_jax import sharding
  from transformer_jax import topology
  from transformer_jax.train import flops
  from transformer_jax.train import loop as train

  mesh = sharding.create_mesh(config.mesh, devices)
  vocab_size = int(vocab_size or config.data.vocab_size)
  setup = train.TrainSetup.create(config, vocab_size, mesh, compile_only=compile_only)
  if setup.task.name == 'translation':
    b, length = batch_shape(config, mesh, length)
    sharding.check_divides(mesh, global_batch=b)
    keys = (('inputs', 'targets') if not config.data.packing else train.BATCH_KEYS)
    batch_spec = sharding.batch_sharding(mesh, 2)
    batch = {k: jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=batch_spec)
             for k in keys}
  else:  # The other families' batches: the task knows their shapes.
    batch = setup.task.abstract_batch(config, mesh)
    b, length = batch['inputs'].shape
  compiled = setup.compiled_train_step(batch)
  state = setup.abstract_state
  chip = topology.chip_spec(list(mesh.devices.flat))
  peak = chip.peak_flops if chip else flops.peak_flops_per_device(config.train)
  return DryRunReport(
      config_name=config_name,
      mesh=dict(mesh.shape),
      device_kind=f'{mesh.devices.size} x {mesh.devices.flat[0].device_kind}',
      batch_shape=(b, length),
      tokens_per_batch=b * length,
      num_params=sum(x.size for x in jax.tree.leaves(state['params'])),
      params_bytes=_shard_bytes(state['params']),
      opt_state_bytes=_shard_bytes(state['opt_state']),
      cost=CompiledCost.of(compiled),
      param_shardings=_param_shardings(state['params']),
      model_flops=(flops.train_flops(setup.model_cfg, b, length, length)
                   if setup.task.name == 'translation'
                   else setup.task.train_flops(setup.model_cfg, batch)),
      hbm_bytes=chip.hbm_bytes if chip else _memory_limit(mesh.devices.flat[0]),
      peak_flops=peak,
      # Beam search is translation's; the other families have no search to compile.
      decode=(_compile_decode(config, setup, length)
              if decode and setup.task.name == 'translation' else None),
  )


def _memory_limit(device) -> int | None:
  """What a real accelerator device says it can allocate (None on CPU)."""
  if device.platform == 'cpu':
    return None
  try:
    return (device.memory_stats() or {}).get('bytes_limit')
  except Exception:  # Compile-only or backends without memory stats.
    return None


def _compile_decode(config, setup, length: int) -> DecodeReport:
  """Compiles the beam search the evaluation runs, for a [B, L] source batch."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from transformer_jax import model as model_lib
  from transformer_jax import sharding
  from transformer_jax.inference import translator as translator_lib
  from transformer_jax.model import config as model_config

  mesh, rules, cfg = setup.mesh, setup.rules, setup.model_cfg
  shards = sharding.batch_divisor(mesh)
  b = -(-int(config.data.eval_batch_size) // shards) * shards  # BatchSearch pads so.
  abstract_model = nnx.eval_shape(
      lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(params=0, dropout=0)))
  graphdef, state = nnx.split(abstract_model)
  leaves, treedef = jax.tree.flatten(state)  # Shardings: one per Variable.
  state = treedef.unflatten([
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(
          leaves, jax.tree.leaves(sharding.param_shardings(state, mesh, rules)))])
  src = jax.ShapeDtypeStruct((b, length), jnp.int32,
                             sharding=sharding.batch_sharding(mesh))
  beam = int(config.eval.beam_size)
  max_extra = int(config.eval.max_extra_length)
  search = translator_lib.compiled_search(  # The very function BatchSearch runs.
      graphdef, beam, float(config.eval.length_penalty), max_extra,
      eos_id=model_config.EOS_ID, bos_id=cfg.bos_id, pad_id=cfg.pad_id)
  max_decode_len = length + max_extra
  if cfg.positions == 'learned':
    max_decode_len = min(max_decode_len, cfg.max_len)
  with jax.set_mesh(mesh), sharding.logical_rules(rules):
    compiled = search.lower(state, src, max_decode_len=max_decode_len).compile()
  return DecodeReport((b, length), beam, max_decode_len, CompiledCost.of(compiled))


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
  topology_flag = flags.DEFINE_string(
      'topology', None, 'TPU slice to compile for with the real TPU compiler (needs '
      'libtpu), e.g. v5e:4x4, v5e-16, v4-8, v5p-32, v6e-8.')
  decode_flag = flags.DEFINE_bool(
      'decode', None, 'Also compile the beam-search decode of one evaluation batch; '
      'default: with --topology only.')
  flags.mark_flag_as_required('config')

  def run_main(_):
    if num_devices.value and topology_flag.value:
      raise app.UsageError('--num_devices (fake CPU devices) and --topology (TPU) '
                           'exclude each other.')
    if num_devices.value:
      use_fake_cpu_devices(num_devices.value)
    devices = None
    if topology_flag.value:
      from transformer_jax import topology
      try:
        devices = topology.tpu_devices(topology_flag.value)
      except (RuntimeError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    config = config_flag.value
    if mesh_flag.value:
      config.mesh.data, config.mesh.fsdp, config.mesh.tensor = _mesh_sizes(
          mesh_flag.value)
    decode = decode_flag.value if decode_flag.value is not None else bool(devices)
    try:
      report = run(config, devices=devices, length=length_flag.value,
                   config_name=config_flags.get_config_filename(flags.FLAGS['config']),
                   compile_only=devices is not None, decode=decode)
    except ValueError as e:  # Mesh and batch that do not divide: one line.
      raise app.UsageError(str(e)) from None
    print(report.format())

  app.run(run_main, argv)


if __name__ == '__main__':
  main(sys.argv)
