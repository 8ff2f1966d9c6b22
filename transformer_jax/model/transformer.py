"""The encoder-decoder Transformer (Vaswani et al., 2017, Sec 3.1, Figure 1).

  shift_right              teacher-forcing decoder inputs
  Encoder, Decoder         N layers over sqrt(d_model)-scaled embeddings + positions
  Transformer              encode, teacher-forced decode, cached decode_step

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
from transformer_jax.model import stacking
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
    # A list of N layers, or one module scanned over a 'layers' axis (scan_layers).
    self.layers = stacking.create(cfg, num_layers, lambda rngs: layer_cls(cfg, rngs=rngs),
                                  rngs)
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
    x, _ = stacking.run(
        self.layers, self.cfg,
        lambda layer, x, cache, mask, positions, probs: (layer(
            x, mask, positions=positions, deterministic=deterministic,
            probs_out=probs), cache),
        x, mask, positions, probs_outs=(probs_out,))
    return self.normalize_output(x)


class Decoder(_Stack):
  """Sec 3.1: N layers of masked self-attention, encoder-decoder attention and FFN.

  One forward path with an optional decode cache (``init_cache``): teacher forcing,
  prefilling a prompt and one-step decoding run the same layers.
  """

  def __init__(self, cfg: TransformerConfig, embedding: Embedding, *, rngs: nnx.Rngs,
               cross_attention: bool = True):
    layer = lambda cfg, rngs: DecoderLayer(cfg, rngs=rngs, cross_attention=cross_attention)
    super().__init__(cfg, embedding, cfg.num_decoder_layers, layer, rngs=rngs)
    self.has_cross_attention = cross_attention
    self.output_projection = (None if cfg.share_embeddings
                              else OutputProjection(cfg, rngs=rngs))

  def output_kernel(self) -> Array:
    """The pre-softmax weights as one [D, V] kernel in the compute dtype (Sec 3.4).

    With shared embeddings this is the embedding matrix transposed. A decoding loop
    computes it once, outside the loop, and passes it to every step: XLA:CPU
    multiplies by a [D, V] kernel faster than by the [V, D] embedding it would
    otherwise read transposed at each step.
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

  def init_cache(self, batch_size: int, length: int, encoded: Array | None = None,
                 src: Array | None = None) -> Cache:
    """An empty decode cache of ``length`` entries per row (see ``__call__``).

    Args:
      batch_size: B, the cache's rows.
      length: E, the entries of each row.
      encoded, src: [B, S, D] encoder output and [B, S] source ids, for a decoder
        with cross-attention: each layer's cross-attention keys and values are
        computed here, once, and the source's padding mask kept.

    Returns:
      {'layers': [per layer {'self': {'key': [B, N, H, E], 'value': [B, N, E, H]},
      'cross': {'key': [B, N, H, S], 'value': [B, N, S, H]}}], 'positions': [B, E]
      int32 (each entry's position, for ALiBi), 'src_valid': [B, S] bool}, 'cross'
      and 'src_valid' only with cross-attention; heads-major for
      ``layers.cached_attention``. Under ``scan_layers`` 'layers' is one such
      dict of arrays with a leading [N_layers] axis (see ``cache_batch_axes``).
    """
    if length < 1:
      raise ValueError(f'A decode cache needs at least one entry per row, got {length}.')
    cross = self.has_cross_attention
    if cross and (encoded is None or src is None):
      raise ValueError('A decoder with cross-attention needs encoded and src for its '
                       'cache.')
    if cross and (encoded.shape[0] != batch_size or src.shape[0] != batch_size):
      raise ValueError(f'encoded {encoded.shape} and src {src.shape} must have '
                       f'batch_size={batch_size} rows.')
    # Per layer, or (scan_layers) one dict of [N, ...] arrays the scan slices.
    cache = {'layers': stacking.init_caches(
                 self.layers, self.cfg,
                 lambda layer: layer.empty_cache(batch_size, length, encoded)),
             'positions': jnp.zeros((batch_size, length), jnp.int32)}
    if cross:
      cache['src_valid'] = src != self.cfg.pad_id
    return cache

  def cache_batch_axes(self) -> dict[str, int]:
    """The batch axis of each part of ``init_cache``'s cache, a pytree prefix of
    it (as ``jax.vmap``'s ``in_axes``): what reordering its rows needs to know."""
    axes = {'layers': stacking.cache_batch_axis(self.cfg), 'positions': 0}
    if self.has_cross_attention:
      axes['src_valid'] = 0
    return axes

  def __call__(self, encoded: Array | None, src: Array | None, tgt_in: Array, *,
               src_segments: Array | None = None, tgt_segments: Array | None = None,
               tgt_positions: Array | None = None, deterministic: bool = True,
               cache: Cache | None = None, index: Array | None = None,
               mask: Array | None = None, output_kernel: Array | None = None,
               self_probs_out: list | None = None,
               cross_probs_out: list | None = None) -> tuple[Array, Cache | None]:
    """tgt_in [B, T] -> (logits [B, T, V] float32, the updated cache or None).

    Without ``cache``: teacher forcing, causal self-attention within the rows'
    tokens (and segments of packed rows). ``encoded`` [B, S, D] and ``src`` [B, S]
    are None for a decoder without cross-attention.

    With ``cache`` (``init_cache``): the T positions of each row are written into
    entries ``index .. index + T - 1`` and attend to the cache's entries under
    ``mask`` [B, T, E] bool (default: entries up to their own, ``e <= index + t``),
    at ``tgt_positions`` [B, T] (default ``index + t``). ``encoded`` and ``src`` are
    unused (the cache holds them). A search chooses the mask and positions: several
    beams sharing a row's entries, left-padded prompts (``inference/``).
    """
    if cache is None:
      self_mask, cross_mask = self._masks(src, tgt_in, src_segments, tgt_segments)
      positions = _default_positions(tgt_in, tgt_positions)
      key_positions = None
    else:
      self_mask, cross_mask, positions, cache = self._cached_masks(
          tgt_in, cache, index, mask, tgt_positions)
      key_positions = cache['positions']
    y = self.embed_tokens(tgt_in, positions, deterministic=deterministic)
    y, layer_caches = stacking.run(
        self.layers, self.cfg,
        lambda layer, y, layer_cache, encoded, self_mask, cross_mask, positions, index,
        key_positions, self_probs, cross_probs: layer(
            y, encoded, self_mask, cross_mask, positions=positions, cache=layer_cache,
            index=index, key_positions=key_positions, deterministic=deterministic,
            self_probs_out=self_probs, cross_probs_out=cross_probs),
        y, encoded, self_mask, cross_mask, positions, index, key_positions,
        caches=None if cache is None else cache['layers'],
        probs_outs=(self_probs_out, cross_probs_out))
    logits = self.logits(y, output_kernel)
    return logits, (None if cache is None else dict(cache, layers=layer_caches))

  def _masks(self, src, tgt_in, src_segments, tgt_segments):
    """Teacher forcing's masks: causal self-attention (Sec 3.2.3), padding, segments."""
    tgt_valid = tgt_in != self.cfg.pad_id
    self_mask = attention_lib.make_mask(
        tgt_valid, tgt_valid, query_segments=tgt_segments, key_segments=tgt_segments,
        causal=True)
    cross_mask = None
    if src is not None:
      cross_mask = attention_lib.make_mask(
          tgt_valid, src != self.cfg.pad_id, query_segments=tgt_segments,
          key_segments=src_segments)
    return self_mask, cross_mask

  def _cached_masks(self, tgt_in, cache, index, mask, positions):
    """With a cache: the self-attention mask [B, 1, T, E], the source's padding mask
    [B, 1, 1, S], the rows' positions [B, T], and the cache with their positions."""
    batch, length = tgt_in.shape
    entries = cache['positions'].shape[1]
    if batch != cache['positions'].shape[0]:
      raise ValueError(f'tgt_in has {batch} rows, the cache {cache["positions"].shape[0]}.')
    if index is None:
      raise ValueError('Decoding with a cache needs the index of the first entry written.')
    steps = index + jnp.arange(length, dtype=jnp.int32)  # [T]
    if positions is None:
      positions = jnp.broadcast_to(steps, (batch, length))
    if mask is None:  # Sec 3.2.3: each position sees the entries up to its own.
      mask = jnp.arange(entries)[None, None, :] <= steps[None, :, None]
    if mask.shape[-2:] != (length, entries):
      raise ValueError(f'mask must be [B, {length}, {entries}] (rows, positions, cache '
                       f'entries), got {mask.shape}.')
    cache = dict(cache, positions=jax.lax.dynamic_update_slice(
        cache['positions'], positions.astype(jnp.int32), (0, index)))
    cross_mask = None
    if 'src_valid' in cache:
      cross_mask = cache['src_valid'][:, None, None, :]  # [B, 1, 1, S]
    return mask[:, None], cross_mask, positions, cache


class Transformer(nnx.Module):
  """The encoder-decoder Transformer (Sec 3, Figure 1).

  Call it for teacher-forced training logits; ``encode`` + ``init_cache`` +
  ``decode_step`` decode with a cache of keys and values (the searches of
  ``inference/search.py`` drive them); ``attention_weights`` returns every layer's
  attention probabilities for visualisation.
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
    logits, _ = self.decoder(encoded, src, tgt_in, src_segments=src_segments,
                             tgt_segments=tgt_segments, tgt_positions=tgt_positions,
                             deterministic=deterministic)
    return logits

  def init_cache(self, encoded: Array, src: Array, length: int) -> Cache:
    """An empty decode cache of ``length`` entries for each source.

    Args:
      encoded: [B, S, D] encoder output: each decoder layer's cross-attention keys
        and values are computed here, once per source.
      src: [B, S] source ids (the cross-attention padding mask).
      length: E, the self-attention entries per source.

    Returns:
      The cache described at ``Decoder.init_cache``.
    """
    self._check_inputs(src=src)
    return self.decoder.init_cache(src.shape[0], length, encoded, src)

  def cache_batch_axes(self) -> dict[str, int]:
    """The batch axis of each part of ``init_cache``'s cache (a pytree prefix of it):
    ``inference.search.beam_search``'s ``cache_batch_axes``."""
    return self.decoder.cache_batch_axes()

  def output_kernel(self) -> Array:
    """[D, V]: the pre-softmax weights for ``decode_step`` (see Decoder.output_kernel)."""
    return self.decoder.output_kernel()

  def decode_step(self, tokens: Array, cache: Cache, *, index: Array,
                  positions: Array | None = None, mask: Array | None = None,
                  output_kernel: Array | None = None) -> tuple[Array, Cache]:
    """Decodes T positions per source with the cache (deterministic).

    The teacher-forced decoder's code (``Decoder.__call__``): the positions' keys
    and values are written into cache entries ``index .. index + T - 1`` and each
    attends to the entries ``mask`` marks, and to its source.

    Args:
      tokens: [B, T] int32 decoder inputs (bos at a sentence's first position).
      cache: from ``init_cache`` or the previous step.
      index: int32 scalar, the first cache entry written.
      positions: [B, T] int32 positions in the sentence (default index + t).
      mask: [B, T, E] bool, True where a position may attend to a cache entry,
        this step's included (default: entries <= index + t).
      output_kernel: optionally ``output_kernel()`` [D, V], computed once before a
        decoding loop (faster logits on CPU; the same values).

    Returns:
      (logits [B, T, V] float32 for each position's next token, the updated cache).
    """
    self._check_inputs(tokens=tokens, positions=positions)
    return self.decoder(None, None, tokens, tgt_positions=positions, cache=cache,
                        index=index, mask=mask, output_kernel=output_kernel)

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
