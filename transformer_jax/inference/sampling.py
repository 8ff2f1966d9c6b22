"""Sampling from a decoder-only language model with its KV cache.

``sample_tokens(decode_fn, cache, prompts, prompt_lengths, ...)`` is a pure function
of the model's cached decode and a cache (as beam search is), so it jits once per
shape:

* prefill: the prompts (of different lengths) are left-padded to end in the same
  column and go through the model in one parallel pass that fills the KV cache;
  each row's cache entries before its prompt are masked out and its positions
  start at its first token, so a row decodes as it would alone.
* then one token per row per step through the same cached decode (the model's one
  forward path with T = 1).
* choosing: greedy (``temperature=0``) or a draw from softmax(logits / temperature)
  restricted to the ``top_k`` most likely tokens and/or to the smallest set whose
  probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020).

``Sampler`` wraps a restored ``LanguageModel`` and its vocabulary: text in, text out.
Shapes: B rows, P the longest prompt, N new tokens, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DecodeFn = Callable[..., tuple[Array, Any]]


def filter_logits(logits: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Sets logits outside the top-k / top-p set to -inf.

  Args:
    logits: [B, V] float32 (already divided by the temperature).
    top_k: keep the k largest per row; 0 keeps all.
    top_p: keep the smallest set of largest logits whose probability reaches
      ``top_p`` (the most likely token always stays); 1.0 keeps all.

  Returns:
    [B, V] float32.
  """
  neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # Probability of the larger ones.
    keep = before < top_p
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg_inf, logits)
  return logits


def choose(logits: Array, key: Array, *, temperature: float, top_k: int,
           top_p: float) -> Array:
  """[B, V] logits -> [B] int32 tokens: argmax at temperature 0, else a draw.

  ``key`` is one PRNG key, or [B] keys, one per row (each row then draws as if alone).
  """
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k,
                         top_p=top_p)
  if jnp.ndim(key) == 0:
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
  return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)


def left_align(prompts: Array, prompt_lengths: Array, pad_id: int = 0) -> Array:
  """Right-padded [B, P] prompts -> the same prompts right-aligned (left-padded), so
  that every row's last prompt token is in column P - 1."""
  width = prompts.shape[1]
  source = jnp.arange(width)[None, :] - (width - prompt_lengths)[:, None]  # [B, P]
  aligned = jnp.take_along_axis(prompts, jnp.clip(source, 0, width - 1), axis=1)
  return jnp.where(source >= 0, aligned, pad_id)


def sample_tokens(decode_fn: DecodeFn, cache, prompts: Array, prompt_lengths: Array, *,
                  max_new_tokens: int, key: Array, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> Array:
  """Continues each prompt by ``max_new_tokens`` tokens (traceable; jit it).

  The prompts are left-padded so that they all end in column P - 1 and prefilled
  in one parallel pass that fills the cache; each row then samples one token per
  step. Row b's cache entry c holds its position c - (P - prompt_lengths[b]);
  entries before its prompt are masked out, so ragged prompts decode as if alone.

  Args:
    decode_fn: ``(tokens [B, T], cache, *, index, positions [B, T], mask [B, T, E])
      -> (logits [B, T, V], cache)``, as ``LanguageModel.decode_step``.
    cache: the model's empty cache for B rows of P + N entries.
    prompts: [B, P] int32, right-padded.
    prompt_lengths: [B] int32, each >= 1.
    max_new_tokens: N.
    key: PRNG key; row b draws the token at its position t with
      ``fold_in(key, t - 1)`` (the same key whatever the other rows' prompts).
    temperature, top_k, top_p: as in :func:`choose`.

  Returns:
    [B, P + N] int32: row b holds its prompt and then its N new tokens in
    positions [0, prompt_lengths[b] + N); later positions are filler (0).
  """
  batch, width = prompts.shape
  pad = width - prompt_lengths  # [B] empty columns before each prompt
  columns = jnp.arange(width + max_new_tokens, dtype=jnp.int32)  # cache entries
  positions = jnp.maximum(columns[None, :] - pad[:, None], 0)  # [B, P + N]
  started = columns[None, :] >= pad[:, None]  # [B, P + N]: not before the prompt

  def visible(first, count):
    """[B, count, P + N] mask of columns first .. first + count - 1."""
    query = first + jnp.arange(count)
    return started[:, None, :] & (columns[None, None, :] <= query[None, :, None])

  def draw(logits, step):
    """Row b's token at position prompt_lengths[b] + step."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, prompt_lengths + step - 1)
    return choose(logits, keys, temperature=temperature, top_k=top_k, top_p=top_p)

  # Prefill: the whole prompt in one pass; its last column predicts the first token.
  aligned = left_align(prompts.astype(jnp.int32), prompt_lengths)
  logits, cache = decode_fn(aligned, cache, index=0, positions=positions[:, :width],
                            mask=visible(0, width))
  new = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(
      draw(logits[:, -1], 0))

  def body(step, carry):
    new, cache = carry
    column = width + step - 1  # Where the previous new token goes.
    logits, cache = decode_fn(
        jax.lax.dynamic_slice_in_dim(new, step - 1, 1, axis=1), cache, index=column,
        positions=jax.lax.dynamic_slice_in_dim(positions, column, 1, axis=1),
        mask=visible(column, 1))
    return new.at[:, step].set(draw(logits[:, 0], step)), cache

  new, _ = jax.lax.fori_loop(1, max_new_tokens, body, (new, cache))
  # Back to right-padded rows: prompt, new tokens, filler.
  out = jnp.concatenate([aligned, new], axis=1)  # [B, P + N]
  source = columns[None, :] + pad[:, None]
  return jnp.where(source < width + max_new_tokens,
                   jnp.take_along_axis(out, jnp.clip(source, 0, width + max_new_tokens - 1),
                                       axis=1), 0)


@functools.lru_cache(maxsize=8)
def _compiled(graphdef, max_new_tokens: int, temperature: float, top_k: int,
              top_p: float):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def run(state, prompts, prompt_lengths, key):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(prompts.shape[0], prompts.shape[1] + max_new_tokens)
    return sample_tokens(model.decode_step, cache, prompts, prompt_lengths,
                         max_new_tokens=max_new_tokens, key=key,
                         temperature=temperature, top_k=top_k, top_p=top_p)

  return jax.jit(run)


class Sampler:
  """Text continuation with a restored ``LanguageModel`` and its vocabulary.

  Example::

    sampler = Sampler(model, vocab)
    sampler.sample(['ROMEO:', 'JULIET:'], max_new_tokens=200, temperature=0.8,
                   top_k=40, seed=0)  # -> two strings, prompt included
  """

  def __init__(self, model, vocab):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    if model.cfg.family != 'decoder_only':
      raise ValueError(f'Sampling needs a decoder_only model, got family '
                       f'{model.cfg.family!r}.')
    self.model, self.vocab = model, vocab
    self.graphdef, self.state = nnx.split(model)

  def sample_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0) -> list[list[int]]:
    """Each prompt's ids followed by its ``max_new_tokens`` new ids."""
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError('Every prompt needs at least one token (e.g. "\\n").')
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}.')
    if not 0.0 < top_p <= 1.0 or top_k < 0 or temperature < 0:
      raise ValueError(f'Need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got '
                       f'{temperature}, {top_k}, {top_p}.')
    width = max(len(p) for p in prompts)
    cfg = self.model.cfg
    if cfg.positions == 'learned' and width + max_new_tokens > cfg.max_len:
      raise ValueError(f'Prompt ({width}) + max_new_tokens ({max_new_tokens}) exceed the '
                       f"model's {cfg.max_len} learned positions.")
    padded = np.zeros((len(prompts), width), np.int32)
    for row, ids in enumerate(prompts):
      padded[row, :len(ids)] = ids
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    run = _compiled(self.graphdef, int(max_new_tokens), float(temperature), int(top_k),
                    float(top_p))
    tokens = np.asarray(run(self.state, padded, lengths, jax.random.key(seed)))
    return [tokens[r, :lengths[r] + max_new_tokens].tolist() for r in range(len(prompts))]

  def sample(self, prompts: Sequence[str], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0) -> list[str]:
    """Each prompt followed by its continuation, as text."""
    ids = self.sample_ids([self.vocab.encode(p) for p in prompts],
                          max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed)
    return [self.vocab.decode(row) for row in ids]


def load_sampler(workdir: str, *, step: int | None = None,
                 average_last: int | None = 1) -> Sampler:
  """A ``Sampler`` for a decoder-only training workdir (latest checkpoint by default;
  ``average_last=K``: the mean of the last K checkpoints up to ``step``).

  Raises:
    FileNotFoundError, ValueError: no such run, checkpoint or vocabulary; not a
      decoder-only run.
  """
  from transformer_jax.run import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  loaded = workdir_lib.Workdir.open(workdir).load(
      step, average_last, family='decoder_only', use='sampling')
  return Sampler(loaded.model, loaded.vocab)
