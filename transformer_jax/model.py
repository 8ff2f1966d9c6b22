"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), Section 3.

Flax NNX modules, top to bottom as the paper builds them:

  TransformerConfig        the hyper-parameters of Sec 3 / Table 3, from config.model
  sinusoidal_positions     Sec 3.5's positional encoding
  Embedding                Sec 3.4: token embeddings x sqrt(d_model), shared with the softmax
  PositionalEncoding       sinusoidal (Sec 3.5) or learned (Table 3 row E)
  MultiHeadAttention       Sec 3.2.2, scaled dot-product attention of Sec 3.2.1
  FeedForward              Sec 3.3: max(0, x W1 + b1) W2 + b2
  SublayerConnection       Sec 5.4: LayerNorm(x + Dropout(Sublayer(x))), or pre-LN
  EncoderLayer, DecoderLayer, Encoder, Decoder (Sec 3.1)
  Transformer              encode, teacher-forced decode, cached one-token decode_step

Shapes use B batch, S source length, T target length, D d_model, N heads, H head
dimension (d_k = d_v), F d_ff, V vocabulary, L a cache's length.

Every parameter carries logical axis names (``out_sharding`` metadata, read by
``sharding.param_shardings``); activations are constrained with ``act_*`` names through
``sharding.constrain``, a no-op outside a mesh. Parameters are created unsharded
(``eager_sharding=False``) so the model builds without a mesh; the training code
places them.

Inputs are int32 token ids with pad = 0. Packed rows (several sentences in one row)
carry segment ids (0 = padding, 1..k = sentence) and positions that restart at 0 for
each sentence; attention never crosses a segment boundary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer_jax import sharding

Array = jax.Array
Cache = dict[str, Any]

_LAYER_NORMS = ('post', 'pre')
_POSITIONS = ('sinusoidal', 'learned')
_ATTENTION_IMPLS = ('xla', 'einsum')
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of the encoder-decoder Transformer (Sec 3, Table 3).

  Defaults are the paper's base model; ``from_config`` builds one from
  ``config.model``.
  """
  vocab_size: int
  num_encoder_layers: int = 6  # N
  num_decoder_layers: int = 6  # N
  d_model: int = 512
  num_heads: int = 8  # h
  head_dim: int | None = None  # d_k = d_v; None -> d_model // num_heads.
  key_dim: int | None = None  # d_k alone (Table 3 row B); None -> the head dim.
  d_ff: int = 2048
  dropout_rate: float = 0.1  # P_drop: sub-layer outputs, embeddings + positions.
  attention_dropout_rate: float = 0.0  # tensor2tensor extra: on attention probs.
  relu_dropout_rate: float = 0.0  # tensor2tensor extra: inside the FFN.
  max_len: int = 256  # Rows of the learned position table.
  share_embeddings: bool = True  # Sec 3.4: one matrix for inputs and the softmax.
  layer_norm: str = 'post'  # 'post' (the paper) or 'pre' (Xiong et al. 2020).
  positions: str = 'sinusoidal'  # 'sinusoidal' (Sec 3.5) or 'learned' (Table 3 E).
  dtype: Any = jnp.float32  # Compute dtype.
  param_dtype: Any = jnp.float32
  attention_impl: str = 'xla'  # 'xla': jax.nn.dot_product_attention; 'einsum'.
  pad_id: int = 0
  bos_id: int = 2

  def __post_init__(self):
    problems = []
    if self.layer_norm not in _LAYER_NORMS:
      problems.append(f'layer_norm={self.layer_norm!r} (expected one of {_LAYER_NORMS})')
    if self.positions not in _POSITIONS:
      problems.append(f'positions={self.positions!r} (expected one of {_POSITIONS})')
    if self.attention_impl not in _ATTENTION_IMPLS:
      problems.append(f'attention_impl={self.attention_impl!r} '
                      f'(expected one of {_ATTENTION_IMPLS})')
    if self.head_dim is None and self.d_model % self.num_heads:
      problems.append(f'd_model={self.d_model} is not divisible by '
                      f'num_heads={self.num_heads}; set head_dim')
    if self.positions == 'sinusoidal' and self.d_model % 2:
      problems.append(f'sinusoidal positions need an even d_model, got {self.d_model}')
    for name in ('vocab_size', 'num_encoder_layers', 'num_decoder_layers',
                 'd_model', 'num_heads', 'd_ff', 'max_len'):
      if getattr(self, name) <= 0:
        problems.append(f'{name}={getattr(self, name)} must be positive')
    for name in ('dropout_rate', 'attention_dropout_rate', 'relu_dropout_rate'):
      if not 0.0 <= getattr(self, name) < 1.0:
        problems.append(f'{name}={getattr(self, name)} must be in [0, 1)')
    if problems:
      raise ValueError('Invalid TransformerConfig: ' + '; '.join(problems) + '.')

  @property
  def qkv_head_dim(self) -> int:
    """H: the per-head dimension d_k = d_v (Sec 3.2.2)."""
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def qk_head_dim(self) -> int:
    """d_k of queries and keys: H unless ``key_dim`` sets it apart from d_v."""
    return self.key_dim if self.key_dim is not None else self.qkv_head_dim

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> TransformerConfig:
    """Builds the config from ``config.model`` (a ConfigDict or mapping).

    Dtype strings ('float32', 'bfloat16') become jnp dtypes. Unknown keys are an
    error, so a misspelt option is never silently ignored.
    """
    values = dict(model_cfg.items()) if hasattr(model_cfg, 'items') else dict(model_cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f'config.model has unknown keys {unknown}; TransformerConfig '
                       f'accepts {sorted(fields - {"vocab_size"})}.')
    values.pop('vocab_size', None)
    for key in ('dtype', 'param_dtype'):
      if isinstance(values.get(key), str):
        if values[key] not in _DTYPES:
          raise ValueError(f'config.model.{key}={values[key]!r}: expected one of '
                           f'{sorted(_DTYPES)}.')
        values[key] = _DTYPES[values[key]]
    return cls(vocab_size=int(vocab_size), **values)


def shift_right(targets: Array, positions: Array | None = None, *, bos_id: int = 2,
                pad_id: int = 0) -> Array:
  """Decoder inputs for teacher forcing: targets shifted right, bos at each start.

  Args:
    targets: [B, T] int32, eos-terminated sentences, pad = ``pad_id``.
    positions: [B, T] positions of packed rows (0 at each sentence start); None for
      one sentence per row.
    bos_id: the token fed to the decoder before each sentence's first token.
    pad_id: padding; positions whose target is padding get padding as input too.

  Returns:
    [B, T] int32 decoder inputs.
  """
  shifted = jnp.pad(targets, ((0, 0), (1, 0)), constant_values=bos_id)[:, :-1]
  if positions is not None:
    shifted = jnp.where(positions == 0, bos_id, shifted)
  return jnp.where(targets == pad_id, pad_id, shifted).astype(targets.dtype)


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


def _layer_norm(cfg: TransformerConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  meta = {'out_sharding': ('embed',), 'eager_sharding': False}
  # epsilon 1e-6 as tensor2tensor; the paper does not give one.
  return nnx.LayerNorm(cfg.d_model, epsilon=1e-6, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, scale_metadata=meta,
                       bias_metadata=meta, rngs=rngs)


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
    self.bias = _param(rngs, jax.nn.initializers.zeros, (cfg.vocab_size,),
                       ('vocab',), cfg.param_dtype)

  def __call__(self, x: Array) -> Array:
    logits = jnp.einsum('btd,dv->btv', x, self.kernel[...].astype(self.cfg.dtype),
                        preferred_element_type=jnp.float32)
    return logits + self.bias[...].astype(jnp.float32)


class PositionalEncoding(nnx.Module):
  """Sinusoidal (Sec 3.5) or learned (Table 3 row E) positions, indexed by position."""

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
                     dropout: nnx.Dropout | None = None,
                     deterministic: bool = True) -> tuple[Array, Array]:
  """Sec 3.2.1: softmax(Q K^T / sqrt(d_k)) V, written out; the reference path.

  Args:
    query: [B, T, N, H]; key, value: [B, S, N, H]; mask: [B, 1, T, S] bool.
    dropout: optional dropout on the attention probabilities.

  Returns:
    ([B, T, N, H] in the query's dtype, probabilities [B, N, T, S] float32).
  """
  scale = 1.0 / math.sqrt(query.shape[-1])
  logits = jnp.einsum('btnh,bsnh->bnts', query, key,
                      preferred_element_type=jnp.float32) * scale  # [B, N, T, S]
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
                           mask: Array) -> Array:
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

  Returns:
    [B, K, N, H] in the value's dtype.
  """
  scale = 1.0 / math.sqrt(query.shape[-1])
  query = jnp.swapaxes(query, 1, 2)  # [B, N, K, H]
  logits = jnp.einsum('bnkh,bnhl->bnkl', query, key,
                      preferred_element_type=jnp.float32) * scale  # [B, N, K, L]
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  heads = jnp.einsum('bnkl,bnlh->bnkh', probs.astype(value.dtype), value)
  return jnp.swapaxes(heads, 1, 2)  # [B, K, N, H]


class MultiHeadAttention(nnx.Module):
  """Sec 3.2.2: h heads of scaled dot-product attention, concatenated and projected.

  The projections W^Q, W^K, W^V [D, N, H] and W^O [N, H, D] carry biases, like the
  paper's "linear projections".
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, h = cfg.d_model, cfg.num_heads, cfg.qkv_head_dim
    zeros = jax.nn.initializers.zeros
    for name, dim in (('query', cfg.qk_head_dim), ('key', cfg.qk_head_dim),
                      ('value', h)):
      setattr(self, f'{name}_kernel', _param(rngs, _glorot(0, (1, 2)), (d, n, dim),
                                             ('embed', 'heads', 'head_dim'),
                                             cfg.param_dtype))
      setattr(self, f'{name}_bias', _param(rngs, zeros, (n, dim), ('heads', 'head_dim'),
                                           cfg.param_dtype))
    self.out_kernel = _param(rngs, _glorot((0, 1), 2), (n, h, d),
                             ('heads', 'head_dim', 'embed'), cfg.param_dtype)
    self.out_bias = _param(rngs, zeros, (d,), ('embed',), cfg.param_dtype)
    self.dropout = nnx.Dropout(cfg.attention_dropout_rate, rngs=rngs)

  def _project(self, x: Array, name: str) -> Array:
    """[B, T, D] -> [B, T, N, H] with W^Q, W^K or W^V."""
    dtype = self.cfg.dtype
    y = jnp.einsum('btd,dnh->btnh', x, getattr(self, f'{name}_kernel')[...].astype(dtype))
    y = y + getattr(self, f'{name}_bias')[...].astype(dtype)
    return sharding.constrain(y, ('act_batch', 'act_length', 'act_heads', None))

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
    return y + self.out_bias[...].astype(self.cfg.dtype)

  def attend(self, query: Array, key: Array, value: Array, mask: Array, *,
             deterministic: bool = True, probs_out: list | None = None) -> Array:
    """Attention over projected heads and the output projection W^O.

    Args:
      query: [B, T, N, H]; key, value: [B, S, N, H]; mask: [B, 1, T, S] bool.
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
      out, probs = einsum_attention(query, key, value, mask, dropout=self.dropout,
                                    deterministic=deterministic)
      if probs_out is not None:
        probs_out.append(probs)
    else:
      out = jax.nn.dot_product_attention(query, key, value, mask=mask,
                                         implementation='xla')
    return self.output(out)

  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Array, *,
               deterministic: bool = True, probs_out: list | None = None) -> Array:
    """inputs_q [B, T, D] attends to inputs_kv [B, S, D] under mask [B, 1, T, S]."""
    key, value = self.project_key_value(inputs_kv)
    return self.attend(self.project_query(inputs_q), key, value, mask,
                       deterministic=deterministic, probs_out=probs_out)


class FeedForward(nnx.Module):
  """Sec 3.3: FFN(x) = max(0, x W1 + b1) W2 + b2, applied at each position."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    zeros = jax.nn.initializers.zeros
    self.wi = _param(rngs, _glorot(0, 1), (cfg.d_model, cfg.d_ff), ('embed', 'mlp'),
                     cfg.param_dtype)
    self.bi = _param(rngs, zeros, (cfg.d_ff,), ('mlp',), cfg.param_dtype)
    self.wo = _param(rngs, _glorot(0, 1), (cfg.d_ff, cfg.d_model), ('mlp', 'embed'),
                     cfg.param_dtype)
    self.bo = _param(rngs, zeros, (cfg.d_model,), ('embed',), cfg.param_dtype)
    self.dropout = nnx.Dropout(cfg.relu_dropout_rate, rngs=rngs)

  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    """[B, T, D] -> [B, T, D] through a [B, T, F] hidden layer."""
    dtype = self.cfg.dtype
    h = jnp.einsum('btd,df->btf', x, self.wi[...].astype(dtype))
    h = jax.nn.relu(h + self.bi[...].astype(dtype))
    h = sharding.constrain(h, ('act_batch', 'act_length', 'act_mlp'))
    h = self.dropout(h, deterministic=deterministic)
    y = jnp.einsum('btf,fd->btd', h, self.wo[...].astype(dtype))
    return y + self.bo[...].astype(dtype)


class SublayerConnection(nnx.Module):
  """Residual connection around a sub-layer, with layer normalisation and dropout.

  post (Sec 3.1 / 5.4, the paper): LayerNorm(x + Dropout(Sublayer(x))).
  pre (Xiong et al. 2020; tensor2tensor's default): x + Dropout(Sublayer(LayerNorm(x))).
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.pre_norm = cfg.layer_norm == 'pre'
    self.norm = _layer_norm(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

  def __call__(self, x: Array, sublayer: Callable[[Array], Array], *,
               deterministic: bool = True) -> Array:
    if self.pre_norm:
      return x + self.dropout(sublayer(self.norm(x)), deterministic=deterministic)
    return self.norm(x + self.dropout(sublayer(x), deterministic=deterministic))


def _constrain_embed(x: Array) -> Array:
  return sharding.constrain(x, ('act_batch', 'act_length', 'act_embed'))


class EncoderLayer(nnx.Module):
  """Sec 3.1: self-attention, then the position-wise feed-forward network."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.self_attention = MultiHeadAttention(cfg, rngs=rngs)
    self.attention_residual = SublayerConnection(cfg, rngs=rngs)
    self.feed_forward = FeedForward(cfg, rngs=rngs)
    self.ffn_residual = SublayerConnection(cfg, rngs=rngs)

  def __call__(self, x: Array, mask: Array, *, deterministic: bool = True,
               probs_out: list | None = None) -> Array:
    """x [B, S, D], mask [B, 1, S, S] -> [B, S, D]."""
    x = self.attention_residual(
        x, lambda h: self.self_attention(h, h, mask, deterministic=deterministic,
                                         probs_out=probs_out),
        deterministic=deterministic)
    x = self.ffn_residual(
        x, lambda h: self.feed_forward(h, deterministic=deterministic),
        deterministic=deterministic)
    return _constrain_embed(x)


class DecoderLayer(nnx.Module):
  """Sec 3.1: masked self-attention, attention over the encoder output, then FFN."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.self_attention = MultiHeadAttention(cfg, rngs=rngs)
    self.self_attention_residual = SublayerConnection(cfg, rngs=rngs)
    self.cross_attention = MultiHeadAttention(cfg, rngs=rngs)
    self.cross_attention_residual = SublayerConnection(cfg, rngs=rngs)
    self.feed_forward = FeedForward(cfg, rngs=rngs)
    self.ffn_residual = SublayerConnection(cfg, rngs=rngs)

  def __call__(self, y: Array, encoded: Array, self_mask: Array, cross_mask: Array, *,
               deterministic: bool = True, self_probs_out: list | None = None,
               cross_probs_out: list | None = None) -> Array:
    """y [B, T, D], encoded [B, S, D], masks [B,1,T,T] and [B,1,T,S] -> [B, T, D]."""
    y = self.self_attention_residual(
        y, lambda h: self.self_attention(h, h, self_mask, deterministic=deterministic,
                                         probs_out=self_probs_out),
        deterministic=deterministic)
    y = self.cross_attention_residual(
        y, lambda h: self.cross_attention(h, encoded, cross_mask,
                                          deterministic=deterministic,
                                          probs_out=cross_probs_out),
        deterministic=deterministic)
    y = self.ffn_residual(
        y, lambda h: self.feed_forward(h, deterministic=deterministic),
        deterministic=deterministic)
    return _constrain_embed(y)

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
    sources, beams = cross_mask.shape[0], rows // cross_mask.shape[0]

    def self_attend(h):
      attention = self.self_attention
      query = attention.project_query(h)  # [R, 1, N, H]
      key, value = attention.project_key_value(h)
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
      heads = single_query_attention(query, cache['key'], cache['value'], self_mask)
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
    y = self.cross_attention_residual(y, cross_attend)
    y = self.ffn_residual(y, self.feed_forward)
    return y, cache


class _Stack(nnx.Module):
  """Shared parts of both stacks: embedding + positions + dropout, final pre-LN norm."""

  def __init__(self, cfg: TransformerConfig, embedding: Embedding, num_layers: int,
               layer_cls, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = embedding
    self.positions = PositionalEncoding(cfg, rngs=rngs)
    # Sec 5.4: dropout on the sums of the embeddings and the positional encodings.
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
    self.layers = nnx.List([layer_cls(cfg, rngs=rngs) for _ in range(num_layers)])
    # Pre-LN leaves the residual stream unnormalised: one last LayerNorm per stack.
    self.final_norm = _layer_norm(cfg, rngs) if cfg.layer_norm == 'pre' else None

  def embed_tokens(self, ids: Array, positions: Array | None, *,
                   deterministic: bool) -> Array:
    """ids [B, T] -> [B, T, D]: sqrt(D)-scaled embeddings + positional encodings."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    x = self.embed(ids) + self.positions(positions)
    x = self.dropout(x, deterministic=deterministic)
    return _constrain_embed(x)

  def normalize_output(self, x: Array) -> Array:
    return self.final_norm(x) if self.final_norm is not None else x


class Encoder(_Stack):
  """Sec 3.1: N identical layers of self-attention and feed-forward sub-layers."""

  def __init__(self, cfg: TransformerConfig, embedding: Embedding, *, rngs: nnx.Rngs):
    super().__init__(cfg, embedding, cfg.num_encoder_layers, EncoderLayer, rngs=rngs)

  def __call__(self, src: Array, *, segments: Array | None = None,
               positions: Array | None = None, deterministic: bool = True,
               probs_out: list | None = None) -> Array:
    """src [B, S] int -> encoded [B, S, D].

    probs_out: when a list, gets one [B, N, S, S] probability array per layer.
    """
    valid = src != self.cfg.pad_id
    mask = attention_mask(valid, valid, query_segments=segments, key_segments=segments)
    x = self.embed_tokens(src, positions, deterministic=deterministic)
    for layer in self.layers:
      x = layer(x, mask, deterministic=deterministic, probs_out=probs_out)
    return self.normalize_output(x)


class Decoder(_Stack):
  """Sec 3.1: N layers of masked self-attention, encoder-decoder attention and FFN."""

  def __init__(self, cfg: TransformerConfig, embedding: Embedding, *, rngs: nnx.Rngs):
    super().__init__(cfg, embedding, cfg.num_decoder_layers, DecoderLayer, rngs=rngs)
    self.output_projection = (None if cfg.share_embeddings
                              else OutputProjection(cfg, rngs=rngs))

  def output_kernel(self) -> Array:
    """The pre-softmax weights as one [D, V] kernel in the compute dtype (Sec 3.4).

    With shared embeddings this is the embedding matrix transposed. A decoding loop
    computes it once, outside the loop, and passes it to every step: XLA:CPU
    multiplies by a [D, V] kernel ~20% faster than by the [V, D] embedding it
    would otherwise read transposed at each step.
    """
    if self.output_projection is not None:
      return self.output_projection.kernel[...].astype(self.cfg.dtype)
    return self.embed.embedding[...].astype(self.cfg.dtype).T

  def logits(self, y: Array, output_kernel: Array | None = None) -> Array:
    """[B, T, D] -> [B, T, V] float32: the pre-softmax linear map (Sec 3.4).

    ``output_kernel``: optionally ``output_kernel()``, computed once by the caller.
    """
    y = self.normalize_output(y)
    if output_kernel is not None:
      logits = jnp.einsum('btd,dv->btv', y, output_kernel,
                          preferred_element_type=jnp.float32)
      if self.output_projection is not None:
        logits = logits + self.output_projection.bias[...].astype(jnp.float32)
    elif self.output_projection is not None:
      logits = self.output_projection(y)
    else:
      logits = self.embed.attend(y)
    # Vocabulary-sharded like the embedding under tensor parallelism.
    return sharding.constrain(logits, ('act_batch', 'act_length', 'vocab'))

  def __call__(self, encoded: Array, src: Array, tgt_in: Array, *,
               src_segments: Array | None = None, tgt_segments: Array | None = None,
               tgt_positions: Array | None = None, deterministic: bool = True,
               self_probs_out: list | None = None,
               cross_probs_out: list | None = None) -> Array:
    """Teacher-forced decoding: tgt_in [B, T] -> logits [B, T, V] float32."""
    src_valid = src != self.cfg.pad_id
    tgt_valid = tgt_in != self.cfg.pad_id
    self_mask = attention_mask(tgt_valid, tgt_valid, query_segments=tgt_segments,
                               key_segments=tgt_segments, causal=True)
    cross_mask = attention_mask(tgt_valid, src_valid, query_segments=tgt_segments,
                                key_segments=src_segments)
    y = self.embed_tokens(tgt_in, tgt_positions, deterministic=deterministic)
    for layer in self.layers:
      y = layer(y, encoded, self_mask, cross_mask, deterministic=deterministic,
                self_probs_out=self_probs_out, cross_probs_out=cross_probs_out)
    return self.logits(y)


class Transformer(nnx.Module):
  """The encoder-decoder Transformer (Sec 3, Figure 1).

  Call it for teacher-forced training logits; ``encode`` + ``init_cache`` +
  ``decode_step`` decode one token at a time; ``attention_weights`` returns every
  layer's attention probabilities for visualisation.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    if cfg.share_embeddings:
      # Sec 3.4: one matrix for both inputs and the pre-softmax projection.
      source_embedding = target_embedding = Embedding(cfg, rngs=rngs)
    else:
      source_embedding = Embedding(cfg, rngs=rngs)
      target_embedding = Embedding(cfg, rngs=rngs)
    self.encoder = Encoder(cfg, source_embedding, rngs=rngs)
    self.decoder = Decoder(cfg, target_embedding, rngs=rngs)

  def _check_inputs(self, **arrays):
    for name, x in arrays.items():
      if x is None:
        continue
      if x.ndim != 2:
        raise ValueError(f'{name} must be [batch, length], got shape {x.shape}.')
      if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f'{name} must hold integer token ids, got dtype {x.dtype}.')
      if self.cfg.positions == 'learned' and x.shape[1] > self.cfg.max_len:
        raise ValueError(f'{name} has length {x.shape[1]}, longer than the learned '
                         f'position table (max_len={self.cfg.max_len}).')

  def __call__(self, src: Array, tgt_in: Array, *, src_segments: Array | None = None,
               tgt_segments: Array | None = None, src_positions: Array | None = None,
               tgt_positions: Array | None = None,
               deterministic: bool = True) -> Array:
    """Teacher-forced logits.

    Args:
      src: [B, S] int32 source ids; tgt_in: [B, T] decoder inputs (``shift_right``).
      src_segments, tgt_segments: [B, S], [B, T] segment ids of packed rows.
      src_positions, tgt_positions: [B, S], [B, T] positions of packed rows.
      deterministic: False applies dropout (needs the 'dropout' RNG stream).

    Returns:
      [B, T, V] float32 logits.
    """
    encoded = self.encode(src, src_segments=src_segments, src_positions=src_positions,
                          deterministic=deterministic)
    return self.decode(encoded, src, tgt_in, src_segments=src_segments,
                       tgt_segments=tgt_segments, tgt_positions=tgt_positions,
                       deterministic=deterministic)

  def encode(self, src: Array, *, src_segments: Array | None = None,
             src_positions: Array | None = None, deterministic: bool = True) -> Array:
    """src [B, S] -> encoder output [B, S, D] (compute dtype)."""
    self._check_inputs(src=src, src_segments=src_segments, src_positions=src_positions)
    return self.encoder(src, segments=src_segments, positions=src_positions,
                        deterministic=deterministic)

  def decode(self, encoded: Array, src: Array, tgt_in: Array, *,
             src_segments: Array | None = None, tgt_segments: Array | None = None,
             tgt_positions: Array | None = None, deterministic: bool = True) -> Array:
    """Teacher-forced decoder: logits [B, T, V] float32.

    ``src`` [B, S] supplies the cross-attention padding mask (src != pad).
    """
    self._check_inputs(src=src, tgt_in=tgt_in, tgt_segments=tgt_segments,
                       tgt_positions=tgt_positions)
    return self.decoder(encoded, src, tgt_in, src_segments=src_segments,
                        tgt_segments=tgt_segments, tgt_positions=tgt_positions,
                        deterministic=deterministic)

  def init_cache(self, batch_size: int, max_len: int, encoded: Array | None = None,
                 *, beams: int = 1) -> Cache:
    """An empty decoding cache for ``batch_size`` sources and ``beams`` rows each.

    Beam search never moves cached keys and values: beam k of a source writes its
    position's keys and values into that source's slot k, and ``'ancestry'``
    records, for each beam and position, the slot holding its prefix there. A beam
    that continues another takes over its ancestry (``reorder_cache``), a [B, K, L]
    integer gather, where moving the keys and values would copy the whole cache
    every step. A step attends over all K * L cached (slot, position) pairs of its
    source, masked to its own prefix, which is exactly attention over the prefix.

    Args:
      batch_size: B, the sources.
      max_len: L, the most tokens ``decode_step`` will be called for.
      encoded: optional [B, S, D] encoder output; when given, each layer's
        cross-attention keys and values are computed once here, once per source,
        instead of at every step.
      beams: K, the rows decoded per source (adjacent rows of ``decode_step``).

    Returns:
      {'index': int32 scalar, 'ancestry': [B, K, L] int32, 'layers': [per decoder
      layer {'key': [B, N, H, L * K], 'value': [B, N, L * K, H]} (position-major,
      slot-minor) (+ {'cross_key': [B, N, H, S], 'cross_value': [B, N, S, H]})]}:
      every array but 'index' has the sources as its leading axis, laid out so
      that a step attends without transposing the cache (see
      ``single_query_attention``) and writes its K slots as one slice.
    """
    cfg = self.cfg
    if cfg.positions == 'learned' and max_len > cfg.max_len:
      raise ValueError(f'Cache length {max_len} exceeds the learned position table '
                       f'(max_len={cfg.max_len}).')
    if encoded is not None and encoded.shape[0] != batch_size:
      raise ValueError(f'encoded has batch {encoded.shape[0]}, cache batch_size is '
                       f'{batch_size}.')
    if beams < 1:
      raise ValueError(f'beams must be >= 1, got {beams}.')
    shape = (batch_size, cfg.num_heads, max_len * beams, cfg.qkv_head_dim)
    key_shape = (batch_size, cfg.num_heads, cfg.qk_head_dim, max_len * beams)
    layers = []
    for layer in self.decoder.layers:
      entry = {'key': jnp.zeros(key_shape, cfg.dtype),
               'value': jnp.zeros(shape, cfg.dtype)}
      if encoded is not None:
        entry['cross_key'], entry['cross_value'] = (
            layer.cross_attention.cache_key_value(encoded))
      layers.append(entry)
    ancestry = jnp.broadcast_to(jnp.arange(beams, dtype=jnp.int32)[None, :, None],
                                (batch_size, beams, max_len))
    return {'index': jnp.zeros((), jnp.int32), 'ancestry': ancestry, 'layers': layers}

  @staticmethod
  def reorder_cache(cache: Cache, parents: Array) -> Cache:
    """Beam search's reordering: new beam k of source b continues old beam
    ``parents[b, k]`` ([B, K] int). Only the ancestry moves (see ``init_cache``)."""
    ancestry = jnp.take_along_axis(cache['ancestry'], parents[:, :, None], axis=1)
    return dict(cache, ancestry=ancestry)

  def output_kernel(self) -> Array:
    """[D, V]: the pre-softmax weights for ``decode_step`` (see Decoder.output_kernel)."""
    return self.decoder.output_kernel()

  def decode_step(self, encoded: Array, src: Array, token: Array, cache: Cache, *,
                  output_kernel: Array | None = None) -> tuple[Array, Cache]:
    """Decodes one position with the cache (deterministic).

    Args:
      encoded: [B, S, D] encoder output; src: [B, S] source ids (padding mask).
      token: [B * K] int32, the previous output token of each row (bos at the
        first step), the K beams of a source adjacent.
      cache: from ``init_cache`` or the previous step; position = cache['index'].
      output_kernel: optionally ``output_kernel()`` [D, V], computed once before a
        decoding loop (faster logits on CPU; the same values).

    Returns:
      (logits [B * K, V] float32 for the next token, the updated cache).
    """
    index, ancestry = cache['index'], cache['ancestry']
    sources, beams, max_len = ancestry.shape
    if token.ndim != 1 or token.shape[0] != sources * beams or src.shape[0] != sources:
      raise ValueError(f'token must be [{sources} sources x {beams} beams] and src '
                       f'[{sources}, S] for this cache; got token {token.shape}, '
                       f'src {src.shape}.')
    # Beam k's token at this position is in slot k.
    ancestry = ancestry.at[:, :, index].set(jnp.arange(beams, dtype=jnp.int32))
    # Sec 3.2.3: a beam sees its prefix so far and itself: for each position <= index,
    # the one slot its ancestry names. [B, K, L, K slots] -> [B, 1, K, L * K].
    slots = jnp.arange(beams, dtype=jnp.int32)[None, None, None, :]
    self_mask = ((ancestry[:, :, :, None] == slots) &
                 (jnp.arange(max_len) <= index)[None, None, :, None])
    self_mask = self_mask.reshape(sources, 1, beams, max_len * beams)
    cross_mask = (src != self.cfg.pad_id)[:, None, None, :]  # [B, 1, 1, S]
    positions = jnp.full((token.shape[0], 1), index, jnp.int32)
    y = self.decoder.embed_tokens(token[:, None], positions, deterministic=True)
    new_layers = []
    for layer, layer_cache in zip(self.decoder.layers, cache['layers']):
      y, layer_cache = layer.step(y, encoded, self_mask, cross_mask, layer_cache, index)
      new_layers.append(layer_cache)
    logits = self.decoder.logits(y, output_kernel)[:, 0]
    return logits, {'index': index + 1, 'ancestry': ancestry, 'layers': new_layers}

  def attention_weights(self, src: Array, tgt_in: Array) -> dict[str, Array]:
    """Every layer's attention probabilities (deterministic; for visualisation).

    Args:
      src: [B, S] source ids; tgt_in: [B, T] decoder inputs.

    Returns:
      {'encoder_self': [L, B, N, S, S], 'decoder_self': [L, B, N, T, T],
       'cross': [L, B, N, T, S]}, float32.
    """
    encoder_self, decoder_self, cross = [], [], []
    self._check_inputs(src=src, tgt_in=tgt_in)
    encoded = self.encoder(src, probs_out=encoder_self)
    self.decoder(encoded, src, tgt_in, self_probs_out=decoder_self,
                 cross_probs_out=cross)
    return {'encoder_self': jnp.stack(encoder_self),
            'decoder_self': jnp.stack(decoder_self), 'cross': jnp.stack(cross)}
