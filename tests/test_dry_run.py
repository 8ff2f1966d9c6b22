"""Tests for transformer_jax.dry_run: per-device memory scales with the mesh.

Small model, 8 fake CPU devices (tests/conftest.py); four compiles in all.
"""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from transformer_jax import dry_run

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(data, fsdp, tensor):
  """tiny, widened so that kernels (which FSDP splits) dominate the parameters."""
  config = tiny.get_config()
  config.model.d_model = 64
  config.model.head_dim = 8
  config.model.d_ff = 256
  config.data.vocab_size = 1024
  config.data.tokens_per_batch = 512
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
  return config


@pytest.fixture(scope='module')
def reports():
  return {
      'one': dry_run.run(_config(1, 1, 1), devices=jax.devices()[:1]),
      'data8': dry_run.run(_config(8, 1, 1)),
      'fsdp8': dry_run.run(_config(1, 8, 1)),
      'tensor2': dry_run.run(_config(4, 1, 2)),
  }


def test_state_bytes_match_the_parameter_count(reports):
  r = reports['data8']
  # Replicated: every device holds all float32 parameters, Adam's mu and nu.
  assert r.params_bytes == 4 * r.num_params
  assert r.opt_state_bytes == pytest.approx(2 * r.params_bytes, abs=64)
  # XLA's own count of the inputs: the state plus the int32 batch shard.
  b, length = r.batch_shape
  batch_bytes = 2 * (b // 8) * length * 4
  assert r.argument_bytes == pytest.approx(
      r.params_bytes + r.opt_state_bytes + batch_bytes, abs=64)
  # The whole state is donated: outputs reuse its buffers.
  assert r.alias_bytes == pytest.approx(r.params_bytes + r.opt_state_bytes, abs=64)


def test_fsdp_splits_the_state_eightfold(reports):
  replicated, fsdp = reports['data8'], reports['fsdp8']
  assert replicated.num_params == fsdp.num_params
  # Everything with an 'embed' axis is split 8 ways; per-head biases stay whole.
  assert fsdp.params_bytes * 8 == pytest.approx(replicated.params_bytes, rel=0.05)
  assert fsdp.opt_state_bytes * 8 == pytest.approx(replicated.opt_state_bytes, rel=0.05)


def test_tensor_parallel_splits_heads_and_ffn(reports):
  r = reports['tensor2']
  lines = {p.path: p for p in r.param_shardings}
  wi = lines['encoder.layers.*.feed_forward.wi']
  assert wi.spec == "('fsdp', 'tensor')" and wi.shard_shape == (64, 128)  # fsdp=1.
  query = lines['encoder.layers.*.self_attention.query_kernel']
  assert query.shard_shape == (64, 4, 8)  # 8 heads over tensor=2.
  assert r.params_bytes < reports['data8'].params_bytes


def test_data_parallel_divides_activations(reports):
  one, data8 = reports['one'], reports['data8']
  assert one.batch_shape == data8.batch_shape  # Same global batch.
  assert one.params_bytes == data8.params_bytes
  # Each device runs 1/8 of the rows: temporaries shrink by far more than half.
  assert data8.temp_bytes * 4 < one.temp_bytes


def test_param_shardings_cover_every_parameter(reports):
  r = reports['fsdp8']
  assert sum(p.count for p in r.param_shardings) == r.num_params
  for p in r.param_shardings:
    assert np.prod(p.shard_shape) * 8 >= np.prod(p.shape)
  assert 'parameters' in r.format() and 'fsdp=8' in r.format()


def test_batch_shape_is_the_pipelines_longest_bucket(reports):
  config = _config(8, 1, 1)
  b, length = reports['data8'].batch_shape
  assert length == config.data.max_length
  assert b % 8 == 0 and b * length <= config.data.tokens_per_batch
  with pytest.raises(ValueError, match='not one of'):
    dry_run.batch_shape(config, dry_run_mesh(config), length=7)


def dry_run_mesh(config):
  from transformer_jax import sharding
  return sharding.create_mesh(config.mesh)


def test_fake_devices_refuse_a_started_backend(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  with pytest.raises(RuntimeError, match='fresh process'):
    dry_run.use_fake_cpu_devices(4)


def test_command_line_sets_its_own_device_count():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run(
      [sys.executable, '-m', 'transformer_jax.dry_run', '--config=configs/tiny.py',
       '--num_devices=4', '--mesh=1,-1,1'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'data=1 x fsdp=4 x tensor=1 (4 x cpu)' in out.stdout
  assert 'optimizer state' in out.stdout and 'peak' in out.stdout
