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
dimension (d_k = d_v), F d_ff, V vocabulary, L a cache's length.

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


def attention_mask(query_valid: Array, key_valid: Array, *,
                   query_segments: Array | None = None,
                   key_segments: Array | None = None,
                   causal: bool = False) -> Array:
  """Boolean mask [B, 1, Tq, Tk]: True where a query may attend to a key.

  Args:
    query_valid: [B, Tq] bool, False at padding queries (used only with segments).
    key_valid: [B, Tk] bool, False at padding keys.
    query_segments, key_segments: [B, Tq], [B, Tk] segment ids of packed rows;
      attention stays within a segment.
    causal: Sec 3.2.3: query i sees keys j <= i only.
  """
  mask = jnp.broadcast_to(key_valid[:, None, :],
                          (key_valid.shape[0], query_valid.shape[1], key_valid.shape[1]))
  if query_segments is not None and key_segments is not None:
    mask &= query_segments[:, :, None] == key_segments[:, None, :]
    mask &= query_valid[:, :, None]
  if causal:
    tq, tk = query_valid.shape[1], key_valid.shape[1]
    mask &= jnp.arange(tq)[:, None] >= jnp.arange(tk)[None, :]
  return mask[:, None, :, :]


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
  if bias is not None:
    logits = logits + bias
  # A large finite negative (not -inf) keeps fully masked rows (padding queries
  # of packed rows) finite, as jax.nn.dot_product_attention does.
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  weights = probs
  if dropout is not None:
    weights = dropout(weights, deterministic=deterministic)
  out = jnp.einsum('bnts,bsnh->btnh', weights.astype(value.dtype), value)  # [B, T, N, H]
  return out, probs


def single_query_attention(query: Array, key: Array, value: Array,
                           mask: Array, bias: Array | None = None) -> Array:
  """Sec 3.2.1 for one decoding position per row, over a heads-major cache.

  Keys are laid out [B, N, H, L] and values [B, N, L, H], and the queries are moved
  to [B, N, K, H], so that both products are plain batched matrix products over
  (b, n), the leading axes: XLA runs them without transposing the cache (on CPU,
  [B, K, N, H] queries made the products 3x slower, and keys laid out [B, N, L, H]
  2x slower). ``query`` may hold K rows per key row (the K beams of one sentence,
  adjacent), which then share that row's keys and values.

  Args:
    query: [B, K, N, H].
    key: [B, N, H, L]; value: [B, N, L, H].
    mask: bool, broadcastable to [B, N, K, L]: True where a key is visible.
    bias: optional float32 logit bias broadcastable to [B, N, K, L] (ALiBi).

  Returns:
    [B, K, N, H] in the value's dtype.
  """
  scale = 1.0 / math.sqrt(query.shape[-1])
  query = jnp.swapaxes(query, 1, 2)  # [B, N, K, H]
  logits = jnp.einsum('bnkh,bnhl->bnkl', query, key,
                      preferred_element_type=jnp.float32) * scale  # [B, N, K, L]
  if bias is not None:
    logits = logits + bias
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  heads = jnp.einsum('bnkl,bnlh->bnkh', probs.astype(value.dtype), value)
  return jnp.swapaxes(heads, 1, 2)  # [B, K, N, H]


class MultiHeadAttention(nnx.Module):
  """Sec 3.2.2: h heads of scaled dot-product attention, concatenated and projected.

  The projections W^Q, W^K, W^V [D, N, H] and W^O [N, H, D] carry biases, like the
  paper's "linear projections", unless ``cfg.use_bias`` is off.

  ``self_attention=True`` marks a self-attention, where positions act when
  ``cfg.positions`` is 'rope' (queries and keys rotated, ``rotate``) or 'alibi' (a
  logit bias, ``position_bias``); cross-attention compares positions of different
  sentences and gets neither.
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

  def cache_key_value(self, x: Array) -> tuple[Array, Array]:
    """[B, S, D] -> keys [B, N, H, S] and values [B, N, S, H], a decode cache's
    layout (see ``single_query_attention``)."""
    key, value = self.project_key_value(x)  # [B, S, N, H]
    return jnp.transpose(key, (0, 2, 3, 1)), jnp.swapaxes(value, 1, 2)

  def output(self, heads: Array) -> Array:
    """W^O: concatenated heads [B, T, N, H] -> [B, T, D]."""
    heads = sharding.constrain(heads, ('act_batch', 'act_length', 'act_heads', None))
    y = jnp.einsum('btnh,nhd->btd', heads, self.out_kernel[...].astype(self.cfg.dtype))
    return add_bias(y, self.out_bias)

  def attend(self, query: Array, key: Array, value: Array, mask: Array, *,
             bias: Array | None = None, deterministic: bool = True,
             probs_out: list | None = None) -> Array:
    """Attention over projected heads and the output projection W^O.

    Args:
      query: [B, T, N, H]; key, value: [B, S, N, H]; mask: an AttentionMask (what
        the fused kernels need) or a dense [B, 1, T, S] bool array.
      bias: optional float32 logit bias [B, N, T, S] (ALiBi). The einsum reference
        adds it to the logits, jax.nn.dot_product_attention's 'xla' implementation
        takes it; the fused kernels do not, so with a bias they fall back to xla.
      probs_out: when a list, the probabilities [B, N, T, S] are appended to it
        (visualisation only; uses the einsum path).

    Returns:
      [B, T, D].
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
    elif bias is not None:
      out = jax.nn.dot_product_attention(query, key, value, bias=bias,
                                         mask=attention_lib.dense(mask),
                                         implementation='xla')
    else:
      out = attention_lib.dot_product_attention(query, key, value, mask,
                                                impl=self.cfg.attention_impl)
    return self.output(out)

  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Array, *,
               positions: Array | None = None, deterministic: bool = True,
               probs_out: list | None = None) -> Array:
    """inputs_q [B, T, D] attends to inputs_kv [B, S, D] under mask [B, 1, T, S].

    ``positions`` [B, T] (self-attention, T = S) feed RoPE or ALiBi when the config
    asks for them; other attentions ignore them.
    """
    key, value = self.project_key_value(inputs_kv)
    query = self.rotate(self.project_query(inputs_q), positions)
    key = self.rotate(key, positions)
    return self.attend(query, key, value, mask,
                       bias=self.position_bias(positions, positions),
                       deterministic=deterministic, probs_out=probs_out)


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
                                         probs_out=probs_out),
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

  def __call__(self, y: Array, encoded: Array, self_mask: Array, cross_mask: Array, *,
               positions: Array | None = None, deterministic: bool = True,
               self_probs_out: list | None = None,
               cross_probs_out: list | None = None) -> Array:
    """y [B, T, D], encoded [B, S, D], masks [B,1,T,T] and [B,1,T,S] -> [B, T, D].

    ``positions`` [B, T]: the target positions, for RoPE/ALiBi self-attention.
    """
    y = self.self_attention_residual(
        y, lambda h: self.self_attention(h, h, self_mask, positions=positions,
                                         deterministic=deterministic,
                                         probs_out=self_probs_out),
        deterministic=deterministic)
    if self.cross_attention is not None:
      y = self.cross_attention_residual(
          y, lambda h: self.cross_attention(h, encoded, cross_mask,
                                            deterministic=deterministic,
                                            probs_out=cross_probs_out),
          deterministic=deterministic)
    y = self.ffn_residual(
        y, lambda h: self.feed_forward(h, deterministic=deterministic),
        deterministic=deterministic)
    return constrain_embed(y)

  def step(self, y: Array, encoded: Array, self_mask: Array, cross_mask: Array,
           cache: Cache, index: Array) -> tuple[Array, Cache]:
    """One decoding position with cached keys and values (deterministic).

    Args:
      y: [R, 1, D], the embedded token at position ``index`` of each of the
        R = B * K rows (the K beams of a source adjacent).
      encoded: [B, S, D]; unused when ``cache`` holds the cross-attention keys.
      self_mask: [B, 1, K, L * K] bool: which cached (position, slot) each beam
        sees (see ``Transformer.decode_step``).
      cross_mask: [B, 1, 1, S] bool, the source's non-padding positions.
      cache: {'key': [B, N, H, L * K], 'value': [B, N, L * K, H]} of this layer's
        self-attention (K slots per source and position), and optionally
        {'cross_key': [B, N, H, S], 'cross_value': [B, N, S, H]}.
      index: int32 scalar, the position being decoded.

    Returns:
      ([R, 1, D], the updated cache).
    """
    cache = dict(cache)
    rows = y.shape[0]
    sources, beams = self_mask.shape[0], rows // self_mask.shape[0]

    def self_attend(h):
      attention = self.self_attention
      positions = jnp.full((rows, 1), index, jnp.int32)
      query = attention.rotate(attention.project_query(h), positions)  # [R, 1, N, H]
      key, value = attention.project_key_value(h)
      # RoPE: keys are cached rotated at their own position, so a cached key never
      # needs touching again (rotations compose into the relative offset).
      key = attention.rotate(key, positions)
      # Position ``index`` of the K slots: entries index * K .. index * K + K - 1.
      key = key.reshape(sources, beams, *key.shape[2:])  # [B, K, N, H]
      key = jnp.transpose(key, (0, 2, 3, 1)).astype(cache['key'].dtype)  # [B, N, H, K]
      cache['key'] = jax.lax.dynamic_update_slice(
          cache['key'], key, (0, 0, 0, index * beams))  # [B, N, H, L * K]
      value = value.reshape(sources, beams, *value.shape[2:])  # [B, K, N, H]
      value = jnp.swapaxes(value, 1, 2).astype(cache['value'].dtype)  # [B, N, K, H]
      cache['value'] = jax.lax.dynamic_update_slice(
          cache['value'], value, (0, 0, index * beams, 0))  # [B, N, L * K, H]
      query = query.reshape(sources, beams, *query.shape[2:])  # [B, K, N, H]
      # ALiBi: cache entry e holds position e // K (position-major, slot-minor).
      entries = cache['key'].shape[-1]
      key_positions = (jnp.arange(entries, dtype=jnp.int32) // beams)[None]  # [1, L*K]
      bias = attention.position_bias(jnp.reshape(index, (1, 1)),
                                     key_positions)  # [1, N, 1, L * K] or None
      heads = single_query_attention(query, cache['key'], cache['value'], self_mask,
                                     bias)
      return attention.output(heads.reshape(rows, 1, *heads.shape[2:]))

    def cross_attend(h):
      attention = self.cross_attention
      if 'cross_key' in cache:
        key, value = cache['cross_key'], cache['cross_value']
      else:
        key, value = attention.cache_key_value(encoded)
      query = attention.project_query(h)  # [R, 1, N, H]
      query = query.reshape(sources, beams, *query.shape[2:])  # [B, K, N, H]
      heads = single_query_attention(query, key, value, cross_mask)
      return attention.output(heads.reshape(rows, 1, *heads.shape[2:]))

    y = self.self_attention_residual(y, self_attend)
    if self.cross_attention is not None:
      y = self.cross_attention_residual(y, cross_attend)
    y = self.ffn_residual(y, self.feed_forward)
    return y, cache
