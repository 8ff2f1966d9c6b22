"""Beam search and greedy search over the model's explicit decoder cache.

The searches are pure functions of arrays. They see the model only through

  step_fn(token [R], cache) -> (logits [R, V], cache)
  reorder_fn(cache, parents [B, K]) -> cache     (beam search only)

where R is the number of rows being decoded (B for greedy search, B * K for beam
search, beams of one sentence adjacent) and ``cache`` is any pytree of arrays. By
default beam search reorders the cache by gathering rows along each leaf's batch
axis (the leading one unless ``cache_batch_axes`` names another: a scanned model's
layer caches are [N, R, ...], ``Transformer.cache_batch_axes``); with the
Transformer (:func:`search_model`) the cache is a
:class:`BeamCache`, which keeps keys and values in place and reorders only each
beam's ancestry (:func:`reorder_beams`). The model knows nothing about beams: its
``decode_step`` writes and attends to cache entries under the mask it is given.

Sec 6.1 of the paper: beam size 4, length penalty alpha = 0.6 in the GNMT form
((5 + |Y|) / 6)^alpha, maximum output length = input length + 50, and the search
stops as soon as no unfinished hypothesis can beat the finished ones. The loop is a
``jax.lax.while_loop`` over a buffer of fixed length, so one compilation serves
every batch of a given source shape.

``beam_rules='ctranslate2'`` instead follows CTranslate2's beam search (its
``BeamSearch::search``, src/decoding.cc, with patience 1 and ``min_decoding_length``
1), so that an exported model can be checked token for token against ours: EOS is
barred from the first step (its logit masked before the softmax), only EOS among a
step's K best candidates finishes a hypothesis, a sentence stops once K hypotheses
have finished, and the best of all finished ones wins by log P / |Y|^alpha (|Y|
counts the EOS, as ours does). See :data:`BEAM_RULES`.

:func:`search_model` wires a :class:`~transformer_jax.model.Transformer` into the
searches: encode once, project each sentence's cross-attention keys and values
once (its K beams share them, :class:`BeamCache`), then run the loop; traceable, so
one ``jax.jit`` holds it all (``inference.translator.BatchSearch`` jits, places and
batches it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.model.config import BOS_ID, EOS_ID, PAD_ID

# Finite stand-in for -inf: keeps sums and divisions free of inf - inf = nan.
NEG_INF = -1.0e9

Cache = Any
StepFn = Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]
ReorderFn = Callable[[Cache, jax.Array], Cache]


BEAM_RULES = ('paper', 'ctranslate2')
"""The beam search's scoring and stopping rules: 'paper' (Sec 6.1 as tensor2tensor
runs it; the default) or 'ctranslate2' (CTranslate2 4.x's, for checking exports)."""


def check_beam_rules(rules: str) -> str:
  """``rules`` if it names a rule set of :data:`BEAM_RULES`, else a ValueError."""
  if rules not in BEAM_RULES:
    raise ValueError(f'beam_rules must be one of {", ".join(BEAM_RULES)}; got {rules!r}.')
  return rules


def length_penalty(length, alpha: float):
  """GNMT length penalty ((5 + |Y|) / 6)^alpha (Wu et al. 2016; Sec 6.1).

  Beam scores are log P(Y | X) / length_penalty(|Y|, alpha); |Y| counts the EOS.
  """
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def output_limits(src_lengths: jax.Array, max_extra_len: int,
                  max_decode_len: int) -> jax.Array:
  """Most output tokens (with EOS) each sentence may produce: |X| + 50 (Sec 6.1).

  Args:
    src_lengths: [B] source tokens (with EOS), 0 for padding rows.
    max_extra_len: output length allowed beyond the input length.
    max_decode_len: the length of the output buffer, L.

  Returns:
    [B] int32 limits in [1, L]; padding rows get 1 so they finish at once.
  """
  limits = jnp.minimum(src_lengths + max_extra_len, max_decode_len)
  return jnp.where(src_lengths > 0, limits, 1).astype(jnp.int32)


def first_argmax(x: jax.Array) -> jax.Array:
  """argmax over the last axis (first index among ties), as int32.

  Written as a max then a min over matching indices: XLA:CPU lowers jnp.argmax to a
  variadic (value, index) reduction that took ~3x longer than a decoding step's
  whole output projection over an 8000-word vocabulary.
  """
  best = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(x == best, iota, x.shape[-1]), axis=-1).astype(jnp.int32)


def _vocabulary_block(vocab: int, target: int = 128) -> int:
  """Block length for the candidate search: the divisor of V in [target / 2,
  2 * target] closest to ``target`` (no padding), else ``target``."""
  divisors = [b for b in range(target // 2, 2 * target + 1) if vocab % b == 0]
  return min(divisors, key=lambda b: abs(b - target)) if divisors else target


def beam_candidates(logits: jax.Array, alive_logp: jax.Array,
                    n: int) -> tuple[jax.Array, jax.Array]:
  """The n most likely one-token continuations of K prefixes, with their log P.

  log P(prefix + v) = log P(prefix) + log_softmax(logits)_v, ranked over all K * V
  continuations of a sentence. Exact, written for XLA:CPU, where ``lax.top_k`` over
  B x (K * V) candidates and separate passes over the [B, K, V] logits dominated
  the search's own cost: one pass takes the maxima of vocabulary blocks (their
  maxima are the rows' maxima, the log-softmax's shift), one sums the exponentials,
  and the n best lie in the n blocks whose maxima are largest after adding their
  row's log P (any other entry has n block maxima at least as large above it), so
  top-k runs over block maxima and then over n gathered blocks. Ties may pick other
  indices of equal value than ``lax.top_k``.

  Args:
    logits: [B, K, V] float32 next-token logits of each prefix.
    alive_logp: [B, K] log P of each prefix.
    n: how many continuations to return per sentence.

  Returns:
    log P [B, n] (best first) and indices [B, n] into K * V (parent * V + token).
  """
  batch, k, vocab = logits.shape
  size = _vocabulary_block(vocab)
  if k * vocab < 16 * size or vocab < 2 * size:  # Small: one top_k is cheap.
    logp = logits + (alive_logp - jax.nn.logsumexp(logits, axis=-1))[:, :, None]
    return jax.lax.top_k(logp.reshape(batch, k * vocab), n)
  x = logits
  if vocab % size:
    x = jnp.pad(logits, ((0, 0), (0, 0), (0, size - vocab % size)),
                constant_values=-jnp.inf)
  per_row = x.shape[-1] // size
  blocks = x.reshape(batch, k * per_row, size)  # [B, K * V / size, size]
  block_max = jnp.max(blocks, axis=-1)  # [B, K * V / size]
  row_max = jnp.max(block_max.reshape(batch, k, per_row), axis=-1)  # [B, K]
  # jax.nn.logsumexp's arithmetic, with the maximum taken from the blocks'.
  lse = jnp.log(jnp.sum(jnp.exp(logits - row_max[:, :, None]), axis=-1)) + row_max
  block_offset = jnp.repeat(alive_logp - lse, per_row, axis=1)  # [B, K * V / size]
  _, which = jax.lax.top_k(block_max + block_offset, n)  # [B, n] best blocks
  candidates = (jnp.take_along_axis(blocks, which[:, :, None], axis=1)
                + jnp.take_along_axis(block_offset, which, axis=1)[:, :, None])
  values, pick = jax.lax.top_k(candidates.reshape(batch, n * size), n)
  block = jnp.take_along_axis(which, pick // size, axis=1)  # [B, n]
  token = (block % per_row) * size + pick % size
  return values, (block // per_row) * vocab + token


def gather_cache_rows(cache: Cache, rows: jax.Array, batch_axes: Any = 0) -> Cache:
  """Picks ``rows`` [R'] of every cache leaf along its batch axis; scalars (the
  index) stay.

  Args:
    cache: a pytree of arrays.
    rows: [R'] int indices into the batch axis, in range.
    batch_axes: each leaf's batch axis: one int for all, or a pytree prefix of
      ``cache`` as ``jax.vmap``'s ``in_axes`` (``Transformer.cache_batch_axes()``).
  """
  def gather(x, axis):
    if jnp.ndim(x) == 0:
      return x
    # The rows are in range by construction: skip the bounds-check select.
    return x.at[(slice(None),) * axis + (rows,)].get(mode='promise_in_bounds')

  return jax.tree.map(gather, cache, jax.tree.broadcast(batch_axes, cache))


def _check_cache_rows(cache: Cache, batch_axes: Any, rows: int) -> None:
  """A ValueError naming the first cache leaf (scalars aside) without ``rows`` rows
  on its batch axis: what gathering a scanned model's [N, R, ...] layer caches on
  axis 0 would otherwise turn into a while_loop type error."""
  axes = jax.tree.leaves(jax.tree.broadcast(batch_axes, cache))
  for (path, x), axis in zip(jax.tree_util.tree_leaves_with_path(cache), axes):
    if jnp.ndim(x) and (axis >= jnp.ndim(x) or jnp.shape(x)[axis] != rows):
      raise ValueError(
          f'cache{jax.tree_util.keystr(path)} {jnp.shape(x)} does not have the '
          f'{rows} rows (sentences x beams) on axis {axis}; give beam_search the '
          'cache_batch_axes (a model\'s cache: Transformer.cache_batch_axes()).')


class _GreedyState(NamedTuple):
  i: jax.Array  # Tokens generated so far.
  last: jax.Array  # [B] previous token.
  tokens: jax.Array  # [B, L]
  done: jax.Array  # [B] bool
  cache: Cache


def greedy_search(step_fn: StepFn, cache: Cache, src_lengths: jax.Array, *,
                  max_decode_len: int, max_extra_len: int = 50,
                  eos_id: int = EOS_ID, bos_id: int = BOS_ID,
                  pad_id: int = PAD_ID, beam_rules: str = 'paper') -> jax.Array:
  """Most likely next token at each step until EOS or the length limit.

  Under ``beam_rules='ctranslate2'`` the first token cannot be EOS, as in CTranslate2's
  greedy search (``min_decoding_length=1``).

  Args:
    step_fn: ``(token [B], cache) -> (logits [B, V], cache)``.
    cache: decoder cache for B rows, at position 0.
    src_lengths: [B] source lengths (with EOS); 0 marks padding rows.
    max_decode_len: L, the output buffer length (static).
    max_extra_len: a sentence stops after ``src_length + max_extra_len`` tokens.
    eos_id, bos_id, pad_id: special token ids.
    beam_rules: one of :data:`BEAM_RULES`.

  Returns:
    [B, L] int32 tokens, EOS included, ``pad_id`` after it.
  """
  batch = src_lengths.shape[0]
  limits = output_limits(src_lengths, max_extra_len, max_decode_len)
  ct2 = check_beam_rules(beam_rules) == 'ctranslate2'

  def cond(s: _GreedyState):
    return (s.i < max_decode_len) & ~jnp.all(s.done)

  def body(s: _GreedyState):
    logits, cache = step_fn(s.last, s.cache)
    if ct2:
      logits = jnp.where((s.i == 0) & (jnp.arange(logits.shape[-1]) == eos_id),
                         NEG_INF, logits)
    token = first_argmax(logits)
    token = jnp.where(s.done, pad_id, token)
    tokens = s.tokens.at[:, s.i].set(token)
    done = s.done | (token == eos_id) | (s.i + 1 >= limits)
    return _GreedyState(s.i + 1, token, tokens, done, cache)

  init = _GreedyState(
      i=jnp.array(0, jnp.int32),
      last=jnp.full((batch,), bos_id, jnp.int32),
      tokens=jnp.full((batch, max_decode_len), pad_id, jnp.int32),
      done=jnp.zeros((batch,), bool),
      cache=cache)
  return jax.lax.while_loop(cond, body, init).tokens


class _BeamState(NamedTuple):
  i: jax.Array  # Tokens generated so far.
  last: jax.Array  # [B, K] previous token of each alive beam.
  alive_tokens: jax.Array  # [B, K, L]
  alive_logp: jax.Array  # [B, K] log P of each alive prefix.
  finished_tokens: jax.Array  # [B, K, L] (2K slots under CTranslate2's rules)
  finished_scores: jax.Array  # [B, K] length-normalised; NEG_INF = empty slot.
  num_finished: jax.Array  # [B] int32 hypotheses finished so far.
  done: jax.Array  # [B] bool: finished hypotheses are final.
  cache: Cache  # B * K rows.


def _take_beams(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, M, ...] indexed by idx [B, K] along axis 1 -> [B, K, ...]."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def beam_search(step_fn: StepFn, cache: Cache, src_lengths: jax.Array, *,
                beam_size: int = 4, alpha: float = 0.6, max_decode_len: int,
                max_extra_len: int = 50, eos_id: int = EOS_ID,
                bos_id: int = BOS_ID, pad_id: int = PAD_ID,
                reorder_fn: ReorderFn | None = None, cache_batch_axes: Any = 0,
                beam_rules: str = 'paper') -> tuple[jax.Array, jax.Array]:
  """Beam search with the GNMT length penalty and early stopping (Sec 6.1).

  Each step expands the K alive prefixes of a sentence, keeps the 2K best
  continuations (enough that K of them do not end in EOS), moves the ones that end
  in EOS (or hit the sentence's length limit) to the finished set, and keeps the K
  best others alive. A sentence is done when its K-th best finished score is at
  least the best score an alive prefix could still reach: log P only falls as a
  prefix grows, so that bound is ``best alive log P / lp(limit)`` for alpha >= 0.

  ``beam_rules='ctranslate2'`` changes what finishes and when the search stops, as
  CTranslate2 does: the first step cannot end (EOS's logit is masked before the
  log-softmax, ``min_decoding_length=1``); of a step's 2K candidates only those among
  the K best that end are finished (an EOS ranked K+1..2K is dropped); every
  finished hypothesis is kept (at most 2K - 1 before the sentence stops) with score
  log P / |Y|^alpha, |Y| its tokens with the EOS (CTranslate2 4.8.5's scores as
  measured: its hypotheses leave the EOS out, its length penalty counts it); a
  sentence stops once K have finished, and the best of them wins. (With alpha = 0
  CTranslate2 stops as soon as its best candidate ends, which picks the same best
  hypothesis.)

  Args:
    step_fn: ``(token [B*K], cache) -> (logits [B*K, V], cache)``; rows are
      sentence-major (the K beams of sentence b are rows b*K .. b*K+K-1).
    cache: decoder cache for B * K rows, at position 0.
    src_lengths: [B] source lengths (with EOS); 0 marks padding rows.
    beam_size: K.
    alpha: length penalty exponent.
    max_decode_len: L, the output buffer length (static).
    max_extra_len: a sentence stops after ``src_length + max_extra_len`` tokens.
    eos_id, bos_id, pad_id: special token ids.
    reorder_fn: ``(cache, parents [B, K]) -> cache`` for the next step, where new
      beam k of sentence b continues old beam ``parents[b, k]``; by default the
      B * K rows of every leaf but scalars are gathered along its batch axis.
    cache_batch_axes: the default reorder's batch axis of each cache leaf: one int
      for all, or a pytree prefix of ``cache`` (``Transformer.cache_batch_axes()``
      for a model's cache, whose layer caches are [N, B * K, ...] under
      ``scan_layers``). Unused with ``reorder_fn``.
    beam_rules: one of :data:`BEAM_RULES`.

  Returns:
    tokens [B, K, L] int32 (EOS included unless the length limit cut the
    hypothesis, ``pad_id`` after) and scores [B, K] float32, best first.
  """
  batch, k = src_lengths.shape[0], beam_size
  ct2 = check_beam_rules(beam_rules) == 'ctranslate2'
  # CTranslate2 keeps every finished hypothesis: fewer than K before a step, at
  # most K more in it.
  slots = 2 * k if ct2 else k
  limits = output_limits(src_lengths, max_extra_len, max_decode_len)
  max_penalty = length_penalty(limits, alpha)  # [B]
  if reorder_fn is None:
    _check_cache_rows(cache, cache_batch_axes, batch * k)
    rows = jnp.arange(batch)[:, None] * k  # [B, 1] first cache row of each sentence
    reorder_fn = lambda cache, parents: gather_cache_rows(
        cache, (rows + parents).reshape(-1), cache_batch_axes)

  def cond(s: _BeamState):
    return (s.i < max_decode_len) & ~jnp.all(s.done)

  def body(s: _BeamState):
    logits, cache = step_fn(s.last.reshape(batch * k), s.cache)
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32).reshape(batch, k, vocab)
    if ct2:  # min_decoding_length=1: no empty output, the rest renormalised.
      logits = jnp.where((s.i == 0) & (jnp.arange(vocab) == eos_id), NEG_INF, logits)
    top_logp, top_idx = beam_candidates(logits, s.alive_logp, 2 * k)  # [B, 2K]
    parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)  # [B, 2K]
    tokens = _take_beams(s.alive_tokens, parent).at[:, :, s.i].set(token)
    valid = top_logp > NEG_INF / 2  # Not grown from an empty beam slot.
    at_limit = (s.i + 1 >= limits)[:, None]  # [B, 1]
    ends = (token == eos_id) | at_limit

    # Finished set: the K best of the old finished and the newly ended.
    finishing = ends & valid & ~s.done[:, None]  # [B, 2K]
    if ct2:
      finishing &= jnp.arange(2 * k) < k  # Only the K best candidates finish.
      new_scores = top_logp / (s.i + 1).astype(jnp.float32) ** alpha
    else:
      new_scores = top_logp / length_penalty(s.i + 1, alpha)
    new_scores = jnp.where(finishing, new_scores, NEG_INF)
    all_scores = jnp.concatenate([s.finished_scores, new_scores], axis=1)
    finished_scores, pick = jax.lax.top_k(all_scores, slots)  # Ties keep the older.
    finished_tokens = _take_beams(
        jnp.concatenate([s.finished_tokens, tokens], axis=1), pick)

    # Alive set: the K best continuations that did not end.
    alive_logp, pick = jax.lax.top_k(jnp.where(ends, NEG_INF, top_logp), k)
    alive_tokens = _take_beams(tokens, pick)
    last = jnp.take_along_axis(token, pick, axis=1)
    cache = reorder_fn(cache, jnp.take_along_axis(parent, pick, axis=1))

    num_finished = s.num_finished + jnp.sum(finishing, axis=1, dtype=jnp.int32)
    if ct2:
      stop = num_finished >= k
    else:
      stop = finished_scores[:, -1] >= alive_logp[:, 0] / max_penalty
    done = s.done | at_limit[:, 0] | stop
    return _BeamState(s.i + 1, last, alive_tokens, alive_logp, finished_tokens,
                      finished_scores, num_finished, done, cache)

  first_beam_only = jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)  # No duplicates.
  init = _BeamState(
      i=jnp.array(0, jnp.int32),
      last=jnp.full((batch, k), bos_id, jnp.int32),
      alive_tokens=jnp.full((batch, k, max_decode_len), pad_id, jnp.int32),
      alive_logp=jnp.broadcast_to(first_beam_only, (batch, k)).astype(jnp.float32),
      finished_tokens=jnp.full((batch, slots, max_decode_len), pad_id, jnp.int32),
      finished_scores=jnp.full((batch, slots), NEG_INF, jnp.float32),
      num_finished=jnp.zeros((batch,), jnp.int32),
      done=jnp.zeros((batch,), bool),
      cache=cache)
  final = jax.lax.while_loop(cond, body, init)
  return final.finished_tokens[:, :k], final.finished_scores[:, :k]


def strip_eos(tokens: Sequence[int] | np.ndarray, eos_id: int = EOS_ID,
              pad_id: int = PAD_ID) -> list[int]:
  """Token ids up to (without) the first EOS, padding dropped."""
  out = []
  for t in np.asarray(tokens).tolist():
    if t == eos_id:
      break
    if t != pad_id:
      out.append(t)
  return out


# ----------------------------------------------------------------------------
# The Transformer wired into the searches: the beams' cache bookkeeping.


class BeamCache(NamedTuple):
  """The decoding state of B sentences x K beams (K = 1: greedy search).

  The model's cache (``Transformer.init_cache``) has one row per sentence, so the K
  beams of a sentence share its cross-attention keys and values. At position t beam
  k writes its self-attention keys and values into entry t * K + k of that row, its
  slot k, and they never move: ``ancestry[b, k, t']`` names the slot that holds beam
  k's prefix at position t'. A beam that continues another takes over that beam's
  ancestry (``reorder_beams``, a [B, K, L] integer gather, where moving keys and
  values would copy the whole cache at every step), and each step attends over all
  L * K entries of the sentence, masked to the one slot per position its ancestry
  names (``beam_mask``), which is exactly attention over its own prefix.
  """
  index: jax.Array  # int32 scalar: the position being decoded.
  ancestry: jax.Array  # [B, K, L] int32
  model: Cache  # The model's cache: B rows of L * K entries.


def init_beam_cache(model, encoded: jax.Array, src: jax.Array, beams: int,
                    max_decode_len: int) -> BeamCache:
  """An empty BeamCache for the sentences of ``src`` [B, S] (encoded [B, S, D])."""
  if beams < 1:
    raise ValueError(f'beams must be >= 1, got {beams}.')
  batch = src.shape[0]
  ancestry = jnp.broadcast_to(jnp.arange(beams, dtype=jnp.int32)[None, :, None],
                              (batch, beams, max_decode_len))
  return BeamCache(jnp.zeros((), jnp.int32), ancestry,
                   model.init_cache(encoded, src, max_decode_len * beams))


def beam_mask(ancestry: jax.Array, index: jax.Array) -> jax.Array:
  """[B, K, L * K] bool: the cache entries each beam sees at position ``index``.

  Sec 3.2.3: a beam sees its prefix and itself: for each position <= index the one
  slot its ``ancestry`` [B, K, L] names (entry position * K + slot).
  """
  batch, beams, max_len = ancestry.shape
  slots = jnp.arange(beams, dtype=jnp.int32)[None, None, None, :]
  mask = ((ancestry[:, :, :, None] == slots) &
          (jnp.arange(max_len) <= index)[None, None, :, None])  # [B, K, L, K]
  return mask.reshape(batch, beams, max_len * beams)


def beam_step(model, token: jax.Array, cache: BeamCache, *,
              output_kernel: jax.Array | None = None) -> tuple[jax.Array, BeamCache]:
  """One position for every beam: ``token`` [B * K] (beams of a sentence adjacent)
  -> (logits [B * K, V], the cache); beam k writes its slot of the position."""
  index, ancestry = cache.index, cache.ancestry
  batch, beams, _ = ancestry.shape
  if token.shape != (batch * beams,):
    raise ValueError(f'token must be [{batch} sentences x {beams} beams], got '
                     f'{token.shape}.')
  ancestry = ancestry.at[:, :, index].set(jnp.arange(beams, dtype=jnp.int32))
  logits, model_cache = model.decode_step(
      token.reshape(batch, beams), cache.model, index=index * beams,
      positions=jnp.full((batch, beams), index, jnp.int32),
      mask=beam_mask(ancestry, index), output_kernel=output_kernel)  # [B, K, V]
  return (logits.reshape(batch * beams, -1),
          BeamCache(index + 1, ancestry, model_cache))


def reorder_beams(cache: BeamCache, parents: jax.Array) -> BeamCache:
  """New beam k of sentence b continues old beam ``parents[b, k]`` ([B, K] int):
  only the ancestry moves."""
  ancestry = jnp.take_along_axis(cache.ancestry, parents[:, :, None], axis=1)
  return cache._replace(ancestry=ancestry)


def search_model(graphdef, state, src: jax.Array, *, beam_size: int, alpha: float,
                 max_extra_len: int, max_decode_len: int, eos_id: int = EOS_ID,
                 bos_id: int = BOS_ID, pad_id: int = PAD_ID, beam_rules: str = 'paper'
                 ) -> tuple[jax.Array, jax.Array]:
  """Encodes ``src`` once and searches; traceable, so wrap it in ``jax.jit``.

  Args:
    graphdef, state: ``nnx.split(model)`` of a Transformer.
    src: [B, S] int32 source ids, ``pad_id`` padded.
    beam_size: K; 1 runs greedy search (what beam search with K = 1 and
      alpha = 0 returns).
    alpha, max_extra_len, max_decode_len, eos_id, bos_id, pad_id, beam_rules: as in
      :func:`beam_search`.

  Returns:
    tokens [B, K, L] and scores [B, K] (greedy: K = 1 and scores 0).
  """
  from flax import nnx
  model = nnx.merge(graphdef, state)
  batch, k = src.shape[0], beam_size
  src_lengths = jnp.sum(src != pad_id, axis=1).astype(jnp.int32)
  cache = init_beam_cache(model, model.encode(src), src, k, max_decode_len)
  step_fn = functools.partial(beam_step, model,
                              output_kernel=model.output_kernel())  # [D, V], once.
  if k == 1:
    tokens = greedy_search(step_fn, cache, src_lengths, max_decode_len=max_decode_len,
                           max_extra_len=max_extra_len, eos_id=eos_id, bos_id=bos_id,
                           pad_id=pad_id, beam_rules=beam_rules)
    return tokens[:, None], jnp.zeros((batch, 1), jnp.float32)
  return beam_search(step_fn, cache, src_lengths, beam_size=k, alpha=alpha,
                     max_decode_len=max_decode_len, max_extra_len=max_extra_len,
                     eos_id=eos_id, bos_id=bos_id, pad_id=pad_id,
                     reorder_fn=reorder_beams, beam_rules=beam_rules)
