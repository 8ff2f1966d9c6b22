"""The encoder-decoder Transformer (Vaswani et al., 2017, Sec 3.1, Figure 1).

  shift_right              teacher-forcing decoder inputs
  Encoder, Decoder         N layers over sqrt(d_model)-scaled embeddings + positions
  Transformer              encode, teacher-forced decode, cached one-token decode_step

Inputs are int32 token ids with pad = 0. Packed rows (several sentences in one row)
carry segment ids (0 = padding, 1..k = sentence) and positions that restart at 0 for
each sentence. Shapes use the letters of ``layers.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax import sharding
from transformer_jax.model import attention as attention_lib
from transformer_jax.model.config import BOS_ID, PAD_ID, TransformerConfig
from transformer_jax.model.layers import (DecoderLayer, Embedding, EncoderLayer,
                                          OutputProjection, PositionalEncoding,
                                          add_bias, constrain_embed, layer_norm)

Array = jax.Array
Cache = dict[str, Any]


def _default_positions(ids: Array, positions: Array | None) -> Array:
  """[B, T] positions: as given (packed rows), else 0..T-1 in every row."""
  if positions is not None:
    return positions
  return jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)


def shift_right(targets: Array, positions: Array | None = None, *,
                bos_id: int = BOS_ID, pad_id: int = PAD_ID) -> Array:
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


# config.model.remat -> what jax.checkpoint keeps for the backward pass.
_REMAT_POLICIES = {
    # The outputs of the weight matmuls (no batch dims: projections, FFN); attention
    # scores, softmax, norms and dropout are recomputed.
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,  # Only each layer's inputs.
}


def _remat(cfg, probs_out):
  """Wraps a layer call in ``nnx.remat`` with the config's policy (identity for
  'none', and when attention probabilities are being collected: remat replays the
  forward pass, which must not append to a Python list twice)."""
  if cfg.remat == 'none' or probs_out is not None:
    return lambda fn: fn
  return lambda fn: nnx.remat(fn, policy=_REMAT_POLICIES[cfg.remat])


class _Stack(nnx.Module):
  """Shared parts of both stacks: embedding + positions + dropout, final pre-LN norm."""

  def __init__(self, cfg: TransformerConfig, embedding: Embedding, num_layers: int,
               layer_cls, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = embedding
    self.positions = (PositionalEncoding(cfg, rngs=rngs) if cfg.additive_positions
                      else None)
    # Sec 5.4: dropout on the sums of the embeddings and the positional encodings.
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
    self.layers = nnx.List([layer_cls(cfg, rngs=rngs) for _ in range(num_layers)])
    # Pre-LN leaves the residual stream unnormalised: one last LayerNorm per stack.
    self.final_norm = layer_norm(cfg, rngs) if cfg.layer_norm == 'pre' else None

  def embed_tokens(self, ids: Array, positions: Array | None, *,
                   deterministic: bool) -> Array:
    """ids [B, T] -> [B, T, D]: sqrt(D)-scaled embeddings + positional encodings."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    x = self.embed(ids)
    if self.positions is not None:
      x = x + self.positions(positions)
    x = self.dropout(x, deterministic=deterministic)
    return constrain_embed(x)

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
    mask = attention_lib.make_mask(valid, valid, query_segments=segments,
                                   key_segments=segments)
    positions = _default_positions(src, positions)
    x = self.embed_tokens(src, positions, deterministic=deterministic)
    for layer in self.layers:
      x = _remat(self.cfg, probs_out)(
          lambda layer, x, mask, positions: layer(
              x, mask, positions=positions, deterministic=deterministic,
              probs_out=probs_out))(layer, x, mask, positions)
    return self.normalize_output(x)


class Decoder(_Stack):
  """Sec 3.1: N layers of masked self-attention, encoder-decoder attention and FFN."""

  def __init__(self, cfg: TransformerConfig, embedding: Embedding, *, rngs: nnx.Rngs,
               cross_attention: bool = True):
    layer = lambda cfg, rngs: DecoderLayer(cfg, rngs=rngs, cross_attention=cross_attention)
    super().__init__(cfg, embedding, cfg.num_decoder_layers, layer, rngs=rngs)
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
        logits = add_bias(logits, self.output_projection.bias)
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
    """Teacher-forced decoding: tgt_in [B, T] -> logits [B, T, V] float32.

    ``encoded`` and ``src`` are None for a decoder without cross-attention.
    """
    tgt_valid = tgt_in != self.cfg.pad_id
    self_mask = attention_lib.make_mask(
        tgt_valid, tgt_valid, query_segments=tgt_segments, key_segments=tgt_segments,
        causal=True)
    cross_mask = None
    if src is not None:
      cross_mask = attention_lib.make_mask(
          tgt_valid, src != self.cfg.pad_id, query_segments=tgt_segments,
          key_segments=src_segments)
    positions = _default_positions(tgt_in, tgt_positions)
    y = self.embed_tokens(tgt_in, positions, deterministic=deterministic)
    probs_out = self_probs_out if self_probs_out is not None else cross_probs_out
    for layer in self.layers:
      y = _remat(self.cfg, probs_out)(
          lambda layer, y, encoded, self_mask, cross_mask, positions: layer(
              y, encoded, self_mask, cross_mask, positions=positions,
              deterministic=deterministic, self_probs_out=self_probs_out,
              cross_probs_out=cross_probs_out))(
                  layer, y, encoded, self_mask, cross_mask, positions)
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
