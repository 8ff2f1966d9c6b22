"""Tests for transformer_jax.model.attention: every kernel equals the einsum reference.

The TPU splash kernel runs in Pallas interpret mode on CPU; the cuDNN path is checked
through the arguments it passes (lengths, causal flag, or the dense mask), given to
the XLA implementation, since there is no GPU here. Only query positions that are
not padding are compared: that is what the loss sees.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.model import attention as ak
from transformer_jax import sharding

B, T, S, N, H = 2, 12, 20, 2, 8


def _reference(q, k, v, dense):
  """Sec 3.2.1 written out: softmax(Q K^T / sqrt(d_k)) V under a [B, 1, T, S] mask."""
  logits = jnp.einsum('btnh,bsnh->bnts', q, k) / math.sqrt(q.shape[-1])
  logits = jnp.where(dense, logits, -1e30)
  return jnp.einsum('bnts,bsnh->btnh', jax.nn.softmax(logits, -1), v)


def _qkv(t, s, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (B, t, N, H)),
          jax.random.normal(keys[1], (B, s, N, H)),
          jax.random.normal(keys[2], (B, s, N, H)))


def _cases():
  """(name, q_len, kv_len, mask): padding, causal + padding, packed rows."""
  q_valid = jnp.arange(T)[None] < jnp.array([[9], [12]])
  k_valid = jnp.arange(S)[None] < jnp.array([[20], [7]])
  t_valid = jnp.arange(T)[None] < jnp.array([[12], [5]])
  # Packed: row 0 holds sentences 1, 2, 3 then padding; row 1 sentences 1, 2.
  q_seg = jnp.array([[1] * 4 + [2] * 3 + [3] * 3 + [0] * 2, [1] * 6 + [2] * 6])
  k_seg = jnp.array([[1] * 6 + [2] * 5 + [3] * 6 + [0] * 3, [1] * 9 + [2] * 9 + [0] * 2])
  return [
      ('cross, padding', T, S, ak.make_mask(q_valid, k_valid)),
      ('self, causal, padding', T, T, ak.make_mask(t_valid, t_valid, causal=True)),
      ('self, causal, packed', T, T, ak.make_mask(
          q_seg > 0, q_seg > 0, query_segments=q_seg, key_segments=q_seg, causal=True)),
      ('cross, packed', T, S, ak.make_mask(
          q_seg > 0, k_seg > 0, query_segments=q_seg, key_segments=k_seg)),
  ]


CASES = _cases()


def _close_at_queries(got, want, mask):
  valid = np.asarray(mask.query_segments > 0)  # [B, T]
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid],
                             atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('name,t,s,mask', CASES, ids=[c[0] for c in CASES])
def test_splash_interpret_matches_reference(name, t, s, mask):
  q, k, v = _qkv(t, s)
  got = jax.jit(lambda q, k, v: ak.splash_attention(q, k, v, mask, interpret=True))(
      q, k, v)
  assert got.shape == q.shape
  _close_at_queries(got, _reference(q, k, v, mask.dense), mask)


@pytest.mark.parametrize('name,t,s,mask', CASES, ids=[c[0] for c in CASES])
def test_cudnn_arguments_mean_the_same_mask(name, t, s, mask):
  q, k, v = _qkv(t, s, seed=1)
  args = ak.cudnn_arguments(mask)
  assert ('mask' in args) == mask.packed  # Unpacked rows use cuDNN's own masks.
  got = jax.nn.dot_product_attention(q, k, v, implementation='xla', **args)
  _close_at_queries(got, _reference(q, k, v, mask.dense), mask)


def test_splash_gradients_match_reference():
  name, t, s, mask = CASES[2]  # Packed, causal.
  q, k, v = _qkv(t, s, seed=2)
  valid = (mask.query_segments > 0)[:, :, None, None]

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.where(valid, fn(q, k, v), 0.0) ** 2)

  want = jax.grad(loss(lambda q, k, v: _reference(q, k, v, mask.dense)),
                  argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(loss(lambda q, k, v: ak.splash_attention(
      q, k, v, mask, interpret=True)), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)


def test_splash_under_a_mesh_runs_per_shard():
  """8 fake devices: batch over data=2, heads over tensor=2 through shard_map."""
  name, t, s, mask = CASES[3]
  q, k, v = _qkv(t, s, seed=3)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(2, 1, 2),
                           sharding.MESH_AXES)
  rules = (('act_batch', ('data', 'fsdp')), ('act_heads', 'tensor'))
  with jax.set_mesh(mesh), sharding.logical_rules(rules):
    assert sharding.active_spec(('act_batch', 'act_length', 'act_heads', None))[2] \
        == 'tensor'
    got = jax.jit(lambda q, k, v: ak.splash_attention(q, k, v, mask, interpret=True))(
        q, k, v)
  _close_at_queries(got, _reference(q, k, v, mask.dense), mask)


def test_auto_picks_the_backends_fused_kernel():
  assert ak.resolve('auto', jnp.bfloat16, 64, platform='tpu') == 'splash'
  assert ak.resolve('auto', jnp.bfloat16, 64, platform='gpu') == 'cudnn'
  assert ak.resolve('auto', jnp.float32, 64, platform='cpu') == 'xla'
  # cuDNN's flash attention is bf16/fp16 only, head dims multiple of 8 up to 256.
  assert ak.resolve('cudnn', jnp.float32, 64, platform='gpu') == 'xla'
  assert ak.resolve('cudnn', jnp.float16, 60, platform='gpu') == 'xla'


def test_dense_mask_arrays_still_work():
  name, t, s, mask = CASES[0]
  q, k, v = _qkv(t, s, seed=4)
  got = ak.dot_product_attention(q, k, v, mask.dense, impl='auto')
  _close_at_queries(got, _reference(q, k, v, mask.dense), mask)
