"""Tests for transformer_jax.model: sizes, masks, packing, cached decoding, dtypes."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from conftest import SRC, TGT
from transformer_jax import model as model_lib
from transformer_jax import sharding
from transformer_jax.model import attention as attention_lib

TINY = model_lib.TransformerConfig(
    vocab_size=50, num_encoder_layers=2, num_decoder_layers=2, d_model=32,
    num_heads=4, d_ff=64, dropout_rate=0.1, max_len=32)

def build(cfg=TINY, seed=0, **overrides):
  cfg = dataclasses.replace(cfg, **overrides)
  return model_lib.Transformer(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def num_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.fixture(scope='module', params=['post', 'pre'])
def model(request):
  return build(layer_norm=request.param)


@pytest.fixture(scope='module')
def post_model():
  return build(layer_norm='post')


# Table 3 (vocab 37000, shared embeddings): paper's count and our tolerance.
PAPER_SIZES = {
    'base': ({}, 65e6, 0.05),
    'big': ({'d_model': 1024, 'd_ff': 4096, 'num_heads': 16}, 213e6, 0.03),
    'C_N2': ({'num_encoder_layers': 2, 'num_decoder_layers': 2}, 36e6, 0.08),
    'C_N4': ({'num_encoder_layers': 4, 'num_decoder_layers': 4}, 50e6, 0.08),
    'C_N8': ({'num_encoder_layers': 8, 'num_decoder_layers': 8}, 80e6, 0.08),
    'C_dff1024': ({'d_ff': 1024}, 53e6, 0.08),
    'C_dff4096': ({'d_ff': 4096}, 90e6, 0.08),
}


@pytest.mark.parametrize('name', list(PAPER_SIZES))
def test_parameter_count_matches_table3(name):
  changes, paper, tolerance = PAPER_SIZES[name]
  model_cfg = default.get_config().model
  model_cfg.update(changes)
  cfg = model_lib.TransformerConfig.from_config(model_cfg, vocab_size=37000)
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  count = num_params(abstract)
  assert abs(count - paper) / paper < tolerance, (name, count)


@pytest.mark.parametrize('share', [True, False])
def test_parameter_count_formula(share):
  cfg = dataclasses.replace(TINY, share_embeddings=share, positions='learned')
  d, f, v, n_layers = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_encoder_layers
  attention = 4 * (d * d + d)
  ffn = 2 * d * f + f + d
  norm = 2 * d
  encoder = n_layers * (attention + ffn + 2 * norm) + cfg.max_len * d
  decoder = n_layers * (2 * attention + ffn + 3 * norm) + cfg.max_len * d
  embeddings = v * d if share else 2 * v * d + d * v + v
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  assert num_params(abstract) == encoder + decoder + embeddings


def test_every_parameter_has_logical_names():
  abstract = nnx.eval_shape(lambda: build(share_embeddings=False, positions='learned'))
  allowed = {'vocab', 'embed', 'heads', 'head_dim', 'mlp', None}
  for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    names = variable.get_metadata().get('out_sharding')
    assert names is not None and len(names) == len(variable.shape), path
    assert set(names) <= allowed, (path, names)
    assert variable.get_metadata()['eager_sharding'] is False


def test_sinusoid_matches_paper_formula():
  d_model = 16
  positions = jnp.arange(40)
  table = np.asarray(model_lib.sinusoidal_positions(positions, d_model))
  assert table.shape == (40, d_model)
  for pos in (0, 1, 7, 39):
    for i in (0, 1, 3, 7):
      angle = pos / 10000 ** (2 * i / d_model)
      np.testing.assert_allclose(table[pos, 2 * i], math.sin(angle), atol=1e-6)
      np.testing.assert_allclose(table[pos, 2 * i + 1], math.cos(angle), atol=1e-6)


def test_shift_right_unpacked_and_packed():
  targets = jnp.array([[7, 8, 1, 0, 0]])
  np.testing.assert_array_equal(model_lib.shift_right(targets), [[2, 7, 8, 0, 0]])
  packed = jnp.array([[7, 8, 1, 9, 1, 0]])
  positions = jnp.array([[0, 1, 2, 0, 1, 0]])
  np.testing.assert_array_equal(model_lib.shift_right(packed, positions),
                                [[2, 7, 8, 2, 9, 0]])


def test_config_errors_name_the_problem():
  with pytest.raises(ValueError, match='layer_norm'):
    dataclasses.replace(TINY, layer_norm='middle')
  with pytest.raises(ValueError, match='num_heads'):
    dataclasses.replace(TINY, num_heads=5)
  model_cfg = default.get_config().model
  model_cfg.unlock()
  model_cfg.num_layerz = 3
  with pytest.raises(ValueError, match='num_layerz'):
    model_lib.TransformerConfig.from_config(model_cfg, 100)
  cfg = model_lib.TransformerConfig.from_config(
      dict(default.get_config().model, dtype='bfloat16'), 100)
  assert cfg.dtype == jnp.bfloat16 and cfg.qkv_head_dim == 64


def test_causality(model):
  tgt_in = model_lib.shift_right(jnp.asarray(TGT))
  logits = model(SRC, tgt_in)
  t = 2
  changed = tgt_in.at[:, t + 1:].set(jnp.where(tgt_in[:, t + 1:] > 0, 40, 0))
  changed_logits = model(SRC, changed)
  np.testing.assert_allclose(changed_logits[:, :t + 1], logits[:, :t + 1], atol=1e-5)
  # Row 1 has real tokens after t, so its later logits must move.
  assert np.abs(changed_logits[1, t + 1:] - logits[1, t + 1:]).max() > 1e-3


def test_source_padding_is_ignored(model):
  tgt_in = model_lib.shift_right(jnp.asarray(TGT))
  logits = model(SRC, tgt_in)
  padded = np.pad(SRC, ((0, 0), (0, 5)))
  np.testing.assert_allclose(model(padded, tgt_in), logits, atol=1e-5)
  # A real token in place of the padding does change the output.
  assert np.abs(model(np.where(SRC == 0, 30, SRC), tgt_in) - logits).max() > 1e-3


def _pack(rows):
  """Concatenates eos-terminated sentences of ``rows`` into one padded row."""
  tokens, segments, positions = [], [], []
  for k, row in enumerate(rows, start=1):
    row = [int(x) for x in row if x != 0]
    tokens += row
    segments += [k] * len(row)
    positions += list(range(len(row)))
  pad = 3
  return (np.array([tokens + [0] * pad], np.int32),
          np.array([segments + [0] * pad], np.int32),
          np.array([positions + [0] * pad], np.int32))


@pytest.mark.parametrize('positions', ['sinusoidal', 'learned'])
def test_packed_rows_match_separate_rows(positions):
  model = build(positions=positions)
  src, src_seg, src_pos = _pack(SRC)
  tgt, tgt_seg, tgt_pos = _pack(TGT)
  tgt_in = model_lib.shift_right(jnp.asarray(tgt), jnp.asarray(tgt_pos))
  packed = model(src, tgt_in, src_segments=src_seg, tgt_segments=tgt_seg,
                 src_positions=src_pos, tgt_positions=tgt_pos)
  assert np.isfinite(np.asarray(packed)).all()  # Padding rows attend to nothing.
  separate = model(SRC, model_lib.shift_right(jnp.asarray(TGT)))
  start = 0
  for b in range(len(TGT)):
    n = int((TGT[b] != 0).sum())
    np.testing.assert_allclose(packed[0, start:start + n], separate[b, :n], atol=1e-5)
    start += n


@pytest.mark.parametrize('impl', ['xla', 'einsum'])
def test_fully_masked_rows_have_finite_values_and_gradients(impl):
  cfg = dataclasses.replace(TINY, attention_impl=impl)
  attention = model_lib.MultiHeadAttention(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, cfg.d_model))
  # Row 1 is all padding (segment 0): every one of its queries is fully masked.
  segments = jnp.array([[1, 1, 2, 2, 0], [0, 0, 0, 0, 0]])
  valid = segments > 0
  mask = attention_lib.make_mask(valid, valid, query_segments=segments,
                                 key_segments=segments).dense
  assert not np.asarray(mask)[1].any()

  def loss(attention, x):
    return (attention(x, x, mask)[0] ** 2).sum()

  value, (param_grads, x_grad) = nnx.value_and_grad(loss, argnums=(0, 1))(attention, x)
  assert np.isfinite(float(value)) and np.isfinite(np.asarray(x_grad)).all()
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(param_grads))


@pytest.mark.parametrize('prefill', [1, 3])
def test_cached_decoding_matches_teacher_forcing(model, prefill):
  """The first ``prefill`` positions in one cached pass, then one position per step:
  the logits of teacher forcing at every non-padding position."""
  tgt_in = model_lib.shift_right(jnp.asarray(TGT))
  expected = model(SRC, tgt_in)
  encoded = model.encode(SRC)
  batch, length = tgt_in.shape
  cache = model.init_cache(encoded, SRC, length + 2)
  for leaf in jax.tree.leaves(cache):
    assert leaf.shape[0] == batch
  step = jax.jit(model_lib.Transformer.decode_step)
  valid = np.asarray(tgt_in != 0)
  logits, cache = step(model, tgt_in[:, :prefill], cache, index=0)
  assert logits.dtype == jnp.float32 and logits.shape == (batch, prefill, TINY.vocab_size)
  got = [logits]
  for t in range(prefill, length):
    logits, cache = step(model, tgt_in[:, t:t + 1], cache, index=t)
    got.append(logits)
  got = np.concatenate(got, axis=1)
  np.testing.assert_allclose(got[valid], np.asarray(expected)[valid], atol=1e-5)


def test_decode_step_errors_name_the_problem(post_model):
  encoded = post_model.encode(SRC)
  cache = post_model.init_cache(encoded, SRC, 4)
  with pytest.raises(ValueError, match='must have batch_size=3 rows'):
    post_model.decoder.init_cache(3, 4, encoded[:2], SRC[:2])
  with pytest.raises(ValueError, match='tgt_in has 2 rows, the cache 3'):
    post_model.decode_step(jnp.zeros((2, 1), jnp.int32), cache, index=0)
  with pytest.raises(ValueError, match=r'mask must be \[B, 1, 4\]'):
    post_model.decode_step(jnp.zeros((3, 1), jnp.int32), cache, index=0,
                           mask=jnp.ones((3, 1, 5), bool))
  with pytest.raises(ValueError, match='tokens must be'):
    post_model.decode_step(jnp.zeros((3,), jnp.int32), cache, index=0)


@pytest.mark.parametrize('share', [True, False])
def test_decode_step_with_a_precomputed_output_kernel(share):
  model = build(share_embeddings=share, layer_norm='pre')
  if not share:  # A non-zero bias, so that leaving it out would show.
    projection = model.decoder.output_projection
    projection.bias.value = jax.random.normal(jax.random.key(1), projection.bias.shape)
  tgt_in = model_lib.shift_right(jnp.asarray(TGT))
  expected = model(SRC, tgt_in)
  kernel = model.output_kernel()
  assert kernel.shape == (TINY.d_model, TINY.vocab_size)
  encoded = model.encode(SRC)
  cache = model.init_cache(encoded, SRC, 4)
  logits, cache = model.decode_step(tgt_in[:, :2], cache, index=0, output_kernel=kernel)
  np.testing.assert_allclose(logits, expected[:, :2], atol=1e-5)


def test_xla_attention_equals_einsum_reference():
  xla = build(attention_impl='xla')
  einsum = build(attention_impl='einsum')
  for a, b in zip(jax.tree.leaves(nnx.state(xla, nnx.Param)),
                  jax.tree.leaves(nnx.state(einsum, nnx.Param))):
    np.testing.assert_array_equal(a, b)
  src, src_seg, src_pos = _pack(SRC)
  tgt, tgt_seg, tgt_pos = _pack(TGT)
  tgt_in = model_lib.shift_right(jnp.asarray(tgt), jnp.asarray(tgt_pos))
  kwargs = dict(src_segments=src_seg, tgt_segments=tgt_seg, src_positions=src_pos,
                tgt_positions=tgt_pos)
  np.testing.assert_allclose(xla(src, tgt_in, **kwargs), einsum(src, tgt_in, **kwargs),
                             atol=1e-5)
  tgt_in = model_lib.shift_right(jnp.asarray(TGT))
  np.testing.assert_allclose(xla(SRC, tgt_in), einsum(SRC, tgt_in), atol=1e-5)


@pytest.mark.parametrize('extra_dropout', [False, True])
def test_dropout_only_when_not_deterministic(extra_dropout):
  rates = dict(attention_dropout_rate=0.2, relu_dropout_rate=0.2) if extra_dropout else {}
  model = build(**rates)
  tgt_in = model_lib.shift_right(jnp.asarray(TGT))
  first = model(SRC, tgt_in)
  np.testing.assert_array_equal(model(SRC, tgt_in), first)
  noisy = model(SRC, tgt_in, deterministic=False)
  noisy_again = model(SRC, tgt_in, deterministic=False)
  assert np.abs(noisy - first).max() > 1e-3
  assert np.abs(noisy_again - noisy).max() > 1e-3
  nnx.reseed(model, dropout=7)
  replay = model(SRC, tgt_in, deterministic=False)
  nnx.reseed(model, dropout=7)
  np.testing.assert_array_equal(model(SRC, tgt_in, deterministic=False), replay)


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
  full = build()
  half = build(dtype=jnp.bfloat16)
  tgt_in = model_lib.shift_right(jnp.asarray(TGT))
  reference = full(SRC, tgt_in)
  logits = half(SRC, tgt_in)
  assert logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(half, nnx.Param)))
  scale = np.abs(reference).max()
  assert np.abs(logits - reference).max() < 0.05 * scale
  encoded = half.encode(SRC)
  assert encoded.dtype == jnp.bfloat16
  step_logits, cache = half.decode_step(tgt_in[:, :1], half.init_cache(encoded, SRC, 4),
                                        index=0)
  assert step_logits.dtype == jnp.float32
  assert cache['layers'][0]['self']['key'].dtype == jnp.bfloat16


def test_attention_weights(post_model):
  tgt_in = model_lib.shift_right(jnp.asarray(TGT))
  weights = post_model.attention_weights(SRC, tgt_in)
  b, s = SRC.shape
  t = tgt_in.shape[1]
  assert weights['encoder_self'].shape == (2, b, 4, s, s)
  assert weights['decoder_self'].shape == (2, b, 4, t, t)
  assert weights['cross'].shape == (2, b, 4, t, s)
  for probs in weights.values():
    assert probs.dtype == jnp.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  # No weight on future target positions or on source padding.
  future = np.triu(np.ones((t, t), bool), k=1)
  assert np.abs(np.asarray(weights['decoder_self'])[..., future]).max() == 0
  cross = np.asarray(weights['cross'])  # [L, B, N, T, S]
  assert np.abs(cross * (SRC == 0)[None, :, None, None, :]).max() == 0


def test_sharded_forward_equals_single_device(post_model):
  mesh_cfg = default.get_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 2, 2, 2
  mesh = sharding.create_mesh(mesh_cfg)
  rules = sharding.rules_from_config(mesh_cfg)
  src = np.concatenate([SRC, SRC[:1]])
  tgt_in = model_lib.shift_right(jnp.asarray(np.concatenate([TGT, TGT[:1]])))
  expected = post_model(src, tgt_in)
  graphdef, state = nnx.split(post_model)
  with jax.set_mesh(mesh), sharding.logical_rules(rules):
    state = jax.device_put(state, sharding.param_shardings(state, mesh, rules))

    @jax.jit
    def forward(state, src, tgt_in):
      return nnx.merge(graphdef, state)(src, tgt_in)

    batch = sharding.batch_sharding(mesh)
    logits = forward(state, jax.device_put(src, batch), jax.device_put(tgt_in, batch))
  np.testing.assert_allclose(logits, expected, atol=1e-5)
