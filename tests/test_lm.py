"""Tests for the decoder-only family: lm.py, sampling.py, char_text.py, the lm task.

* Cached one-token decoding, and ragged prompts prefilled in one pass then stepped,
  give the logits of the full (teacher-forced) pass; greedy sampling of batched
  prompts of different lengths continues each prompt with the argmax of the full
  pass on its prefix, and seeded sampling draws what a token-by-token loop over
  the uncached model draws with the same key.
* Causality: changing token j moves no logit before j.
* The loss of a known example equals its hand-computed cross-entropy.
* top-k / top-p keep exactly the expected tokens.
* A run stopped after k steps and resumed equals an uninterrupted run (losses,
  parameters), through ``train.train_and_evaluate`` on Tiny Shakespeare.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm_shakespeare
from transformer_jax.data import char_text
from transformer_jax.model import families
from transformer_jax import model as model_lib
from transformer_jax.inference import sampling
from transformer_jax.train import tasks
from transformer_jax.train import loop as train

VOCAB = 24


def _cfg(**overrides):
  values = dict(vocab_size=VOCAB, family='decoder_only', num_decoder_layers=2, d_model=32,
                num_heads=4, d_ff=64, dropout_rate=0.0, layer_norm='pre',
                positions='learned', max_len=32)
  values.update(overrides)
  return model_lib.TransformerConfig(**values)


@pytest.fixture(scope='module')
def lm():
  return families.build_model(_cfg(), rngs=nnx.Rngs(params=0, dropout=0))


def _tokens(rows=2, length=12, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(4, VOCAB, (rows, length)),
                     jnp.int32)


def test_model_has_no_cross_attention_and_shares_the_decoder_layer(lm):
  layer = lm.decoder.layers[0]
  assert type(layer) is model_lib.DecoderLayer and layer.cross_attention is None
  names = {'/'.join(map(str, p)) for p, _ in nnx.state(lm, nnx.Param).flat_state()}
  assert not any('cross' in n for n in names)


def test_cached_decoding_equals_the_full_forward_pass(lm):
  tokens = _tokens()
  full = lm(tokens)  # [B, T, V]
  cache = lm.init_cache(tokens.shape[0], tokens.shape[1])
  step = jax.jit(lambda token, cache, t: lm.decode_step(token, cache, index=t))
  for t in range(tokens.shape[1]):
    logits, cache = step(tokens[:, t:t + 1], cache, t)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-4, rtol=1e-4,
                               err_msg=f't={t}')


@pytest.mark.parametrize('positions', ['learned', 'rope', 'alibi'])
def test_ragged_prompts_prefilled_in_one_pass_then_stepped_equal_the_full_pass(
    positions):
  """Prompts of 5, 1 and 3 tokens, left-padded to end in one column and prefilled in
  one parallel pass, then 3 tokens per row one step at a time: each row's logits
  are those of the full (uncached) pass over that row alone."""
  lm = families.build_model(_cfg(positions=positions), rngs=nnx.Rngs(params=1, dropout=0))
  seqs = _tokens(rows=3, length=8, seed=4)
  full = lm(seqs)  # [B, T, V]
  lengths, width, steps = np.array([5, 1, 3]), 5, 3
  pad = width - lengths
  entries = np.arange(width + steps)
  started = entries[None, :] >= pad[:, None]  # [B, E]: not before the row's prompt
  aligned = np.zeros((3, width), np.int32)
  for b in range(3):
    aligned[b, pad[b]:] = seqs[b, :lengths[b]]
  cache = lm.init_cache(3, width + steps)
  logits, cache = lm.decode_step(
      jnp.asarray(aligned), cache, index=0,
      positions=jnp.asarray(np.maximum(entries[None, :width] - pad[:, None], 0)),
      mask=jnp.asarray(started[:, None, :] & (entries[None, None, :] <=
                                              entries[:width][None, :, None])))
  for b in range(3):
    np.testing.assert_allclose(logits[b, pad[b]:], full[b, :lengths[b]], atol=1e-4,
                               rtol=1e-4, err_msg=f'prefill row {b}')
  for i in range(steps):
    column = width + i
    token = seqs[np.arange(3), lengths + i][:, None]
    logits, cache = lm.decode_step(
        token, cache, index=column, positions=jnp.asarray(lengths[:, None] + i),
        mask=jnp.asarray(started[:, None, :] & (entries <= column)[None, None, :]))
    np.testing.assert_allclose(logits[:, 0], full[np.arange(3), lengths + i],
                               atol=1e-4, rtol=1e-4, err_msg=f'step {i}')


def test_prefill_then_sampling_equals_token_by_token_sampling(lm):
  """The sampler (parallel prefill of ragged prompts, then cached steps) draws what
  a token-by-token loop over the uncached model draws with the same key: row b's
  token at position t from its full-pass logits with ``fold_in(key, t - 1)``."""
  vocab = char_text.CharVocabulary([chr(ord('a') + i) for i in range(VOCAB - 4)])
  prompts, new, seed = [[5, 9, 7, 4, 11], [6], [8, 8, 12]], 6, 11
  settings = dict(temperature=0.9, top_k=6, top_p=0.95)
  out = sampling.Sampler(lm, vocab).sample_ids(prompts, max_new_tokens=new, seed=seed,
                                               **settings)
  width = max(map(len, prompts)) + new

  @nnx.jit
  def next_token(lm, tokens, t):
    # Causal: the filler after position t - 1 does not change its logits.
    logits = lm(tokens)[:, t - 1]  # [1, V]
    keys = jax.random.fold_in(jax.random.key(seed), t - 1)[None]
    return sampling.choose(logits, keys, **settings)[0]

  for prompt, row in zip(prompts, out):
    expected = list(prompt)
    for _ in range(new):
      tokens = jnp.asarray([expected + [3] * (width - len(expected))], jnp.int32)
      expected.append(int(next_token(lm, tokens, len(expected))))
    assert row == expected, prompt
  assert len({tuple(row[-new:]) for row in out}) == 3  # Draws, not one argmax.


def test_greedy_sampling_of_batched_prompts_follows_the_full_pass(lm):
  vocab = char_text.CharVocabulary([chr(ord('a') + i) for i in range(VOCAB - 4)])
  assert vocab.vocab_size == VOCAB
  sampler = sampling.Sampler(lm, vocab)
  prompts = [[5, 9, 7, 4, 11], [6], [8, 8, 12]]
  out = sampler.sample_ids(prompts, max_new_tokens=6, temperature=0.0)
  for prompt, row in zip(prompts, out):
    assert row[:len(prompt)] == prompt and len(row) == len(prompt) + 6
    for t in range(len(prompt), len(row)):
      logits = lm(jnp.asarray([row[:t]], jnp.int32))[0, -1]
      assert row[t] == int(jnp.argmax(logits)), (prompt, t)
  # A batch gives each row what it gets alone.
  assert sampler.sample_ids([prompts[1]], max_new_tokens=6, temperature=0.0) == [out[1]]


def test_sampling_is_seeded_and_text_round_trips(lm):
  vocab = char_text.CharVocabulary([chr(ord('a') + i) for i in range(VOCAB - 4)])
  sampler = sampling.Sampler(lm, vocab)
  a = sampler.sample(['abc', 'd'], max_new_tokens=8, temperature=1.0, top_k=5, seed=3)
  b = sampler.sample(['abc', 'd'], max_new_tokens=8, temperature=1.0, top_k=5, seed=3)
  assert a == b and a[0].startswith('abc') and len(a[0]) == 11 and len(a[1]) == 9
  with pytest.raises(ValueError, match='at least one token'):
    sampler.sample([''], max_new_tokens=2)


def test_causality(lm):
  tokens = _tokens(rows=1, length=10)
  base = lm(tokens)
  j = 6
  changed = lm(tokens.at[0, j].set(4 if int(tokens[0, j]) != 4 else 5))
  np.testing.assert_allclose(changed[0, :j], base[0, :j], atol=1e-6)
  assert np.abs(np.asarray(changed[0, j:] - base[0, j:])).max() > 1e-3


def test_filter_logits_keeps_top_k_and_nucleus():
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert kept(sampling.filter_logits(logits, top_k=3)) == [False, True, True, True]
  # Sorted: 0.5, 0.3 (0.8 >= 0.7 reached), so 0.15 and 0.05 go.
  assert kept(sampling.filter_logits(logits, top_p=0.7)) == [False, True, False, True]
  assert kept(sampling.filter_logits(logits, top_p=0.4)) == [False, True, False, False]
  assert kept(sampling.filter_logits(logits, top_p=0.85)) == [False, True, True, True]


class _FixedLogits:
  """Stands in for a model whose logits are given."""

  def __init__(self, logits):
    self.logits, self.cfg = jnp.asarray(logits, jnp.float32), _cfg()

  def __call__(self, inputs, deterministic=True):
    del inputs, deterministic
    return self.logits


def test_loss_on_a_hand_checked_example():
  # Position 1: uniform over 4 ids -> ln 4. Position 2: id 1 has e^{ln 3} / (3 + 3)
  # = 1/2 -> ln 2. Position 3 is padding (target 0): no loss.
  logits = [[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), 0.0, 0.0], [9.0, 0.0, 0.0, 0.0]]]
  batch = {'inputs': jnp.asarray([[5, 6, 7]]), 'targets': jnp.asarray([[2, 1, 0]])}
  config = lm_shakespeare.get_config()
  loss, sums = tasks.LanguageModelTask().loss(_FixedLogits(logits), batch, config,
                                              train=False)
  assert float(sums['tokens']) == 2
  np.testing.assert_allclose(float(loss), (math.log(4) + math.log(2)) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(sums['nll_sum']), math.log(8), rtol=1e-6)


def test_char_vocabulary_and_windows():
  vocab = char_text.CharVocabulary.from_text('hello world')
  assert vocab.decode(vocab.encode('low')) == 'low'
  assert vocab.encode_array('low').tolist() == vocab.encode('low')
  assert vocab.encode('z') == [char_text.UNK_ID] and vocab.vocab_size % 8 == 0
  ids = np.arange(4, 504, dtype=np.int32)
  it = char_text.WindowIterator(ids, 3, 5, seed=1)
  first = [next(it) for _ in range(3)]
  np.testing.assert_array_equal(first[0]['targets'][:, :-1], first[0]['inputs'][:, 1:])
  resumed = char_text.WindowIterator(ids, 3, 5, seed=1)
  resumed.set_state(dict(it.get_state(), batches=1))
  np.testing.assert_array_equal(next(resumed)['inputs'], first[1]['inputs'])
  windows = list(char_text.WindowEvalSet('v', ids[:12], 5).batches(4))
  # 11 next-character targets: windows of 5, 5 and 1, every position once.
  assert sum(int((b['targets'] != 0).sum()) for b in windows) == 11


def _run_config(shared_data, num_steps):
  config = lm_shakespeare.get_config()
  m = config.model
  m.num_decoder_layers, m.d_model, m.num_heads, m.d_ff, m.max_len = 1, 32, 4, 64, 16
  m.dropout_rate = 0.1  # Resume must repeat the dropout masks too.
  d = config.data
  d.text_path = str(shared_data / 'tinyshakespeare' / 'input.txt.gz')
  d.context_length, d.batch_size, d.eval_batch_size = 16, 8, 64
  t = config.train
  t.num_steps, t.log_every_steps, t.eval_every_steps, t.eval_max_batches = (
      num_steps, 1, 4, 1)
  # The interrupted run stops at num_steps=2 and resumes with 4: its schedule must not
  # depend on num_steps, as the config's cosine decay does.
  config.optim.decay = 'inverse_sqrt'
  config.checkpoint.every_steps, config.checkpoint.every_minutes = 2, 0.0
  config.checkpoint.async_save = False
  return config


@pytest.fixture(scope='module')
def runs(shared_data, tmp_path_factory):
  whole = train.train_and_evaluate(_run_config(shared_data, 4),
                                   str(tmp_path_factory.mktemp('whole')))
  parted = str(tmp_path_factory.mktemp('parted'))
  first = train.train_and_evaluate(_run_config(shared_data, 2), parted)
  second = train.train_and_evaluate(_run_config(shared_data, 4), parted)
  return whole, first, second


def test_resume_equals_an_uninterrupted_run(runs):
  whole, first, second = runs
  assert sorted(first['train_loss']) == [1, 2] and sorted(second['train_loss']) == [3, 4]
  losses = {**first['train_loss'], **second['train_loss']}
  np.testing.assert_allclose([losses[s] for s in range(1, 5)],
                             [whole['train_loss'][s] for s in range(1, 5)], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(jax.device_get(whole['state']['params'])),
                  jax.tree.leaves(jax.device_get(second['state']['params']))):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # Characters: ln(vocabulary) ~ 4.3 nats at the start; dev loss per character.
  assert 0 < whole['eval']['loss'] < 6 and whole['eval']['tokens'] > 0
