"""The model of each family, chosen by the one config field ``config.model.family``.

  encoder_decoder   transformer.Transformer      translation (the paper)
  decoder_only      lm.LanguageModel             causal language modelling
  encoder_only      classifier.EncoderClassifier classification / masked LM

All three are built from the same layer modules (``model/layers.py``).
"""

from __future__ import annotations

from flax import nnx

from transformer_jax.model.config import TransformerConfig
from transformer_jax.model.transformer import Transformer


def build_model(cfg: TransformerConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The family's model for ``cfg`` (``cfg.family`` decides)."""
  if cfg.family == 'encoder_decoder':
    return Transformer(cfg, rngs=rngs)
  if cfg.family == 'decoder_only':
    from transformer_jax.model import lm  # pylint: disable=g-import-not-at-top
    return lm.LanguageModel(cfg, rngs=rngs)
  if cfg.family == 'encoder_only':
    from transformer_jax.model import classifier  # pylint: disable=g-import-not-at-top
    return classifier.EncoderClassifier(cfg, rngs=rngs)
  raise ValueError(f'Unknown model family {cfg.family!r}.')
