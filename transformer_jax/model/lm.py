"""Decoder-only causal language model: the Transformer's decoder without its encoder.

The paper's decoder stack (Sec 3.1) with the encoder-decoder attention sub-layer
dropped leaves masked self-attention + FFN per layer: the GPT family. Every module
is the translation model's own (``DecoderLayer(cross_attention=False)``, the same
attention, FFN, norms, positions, logical axes and decode cache), so a change to a
layer is seen by both models.

  LanguageModel(cfg)(tokens)         teacher-forced logits [B, T, V]
  init_cache(B, L) / decode_step     one token at a time with cached keys and values

Sampling (temperature, top-k, top-p, greedy) lives outside the model, in
``inference/sampling.py``: a pure function of ``decode_step`` and a cache.
Shapes: B batch, T length, D d_model, N heads, H head dim, V vocabulary, L the
cache's length.
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

  def _check(self, tokens: Array, max_len: int | None = None) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'tokens must be [batch, length] integer ids, got shape '
                       f'{tokens.shape} dtype {tokens.dtype}.')
    length = tokens.shape[1] if max_len is None else max_len
    if self.cfg.positions == 'learned' and length > self.cfg.max_len:
      raise ValueError(f'Length {length} is longer than the learned position table '
                       f'(max_len={self.cfg.max_len}).')

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
    return self.decoder(None, None, tokens, tgt_segments=segments,
                        tgt_positions=positions, deterministic=deterministic,
                        self_probs_out=probs_out)

  def init_cache(self, batch_size: int, max_len: int) -> Cache:
    """An empty cache for ``batch_size`` rows of up to ``max_len`` tokens.

    Returns:
      {'index': int32 scalar, the next position; 'layers': [per layer {'key':
      [B, N, H, L], 'value': [B, N, L, H]}]}, the translation decoder's layout
      (see ``layers.single_query_attention``) with one beam.
    """
    cfg = self.cfg
    if cfg.positions == 'learned' and max_len > cfg.max_len:
      raise ValueError(f'Cache length {max_len} exceeds the learned position table '
                       f'(max_len={cfg.max_len}).')
    layers_cache = [{
        'key': jnp.zeros((batch_size, cfg.num_heads, cfg.qk_head_dim, max_len), cfg.dtype),
        'value': jnp.zeros((batch_size, cfg.num_heads, max_len, cfg.qkv_head_dim),
                           cfg.dtype)} for _ in self.decoder.layers]
    return {'index': jnp.zeros((), jnp.int32), 'layers': layers_cache}

  def decode_step(self, token: Array, cache: Cache) -> tuple[Array, Cache]:
    """Feeds one token per row at position ``cache['index']`` (deterministic).

    Args:
      token: [B] int32, each row's token at this position.
      cache: from ``init_cache`` or the previous step.

    Returns:
      (logits [B, V] float32 for the next token, the updated cache).
    """
    index = cache['index']
    batch, max_len = token.shape[0], cache['layers'][0]['key'].shape[-1]
    # Sec 3.2.3: position ``index`` sees the cached positions <= index.
    self_mask = jnp.broadcast_to((jnp.arange(max_len) <= index)[None, None, None, :],
                                 (batch, 1, 1, max_len))  # [B, 1, 1, L]
    positions = jnp.full((batch, 1), index, jnp.int32)
    y = self.decoder.embed_tokens(token[:, None], positions, deterministic=True)
    new_layers = []
    for layer, layer_cache in zip(self.decoder.layers, cache['layers']):
      y, layer_cache = layer.step(y, None, self_mask, None, layer_cache, index)
      new_layers.append(layer_cache)
    logits = self.decoder.logits(y)[:, 0]  # [B, V]
    return logits, {'index': index + 1, 'layers': new_layers}

  def attention_weights(self, tokens: Array) -> dict[str, Array]:
    """{'decoder_self': [layers, B, N, T, T]} float32 probabilities (visualisation)."""
    probs = []
    self(tokens, probs_out=probs)
    return {'decoder_self': jnp.stack(probs)}
