"""The decoder-only and encoder-only runs through the shared command-line layer.

* ``Workdir.load`` gives each family's model with the vocabulary it reads (characters;
  SentencePiece pieces + [MASK]); a run of another family is a one-line error.
* ``sample`` and ``classify`` take the shared flags (``--checkpoint_step``,
  ``--average_last``, ``--input``/``--output``) and print what the Python API returns.
* An ensemble of classifiers (comma-separated workdirs) gives the mean of its members'
  probabilities, and ``--labelled`` prints its accuracy on a labelled file.
* A fine-tuning run (``train.init_from``) reads its parent's vocabulary.
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from transformer_jax.run.workdir import Workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(command, *args, stdin=None):
  return subprocess.run([sys.executable, '-m', f'transformer_jax.{command}', *args],
                        input=stdin, capture_output=True, text=True, timeout=600, cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))


def _params(model):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_load_gives_each_family_its_model_and_vocabulary(lm_run, classifier_run):
  from transformer_jax.data import char_text, sentences
  lm = Workdir.open(lm_run.path).load(average_last=2)
  assert isinstance(lm.vocab, char_text.CharVocabulary)
  assert lm.model.cfg.family == 'decoder_only' and lm.restored.steps == [3, 6]
  for got, a, b in zip(_params(lm.model), jax.tree.leaves(lm_run.params[3]),
                       jax.tree.leaves(lm_run.params[6])):
    np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-6, atol=1e-7)
  cls = Workdir.open(classifier_run.path).load(3)
  assert isinstance(cls.vocab, sentences.SentenceVocabulary)
  # V = the SentencePiece pieces + [MASK] = config.data.vocab_size = the embedding.
  assert cls.vocab.vocab_size == cls.vocab.tokenizer.vocab_size + 1
  assert cls.model.cfg.vocab_size == cls.vocab.vocab_size == classifier_run.config.data.vocab_size
  for got, want in zip(_params(cls.model), jax.tree.leaves(classifier_run.params[3])):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match='holds a decoder_only model; classify needs an '
                                       'encoder_only one'):
    Workdir.open(lm_run.path).load(family='encoder_only', use='classify')


def test_sample_cli_prints_what_the_sampler_returns(lm_run, tmp_path):
  from transformer_jax import sample
  from transformer_jax.inference import sampling
  out = tmp_path / 'samples.txt'
  result = _cli('sample', f'--workdir={lm_run.path}', '--checkpoint_step=3',
                '--prompt=ROMEO:', '--prompt=ab', '--max_new_tokens=5', '--temperature=0',
                f'--output={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  sampler = sampling.load_sampler(lm_run.path, step=3)
  texts = sampler.sample(['ROMEO:', 'ab'], max_new_tokens=5, temperature=0)
  assert out.read_text(encoding='utf-8') == sample.SEPARATOR.join(texts) + '\n'
  assert texts[0].startswith('ROMEO:') and len(texts[0]) == len('ROMEO:') + 5


def test_classify_cli_prints_what_the_classifier_returns(classifier_run, lm_run, tmp_path):
  from transformer_jax import classify
  lines = ['the cat runs', 'a big red dog sleeps on cat', 'small bird']
  src, out = tmp_path / 'in.txt', tmp_path / 'out.tsv'
  src.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  result = _cli('classify', f'--workdir={classifier_run.path}', '--average_last=2',
                f'--input={src}', f'--output={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  classifier = classify.load_classifier(classifier_run.path, average_last=2)
  probs, _ = classifier.predict(lines)
  rows = [row.split('\t') for row in out.read_text(encoding='utf-8').splitlines()]
  assert [r[2] for r in rows] == lines
  for row, p in zip(rows, probs):
    assert row[0] == classifier.label_names[int(np.argmax(p))]
    assert float(row[1]) == pytest.approx(float(np.max(p)), abs=1e-4)
  result = _cli('classify', f'--workdir={lm_run.path}', stdin='the cat\n')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      f'classify: {lm_run.path} holds a decoder_only model; classify needs an '
      'encoder_only one')


def test_an_ensemble_averages_its_members_probabilities(classifier_run, tmp_path):
  from transformer_jax import classify
  # A second member: the same run without its step-6 checkpoint (its latest is 3).
  other = tmp_path / 'other'
  shutil.copytree(classifier_run.path, other)
  shutil.rmtree(other / 'checkpoints' / '6')
  members = [classify.load_classifier(p, average_last=1) for p in (classifier_run.path, other)]
  lines = ['the cat runs', 'a big red dog sleeps on cat', 'small bird', 'red cat']
  (p6, e6), (p3, e3) = (m.predict(lines) for m in members)
  assert not np.allclose(p6, p3)  # Two different models.
  ensemble = classify.load_ensemble([classifier_run.path, str(other)])
  probs, pooled = ensemble.predict(lines)
  np.testing.assert_allclose(probs, (p6 + p3) / 2, rtol=1e-6)
  np.testing.assert_allclose(pooled, np.concatenate([e6, e3], axis=-1), rtol=1e-6)
  # The ensemble's own predictions with the first one flipped: 3 of 4 right.
  labels = np.argmax(probs, axis=-1)
  labels[0] = 1 - labels[0]
  tsv = tmp_path / 'dev.tsv'
  tsv.write_text('sentence\tlabel\n' + ''.join(
      f'{line}\t{label}\n' for line, label in zip(lines, labels)), encoding='utf-8')
  assert classify.accuracy(ensemble, lines, labels) == 0.75
  result = _cli('classify', f'--workdir={classifier_run.path},{other}', f'--labelled={tsv}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout == f'accuracy 75.00% (3 of 4 sentences of {tsv})\n'
  result = _cli('classify', f'--workdir={classifier_run.path}', f'--labelled={tsv}',
                '--embeddings')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      'classify: --labelled scores a labelled file; it takes no --input or --embeddings.')
  empty = tmp_path / 'empty.tsv'
  empty.write_text('sentence\tlabel\n', encoding='utf-8')
  result = _cli('classify', f'--workdir={classifier_run.path}', f'--labelled={empty}')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f'classify: {empty} holds no labelled sentences to score.')


def test_a_fine_tuning_run_reads_its_parents_vocabulary(classifier_run, tmp_path):
  parent = Workdir.open(classifier_run.path)
  config = classifier_run.config.copy_and_resolve_references()
  config.train.init_from = parent.path
  child = Workdir.create(tmp_path / 'finetuned', config)
  assert child.parent().path == parent.path
  assert child.vocab_path == os.path.join(parent.path, 'vocab', 'spm.model')
  config.train.init_from = child.path  # Two generations down: still the first's.
  assert Workdir.create(tmp_path / 'again', config).vocab_path == parent.vocab_path
  config.data.vocab_path = '/elsewhere/spm.model'  # Given explicitly: that one.
  assert Workdir.create(tmp_path / 'given', config).vocab_path == '/elsewhere/spm.model'
  config.data.vocab_path = None
  config.train.init_from = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='nowhere does not exist'):
    Workdir.create(tmp_path / 'orphan', config).vocab_path  # pylint: disable=expression-not-assigned
