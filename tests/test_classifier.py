"""Tests for the encoder-only family: classifier.py, sentences.py, the classification
and masked-LM tasks.

* BERT masking: ~15% of the real tokens are chosen (never [CLS] or padding), of them
  ~80% become [MASK], ~10% a random piece and ~10% stay; targets are the originals.
* Word dropout: ~p of the real tokens become <unk>, never [CLS] or padding; the
  batches with it are the same batches, resumable, and differ only there.
* Pooling ([CLS], masked mean, masked max) ignores padding: the same sentence padded
  to two lengths gives the same sentence vector and logits.
* The classification loss and accuracy of known logits equal their hand-computed values.
* A train step on meshes (8,1,1) and (2,2,2) equals the single-device step (loss,
  parameters), for classification and masked-LM batches.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import sst2
from transformer_jax.model import families
from transformer_jax import model as model_lib
from transformer_jax.data import sentences
from transformer_jax.data.tokenizer import UNK_ID
from transformer_jax import sharding
from transformer_jax.train import tasks
from transformer_jax.train import loop as train

VOCAB = 64  # 63 pieces + [MASK].
MASK = VOCAB - 1


def test_masking_statistics():
  rng = np.random.default_rng(0)
  rows, length = 4000, 40
  ids = np.zeros((rows, length), np.int32)
  lengths = rng.integers(5, length + 1, size=rows)
  for r, n in enumerate(lengths):
    ids[r, 0] = 2  # [CLS]
    ids[r, 1:n] = rng.integers(4, MASK, size=n - 1)
  corrupted, positions, targets = sentences.mask_tokens(
      ids, np.random.default_rng(1), mask_id=MASK, vocab_size=VOCAB)
  chosen = targets != 0
  real = int((ids[:, 1:] != 0).sum())
  assert abs(chosen.sum() / real - 0.15) < 0.01
  rows_idx = np.nonzero(chosen)[0]
  pos = positions[chosen]
  assert (pos > 0).all() and (ids[rows_idx, pos] != 0).all()  # Never [CLS] or padding.
  np.testing.assert_array_equal(targets[chosen], ids[rows_idx, pos])
  new = corrupted[rows_idx, pos]
  masked = np.mean(new == MASK)
  kept = np.mean(new == ids[rows_idx, pos])
  random = 1 - masked - kept
  assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(random - 0.1) < 0.015
  assert ((new >= 4) & (new <= MASK)).all()
  # Positions not chosen are untouched.
  untouched = np.ones_like(ids, bool)
  untouched[rows_idx, pos] = False
  np.testing.assert_array_equal(corrupted[untouched], ids[untouched])


def test_word_dropout_replaces_a_fraction_of_real_tokens_with_unk():
  rng = np.random.default_rng(0)
  rows, length = 2000, 40
  ids = np.zeros((rows, length), np.int32)
  for r, n in enumerate(rng.integers(5, length + 1, size=rows)):
    ids[r, 0] = 2  # [CLS]
    ids[r, 1:n] = rng.integers(4, MASK, size=n - 1)
  dropped = sentences.drop_words(ids, np.random.default_rng(1), 0.2)
  changed = dropped != ids
  assert (dropped[changed] == UNK_ID).all()
  assert not changed[:, 0].any() and not changed[ids == 0].any()
  assert abs(changed.sum() / (ids[:, 1:] != 0).sum() - 0.2) < 0.01


def test_word_dropout_batches_differ_only_by_unk_and_resume_exactly():
  rng = np.random.default_rng(0)
  ids = [np.concatenate([[2], rng.integers(4, MASK, size=n)]).astype(np.int32)
         for n in rng.integers(3, 30, size=300)]
  labels = rng.integers(0, 2, size=300)
  make = lambda p: sentences.SentenceBatches(ids, labels, batch_size=8, buckets=(16, 32),
                                             seed=5, group=4, word_dropout=p)
  plain, dropped = make(0.0), make(0.3)
  first = [next(dropped) for _ in range(6)]
  for batch in first:
    reference = next(plain)
    np.testing.assert_array_equal(batch['labels'], reference['labels'])
    changed = batch['inputs'] != reference['inputs']
    assert changed.any() and (batch['inputs'][changed] == UNK_ID).all()
  advanced = make(0.3)
  for _ in range(3):
    next(advanced)
  resumed = make(0.3)
  resumed.set_state(advanced.get_state())
  np.testing.assert_array_equal(next(resumed)['inputs'], first[3]['inputs'])
  with pytest.raises(ValueError, match='word_dropout'):
    make(1.0)


def test_length_group_sorts_each_chunk_of_batches_by_length_and_1_does_not():
  rng = np.random.default_rng(0)
  n, rows = 192, 8
  lengths = rng.integers(2, 31, size=n)
  ids = [np.concatenate([[2], rng.integers(4, MASK, size=k - 1)]).astype(np.int32)
         for k in lengths]
  spreads = {}
  for group in (1, 4):
    batches = sentences.SentenceBatches(ids, np.arange(n), batch_size=rows,
                                        buckets=(16, 32), seed=1, group=group)
    epoch = [next(batches)['labels'][:, 0] for _ in range(n // rows)]
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), np.arange(n))
    spreads[group] = np.mean([np.ptp(lengths[m]) for m in epoch])
    for start in range(0, len(epoch), group):
      ranges = sorted((lengths[m].min(), lengths[m].max()) for m in epoch[start:start + group])
      for (_, high), (low, _) in zip(ranges, ranges[1:]):
        assert high <= low  # The chunk's batches are consecutive runs of its sorted lengths.
  # Batches of random sentences span most of the lengths; sorted chunks of 4 about a quarter.
  assert spreads[1] > 2 * spreads[4], spreads


def test_finetune_config_refuses_to_start_without_a_pretrained_run(tmp_path):
  with pytest.raises(ValueError, match='init_from'):
    train.train_and_evaluate(sst2.get_config('finetune'), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def _cfg(**overrides):
  values = dict(vocab_size=VOCAB, family='encoder_only', num_encoder_layers=2, d_model=32,
                num_heads=4, d_ff=64, dropout_rate=0.0, layer_norm='pre', max_len=32,
                positions='learned', num_classes=3)
  values.update(overrides)
  return model_lib.TransformerConfig(**values)


@pytest.mark.parametrize('pooling', ['cls', 'mean', 'max'])
def test_pooling_ignores_padding(pooling):
  model = families.build_model(_cfg(pooling=pooling), rngs=nnx.Rngs(0))
  short = jnp.asarray([[2, 9, 17, 33, 5, 0, 0, 0], [2, 40, 0, 0, 0, 0, 0, 0]], jnp.int32)
  long = jnp.pad(short, ((0, 0), (0, 8)))
  np.testing.assert_allclose(model.sentence_embedding(short),
                             model.sentence_embedding(long), atol=1e-5)
  np.testing.assert_allclose(model(short), model(long), atol=1e-5)
  encoded = model.encode(short)
  if pooling in ('mean', 'max'):
    reduce = {'mean': np.mean, 'max': np.max}[pooling]
    for row, length in enumerate((5, 2)):
      np.testing.assert_allclose(model.sentence_embedding(short)[row],
                                 reduce(encoded[row, :length], axis=0), atol=1e-5)
    assert not np.allclose(model.sentence_embedding(short)[1],
                           reduce(encoded[1], axis=0), atol=1e-3)  # Padding would move it.


class _FixedLogits:
  """Stands in for a classifier whose logits are given."""

  def __init__(self, logits):
    self.logits, self.cfg = jnp.asarray(logits, jnp.float32), _cfg()

  def __call__(self, ids, deterministic=True):
    del ids, deterministic
    return self.logits

  def masked_lm(self, ids, positions, deterministic=True):
    del ids, positions, deterministic
    return self.logits


def test_classification_loss_on_a_known_example():
  # Row 0: p(label 1) = 3 / (1 + 3) -> ln(4/3), correct. Row 1: uniform over 2
  # -> ln 2, argmax ties go to label 0 = correct. Row 2: padding (label -1).
  logits = [[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 1.0]]
  batch = {'inputs': jnp.zeros((3, 4), jnp.int32),
           'labels': jnp.asarray([[1], [0], [-1]], jnp.int32)}
  config = sst2.get_config()
  config.optim.label_smoothing = 0.0
  loss, sums = tasks.ClassificationTask().loss(_FixedLogits(logits), batch, config,
                                               train=False)
  nll = (math.log(4 / 3) + math.log(2)) / 2
  np.testing.assert_allclose(float(loss), nll, rtol=1e-6)
  metrics = tasks.summarize(jax.device_get(sums))
  assert metrics['tokens'] == 2 and metrics['accuracy'] == 1.0
  # Smoothing 0.1 over 2 classes: row 0's targets are (0.05, 0.95); row 1 stays ln 2.
  # The loss is smoothed, the reported nll is not.
  config.optim.label_smoothing = 0.1
  loss, sums = tasks.ClassificationTask().loss(_FixedLogits(logits), batch, config,
                                               train=False)
  row0 = 0.05 * math.log(4) + 0.95 * math.log(4 / 3)
  np.testing.assert_allclose(float(loss), (row0 + math.log(2)) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(sums['nll_sum']), 2 * nll, rtol=1e-6)


def test_masked_lm_loss_on_a_known_example():
  # Two scored slots of one row (target 0 = unused slot): uniform -> ln 4, and
  # id 3 with 3 / (1 + 1 + 1 + 3) -> ln 2.
  logits = [[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, math.log(3.0)], [0.0, 9.0, 0.0, 0.0]]]
  batch = {'inputs': jnp.zeros((1, 6), jnp.int32),
           'mlm_positions': jnp.asarray([[1, 3, 0]], jnp.int32),
           'mlm_targets': jnp.asarray([[2, 3, 0]], jnp.int32)}
  loss, sums = tasks.MaskedLMTask().loss(_FixedLogits(logits), batch, sst2.get_config('mlm'),
                                         train=False)
  np.testing.assert_allclose(float(loss), (math.log(4) + math.log(2)) / 2, rtol=1e-6)
  assert float(sums['correct']) == 1.0  # Slot 2's argmax is id 3.


class _Stop(Exception):
  pass


def _write_labelled_tsv(tmp_path) -> list[str]:
  """train.tsv (400) and dev.tsv (40) of made-up sentences over 15 words; the words."""
  words = 'red blue green cat dog bird runs sleeps eats big small the a on under'.split()
  rng = np.random.default_rng(0)
  for name, rows in (('train.tsv', 400), ('dev.tsv', 40)):
    lines = [' '.join(rng.choice(words, rng.integers(1, 8))) + f'\t{i % 2}'
             for i in range(rows)]
    (tmp_path / name).write_text('sentence\tlabel\n' + '\n'.join(lines) + '\n')
  return words


def test_config_vocab_size_is_the_models_ids_in_training_and_the_dry_run(tmp_path,
                                                                        monkeypatch):
  # config.data.vocab_size is V, the embedding's rows, in every family: training
  # makes V - 1 SentencePiece pieces and puts [MASK] at V - 1, and the dry run (which
  # builds the model from the config alone) builds the same V.
  from transformer_jax import dry_run
  from transformer_jax.data import tokenizer as tokenizer_lib
  words = _write_labelled_tsv(tmp_path)
  config = sst2.get_config('mlm')
  d = config.data
  d.data_dir, d.train_file, d.eval_file = str(tmp_path), 'train.tsv', 'dev.tsv'
  d.vocab_size, d.vocab_model_type = len(words) + 4 + 1, 'word'
  d.batch_size, d.max_length, d.bucket_lengths = 8, 16, (8,)

  def datasets():
    return tasks.for_config(config).get_datasets(
        config, str(tmp_path / 'run'), process_index=0, process_count=1, batch_multiple=1)

  vocab, train_iter, _ = datasets()
  assert vocab.vocab_size == d.vocab_size and vocab.tokenizer.vocab_size == d.vocab_size - 1
  assert vocab.mask_id == d.vocab_size - 1
  batch = next(train_iter)
  assert batch['inputs'].max() == vocab.mask_id  # [MASK] is the last id, V - 1.
  assert datasets()[0].tokenizer.fingerprint() == vocab.tokenizer.fingerprint()  # Resume.
  seen = {}

  def create(config, vocab_size, mesh, **kwargs):
    seen['vocab_size'] = vocab_size
    raise _Stop

  monkeypatch.setattr(train.TrainSetup, 'create', create)
  with pytest.raises(_Stop):
    dry_run.run(config, devices=jax.devices()[:1])
  assert seen['vocab_size'] == vocab.vocab_size
  d.vocab_size += 1  # The workdir's vocabulary has another size: one clear line.
  with pytest.raises(tokenizer_lib.VocabularyMismatchError,
                     match=r'has 19 \+ 1 reserved tokens but config.data.vocab_size is 21'):
    datasets()


def _config(task, sizes):
  config = sst2.get_config('mlm' if task == 'mlm' else None)
  m = config.model
  m.num_encoder_layers, m.d_model, m.num_heads, m.d_ff, m.max_len = 1, 32, 8, 64, 16
  m.head_dim = 4
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
  return config


def _batches(task, rows=8, length=12):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(2):
    ids = np.zeros((rows, length), np.int32)
    for r in range(rows):
      n = rng.integers(3, length + 1)
      ids[r, 0], ids[r, 1:n] = 2, rng.integers(4, MASK, size=n - 1)
    if task == 'mlm':
      corrupted, positions, targets = sentences.mask_tokens(
          ids, rng, mask_id=MASK, vocab_size=VOCAB, max_predictions=3)
      out.append({'inputs': corrupted, 'mlm_positions': positions, 'mlm_targets': targets})
    else:
      out.append({'inputs': ids, 'labels': rng.integers(0, 2, (rows, 1)).astype(np.int32)})
  return out


def _run(task, sizes, initial=None):
  config = _config(task, sizes)
  mesh = sharding.create_mesh(config.mesh, jax.devices()[:int(np.prod(sizes))])
  setup = train.TrainSetup.create(config, VOCAB, mesh)
  if initial is None:
    initial = jax.device_get(setup.init_state())
  state = jax.device_put(initial, setup.state_shardings)
  losses = []
  for batch in _batches(task):
    state, sums = setup.train_step(state, train.shard_batch(batch, mesh))
    losses.append(float(sums['loss_sum'] / sums['tokens']))
  return losses, jax.device_get(state), initial, setup


@pytest.mark.parametrize('task', ['classification', 'mlm'])
def test_sharded_step_equals_one_device(task):
  ref_losses, ref_state, initial, setup = _run(task, (1, 1, 1))
  losses, state, _, _ = _run(task, (2, 2, 2), initial)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  lr_total = sum(setup.learning_rate(s) for s in range(2))
  flat = jax.tree_util.tree_flatten_with_path(ref_state['params'])[0]
  for (path, want), got in zip(flat, jax.tree.leaves(state['params'])):
    name = jax.tree_util.keystr(path)
    if 'key_bias' in name:
      # softmax ignores a key bias: its gradient is 0 up to round-off, whose sign
      # Adam turns into +-lr (as in test_train).
      assert np.abs(got - want).max() <= 2 * lr_total + 1e-6, name
    else:
      np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)


def _labelled_tsv_config(tmp_path):
  """configs/sst2.py cut to 1 layer over _write_labelled_tsv's sentences."""
  words = _write_labelled_tsv(tmp_path)
  config = sst2.get_config()
  m = config.model
  m.num_encoder_layers, m.d_model, m.num_heads, m.d_ff, m.max_len = 1, 32, 4, 64, 16
  d = config.data
  d.data_dir, d.train_file, d.eval_file = str(tmp_path), 'train.tsv', 'dev.tsv'
  d.vocab_size, d.vocab_model_type = len(words) + 4 + 1, 'word'
  d.batch_size, d.eval_batch_size, d.max_length, d.bucket_lengths = 8, 16, 16, (8,)
  return config


def test_training_ends_with_the_dev_metrics_of_the_averaged_checkpoints(tmp_path):
  # eval.average_last=3 over checkpoints 2, 4, 6: the final averaged evaluation
  # equals evaluate_loss on the parameter mean of the three restored checkpoints.
  from transformer_jax.run.workdir import Workdir
  config = _labelled_tsv_config(tmp_path)
  t = config.train
  t.num_steps, t.eval_every_steps, t.log_every_steps = 6, 6, 2
  config.optim.warmup_steps = 2
  config.checkpoint.every_steps, config.checkpoint.max_to_keep = 2, 5
  config.checkpoint.every_minutes = 0.0
  config.eval.average_last = 3
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  averaged = result['averaged_eval']
  assert averaged['steps'] == [2, 4, 6]

  wd = Workdir.open(str(tmp_path / 'run'))
  per_step = [wd.restore(step).params for step in (2, 4, 6)]
  mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *per_step)
  setup = result['setup']
  _, _, eval_sets = setup.task.get_datasets(config, str(tmp_path / 'run'), process_index=0,
                                            process_count=1, batch_multiple=1)
  want = train.evaluate_loss(setup, jax.device_put(mean, setup.state_shardings['params']),
                             eval_sets['validation'], config.data.eval_batch_size)
  np.testing.assert_allclose(averaged['loss'], want['loss'], rtol=1e-6)
  assert averaged['accuracy'] == want['accuracy']
  last = result['eval']  # Step 6's own parameters: not what the average gives.
  assert abs(last['loss'] - averaged['loss']) > 1e-4

  config.eval.average_last = 1
  result = train.train_and_evaluate(config, str(tmp_path / 'run_no_average'))
  assert result['averaged_eval'] == {}


def test_min_train_tokens_leaves_out_the_shorter_training_sentences(tmp_path):
  config = _labelled_tsv_config(tmp_path)  # Sentences of 1-7 words, [CLS] + words.
  config.data.bucket_lengths = (4, 8)

  def lengths():
    _, train_iter, eval_sets = tasks.for_config(config).get_datasets(
        config, str(tmp_path / 'run'), process_index=0, process_count=1, batch_multiple=1)
    real = np.concatenate([(next(train_iter)['inputs'] != 0).sum(axis=1)
                           for _ in range(50)])
    return real, len(eval_sets['validation'])

  everything, dev = lengths()
  assert everything.min() == 2  # [CLS] + one word.
  config.data.min_train_tokens = 5
  kept, kept_dev = lengths()
  assert kept.min() == 5 and kept.max() == everything.max() and kept_dev == dev
  config.data.min_train_tokens = 9
  with pytest.raises(ValueError, match='min_train_tokens=9'):
    lengths()


def test_config_length_group_sets_how_alike_the_lengths_in_a_batch_are(tmp_path):
  config = _labelled_tsv_config(tmp_path)  # 400 sentences of 1-7 words, 8 a batch.

  def mean_spread(group):
    config.data.length_group = group
    _, train_iter, _ = tasks.for_config(config).get_datasets(
        config, str(tmp_path / 'run'), process_index=0, process_count=1, batch_multiple=1)
    real = [(next(train_iter)['inputs'] != 0).sum(axis=1) for _ in range(50)]
    return np.mean([np.ptp(r) for r in real])

  # Random batches span most of the 2-8 tokens; batches cut from length-sorted chunks of
  # 10 hold sentences of one or two lengths.
  random_batches, grouped = mean_spread(1), mean_spread(10)
  assert random_batches > 3 and grouped < 1.5, (random_batches, grouped)
  with pytest.raises(ValueError, match='length_group must be at least 1, got 0'):
    mean_spread(0)
