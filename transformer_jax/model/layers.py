"""The Transformer's layers (Vaswani et al., 2017, Sec 3.1-3.5) as Flax NNX modules.

Top to bottom as the paper builds them:

  sinusoidal_positions     Sec 3.5's positional encoding
  Embedding                Sec 3.4: token embeddings x sqrt(d_model), shared with the softmax
  PositionalEncoding       sinusoidal (Sec 3.5) or learned (Table 3 row E), added
  MultiHeadAttention       Sec 3.2.2, scaled dot-product attention of Sec 3.2.1; RoPE
                           or ALiBi (``positions.py``) in self-attention when asked
  FeedForward              Sec 3.3: max(0, x W1 + b1) W2 + b2, or gated (SwiGLU, GeGLU)
  SublayerConnection       Sec 5.4: LayerNorm(x + Dropout(Sublayer(x))), or pre-LN;
                           LayerNorm or RMSNorm (``layer_norm``)
  EncoderLayer, DecoderLayer (Sec 3.1)

The stacks and the encoder-decoder are in ``transformer.py``. The post-2017 options
(``TransformerConfig.positions`` 'rope'/'alibi', ``norm``, ``feed_forward``,
``use_bias``) live in these shared layers, so every model built on them has them.

Shapes use B batch, S source length, T target length, D d_model, N heads, H head
dimension (d_k = d_v), F d_ff, V vocabulary, E a decode cache's entries per row.

Each sub-layer has one forward path with an optional decode cache (keys and values
of earlier positions, ``MultiHeadAttention.__call__``): teacher-forced training,
prefilling a prompt and one-step decoding are the same code. Which cache entries a
query sees is a mask the caller passes; the model knows nothing about how a search
uses the entries (beams, ancestry, ragged prompts: ``inference/``).

Every parameter carries logical axis names (``out_sharding`` metadata, read by
``sharding.param_shardings``); activations are constrained with ``act_*`` names through
``sharding.constrain``, a no-op outside a mesh. Parameters are created unsharded
(``eager_sharding=False``) so the model builds without a mesh; the training code
places them.

Packed rows (several sentences in one row) carry segment ids (0 = padding,
1..k = sentence); attention never crosses a segment boundary.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax import sharding
from transformer_jax.model import attention as attention_lib
from transformer_jax.model.config import TransformerConfig
from transformer_jax.model.positions import alibi_bias, rotary_embedding

Array = jax.Array
Cache = dict[str, Any]


def sinusoidal_positions(positions: Array, d_model: int) -> Array:
  """Sec 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(same).

  Computed from the positions themselves (no table), so any length works.

  Args:
    positions: [...] integer positions.
    d_model: D, even.

  Returns:
    [..., D] float32, sines at even and cosines at odd feature indices.
  """
  two_i = jnp.arange(0, d_model, 2, dtype=jnp.float32)  # [D/2]
  angles = positions[..., None].astype(jnp.float32) / jnp.power(10000.0, two_i / d_model)
  # Interleave sin (even indices) and cos (odd), as the formula writes it.
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(
      *positions.shape, d_model)


def _param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int],
           names: tuple[str | None, ...], dtype) -> nnx.Param:
  """A parameter with logical axis names, created unsharded (no mesh needed)."""
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=names,
                   eager_sharding=False)


def layer_norm(cfg: TransformerConfig, rngs: nnx.Rngs) -> nnx.LayerNorm | nnx.RMSNorm:
  """LayerNorm (the paper), or RMSNorm (Zhang & Sennrich 2019: x / rms(x) * g, no
  mean subtraction and no bias), as ``cfg.norm`` says."""
  meta = {'out_sharding': ('embed',), 'eager_sharding': False}
  # epsilon 1e-6 as tensor2tensor; the paper does not give one.
  if cfg.norm == 'rmsnorm':
    return nnx.RMSNorm(cfg.d_model, epsilon=1e-6, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, scale_metadata=meta, rngs=rngs)
  return nnx.LayerNorm(cfg.d_model, epsilon=1e-6, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, scale_metadata=meta,
                       bias_metadata=meta, rngs=rngs)


def _bias(cfg: TransformerConfig, rngs: nnx.Rngs, shape: Sequence[int],
          names: tuple[str | None, ...]) -> nnx.Param | None:
  """A zero-initialised bias, or None when ``cfg.use_bias`` is off."""
  if not cfg.use_bias:
    return None
  return _param(rngs, jax.nn.initializers.zeros, shape, names, cfg.param_dtype)


def add_bias(y: Array, bias: nnx.Param | None) -> Array:
  return y if bias is None else y + bias[...].astype(y.dtype)


# Glorot-uniform over (fan_in, fan_out) with multi-axis kernels, as tensor2tensor's
# dense layers; per-head kernels keep the heads axis for tensor-parallel sharding.
def _glorot(in_axis, out_axis):
  return jax.nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform',
                                              in_axis=in_axis, out_axis=out_axis)


class Embedding(nnx.Module):
  """Token embedding, scaled by sqrt(d_model) (Sec 3.4), and its transpose as softmax."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # stddev d_model^-0.5 so that the sqrt(d_model)-scaled embeddings have unit
    # variance and the shared pre-softmax projection starts with small logits.
    init = jax.nn.initializers.normal(stddev=cfg.d_model ** -0.5)
    self.embedding = _param(rngs, init, (cfg.vocab_size, cfg.d_model),
                            ('vocab', 'embed'), cfg.param_dtype)

  def __call__(self, ids: Array) -> Array:
    """ids [B, T] int -> [B, T, D] in the compute dtype."""
    # Gather first, then cast: a decoding step touches B rows, not all V.
    x = jnp.take(self.embedding[...], ids, axis=0).astype(self.cfg.dtype)
    return x * jnp.asarray(math.sqrt(self.cfg.d_model), self.cfg.dtype)

  def attend(self, x: Array) -> Array:
    """Sec 3.4: pre-softmax projection with the embedding matrix. [B,T,D] -> [B,T,V] f32."""
    table = self.embedding[...].astype(self.cfg.dtype)
    return jnp.einsum('btd,vd->btv', x, table, preferred_element_type=jnp.float32)


class OutputProjection(nnx.Module):
  """Pre-softmax linear map when embeddings are not shared. [B,T,D] -> [B,T,V] f32."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.kernel = _param(rngs, _glorot(0, 1), (cfg.d_model, cfg.vocab_size),
                         ('embed', 'vocab'), cfg.param_dtype)
    self.bias = _bias(cfg, rngs, (cfg.vocab_size,), ('vocab',))

  def __call__(self, x: Array) -> Array:
    logits = jnp.einsum('btd,dv->btv', x, self.kernel[...].astype(self.cfg.dtype),
                        preferred_element_type=jnp.float32)
    return add_bias(logits, self.bias)


class PositionalEncoding(nnx.Module):
  """Sinusoidal (Sec 3.5) or learned (Table 3 row E) positions, indexed by position.

  Built only for those two: RoPE and ALiBi act inside self-attention instead.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    if cfg.positions == 'learned':
      self.table = _param(rngs, jax.nn.initializers.normal(stddev=0.02),
                          (cfg.max_len, cfg.d_model), (None, 'embed'), cfg.param_dtype)

  def __call__(self, positions: Array) -> Array:
    """positions [B, T] int -> [B, T, D] in the compute dtype."""
    if self.cfg.positions == 'learned':
      return jnp.take(self.table[...], positions, axis=0).astype(self.cfg.dtype)
    return sinusoidal_positions(positions, self.cfg.d_model).astype(self.cfg.dtype)


def _masked_softmax(logits: Array, mask: Array, bias: Array | None) -> Array:
  """softmax over the last (key) axis of float32 logits, plus an optional logit bias
  (ALiBi), with masked keys left out."""
  if bias is not None:
    logits = logits + bias
  # A large finite negative (not -inf) keeps fully masked rows (padding queries
  # of packed rows) finite, as jax.nn.dot_product_attention does.
  return jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)


def einsum_attention(query: Array, key: Array, value: Array, mask: Array, *,
                     bias: Array | None = None, dropout: nnx.Dropout | None = None,
                     deterministic: bool = True) -> tuple[Array, Array]:
  """Sec 3.2.1: softmax(Q K^T / sqrt(d_k)) V, written out; the reference path.

  Args:
    query: [B, T, N, H]; key, value: [B, S, N, H]; mask: [B, 1, T, S] bool.
    bias: optional float32 logit bias broadcastable to [B, N, T, S] (ALiBi).
    dropout: optional dropout on the attention probabilities.

  Returns:
    ([B, T, N, H] in the query's dtype, probabilities [B, N, T, S] float32).
  """
  scale = 1.0 / math.sqrt(query.shape[-1])
  logits = jnp.einsum('btnh,bsnh->bnts', query, key,
                      preferred_element_type=jnp.float32) * scale  # [B, N, T, S]
  probs = _masked_softmax(logits, mask, bias)
  weights = probs if dropout is None else dropout(probs, deterministic=deterministic)
  out = jnp.einsum('bnts,bsnh->btnh', weights.astype(value.dtype), value)  # [B, T, N, H]
  return out, probs


def cached_attention(query: Array, key: Array, value: Array, mask: Array,
                     bias: Array | None = None) -> Array:
  """Sec 3.2.1 over a decode cache: each cache row's E entries of keys and values,
  attended to by that row's T queries (deterministic).

  The cache is heads-major, keys [B, N, H, E] and values [B, N, E, H], and the
  queries move to [B, N, T, H], so that both products are batched matrix products
  over the leading (b, n) axes, which XLA runs without transposing the cache (the
  layout ``benchmarks/decode.py`` found fastest on CPU). Which entries a query sees
  is the caller's ``mask``: its own prefix, or, with several beams of a sentence
  sharing one cache row, the entries of its own ancestry.

  Args:
    query: [B, T, N, H].
    key: [B, N, H, E]; value: [B, N, E, H].
    mask: bool, broadcastable to [B, N, T, E]: True where an entry is visible.
    bias: optional float32 logit bias broadcastable to [B, N, T, E] (ALiBi).

  Returns:
    [B, T, N, H] in the value's dtype.
  """
  scale = 1.0 / math.sqrt(query.shape[-1])
  query = jnp.swapaxes(query, 1, 2)  # [B, N, T, H]
  logits = jnp.einsum('bnth,bnhe->bnte', query, key,
                      preferred_element_type=jnp.float32) * scale  # [B, N, T, E]
  probs = _masked_softmax(logits, mask, bias)
  heads = jnp.einsum('bnte,bneh->bnth', probs.astype(value.dtype), value)
  return jnp.swapaxes(heads, 1, 2)  # [B, T, N, H]


class MultiHeadAttention(nnx.Module):
  """Sec 3.2.2: h heads of scaled dot-product attention, concatenated and projected.

  The projections W^Q, W^K, W^V [D, N, H] and W^O [N, H, D] carry biases, like the
  paper's "linear projections", unless ``cfg.use_bias`` is off.

  ``self_attention=True`` marks a self-attention, where positions act when
  ``cfg.positions`` is 'rope' (queries and keys rotated, ``rotate``) or 'alibi' (a
  logit bias, ``position_bias``); cross-attention compares positions of different
  sentences and gets neither.

  One forward path, ``__call__``, with an optional decode cache: without one the
  queries attend to ``inputs_kv`` (training, scoring); with one the keys and values
  of ``inputs_kv`` are first written into the cache and the queries attend to its
  entries (prefill of many positions and one-step decoding alike).
  """

  def __init__(self, cfg: TransformerConfig, *, self_attention: bool = False,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.rope = self_attention and cfg.positions == 'rope'
    self.alibi = self_attention and cfg.positions == 'alibi'
    d, n, h = cfg.d_model, cfg.num_heads, cfg.qkv_head_dim
    for name, dim in (('query', cfg.qk_head_dim), ('key', cfg.qk_head_dim),
                      ('value', h)):
      setattr(self, f'{name}_kernel', _param(rngs, _glorot(0, (1, 2)), (d, n, dim),
                                             ('embed', 'heads', 'head_dim'),
                                             cfg.param_dtype))
      setattr(self, f'{name}_bias', _bias(cfg, rngs, (n, dim), ('heads', 'head_dim')))
    self.out_kernel = _param(rngs, _glorot((0, 1), 2), (n, h, d),
                             ('heads', 'head_dim', 'embed'), cfg.param_dtype)
    self.out_bias = _bias(cfg, rngs, (d,), ('embed',))
    self.dropout = nnx.Dropout(cfg.attention_dropout_rate, rngs=rngs)

  def _project(self, x: Array, name: str) -> Array:
    """[B, T, D] -> [B, T, N, H] with W^Q, W^K or W^V."""
    dtype = self.cfg.dtype
    y = jnp.einsum('btd,dnh->btnh', x, getattr(self, f'{name}_kernel')[...].astype(dtype))
    y = add_bias(y, getattr(self, f'{name}_bias'))
    return sharding.constrain(y, ('act_batch', 'act_length', 'act_heads', None))

  def rotate(self, x: Array, positions: Array | None) -> Array:
    """RoPE on projected queries or keys [B, T, N, H] at ``positions`` [B, T];
    the identity unless this is a self-attention with ``positions='rope'``."""
    if not self.rope:
      return x
    return rotary_embedding(x, positions, self.cfg.rope_base)

  def position_bias(self, query_positions: Array | None,
                    key_positions: Array | None) -> Array | None:
    """ALiBi's logit bias [B, N, T, S] float32 for positions [B, T] and [B, S];
    None unless this is a self-attention with ``positions='alibi'``."""
    if not self.alibi:
      return None
    return alibi_bias(query_positions, key_positions, self.cfg.num_heads)

  def project_query(self, x: Array) -> Array:
    return self._project(x, 'query')

  def project_key_value(self, x: Array) -> tuple[Array, Array]:
    """[B, S, D] -> keys and values, each [B, S, N, H]."""
    return self._project(x, 'key'), self._project(x, 'value')

  def empty_cache(self, batch_size: int, length: int) -> Cache:
    """A cache of ``length`` zero entries per row: {'key': [B, N, H, E], 'value':
    [B, N, E, H]} in the compute dtype (the layout of ``cached_attention``)."""
    cfg = self.cfg
    return {'key': jnp.zeros((batch_size, cfg.num_heads, cfg.qk_head_dim, length),
                             cfg.dtype),
            'value': jnp.zeros((batch_size, cfg.num_heads, length, cfg.qkv_head_dim),
                               cfg.dtype)}

  def key_value_cache(self, x: Array) -> Cache:
    """[B, S, D] -> a full cache of its keys and values (a cross-attention's, built
    once per source): {'key': [B, N, H, S], 'value': [B, N, S, H]}."""
    key, value = self.project_key_value(x)  # [B, S, N, H]
    return {'key': jnp.transpose(key, (0, 2, 3, 1)), 'value': jnp.swapaxes(value, 1, 2)}

  def output(self, heads: Array) -> Array:
    """W^O: concatenated heads [B, T, N, H] -> [B, T, D]."""
    heads = sharding.constrain(heads, ('act_batch', 'act_length', 'act_heads', None))
    y = jnp.einsum('btnh,nhd->btd', heads, self.out_kernel[...].astype(self.cfg.dtype))
    return add_bias(y, self.out_bias)

  def attend(self, query: Array, key: Array, value: Array, mask: Array, *,
             bias: Array | None = None, deterministic: bool = True,
             probs_out: list | None = None) -> Array:
    """Attention over projected heads (no cache), through the configured kernel.

    Args:
      query: [B, T, N, H]; key, value: [B, S, N, H]; mask: an AttentionMask (what
        the fused kernels need) or a dense [B, 1, T, S] bool array.
      bias: optional float32 logit bias [B, N, T, S] (ALiBi). The einsum reference
        adds it to the logits, jax.nn.dot_product_attention's 'xla' implementation
        takes it; the fused kernels do not, so with a bias they fall back to xla.
      probs_out: when a list, the probabilities [B, N, T, S] are appended to it
        (visualisation only; uses the einsum path).

    Returns:
      [B, T, N, H].
    """
    attention_dropout = self.cfg.attention_dropout_rate > 0 and not deterministic
    if (self.cfg.attention_impl == 'einsum' or probs_out is not None or attention_dropout
        or query.shape[-1] != value.shape[-1]):
      # jax.nn.dot_product_attention neither returns probabilities nor applies
      # dropout to them, nor takes d_k != d_v, so those cases take the reference path.
      out, probs = einsum_attention(query, key, value, attention_lib.dense(mask),
                                    bias=bias, dropout=self.dropout,
                                    deterministic=deterministic)
      if probs_out is not None:
        probs_out.append(probs)
      return out
    if bias is not None:
      return jax.nn.dot_product_attention(query, key, value, bias=bias,
                                          mask=attention_lib.dense(mask),
                                          implementation='xla')
    return attention_lib.dot_product_attention(query, key, value, mask,
                                               impl=self.cfg.attention_impl)

  def __call__(self, inputs_q: Array, inputs_kv: Array | None, mask: Array, *,
               positions: Array | None = None, cache: Cache | None = None,
               index: Array | None = None, key_positions: Array | None = None,
               deterministic: bool = True,
               probs_out: list | None = None) -> tuple[Array, Cache | None]:
    """inputs_q [B, T, D] attends to inputs_kv [B, S, D], or through a cache.

    Without ``cache``: to the keys and values of ``inputs_kv`` under ``mask``
    (an AttentionMask or a dense [B, 1, T, S] bool array).

    With ``cache`` ({'key': [B, N, H, E], 'value': [B, N, E, H]}, see
    ``empty_cache`` and ``key_value_cache``): the keys and values of ``inputs_kv``
    (if not None; then S = T) are written into entries ``index .. index + T - 1``,
    and the queries attend to the cache's E entries under ``mask``, bool
    broadcastable to [B, 1, T, E]. RoPE keys are cached already rotated at their
    own position, so a cached key never needs touching again.

    Args:
      positions: [B, T] the queries' positions (and the new keys'), for RoPE and
        ALiBi in a self-attention; other attentions ignore them.
      key_positions: [B, E] each cache entry's position (ALiBi with a cache).
      index: int32 scalar, the first cache entry written.

    Returns:
      ([B, T, D], the updated cache, or None without one).
    """
    query = self.rotate(self.project_query(inputs_q), positions)
    if inputs_kv is not None:
      key, value = self.project_key_value(inputs_kv)  # [B, S, N, H]
      key = self.rotate(key, positions)
    if cache is None:
      out = self.attend(query, key, value, mask,
                        bias=self.position_bias(positions, positions),
                        deterministic=deterministic, probs_out=probs_out)
      return self.output(out), None
    if inputs_kv is not None:
      cache = {
          'key': jax.lax.dynamic_update_slice(  # [B, N, H, E]
              cache['key'], jnp.transpose(key, (0, 2, 3, 1)).astype(cache['key'].dtype),
              (0, 0, 0, index)),
          'value': jax.lax.dynamic_update_slice(  # [B, N, E, H]
              cache['value'], jnp.swapaxes(value, 1, 2).astype(cache['value'].dtype),
              (0, 0, index, 0))}
    out = cached_attention(query, cache['key'], cache['value'], mask,
                           self.position_bias(positions, key_positions))
    return self.output(out), cache


# Gated FFNs of Shazeer (2020), "GLU Variants Improve Transformer": the activation
# applied to the gate branch. GeGLU uses the exact (erf) GELU, as that paper does.
_GATE_ACTIVATIONS = {'swiglu': jax.nn.silu,
                     'geglu': functools.partial(jax.nn.gelu, approximate=False)}


class FeedForward(nnx.Module):
  """Sec 3.3: FFN(x) = max(0, x W1 + b1) W2 + b2, applied at each position.

  With ``cfg.feed_forward`` 'swiglu' or 'geglu' it is Shazeer's (2020) gated unit,
  FFN(x) = (act(x Wg + bg) * (x W1 + b1)) W2 + b2, act = Swish or GELU, with hidden
  width ``cfg.ffn_hidden_dim`` (2/3 of d_ff: the same parameter count as ReLU's).
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f = cfg.d_model, cfg.ffn_hidden_dim
    self.wi = _param(rngs, _glorot(0, 1), (d, f), ('embed', 'mlp'), cfg.param_dtype)
    self.bi = _bias(cfg, rngs, (f,), ('mlp',))
    if cfg.feed_forward in _GATE_ACTIVATIONS:
      self.wg = _param(rngs, _glorot(0, 1), (d, f), ('embed', 'mlp'), cfg.param_dtype)
      self.bg = _bias(cfg, rngs, (f,), ('mlp',))
    self.wo = _param(rngs, _glorot(0, 1), (f, d), ('mlp', 'embed'), cfg.param_dtype)
    self.bo = _bias(cfg, rngs, (d,), ('embed',))
    self.dropout = nnx.Dropout(cfg.relu_dropout_rate, rngs=rngs)

  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    """[B, T, D] -> [B, T, D] through a [B, T, F] hidden layer."""
    dtype = self.cfg.dtype
    h = add_bias(jnp.einsum('btd,df->btf', x, self.wi[...].astype(dtype)), self.bi)
    if self.cfg.feed_forward in _GATE_ACTIVATIONS:
      gate = add_bias(jnp.einsum('btd,df->btf', x, self.wg[...].astype(dtype)), self.bg)
      h = _GATE_ACTIVATIONS[self.cfg.feed_forward](gate) * h  # [B, T, F]
    else:
      h = jax.nn.relu(h)
    h = sharding.constrain(h, ('act_batch', 'act_length', 'act_mlp'))
    h = self.dropout(h, deterministic=deterministic)
    y = jnp.einsum('btf,fd->btd', h, self.wo[...].astype(dtype))
    return add_bias(y, self.bo)


class SublayerConnection(nnx.Module):
  """Residual connection around a sub-layer, with layer normalisation and dropout.

  post (Sec 3.1 / 5.4, the paper): LayerNorm(x + Dropout(Sublayer(x))).
  pre (Xiong et al. 2020; tensor2tensor's default): x + Dropout(Sublayer(LayerNorm(x))).
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.pre_norm = cfg.layer_norm == 'pre'
    self.norm = layer_norm(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

  def __call__(self, x: Array, sublayer: Callable[[Array], Array], *,
               deterministic: bool = True) -> Array:
    if self.pre_norm:
      return x + self.dropout(sublayer(self.norm(x)), deterministic=deterministic)
    return self.norm(x + self.dropout(sublayer(x), deterministic=deterministic))


def constrain_embed(x: Array) -> Array:
  return sharding.constrain(x, ('act_batch', 'act_length', 'act_embed'))


class EncoderLayer(nnx.Module):
  """Sec 3.1: self-attention, then the position-wise feed-forward network."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.self_attention = MultiHeadAttention(cfg, self_attention=True, rngs=rngs)
    self.attention_residual = SublayerConnection(cfg, rngs=rngs)
    self.feed_forward = FeedForward(cfg, rngs=rngs)
    self.ffn_residual = SublayerConnection(cfg, rngs=rngs)

  def __call__(self, x: Array, mask: Array, *, positions: Array | None = None,
               deterministic: bool = True, probs_out: list | None = None) -> Array:
    """x [B, S, D], mask [B, 1, S, S], positions [B, S] (RoPE/ALiBi) -> [B, S, D]."""
    x = self.attention_residual(
        x, lambda h: self.self_attention(h, h, mask, positions=positions,
                                         deterministic=deterministic,
                                         probs_out=probs_out)[0],
        deterministic=deterministic)
    x = self.ffn_residual(
        x, lambda h: self.feed_forward(h, deterministic=deterministic),
        deterministic=deterministic)
    return constrain_embed(x)


class DecoderLayer(nnx.Module):
  """Sec 3.1: masked self-attention, attention over the encoder output, then FFN.

  ``cross_attention=False`` drops the encoder-decoder sub-layer: the block of a
  decoder-only language model (``model/lm.py``), otherwise the same modules.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs,
               cross_attention: bool = True):
    self.self_attention = MultiHeadAttention(cfg, self_attention=True, rngs=rngs)
    self.self_attention_residual = SublayerConnection(cfg, rngs=rngs)
    self.cross_attention = MultiHeadAttention(cfg, rngs=rngs) if cross_attention else None
    self.cross_attention_residual = (SublayerConnection(cfg, rngs=rngs)
                                     if cross_attention else None)
    self.feed_forward = FeedForward(cfg, rngs=rngs)
    self.ffn_residual = SublayerConnection(cfg, rngs=rngs)

  def empty_cache(self, batch_size: int, length: int,
                  encoded: Array | None = None) -> Cache:
    """This layer's decode cache: {'self': ``length`` empty self-attention entries
    per row} (+ {'cross': the keys and values of ``encoded`` [B, S, D]})."""
    cache = {'self': self.self_attention.empty_cache(batch_size, length)}
    if self.cross_attention is not None:
      cache['cross'] = self.cross_attention.key_value_cache(encoded)
    return cache

  def __call__(self, y: Array, encoded: Array | None, self_mask: Array,
               cross_mask: Array | None, *, positions: Array | None = None,
               cache: Cache | None = None, index: Array | None = None,
               key_positions: Array | None = None, deterministic: bool = True,
               self_probs_out: list | None = None,
               cross_probs_out: list | None = None) -> tuple[Array, Cache | None]:
    """The layer over T target rows, teacher-forced or with a cache: one code path.

    Without a cache the rows attend to each other (training, scoring). With one
    (``empty_cache``), their keys and values are written into the cache at entries
    ``index .. index + T - 1`` and they attend to its entries: prefilling a prompt
    (T positions) and one-step decoding (T = 1, or several beams sharing a row's
    entries) are the same call.

    Args:
      y: [B, T, D] embedded target rows.
      encoded: [B, S, D] encoder output (None with a cache, which holds its keys
        and values, or without cross-attention).
      self_mask: [B, 1, T, T] (AttentionMask or bool) without a cache; with one,
        bool broadcastable to [B, 1, T, E]: the cache entries each row sees.
      cross_mask: [B, 1, T, S] (AttentionMask or bool; with a cache [B, 1, 1, S]).
      positions: [B, T] the target positions, for RoPE/ALiBi self-attention.
      cache, index: this layer's cache and the first entry written (int32).
      key_positions: [B, E] the cache entries' positions (ALiBi).
      self_probs_out, cross_probs_out: lists that collect attention probabilities
        (visualisation, no cache).

    Returns:
      ([B, T, D], the updated cache, or None without one).
    """
    new_cache = None if cache is None else dict(cache)

    def self_attend(h):
      out, new_cache_self = self.self_attention(
          h, h, self_mask, positions=positions, key_positions=key_positions,
          cache=None if cache is None else cache['self'], index=index,
          deterministic=deterministic, probs_out=self_probs_out)
      if cache is not None:
        new_cache['self'] = new_cache_self
      return out

    y = self.self_attention_residual(y, self_attend, deterministic=deterministic)
    if self.cross_attention is not None:
      y = self.cross_attention_residual(
          y, lambda h: self.cross_attention(
              h, encoded if cache is None else None, cross_mask,
              cache=None if cache is None else cache['cross'],
              deterministic=deterministic, probs_out=cross_probs_out)[0],
          deterministic=deterministic)
    y = self.ffn_residual(
        y, lambda h: self.feed_forward(h, deterministic=deterministic),
        deterministic=deterministic)
    return constrain_embed(y), new_cache
