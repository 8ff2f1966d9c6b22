"""Device mesh and logical-axis sharding.

Parameters and activations are annotated with *logical* axis names (``vocab``,
``embed``, ``heads``, ``head_dim``, ``mlp`` for weights; ``act_batch``,
``act_length``, ``act_embed``, ``act_heads`` for activations). The rules that map
those names onto the mesh axes ``('data', 'fsdp', 'tensor')`` are config data
(``config.mesh.rules``) and are read only here.

Typical use::

  mesh = create_mesh(config.mesh)
  rules = rules_from_config(config.mesh)
  with jax.set_mesh(mesh), logical_rules(rules):
    ...  # model code calls constrain(x, ('act_batch', 'act_length', 'act_embed'))
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
# Mesh axes the batch is split over (data parallelism and FSDP both shard the batch).
BATCH_AXES = ('data', 'fsdp')

Rules = tuple[tuple[str, Any], ...]

_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar(
    'transformer_jax_logical_rules', default=None)


def mesh_shape_from_config(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves the ('data', 'fsdp', 'tensor') sizes; at most one may be -1.

  Raises:
    ValueError: naming the sizes, when they do not multiply to ``num_devices``.
  """
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f'At most one mesh axis may be -1, got data={sizes[0]} '
                     f'fsdp={sizes[1]} tensor={sizes[2]}.')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'Mesh axis sizes must be positive or -1, got {sizes}.')
  known = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % known:
      raise ValueError(
          f'Mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}: the fixed '
          f'axes ({known} devices) do not divide the {num_devices} devices.')
    sizes[free[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f'Mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs '
        f'{math.prod(sizes)} devices, but {num_devices} are available.')
  return tuple(sizes)


def create_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ('data', 'fsdp', 'tensor') mesh over ``devices`` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape_from_config(mesh_cfg, len(devices))
  try:
    from jax.experimental import mesh_utils  # Topology-aware on TPU/GPU.
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def rules_from_config(mesh_cfg) -> Rules:
  """The logical-name -> mesh-axis rules, as a hashable tuple of pairs."""
  rules = []
  for name, target in mesh_cfg.rules:
    if isinstance(target, list):
      target = tuple(target)
    rules.append((name, target))
  return tuple(rules)


@contextlib.contextmanager
def logical_rules(rules: Rules) -> Iterator[None]:
  """Makes ``rules`` the ones :func:`constrain` uses inside the block."""
  token = _ACTIVE_RULES.set(tuple(rules))
  try:
    yield
  finally:
    _ACTIVE_RULES.reset(token)


def logical_to_mesh_spec(logical_axes: Sequence[str | None] | PartitionSpec,
                         rules: Rules) -> PartitionSpec:
  """Maps logical axis names to a mesh PartitionSpec; unmatched names replicate.

  A mesh axis is used at most once per array: a later dimension whose rule names
  an axis already taken is replicated instead.
  """
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in logical_axes:
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names.

  A no-op outside :func:`logical_rules` or without a mesh set by ``jax.set_mesh``,
  so model code runs unchanged on one device and in tests.
  """
  rules = _ACTIVE_RULES.get()
  if rules is None:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(logical_axes, rules))


def param_shardings(abstract_state, mesh: Mesh, rules: Rules):
  """NamedShardings for an ``nnx.State`` whose Params carry ``out_sharding`` names.

  Variables without logical names (step counters, RNG keys) are replicated.
  """
  from flax import nnx

  def one(variable):
    names = variable.get_metadata().get('out_sharding') if isinstance(
        variable, nnx.Variable) else None
    spec = logical_to_mesh_spec(names, rules) if names else PartitionSpec()
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, abstract_state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch-major arrays split over ('data', 'fsdp'), other dims replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
  """How many shards the global batch is split into."""
  return mesh.shape['data'] * mesh.shape['fsdp']


def check_divides(mesh: Mesh, *, global_batch: int | None = None,
                  num_heads: int | None = None, vocab_size: int | None = None,
                  d_ff: int | None = None) -> None:
  """Raises a ValueError naming the sizes when the mesh cannot split them."""
  problems = []
  n_batch, n_tensor = batch_divisor(mesh), mesh.shape['tensor']
  if global_batch is not None and global_batch % n_batch:
    problems.append(f'global batch {global_batch} is not divisible by '
                    f'data*fsdp = {n_batch}')
  if num_heads is not None and num_heads % n_tensor:
    problems.append(f'{num_heads} attention heads are not divisible by '
                    f'tensor = {n_tensor}')
  if d_ff is not None and d_ff % n_tensor:
    problems.append(f'd_ff {d_ff} is not divisible by tensor = {n_tensor}')
  if vocab_size is not None and vocab_size % n_tensor:
    problems.append(f'vocabulary size {vocab_size} is not divisible by '
                    f'tensor = {n_tensor}')
  if problems:
    raise ValueError(f'Mesh {dict(mesh.shape)} does not fit the model/batch: '
                     + '; '.join(problems) + '.')


def active_spec(logical_axes: Sequence[str | None]) -> PartitionSpec | None:
  """The PartitionSpec ``constrain`` would use, or None outside rules and a mesh
  (for code that must place work by hand, like a Pallas kernel under shard_map)."""
  rules = _ACTIVE_RULES.get()
  if rules is None or jax.sharding.get_abstract_mesh().empty:
    return None
  spec = logical_to_mesh_spec(logical_axes, rules)
  return PartitionSpec(*spec, *([None] * (len(logical_axes) - len(spec))))
