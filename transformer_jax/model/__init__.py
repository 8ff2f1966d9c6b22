"""The paper's modules: config, layers and the encoder-decoder Transformer.

``from transformer_jax import model`` gives the public names below, so callers write
``model.Transformer(model.TransformerConfig(...), rngs=...)``. Nothing here knows
about search, data or the training loop.
"""

from transformer_jax.model.config import TransformerConfig
from transformer_jax.model.layers import (DecoderLayer, Embedding, EncoderLayer,
                                          FeedForward, MultiHeadAttention,
                                          OutputProjection, PositionalEncoding,
                                          SublayerConnection, cached_attention,
                                          einsum_attention, sinusoidal_positions)
from transformer_jax.model.positions import alibi_bias, alibi_slopes, rotary_embedding
from transformer_jax.model.transformer import (Decoder, Encoder, Transformer,
                                               shift_right)

__all__ = [
    'Decoder', 'DecoderLayer', 'Embedding', 'Encoder', 'EncoderLayer', 'FeedForward',
    'MultiHeadAttention', 'OutputProjection', 'PositionalEncoding', 'alibi_bias',
    'alibi_slopes', 'rotary_embedding',
    'SublayerConnection', 'Transformer', 'TransformerConfig', 'cached_attention',
    'einsum_attention', 'shift_right', 'sinusoidal_positions',
]
