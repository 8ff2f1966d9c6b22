"""Encoder-only model: the Transformer's encoder with a pooled classifier and a masked-LM head.

The paper's encoder stack (Sec 3.1, the same ``Encoder`` class as the translation
model) read by two heads, as BERT (Devlin et al., 2019) does:

  classify(ids)          [B, S] -> [B, C] logits from a pooled sentence vector:
                         the first token ([CLS], Sec 3 of BERT), or the mean
                         ('mean') or feature-wise maximum ('max') of the
                         non-padding positions
  sentence_embedding     the pooled [B, D] vector itself
  masked_lm(ids, pos)    [B, S], [B, P] -> [B, P, V] logits at the P masked
                         positions (BERT's transform: dense + GELU + LayerNorm,
                         then the tied embedding matrix and a vocabulary bias)

Both heads live in one module, so a masked-LM pre-training checkpoint restores
into the classifier unchanged and fine-tuning starts from it. Shapes: B batch, S
length, D d_model, C classes, V vocabulary, P masked positions per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax import sharding
from transformer_jax.model import layers
from transformer_jax.model.config import TransformerConfig
from transformer_jax.model.transformer import Encoder

Array = jax.Array


class EncoderClassifier(nnx.Module):
  """Encoder stack + pooling + linear classifier, and a masked-LM head."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, zeros = cfg.d_model, jax.nn.initializers.zeros
    self.encoder = Encoder(cfg, layers.Embedding(cfg, rngs=rngs), rngs=rngs)
    self.head_dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
    self.head_kernel = layers._param(rngs, layers._glorot(0, 1), (d, cfg.num_classes),
                                     ('embed', None), cfg.param_dtype)
    self.head_bias = layers._param(rngs, zeros, (cfg.num_classes,), (None,),
                                   cfg.param_dtype)
    self.mlm_kernel = layers._param(rngs, layers._glorot(0, 1), (d, d), ('embed', None),
                                    cfg.param_dtype)
    self.mlm_bias = layers._param(rngs, zeros, (d,), (None,), cfg.param_dtype)
    self.mlm_norm = layers.layer_norm(cfg, rngs)
    self.mlm_output_bias = layers._param(rngs, zeros, (cfg.vocab_size,), ('vocab',),
                                         cfg.param_dtype)

  def encode(self, ids: Array, *, deterministic: bool = True,
             probs_out: list | None = None) -> Array:
    """ids [B, S] int32 (pad = 0) -> encoder output [B, S, D]."""
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f'ids must be [batch, length] integer ids, got shape {ids.shape} '
                       f'dtype {ids.dtype}.')
    if self.cfg.positions == 'learned' and ids.shape[1] > self.cfg.max_len:
      raise ValueError(f'Length {ids.shape[1]} is longer than the learned position '
                       f'table (max_len={self.cfg.max_len}).')
    return self.encoder(ids, deterministic=deterministic, probs_out=probs_out)

  def pool(self, encoded: Array, ids: Array) -> Array:
    """[B, S, D] -> [B, D]: the [CLS] position, or the mean or the feature-wise
    maximum (max-over-time, as in Kim, 2014) over the non-padding positions."""
    if self.cfg.pooling == 'cls':
      return encoded[:, 0]
    if self.cfg.pooling == 'max':
      real = (ids != self.cfg.pad_id)[:, :, None]  # [B, S, 1]; [CLS] is never padding.
      return jnp.max(jnp.where(real, encoded, jnp.finfo(encoded.dtype).min), axis=1)
    valid = (ids != self.cfg.pad_id).astype(encoded.dtype)[:, :, None]  # [B, S, 1]
    return jnp.sum(encoded * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)

  def sentence_embedding(self, ids: Array) -> Array:
    """ids [B, S] -> pooled sentence vectors [B, D] (deterministic)."""
    return self.pool(self.encode(ids), ids)

  def __call__(self, ids: Array, *, deterministic: bool = True) -> Array:
    """Class logits [B, C] float32 for ids [B, S]."""
    pooled = self.pool(self.encode(ids, deterministic=deterministic), ids)
    pooled = self.head_dropout(pooled, deterministic=deterministic)
    logits = jnp.einsum('bd,dc->bc', pooled, self.head_kernel[...].astype(self.cfg.dtype),
                        preferred_element_type=jnp.float32)
    return logits + self.head_bias[...].astype(jnp.float32)

  def masked_lm(self, ids: Array, positions: Array, *,
                deterministic: bool = True) -> Array:
    """Masked-LM logits at the given positions.

    Only the P masked positions reach the vocabulary projection (BERT's
    ``max_predictions_per_seq``): with ~15% of tokens masked, projecting every
    position onto V would spend most of the head's FLOPs on unscored outputs.

    Args:
      ids: [B, S] int32 corrupted input ids.
      positions: [B, P] int32 positions to predict (padding entries are ignored by
        the loss; any index in [0, S) is fine for them).

    Returns:
      [B, P, V] float32 logits.
    """
    dtype = self.cfg.dtype
    encoded = self.encode(ids, deterministic=deterministic)  # [B, S, D]
    picked = jnp.take_along_axis(encoded, positions[:, :, None], axis=1)  # [B, P, D]
    h = jnp.einsum('bpd,de->bpe', picked, self.mlm_kernel[...].astype(dtype))
    h = self.mlm_norm(jax.nn.gelu(h + self.mlm_bias[...].astype(dtype)))
    logits = self.encoder.embed.attend(h) + self.mlm_output_bias[...].astype(jnp.float32)
    return sharding.constrain(logits, ('act_batch', 'act_length', 'vocab'))

  def attention_weights(self, ids: Array) -> dict[str, Array]:
    """{'encoder_self': [layers, B, N, S, S]} float32 probabilities (visualisation)."""
    probs = []
    self.encode(ids, probs_out=probs)
    return {'encoder_self': jnp.stack(probs)}
