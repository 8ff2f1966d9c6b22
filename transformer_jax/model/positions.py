"""Relative positions inside self-attention: RoPE and ALiBi (after the paper).

The paper adds absolute positions to the embeddings (Sec 3.5, ``sinusoidal_positions``
in layers.py; Table 3 row E's learned table). Two later schemes act inside each
self-attention instead and see only the offset between a query and a key:

  rotary_embedding   RoPE (Su et al. 2021): queries and keys rotated by position
  alibi_slopes       ALiBi (Press et al. 2022): one slope per head...
  alibi_bias         ...times minus the query-key distance, added to the logits

Both take explicit [B, T] positions, so packed rows (positions restarting at each
sentence) and the decode cache (one position per step) need nothing special.
``MultiHeadAttention`` applies them when ``TransformerConfig.positions`` asks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def rotary_embedding(x: Array, positions: Array, base: float = 10000.0) -> Array:
  """RoPE (Su et al. 2021, "RoFormer"): rotates feature pairs by position-set angles.

  Pair i of a head, features (i, i + H/2) (the split-halves layout of GPT-NeoX,
  LLaMA and Gemma), turns by angle pos * base^(-2i/H). A rotated query at position
  m and a rotated key at position n then have a dot product that depends on m - n
  only, so attention sees relative offsets; packed rows' restarting positions and a
  cache written position by position need nothing more.

  Args:
    x: [B, T, N, H] queries or keys, H even.
    positions: [B, T] integer positions.
    base: the wavelength base (10000 as Sec 3.5's sinusoids).

  Returns:
    [B, T, N, H] in x's dtype (the rotation is computed in float32).
  """
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, N, H/2] each
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                         axis=-1).astype(x.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's per-head slopes (Press et al. 2022, Sec 3 and their reference code).

  For n heads, n a power of two, the geometric sequence 2^(-8/n), 2^(-16/n), ...,
  2^(-8). Otherwise the n' = 2^floor(log2 n) slopes of n' heads, then every other
  slope of 2n' heads (the odd powers) for the remaining n - n' heads.

  Returns:
    [N] float32.
  """
  def geometric(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  closest = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = geometric(closest)
  if closest != num_heads:
    slopes += geometric(2 * closest)[0::2][:num_heads - closest]
  return np.asarray(slopes, np.float32)


def alibi_bias(query_positions: Array, key_positions: Array, num_heads: int) -> Array:
  """ALiBi's additive attention-logit bias: -slope_n * |i - j|.

  The distance is taken from the positions themselves, so packed rows (positions
  restarting at each sentence) and cached decoding get the right offsets. Causal
  attention only ever sees j <= i, where |i - j| = i - j, the paper's bias; the
  encoder's bidirectional attention penalises distance in both directions alike.

  Args:
    query_positions: [B, T] integer positions; key_positions: [B, S].

  Returns:
    [B, N, T, S] float32.
  """
  distance = jnp.abs(query_positions[:, :, None] - key_positions[:, None, :])  # [B, T, S]
  slopes = jnp.asarray(alibi_slopes(num_heads))  # [N]
  return -slopes[None, :, None, None] * distance[:, None].astype(jnp.float32)
