"""Tests for transformer_jax.sharding: mesh sizes, rules and divisibility errors."""

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from configs import default
from transformer_jax import sharding


def _mesh_cfg(data, fsdp, tensor):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


@pytest.mark.parametrize('sizes, expected', [
    ((-1, 1, 1), (8, 1, 1)),
    ((2, -1, 2), (2, 2, 2)),
    ((1, 2, -1), (1, 2, 4)),
    ((1, 1, 8), (1, 1, 8)),
])
def test_mesh_shape_resolves_minus_one(sizes, expected):
  assert sharding.mesh_shape_from_config(_mesh_cfg(*sizes), 8) == expected


@pytest.mark.parametrize('sizes, message', [
    ((-1, -1, 1), 'At most one'),
    ((3, -1, 1), 'do not divide'),
    ((2, 2, 1), 'needs 4 devices'),
])
def test_mesh_shape_errors_name_sizes(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape_from_config(_mesh_cfg(*sizes), 8)


def test_create_mesh_on_fake_devices():
  mesh = sharding.create_mesh(_mesh_cfg(2, 2, 2))
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert len(jax.devices()) == 8


def test_default_rules_map_logical_names():
  rules = sharding.rules_from_config(default.get_config().mesh)
  assert sharding.logical_to_mesh_spec(('vocab', 'embed'), rules) == P('tensor', 'fsdp')
  assert sharding.logical_to_mesh_spec(('embed', 'heads', 'head_dim'), rules) == P(
      'fsdp', 'tensor', None)
  assert sharding.logical_to_mesh_spec(('act_batch', 'act_length', 'act_embed'),
                                       rules) == P(('data', 'fsdp'), None, None)
  # A mesh axis is used once per array: the second 'tensor' dimension replicates.
  assert sharding.logical_to_mesh_spec(('heads', 'mlp'), rules) == P('tensor', None)
  assert sharding.logical_to_mesh_spec(('unknown',), rules) == P(None)


def test_check_divides_names_the_problem():
  mesh = sharding.create_mesh(_mesh_cfg(4, 1, 2))
  sharding.check_divides(mesh, global_batch=8, num_heads=8, vocab_size=32000)
  with pytest.raises(ValueError, match='global batch 6 is not divisible by data\\*fsdp = 4'):
    sharding.check_divides(mesh, global_batch=6)
  with pytest.raises(ValueError, match='3 attention heads'):
    sharding.check_divides(mesh, num_heads=3)


def test_constrain_is_noop_without_rules():
  x = jax.numpy.ones((4, 3))
  assert sharding.constrain(x, ('act_batch', 'act_embed')) is x
