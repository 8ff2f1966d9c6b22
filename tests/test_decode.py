"""Beam and greedy search on toy scorers whose best outputs are known."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SRC, TGT
from transformer_jax.inference import search
from transformer_jax.inference.translator import BatchSearch

EOS, BOS, PAD = 1, 2, 0


def _toy_scorer(seed, vocab=4, sharpness=3.0):
  """A second-order Markov scorer: logits depend on the last two tokens.

  The cache holds the previous token per row, so a wrong cache reorder in beam
  search changes the scores.
  """
  table = jax.random.normal(jax.random.key(seed), (vocab, vocab, vocab)) * sharpness

  def step_fn(token, cache):
    logits = table[cache['prev'], token]
    return logits, {'index': cache['index'] + 1, 'prev': token}

  def init_cache(rows):
    return {'index': jnp.array(0, jnp.int32),
            'prev': jnp.full((rows,), BOS, jnp.int32)}

  def log_prob(seq):
    """log P(seq) under the scorer, seq without BOS."""
    logp = jax.nn.log_softmax(table, axis=-1)
    prev, last, total = BOS, BOS, 0.0
    for t in seq:
      total += float(logp[prev, last, t])
      prev, last = last, t
    return total

  return step_fn, init_cache, log_prob, vocab


def _exhaustive_best(log_prob, vocab, limit, alpha):
  """Best length-normalised hypothesis: ends in EOS, or is cut at the limit."""
  best, best_seq = -math.inf, None
  non_eos = [t for t in range(vocab) if t != EOS]
  for n in range(1, limit + 1):
    for prefix in itertools.product(non_eos, repeat=n - 1):
      lasts = range(vocab) if n == limit else [EOS]
      for last in lasts:
        seq = list(prefix) + [last]
        score = log_prob(seq) / ((5 + n) / 6) ** alpha
        if score > best:
          best, best_seq = score, seq
  return best_seq, best


def _beam(step_fn, init_cache, src_lengths, beam_size, alpha, max_decode_len,
          max_extra_len):
  src_lengths = jnp.asarray(src_lengths, jnp.int32)
  return jax.jit(functools.partial(
      search.beam_search, step_fn, beam_size=beam_size, alpha=alpha,
      max_decode_len=max_decode_len, max_extra_len=max_extra_len))(
          init_cache(src_lengths.shape[0] * beam_size), src_lengths)


def test_length_penalty_formula():
  assert float(search.length_penalty(4, 0.6)) == pytest.approx((9 / 6) ** 0.6)
  assert float(search.length_penalty(1, 0.6)) == pytest.approx(1.0)
  assert float(search.length_penalty(37, 0.0)) == 1.0
  np.testing.assert_allclose(search.length_penalty(jnp.array([1, 7, 25]), 2.0),
                             [1.0, 4.0, 25.0], rtol=1e-6)


def test_output_limits_input_plus_extra_capped():
  limits = search.output_limits(jnp.array([3, 10, 0, 40]), max_extra_len=5,
                                max_decode_len=20)
  np.testing.assert_array_equal(limits, [8, 15, 1, 20])


@pytest.mark.parametrize('seed,alpha', [(0, 0.6), (1, 0.6), (2, 0.0), (3, 1.5)])
def test_wide_beam_finds_exhaustive_best(seed, alpha):
  # 3 non-EOS tokens, limit 4: 27 prefixes of length 3, so a beam of 32 never
  # prunes and must return the exhaustive optimum, with its exact score.
  step_fn, init_cache, log_prob, vocab = _toy_scorer(seed)
  limit = 4
  tokens, scores = _beam(step_fn, init_cache, [limit - 2], 32, alpha,
                         max_decode_len=8, max_extra_len=2)
  best_seq, best = _exhaustive_best(log_prob, vocab, limit, alpha)
  got = [t for t in np.asarray(tokens[0, 0]).tolist()][:len(best_seq)]
  assert got == best_seq
  assert np.all(np.asarray(tokens[0, 0, len(best_seq):]) == PAD)
  assert float(scores[0, 0]) == pytest.approx(best, rel=1e-5, abs=1e-5)


def test_beam_scores_are_normalised_log_probs_of_the_returned_tokens():
  # Recomputing every returned hypothesis' score from scratch checks the cache
  # reorder (the toy scorer's logits depend on the previous token in the cache).
  step_fn, init_cache, log_prob, _ = _toy_scorer(seed=5, vocab=7, sharpness=1.0)
  alpha = 0.6
  tokens, scores = _beam(step_fn, init_cache, [3, 6, 1], 4, alpha,
                         max_decode_len=10, max_extra_len=3)
  limits = [6, 9, 4]
  for b in range(3):
    assert np.all(np.diff(np.asarray(scores[b])) <= 1e-6)  # Best first.
    for kk in range(4):
      seq = np.asarray(tokens[b, kk]).tolist()
      n = seq.index(EOS) + 1 if EOS in seq else limits[b]
      assert n <= limits[b]
      assert all(t == PAD for t in seq[n:])
      expected = log_prob(seq[:n]) / ((5 + n) / 6) ** alpha
      assert float(scores[b, kk]) == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_beam_beats_greedy_when_greedy_is_myopic():
  # First step: token 3 is likelier than token 4, but after 3 every continuation
  # is uncertain, while after 4 EOS is nearly certain.
  vocab = 6
  logits = np.full((vocab, vocab), -5.0, np.float32)
  logits[BOS, 3], logits[BOS, 4] = 1.0, 0.6
  logits[3, :] = 0.0
  logits[4, EOS] = 10.0
  table = jnp.asarray(logits)

  def step_fn(token, cache):
    return table[token], cache

  cache = lambda rows: {'index': jnp.array(0, jnp.int32),
                        'dummy': jnp.zeros((rows, 2))}
  greedy = search.greedy_search(step_fn, cache(1), jnp.array([5]),
                                max_decode_len=6, max_extra_len=1)
  assert np.asarray(greedy[0]).tolist()[0] == 3
  tokens, _ = _beam(step_fn, cache, [5], 4, 0.6, max_decode_len=6, max_extra_len=1)
  assert np.asarray(tokens[0, 0]).tolist() == [4, EOS, PAD, PAD, PAD, PAD]


@pytest.mark.parametrize('seed', [0, 7])
def test_beam_one_without_length_penalty_equals_greedy(seed):
  step_fn, init_cache, _, _ = _toy_scorer(seed, vocab=9, sharpness=1.5)
  src_lengths = jnp.array([2, 5, 9, 0], jnp.int32)
  greedy = jax.jit(functools.partial(
      search.greedy_search, step_fn, max_decode_len=12, max_extra_len=3))(
          init_cache(4), src_lengths)
  tokens, _ = _beam(step_fn, init_cache, src_lengths, 1, 0.0,
                    max_decode_len=12, max_extra_len=3)
  np.testing.assert_array_equal(np.asarray(tokens[:, 0]), np.asarray(greedy))
  # Greedy respects the limits too: |X| + 3, and 1 for the padding row.
  for row, limit in zip(np.asarray(greedy), [5, 8, 12, 1]):
    n = (row.tolist().index(EOS) + 1) if EOS in row else limit
    assert n <= limit and np.all(row[n:] == PAD)


def test_early_stop_when_every_sentence_has_finished():
  # EOS is by far the likeliest token (other tokens: log P = -20 each). With K = 2
  # the second finished slot holds -20 / lp(2) = -18.2 after step 2; the best alive
  # prefix can still reach -20 i / lp(40) = -5.97 i after step i, so the search
  # stops after step 4 (-23.9 < -18.2), long before the 40-token limit.
  vocab = 5
  table = jnp.zeros((vocab,)).at[EOS].set(20.0)
  steps = []

  def step_fn(token, cache):
    jax.debug.callback(lambda i: steps.append(int(i)), cache['index'])
    return jnp.broadcast_to(table, token.shape + (vocab,)), {
        'index': cache['index'] + 1}

  tokens, scores = _beam(step_fn, lambda rows: {'index': jnp.array(0, jnp.int32)},
                         [30, 30], 2, 0.6, max_decode_len=40, max_extra_len=10)
  jax.block_until_ready(tokens)
  jax.effects_barrier()  # Debug callbacks are unordered and may arrive late on GPU.
  assert np.asarray(tokens[:, 0, 0]).tolist() == [EOS, EOS]
  assert sorted(steps) == [0, 1, 2, 3]


def test_strip_eos():
  assert search.strip_eos([5, 6, PAD, 7, EOS, 8, PAD]) == [5, 6, 7]
  assert search.strip_eos([EOS, 4]) == []
  assert search.strip_eos(np.array([4, 4])) == [4, 4]


# ----------------------------------------------------------------------------
# The Transformer wired into the searches.


@pytest.fixture(scope='module')
def tiny_model():
  from flax import nnx
  from transformer_jax import model as model_lib
  cfg = model_lib.TransformerConfig(
      vocab_size=24, num_encoder_layers=1, num_decoder_layers=2, d_model=16,
      num_heads=2, d_ff=32, dropout_rate=0.0, max_len=64)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(3))
  # Sharper, more varied next-token distributions than the tiny initial logits.
  emb = model.decoder.embed.embedding
  emb[...] = emb[...] * 6.0
  src = np.array([[5, 9, 12, 7, EOS, 0], [8, 8, EOS, 0, 0, 0],
                  [4, 20, 6, 11, 17, EOS]], np.int32)
  return model, src


def _forward(model):
  """Jitted teacher-forced logits; callers pad to one shape so it compiles once."""
  from flax import nnx
  return nnx.jit(lambda m, src, tgt_in: m(src, tgt_in))


def _teacher_forced_log_prob(forward, model, src_row, hyp, length):
  # The decoder is causal: padding the target to `length` leaves the prefix's
  # log-probabilities unchanged and keeps one compiled shape.
  from transformer_jax import model as model_lib
  tgt = jnp.asarray([hyp + [0] * (length - len(hyp))], jnp.int32)
  logits = forward(model, jnp.asarray(src_row[None]),
                   model_lib.shift_right(tgt, bos_id=BOS))
  logp = jax.nn.log_softmax(logits[0], axis=-1)
  return float(jnp.sum(logp[jnp.arange(len(hyp)), tgt[0, :len(hyp)]]))


def test_model_beam_scores_equal_teacher_forced_log_probs(tiny_model):
  # Every hypothesis' score, recomputed with the full (uncached) forward pass,
  # checks the encoder tiling, the cached cross-attention and the cache reorder.
  model, src = tiny_model
  alpha, extra = 0.6, 4
  tokens, scores = BatchSearch(model, beam_size=3, alpha=alpha, max_extra_len=extra)(src)
  lengths = (src != 0).sum(1)
  assert tokens.shape == (3, 3, src.shape[1] + extra)
  forward = _forward(model)
  for b in range(3):
    for kk in range(3):
      seq = tokens[b, kk].tolist()
      n = seq.index(EOS) + 1 if EOS in seq else lengths[b] + extra
      assert n <= lengths[b] + extra
      expected = (_teacher_forced_log_prob(forward, model, src[b], seq[:n],
                                           tokens.shape[-1])
                  / ((5 + n) / 6) ** alpha)
      assert float(scores[b, kk]) == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_model_greedy_equals_uncached_argmax_loop(tiny_model):
  from transformer_jax import model as model_lib
  model, src = tiny_model
  extra = 3
  tokens, _ = BatchSearch(model, beam_size=1, max_extra_len=extra)(src)
  best = [search.strip_eos(row) for row in tokens[:, 0]]
  forward, max_len = _forward(model), src.shape[1] + extra
  for b, length in enumerate((src != 0).sum(1)):
    out = []
    for _ in range(length + extra):
      # Causal decoder: the filler after the prefix does not change its logits.
      tgt = jnp.asarray([out + [3] * (max_len - len(out))], jnp.int32)
      logits = forward(model, jnp.asarray(src[b:b + 1]),
                       model_lib.shift_right(tgt, bos_id=BOS))
      token = int(jnp.argmax(logits[0, len(out)]))
      if token == EOS:
        break
      out.append(token)
    assert best[b] == out


def test_model_search_sharded_over_the_batch_equals_single_device(tiny_model):
  from transformer_jax import sharding
  import ml_collections
  model, src = tiny_model
  mesh_cfg = ml_collections.ConfigDict(dict(data=4, fsdp=2, tensor=1, rules=(
      ('act_batch', ('data', 'fsdp')), ('embed', 'fsdp'))))
  mesh = sharding.create_mesh(mesh_cfg)
  single = BatchSearch(model, beam_size=2, max_extra_len=3)(src)
  sharded = BatchSearch(model, beam_size=2, max_extra_len=3, mesh=mesh,
                        rules=sharding.rules_from_config(mesh_cfg))(src)
  np.testing.assert_array_equal(sharded[0], single[0])  # 3 rows padded to 8 inside.
  np.testing.assert_allclose(sharded[1], single[1], rtol=1e-5, atol=1e-5)


def _reference_candidates(logits, alive_logp, n):
  logp = jax.nn.log_softmax(logits, axis=-1) + alive_logp[:, :, None]
  return jax.lax.top_k(logp.reshape(logits.shape[0], -1), n)


# V = 8000 splits into blocks of 125; 4099 (prime) is padded to blocks of 128; the
# small vocabulary takes one lax.top_k.
@pytest.mark.parametrize('vocab,k', [(8000, 4), (4099, 3), (50, 2)])
def test_beam_candidates_equal_log_softmax_top_k(vocab, k):
  batch, n = 3, 2 * k
  logits = 4 * jax.random.normal(jax.random.key(vocab), (batch, k, vocab))
  alive_logp = -jnp.abs(jax.random.normal(jax.random.key(1), (batch, k))) * 3
  alive_logp = alive_logp.at[:, 1:].set(jnp.where(jnp.arange(batch)[:, None] == 0,
                                                  search.NEG_INF, alive_logp[:, 1:]))
  candidates = jax.jit(search.beam_candidates, static_argnums=2)
  values, indices = candidates(logits, alive_logp, n)
  expected_values, expected_indices = _reference_candidates(logits, alive_logp, n)
  np.testing.assert_allclose(values, expected_values, rtol=1e-6, atol=1e-5)
  np.testing.assert_array_equal(indices, expected_indices)
  # Ties (a coarse grid of logits): the same values, at indices holding them.
  logits = jnp.round(logits)
  values, indices = candidates(logits, alive_logp, n)
  expected_values, _ = _reference_candidates(logits, alive_logp, n)
  np.testing.assert_allclose(values, expected_values, rtol=1e-6, atol=1e-5)
  logp = jax.nn.log_softmax(logits, axis=-1) + alive_logp[:, :, None]
  np.testing.assert_allclose(
      jnp.take_along_axis(logp.reshape(batch, -1), indices, axis=1), values,
      rtol=1e-6, atol=1e-5)
  assert all(len(set(row)) == n for row in np.asarray(indices).tolist())


def test_first_argmax_equals_argmax_with_ties():
  x = jnp.round(jax.random.normal(jax.random.key(0), (5, 8000)) * 2) / 2
  np.testing.assert_array_equal(search.first_argmax(x), jnp.argmax(x, axis=-1))


# ----------------------------------------------------------------------------
# The beams' cache bookkeeping (BeamCache): the model knows nothing about beams.

def _beam_prefixes(beams):
  """Decoder inputs [B * K, T] for K beams per source: beam k's tokens are the
  target's plus 3k (padding stays), so that the beams' prefixes all differ."""
  from transformer_jax import model as model_lib
  tgt_in = np.asarray(model_lib.shift_right(jnp.asarray(TGT)))
  rows = np.repeat(tgt_in, beams, axis=0)
  shift = 3 * np.tile(np.arange(beams), len(TGT))[:, None]
  rows[:, 1:] = np.where(rows[:, 1:] != 0, rows[:, 1:] + shift, 0)
  return rows


@pytest.mark.parametrize('positions', ['sinusoidal', 'rope', 'alibi'])
def test_beams_share_a_cache_row_and_reordered_beams_continue_their_parents(positions):
  """K beams per sentence in one cache row: before a reorder each beam's logits are
  the teacher-forced ones of its own prefix (the sentence's cross-attention keys
  computed once); after ``reorder_beams`` each beam continues its parent's prefix
  (RoPE keys and ALiBi distances included) although no key or value moved."""
  from flax import nnx
  from transformer_jax import model as model_lib
  cfg = model_lib.TransformerConfig(
      vocab_size=50, num_encoder_layers=1, num_decoder_layers=2, d_model=32,
      num_heads=4, d_ff=48, dropout_rate=0.0, max_len=32, positions=positions)
  model, beams = model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), 3
  rows_in = _beam_prefixes(beams)
  encoded = model.encode(SRC)
  cache = search.init_beam_cache(model, encoded, SRC, beams, 5)
  assert cache.model['layers'][0]['cross']['key'].shape[0] == len(SRC)
  assert cache.model['layers'][0]['self']['key'].shape[-1] == 5 * beams
  expected = model(np.repeat(SRC, beams, axis=0), jnp.asarray(rows_in))
  parents = np.array([[2, 0, 0], [1, 2, 1], [0, 1, 2]])
  step = functools.partial(search.beam_step, model)
  for t in range(4):
    if t == 2:  # Beam k of source b continues beam parents[b, k].
      cache = search.reorder_beams(cache, jnp.asarray(parents))
      flat = (np.arange(len(SRC))[:, None] * beams + parents).reshape(-1)
      rows_in[:, :2] = rows_in[flat, :2]
      expected = model(np.repeat(SRC, beams, axis=0), jnp.asarray(rows_in))
    logits, cache = step(jnp.asarray(rows_in[:, t]), cache)
    rows = rows_in[:, t] != 0
    np.testing.assert_allclose(logits[rows], expected[rows, t], atol=2e-5,
                               err_msg=f't={t}')
  assert rows.sum() >= 6
  # Without the reordering the same inputs give other logits.
  unordered = model(np.repeat(SRC, beams, axis=0), jnp.asarray(_beam_prefixes(beams)))
  assert np.abs(np.asarray(logits[rows]) - np.asarray(unordered[rows, 3])).max() > 1e-3
  with pytest.raises(ValueError, match=r'token must be \[3 sentences x 3 beams\]'):
    step(jnp.zeros((len(SRC),), jnp.int32), cache)
