"""Tests for the post-2017 model options: RoPE, ALiBi, RMSNorm, SwiGLU/GeGLU, no biases.

Each option must keep the model's invariants (cached decoding equals the teacher-forced
pass, packed rows equal separate rows, logical axis names on every parameter) and do
what its paper says (RoPE scores depend on offsets only; ALiBi's slopes). Beams that
share a cache row, with RoPE and ALiBi, are tested in tests/test_decode.py.
"""

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

# One layer a stack keeps the compiles cheap; 4 heads of 8 features.
BASE = model_lib.TransformerConfig(
    vocab_size=50, num_encoder_layers=1, num_decoder_layers=1, d_model=32,
    num_heads=4, d_ff=48, dropout_rate=0.1, max_len=32)

VARIANTS = {
    'rope': dict(positions='rope'),
    'alibi': dict(positions='alibi'),
    'rmsnorm': dict(norm='rmsnorm'),
    'swiglu': dict(feed_forward='swiglu'),
    'geglu': dict(feed_forward='geglu'),
    'no_bias': dict(use_bias=False, share_embeddings=False),
    # The modern combination: pre-LN, RMSNorm, SwiGLU, RoPE.
    'modern': dict(layer_norm='pre', norm='rmsnorm', feed_forward='swiglu',
                   positions='rope'),
}

def build(seed=0, **overrides):
  cfg = dataclasses.replace(BASE, **overrides)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  # Non-zero biases and norm offsets, so a dropped or misplaced one would show.
  params = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(seed + 7), len(jax.tree.leaves(params))))

  def perturb(path, p):
    if p.ndim == 1 or 'bias' in str(path[-1]):
      return p + 0.1 * jax.random.normal(next(keys), p.shape, p.dtype)
    return p

  nnx.update(model, jax.tree.map_with_path(perturb, params))
  return model


def num_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.fixture(scope='module', params=list(VARIANTS))
def variant(request):
  return request.param, build(**VARIANTS[request.param])


def test_cached_decoding_matches_teacher_forcing(variant):
  """Two positions prefilled in one cached pass, then one per step."""
  name, model = variant
  tgt_in = model_lib.shift_right(jnp.asarray(TGT))
  expected = model(SRC, tgt_in)
  encoded = model.encode(SRC)
  length = tgt_in.shape[1]
  cache = model.init_cache(encoded, SRC, length + 2)
  step = jax.jit(model_lib.Transformer.decode_step)
  logits, cache = step(model, tgt_in[:, :2], cache, index=0)
  got = [logits]
  for t in range(2, length):
    logits, cache = step(model, tgt_in[:, t:t + 1], cache, index=t)
    got.append(logits)
  valid = np.asarray(tgt_in != 0)
  np.testing.assert_allclose(np.concatenate(got, 1)[valid], np.asarray(expected)[valid],
                             atol=2e-5, err_msg=name)


def _pack(rows):
  tokens, segments, positions = [], [], []
  for i, row in enumerate(rows):
    n = int((row != 0).sum())
    tokens += list(row[:n])
    segments += [i + 1] * n
    positions += list(range(n))
  pad = 3
  return (np.array([tokens + [0] * pad], np.int32),
          np.array([segments + [0] * pad], np.int32),
          np.array([positions + [0] * pad], np.int32))


@pytest.mark.parametrize('positions', ['rope', 'alibi'])
def test_packed_rows_match_separate_rows(positions):
  model = build(positions=positions)
  src, src_seg, src_pos = _pack(SRC)
  tgt, tgt_seg, tgt_pos = _pack(TGT)
  tgt_in = model_lib.shift_right(jnp.asarray(tgt), jnp.asarray(tgt_pos))
  packed = model(src, tgt_in, src_segments=src_seg, tgt_segments=tgt_seg,
                 src_positions=src_pos, tgt_positions=tgt_pos)
  separate = model(SRC, model_lib.shift_right(jnp.asarray(TGT)))
  start = 0
  for b in range(len(TGT)):
    n = int((TGT[b] != 0).sum())
    np.testing.assert_allclose(packed[0, start:start + n], separate[b, :n], atol=2e-5)
    start += n
  # Relative positions: numbering the packed row 0..n-1 instead of restarting
  # shifts each sentence's positions by a constant, which changes nothing.
  continuing = model(src, tgt_in, src_segments=src_seg, tgt_segments=tgt_seg)
  np.testing.assert_allclose(continuing, packed, atol=2e-5)


def test_rope_scores_depend_only_on_relative_offsets():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 3, 16))  # [B, T, N, H]

  def score(m, n):
    rq = model_lib.rotary_embedding(q, jnp.array([[m]]))
    rk = model_lib.rotary_embedding(k, jnp.array([[n]]))
    return float(jnp.sum(rq * rk, axis=-1)[0, 0, 0])

  for m, n, shift in ((3, 1, 10), (0, 7, 25), (40, 40, 3)):
    np.testing.assert_allclose(score(m, n), score(m + shift, n + shift), rtol=1e-4)
  assert abs(score(3, 1) - score(1, 3)) > 1e-3  # Direction matters, not just distance.
  # Position 0 is the identity; rotations keep norms.
  np.testing.assert_allclose(model_lib.rotary_embedding(q, jnp.zeros((1, 1), int)), q,
                             atol=1e-6)
  rotated = model_lib.rotary_embedding(q, jnp.array([[17]]))
  np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1),
                             jnp.linalg.norm(q, axis=-1), rtol=1e-5)


def test_rope_matches_the_rotation_formula():
  """Pair i (features i and i + H/2) turns by pos * base^(-2i/H)."""
  h, pos = 8, 5
  x = jax.random.normal(jax.random.key(1), (1, 1, 1, h))
  out = np.asarray(model_lib.rotary_embedding(x, jnp.array([[pos]])))[0, 0, 0]
  x = np.asarray(x)[0, 0, 0]
  for i in range(h // 2):
    angle = pos * 10000.0 ** (-2 * i / h)
    c, s = math.cos(angle), math.sin(angle)
    np.testing.assert_allclose(out[i], x[i] * c - x[i + h // 2] * s, atol=1e-5)
    np.testing.assert_allclose(out[i + h // 2], x[i + h // 2] * c + x[i] * s, atol=1e-5)


def _reference_slopes(n):
  """ALiBi's reference implementation (ofirpress/attention_with_linear_biases)."""
  def power_of_2(n):
    start = 2 ** (-2 ** -(math.log2(n) - 3))
    return [start * start ** i for i in range(n)]
  if math.log2(n).is_integer():
    return power_of_2(n)
  closest = 2 ** math.floor(math.log2(n))
  return power_of_2(closest) + _reference_slopes(2 * closest)[0::2][:n - closest]


@pytest.mark.parametrize('heads', [1, 2, 4, 6, 8, 12, 16, 20])
def test_alibi_slopes_match_the_formula(heads):
  np.testing.assert_allclose(model_lib.alibi_slopes(heads), _reference_slopes(heads),
                             rtol=1e-6)


def test_alibi_slopes_known_values():
  np.testing.assert_allclose(model_lib.alibi_slopes(8), [2.0 ** -k for k in range(1, 9)])
  # 6 heads: the 4 slopes of 4 heads (2^-2 .. 2^-8), then 2^-1 and 2^-3 of 8 heads.
  np.testing.assert_allclose(model_lib.alibi_slopes(6),
                             [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


def test_alibi_bias_uses_distances_within_packed_positions():
  positions = jnp.array([[0, 1, 2, 0, 1]])  # Two packed sentences.
  bias = np.asarray(model_lib.alibi_bias(positions, positions, 2))  # [1, N, T, S]
  slopes = model_lib.alibi_slopes(2)
  assert bias.shape == (1, 2, 5, 5)
  np.testing.assert_allclose(bias[0, 1, 2, 0], -2 * slopes[1])
  np.testing.assert_allclose(bias[0, 0, 0, 2], -2 * slopes[0])  # Bidirectional.
  np.testing.assert_allclose(bias[0, 0, 4, 3], -slopes[0])  # Restarted positions.
  np.testing.assert_allclose(np.diagonal(bias[0], axis1=1, axis2=2), 0)


def test_alibi_xla_attention_equals_einsum_reference():
  xla = build(positions='alibi', attention_impl='xla')
  einsum = build(positions='alibi', attention_impl='einsum')
  tgt_in = model_lib.shift_right(jnp.asarray(TGT))
  np.testing.assert_allclose(xla(SRC, tgt_in), einsum(SRC, tgt_in), atol=2e-5)


def test_attention_positions_only_in_self_attention():
  model = build(positions='rope')
  layer = model.decoder.layers[0]
  assert layer.self_attention.rope and not layer.cross_attention.rope
  assert model.encoder.layers[0].self_attention.rope
  assert model.encoder.positions is None and model.decoder.positions is None


def _ffn_count(cfg):
  d, f = cfg.d_model, cfg.ffn_hidden_dim
  matrices = (3 if cfg.feed_forward != 'relu' else 2) * d * f
  biases = ((2 if cfg.feed_forward != 'relu' else 1) * f + d) if cfg.use_bias else 0
  return matrices + biases


@pytest.mark.parametrize('name', ['paper', *VARIANTS])
def test_parameter_count_formula(name):
  cfg = dataclasses.replace(BASE, **VARIANTS.get(name, {}))
  d, v, n = cfg.d_model, cfg.vocab_size, cfg.num_encoder_layers
  attention = 4 * d * d + (4 * d if cfg.use_bias else 0)
  norm = 2 * d if cfg.norm == 'layernorm' else d
  positions = cfg.max_len * d if cfg.positions == 'learned' else 0
  encoder = n * (attention + _ffn_count(cfg) + 2 * norm) + positions
  decoder = n * (2 * attention + _ffn_count(cfg) + 3 * norm) + positions
  final_norms = 2 * norm if cfg.layer_norm == 'pre' else 0
  embeddings = v * d if cfg.share_embeddings else 2 * v * d + d * v + (
      v if cfg.use_bias else 0)
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  assert num_params(abstract) == encoder + decoder + embeddings + final_norms


@pytest.mark.parametrize('d_ff, hidden', [(2048, 1368), (1024, 680), (48, 32), (6, 8)])
def test_gated_ffn_width_keeps_the_parameter_count(d_ff, hidden):
  cfg = dataclasses.replace(BASE, d_model=512, d_ff=d_ff, feed_forward='swiglu')
  assert cfg.ffn_hidden_dim == hidden and hidden % 8 == 0
  if d_ff >= 48:  # 3 * D * F' within 2% of ReLU's 2 * D * d_ff.
    assert abs(3 * hidden - 2 * d_ff) / (2 * d_ff) < 0.02
  assert dataclasses.replace(cfg, feed_forward='relu').ffn_hidden_dim == d_ff


def test_swiglu_and_geglu_compute_the_gated_formula():
  for kind, act in (('swiglu', jax.nn.silu),
                    ('geglu', lambda x: jax.nn.gelu(x, approximate=False))):
    cfg = dataclasses.replace(BASE, feed_forward=kind)
    ffn = model_lib.FeedForward(cfg, rngs=nnx.Rngs(0))
    for p in (ffn.bi, ffn.bg, ffn.bo):
      p.value = jax.random.normal(jax.random.key(2), p.shape)
    x = jax.random.normal(jax.random.key(3), (2, 3, cfg.d_model))
    expected = (act(x @ ffn.wg[...] + ffn.bg[...]) * (x @ ffn.wi[...] + ffn.bi[...])
                ) @ ffn.wo[...] + ffn.bo[...]
    np.testing.assert_allclose(ffn(x), expected, atol=1e-5, err_msg=kind)


def test_rmsnorm_formula():
  cfg = dataclasses.replace(BASE, norm='rmsnorm', layer_norm='pre')
  model = build(norm='rmsnorm', layer_norm='pre')
  norm = model.encoder.final_norm
  assert isinstance(norm, nnx.RMSNorm)
  x = jax.random.normal(jax.random.key(4), (2, 3, cfg.d_model)) + 3.0
  rms = jnp.sqrt(jnp.mean(x ** 2, axis=-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(norm(x), x / rms * norm.scale[...], rtol=1e-5)


def test_no_bias_leaves_no_bias_in_any_linear():
  linear_biases = {'query_bias', 'key_bias', 'value_bias', 'out_bias', 'bi', 'bg', 'bo'}
  for use_bias, kind in ((True, 'relu'), (False, 'relu'), (False, 'swiglu')):
    model = build(use_bias=use_bias, feed_forward=kind, share_embeddings=False)
    paths = [tuple(map(str, path)) for path, _ in
             nnx.to_flat_state(nnx.state(model, nnx.Param))]
    names = {path[-1] for path in paths}
    output_bias = ('decoder', 'output_projection', 'bias') in paths
    if use_bias:
      assert linear_biases - {'bg'} <= names and output_bias
    else:
      assert not names & linear_biases and not output_bias, names
      # LayerNorm keeps its offset beta: it is not a linear map's bias.
      assert any(path[-1] == 'bias' and 'residual' in path[-3] for path in paths)


def test_every_new_parameter_has_logical_names_and_shards():
  cfg = dataclasses.replace(BASE, num_heads=8, d_model=64, d_ff=96, layer_norm='pre',
                            norm='rmsnorm', feed_forward='geglu', positions='alibi',
                            use_bias=False, share_embeddings=False, vocab_size=64)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  allowed = {'vocab', 'embed', 'heads', 'head_dim', 'mlp', None}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = variable.get_metadata().get('out_sharding')
    assert names is not None and len(names) == len(variable.shape), path
    assert set(names) <= allowed, (path, names)
  # And the sharded forward pass equals the single-device one (tensor axis splits
  # the heads and the gated hidden layer).
  mesh_cfg = default.get_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 2, 2, 2
  mesh = sharding.create_mesh(mesh_cfg)
  rules = sharding.rules_from_config(mesh_cfg)
  src = np.concatenate([SRC, SRC[:1]])
  tgt_in = model_lib.shift_right(jnp.asarray(np.concatenate([TGT, TGT[:1]])))
  expected = model(src, tgt_in)
  graphdef, state = nnx.split(model)
  with jax.set_mesh(mesh), sharding.logical_rules(rules):
    state = jax.device_put(state, sharding.param_shardings(state, mesh, rules))

    @jax.jit
    def forward(state, src, tgt_in):
      return nnx.merge(graphdef, state)(src, tgt_in)

    batch = sharding.batch_sharding(mesh)
    logits = forward(state, jax.device_put(src, batch), jax.device_put(tgt_in, batch))
  np.testing.assert_allclose(logits, expected, atol=2e-5)


def test_modern_bfloat16_close_to_float32():
  f32 = build(**VARIANTS['modern'])
  bf16 = build(**VARIANTS['modern'], dtype=jnp.bfloat16)
  tgt_in = model_lib.shift_right(jnp.asarray(TGT))
  a, b = f32(SRC, tgt_in), bf16(SRC, tgt_in)
  assert b.dtype == jnp.float32
  assert np.abs(np.asarray(a - b)).max() < 0.1 * np.abs(np.asarray(a)).max()


def test_config_errors_name_the_problem():
  with pytest.raises(ValueError, match="norm='batchnorm'"):
    dataclasses.replace(BASE, norm='batchnorm')
  with pytest.raises(ValueError, match="feed_forward='gelu'"):
    dataclasses.replace(BASE, feed_forward='gelu')
  with pytest.raises(ValueError, match='rope rotates pairs'):
    dataclasses.replace(BASE, positions='rope', head_dim=5)
  with pytest.raises(ValueError, match='positions='):
    dataclasses.replace(BASE, positions='t5')


@pytest.mark.parametrize('options', [dict(positions='alibi', feed_forward='geglu'),
                                     VARIANTS['modern']])
def test_language_model_family_gets_the_options(options):
  """The decoder-only family is built on the same layers: with RoPE/ALiBi (no added
  position table) its cached decoding equals its full pass."""
  from transformer_jax.model import families
  cfg = dataclasses.replace(BASE, family='decoder_only', num_encoder_layers=1, **options)
  lm = families.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=0))
  assert lm.decoder.positions is None
  tokens = jnp.asarray(np.random.RandomState(0).randint(4, 50, (2, 7)), jnp.int32)
  full = lm(tokens)
  cache = lm.init_cache(tokens.shape[0], tokens.shape[1])
  logits, cache = lm.decode_step(tokens[:, :3], cache, index=0)
  np.testing.assert_allclose(logits, full[:, :3], atol=2e-5)
  step = jax.jit(lambda token, cache, t: lm.decode_step(token, cache, index=t))
  for t in range(3, tokens.shape[1]):
    logits, cache = step(tokens[:, t:t + 1], cache, t)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=2e-5, err_msg=f't={t}')


def test_encoder_classifier_family_gets_alibi():
  """The encoder-only family: ALiBi in its (bidirectional) self-attention changes the
  pooled logits when the same tokens are reordered, without a position table."""
  from transformer_jax.model import families
  cfg = dataclasses.replace(BASE, family='encoder_only', positions='alibi',
                            norm='rmsnorm', num_decoder_layers=1)
  classifier = families.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=0))
  ids = jnp.asarray([[5, 6, 7, 8, 1, 0], [8, 7, 6, 5, 1, 0]], jnp.int32)
  encoded = classifier.encode(ids)
  # Token 6 in row 0 (position 1) and row 1 (position 2) sees the same bag of tokens
  # at different distances: a different encoding.
  assert np.abs(np.asarray(encoded[0, 1] - encoded[1, 2])).max() > 1e-4
  assert np.isfinite(np.asarray(classifier(ids))).all()
