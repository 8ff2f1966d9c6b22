"""Translator: the Python API every CLI and training's BLEU go through.

Runs on ``copy_run`` (conftest.py): a tiny Transformer trained to copy sentences, so
the right translation of every input is known, and the n-best scores are checked
against log P recomputed with a teacher-forced forward pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import COPY_SENTENCES as SENTENCES
from transformer_jax import model as model_lib
from transformer_jax.inference import search as search_lib
from transformer_jax.inference import translator as translator_lib
from transformer_jax.inference.translator import Translator


@pytest.fixture(scope='module')
def translator(copy_run):
  return Translator.from_workdir(copy_run.path, use_mesh=False)


def test_translates_in_input_order_batched_or_one_at_a_time(translator):
  lines = [SENTENCES[1], '', *SENTENCES, '   ']
  out = translator.translate(lines)
  assert out == [SENTENCES[1], '', *SENTENCES, '']
  assert translator.batch_size == 4  # config.data.eval_batch_size: several batches.
  for sentence in SENTENCES:
    assert translator.translate([sentence]) == [sentence]


def test_settings_come_from_the_workdir(translator, copy_run):
  assert translator.step == 500 and translator.steps == [500]
  assert translator.beam_size == 2 and translator.search.alpha == 0.6
  assert translator.search.max_extra_len == 3
  assert translator.buckets == (8, 16)
  greedy = translator.with_search(beam_size=1)
  assert greedy.beam_size == 1 and greedy.model is translator.model
  assert greedy.translate(SENTENCES) == SENTENCES


def _log_p(model, src, out_ids):
  """log P(out_ids | src) by a teacher-forced forward pass; out_ids [T]."""
  tgt = jnp.asarray([out_ids], jnp.int32)
  logits = model(jnp.asarray([src], jnp.int32), model_lib.shift_right(tgt))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return float(jnp.sum(jnp.take_along_axis(logp[0], tgt[0][:, None], axis=-1)))


def test_n_best_is_ranked_and_scored_by_length_normalised_log_p(translator):
  n_best = translator.translate(SENTENCES, n_best=2)
  tok = translator.tokenizer
  eos = tok.eos_id
  for sentence, hyps in zip(SENTENCES, n_best):
    assert len(hyps) == 2
    assert hyps[0].text == sentence and hyps[0].text != hyps[1].text
    assert hyps[0].score >= hyps[1].score
    src = tok.encode(sentence) + [eos]
    limit = len(src) + translator.search.max_extra_len
    for hyp in hyps:
      assert tok.decode(hyp.ids) == hyp.text
      # A hypothesis shorter than the limit ended with EOS, which its score counts.
      out = hyp.ids + [eos] if len(hyp.ids) < limit else hyp.ids
      expected = _log_p(translator.model, src, out) / search_lib.length_penalty(
          len(out), translator.search.alpha)
      assert hyp.score == pytest.approx(float(expected), abs=2e-4)
  assert translator.translate(['', SENTENCES[0]], n_best=2)[0] == []


def test_equals_the_search_on_each_sentence_alone(translator, copy_run):
  # The search itself, jitted on one unpadded sentence at a time: bucketing, batch
  # padding and reordering must not change a hypothesis or its score.
  graphdef, state = nnx.split(translator.model)
  search = jax.jit(lambda state, src, length: search_lib.search_model(
      graphdef, state, src, beam_size=2, alpha=0.6, max_extra_len=3,
      max_decode_len=length), static_argnums=2)
  tok = translator.tokenizer
  sources = [tok.encode(s) + [tok.eos_id] for s in SENTENCES]
  got = translator.translate_ids(sources, n_best=2)
  for src, hyps in zip(sources, got):
    tokens, scores = search(state, np.asarray([src], np.int32), len(src) + 3)
    for k, (ids, score) in enumerate(hyps):
      assert ids == search_lib.strip_eos(np.asarray(tokens[0, k]))
      assert score == pytest.approx(float(scores[0, k]), abs=1e-5)


def test_sharded_over_a_mesh_equals_one_device(translator, copy_run):
  sharded = Translator.from_workdir(copy_run.path)  # 8 fake CPU devices.
  assert sharded.search.mesh is not None and sharded.search.mesh.size == 8
  assert sharded.batch_size == 8  # eval_batch_size 4 rounded up to whole shards.
  assert sharded.translate(SENTENCES, n_best=2) == translator.translate(SENTENCES,
                                                                        n_best=2)


def test_average_last_two_checkpoints_is_the_mean(copy_run):
  averaged = Translator.from_workdir(copy_run.path, average_last=2, use_mesh=False)
  assert averaged.step == 500 and averaged.steps == [250, 500]
  got = nnx.state(averaged.model, nnx.Param)
  expected = jax.tree.map(lambda a, b: (a + b) / 2, copy_run.params[250],
                          copy_run.params[500])
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(g), e, rtol=1e-6, atol=1e-7)


def test_bad_requests_are_clear_errors(translator, copy_run, tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    Translator.from_workdir(str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match='average the last 5'):
    Translator.from_workdir(copy_run.path, average_last=5)
  with pytest.raises(FileNotFoundError, match='No checkpoint for step 7'):
    Translator.from_workdir(copy_run.path, checkpoint_step=7)
  with pytest.raises(ValueError, match=r'n_best must be between 1 and the beam size \(2\)'):
    translator.translate(SENTENCES, n_best=3)
  with pytest.raises(TypeError, match='list of sentences'):
    translator.translate('the cat runs')
  with pytest.raises(ValueError, match='beam_size must be >= 1'):
    translator.with_search(beam_size=0)
  with pytest.raises(ValueError, match="beam_rules must be one of paper, ctranslate2; "
                                       "got 'fairseq'"):
    translator.with_search(beam_rules='fairseq')


def test_bucket_length():
  assert translator_lib.bucket_length(5, (8, 16), 64) == 8
  assert translator_lib.bucket_length(9, (8, 16), 64) == 16
  assert translator_lib.bucket_length(17, (8, 16), 64) == 32
  assert translator_lib.bucket_length(40, (8, 16), 48) == 48
  assert translator_lib.bucket_length(12, (8, 32), 16) == 16


def test_length_batches_sort_pad_and_cover_every_sentence():
  sources = [[5, 1], None, [5, 6, 7, 8, 9, 1], [5, 6, 1], [], [5, 6, 7, 1]]
  batches = list(translator_lib.length_batches(sources, batch_size=2, buckets=(4, 8),
                                               max_len=16))
  assert [rows for rows, _ in batches] == [[2, 5], [3, 0]]  # Longest first.
  assert [src.shape for _, src in batches] == [(2, 8), (2, 4)]
  for rows, src in batches:
    for r, i in enumerate(rows):
      np.testing.assert_array_equal(src[r, :len(sources[i])], sources[i])
      assert not src[r, len(sources[i]):].any()
