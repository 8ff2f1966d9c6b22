"""Decoder-only causal language model: the Transformer's decoder without its encoder.

The paper's decoder stack (Sec 3.1) with the encoder-decoder attention sub-layer
dropped leaves masked self-attention + FFN per layer: the GPT family. Every module
is the translation model's own (``DecoderLayer(cross_attention=False)``, the same
attention, FFN, norms, positions, logical axes and decode cache), so a change to a
layer is seen by both models.

  LanguageModel(cfg)(tokens)         teacher-forced logits [B, T, V]
  init_cache(B, E) / decode_step     T tokens at a time (a prompt, then one per
                                     step) with cached keys and values

Sampling (prompt prefill, temperature, top-k, top-p, greedy) lives outside the
model, in ``inference/sampling.py``: a pure function of ``decode_step`` and a cache.
Shapes: B batch, T length, D d_model, N heads, H head dim, V vocabulary, E the
cache's entries per row.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax.model.config import TransformerConfig
from transformer_jax.model.layers import Embedding
from transformer_jax.model.transformer import Decoder

Array = jax.Array
Cache = dict[str, Any]


class LanguageModel(nnx.Module):
  """A causal language model: p(x_t | x_<t) from decoder layers without cross-attention."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # The same stack class as the translation decoder; one embedding is both the
    # input table and (with share_embeddings) the softmax weights (Sec 3.4).
    self.decoder = Decoder(cfg, Embedding(cfg, rngs=rngs), rngs=rngs,
                           cross_attention=False)

  def _check(self, tokens: Array) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'tokens must be [batch, length] integer ids, got shape '
                       f'{tokens.shape} dtype {tokens.dtype}.')
    if self.cfg.positions == 'learned' and tokens.shape[1] > self.cfg.max_len:
      raise ValueError(f'Length {tokens.shape[1]} is longer than the learned position '
                       f'table (max_len={self.cfg.max_len}).')

  def __call__(self, tokens: Array, *, segments: Array | None = None,
               positions: Array | None = None, deterministic: bool = True,
               probs_out: list | None = None) -> Array:
    """Teacher-forced logits: position t predicts token t + 1.

    Args:
      tokens: [B, T] int32 ids; ``pad_id`` marks padding (never attended to).
      segments, positions: [B, T] of packed rows (optional).
      deterministic: False applies dropout (needs the 'dropout' RNG stream).
      probs_out: when a list, gets one [B, N, T, T] probability array per layer.

    Returns:
      [B, T, V] float32 logits.
    """
    self._check(tokens)
    logits, _ = self.decoder(None, None, tokens, tgt_segments=segments,
                             tgt_positions=positions, deterministic=deterministic,
                             self_probs_out=probs_out)
    return logits

  def init_cache(self, batch_size: int, length: int) -> Cache:
    """An empty decode cache of ``length`` entries for each of ``batch_size`` rows
    (the translation decoder's, without cross-attention: ``Decoder.init_cache``)."""
    return self.decoder.init_cache(batch_size, length)

  def decode_step(self, tokens: Array, cache: Cache, *, index: Array,
                  positions: Array | None = None,
                  mask: Array | None = None) -> tuple[Array, Cache]:
    """Feeds T tokens per row through the cache (deterministic): a prompt's prefill
    and one-token sampling steps are the same call (``Decoder.__call__``).

    Args:
      tokens: [B, T] int32, written into cache entries ``index .. index + T - 1``.
      cache: from ``init_cache`` or the previous step.
      index: int32 scalar, the first cache entry written.
      positions: [B, T] int32 positions (default index + t).
      mask: [B, T, E] bool, the cache entries each token sees, its own included
        (default: entries <= index + t).

    Returns:
      (logits [B, T, V] float32 for each token's successor, the updated cache).
    """
    self._check(tokens)
    return self.decoder(None, None, tokens, tgt_positions=positions, cache=cache,
                        index=index, mask=mask)

  def attention_weights(self, tokens: Array) -> dict[str, Array]:
    """{'decoder_self': [layers, B, N, T, T]} float32 probabilities (visualisation)."""
    probs = []
    self(tokens, probs_out=probs)
    return {'decoder_self': jnp.stack(probs)}
