"""Tests for transformer_jax/data/pipeline.py and transformer_jax/data/datasets/.

A synthetic line-aligned corpus (target = source words translated and reversed, so
every pair is recognisable) drives the batching tests; TFDS WMT runs under
``tfds.testing.mock_data``; the Multi30k builder reads ../shared/data/multi30k.
"""

import gzip
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from transformer_jax.data import pipeline as input_pipeline
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.data.datasets import multi30k
from transformer_jax.data.datasets import parallel_text

_LEXICON = {'the': 'der', 'a': 'ein', 'man': 'Mann', 'woman': 'Frau', 'dog': 'Hund',
            'child': 'Kind', 'street': 'Straße', 'red': 'rot', 'blue': 'blau',
            'runs': 'läuft', 'sits': 'sitzt', 'looks': 'schaut', 'at': 'an', 'with': 'mit',
            'in': 'in', 'on': 'auf', 'big': 'groß', 'small': 'klein', 'green': 'grün',
            'over': 'über', 'ball': 'Ball', 'girl': 'Mädchen', 'boy': 'Junge'}
NUM_PAIRS = 1200


def _pairs(n, seed):
  rng = np.random.default_rng(seed)
  words = sorted(_LEXICON)
  pairs = []
  for i in range(n):
    # Mostly short sentences, a few longer than the tests' max_length.
    length = int(rng.integers(1, 12 if i % 20 else 40))
    source = [str(w) for w in rng.choice(words, size=length)] + [f'n{i}']
    target = [_LEXICON.get(w, w) for w in reversed(source)]
    pairs.append((' '.join(source), ' '.join(target)))
  return pairs


def _write(path, lines, gz):
  opener = gzip.open if gz else open
  with opener(path, 'wt', encoding='utf-8') as f:
    f.writelines(line + '\n' for line in lines)
  return str(path)


def _write_pairs(folder, name, pairs, gz=True):
  ext = '.gz' if gz else ''
  return (_write(folder / f'{name}.en{ext}', [p[0] for p in pairs], gz),
          _write(folder / f'{name}.de{ext}', [p[1] for p in pairs], gz))


@pytest.fixture(scope='session')
def corpus(tmp_path_factory):
  folder = tmp_path_factory.mktemp('corpus')
  train = _pairs(NUM_PAIRS, seed=0)
  valid = _pairs(21, seed=1)
  return {'train': train, 'validation': valid,
          'train_files': _write_pairs(folder, 'train', train),
          'eval_files': _write_pairs(folder, 'valid', valid, gz=False)}


@pytest.fixture(scope='session')
def vocab_path(tmp_path_factory, corpus):
  path = tmp_path_factory.mktemp('vocab') / 'spm.model'
  sentences = [s for pair in corpus['train'] for s in pair]
  return tokenizer_lib.train_tokenizer(sentences, path, vocab_size=300).path


def _config(corpus, vocab_path, **data):
  config = default.get_config()
  d = config.data
  d.source = 'text'
  d.train_files = corpus['train_files']
  d.eval_files = corpus['eval_files']
  d.vocab_path = vocab_path
  d.vocab_size = 300
  d.max_length = 24
  d.tokens_per_batch = 256
  d.bucket_lengths = (8, 16)
  d.prefetch = 2
  for key, value in data.items():
    setattr(d, key, value)
  return config


def _datasets(config, workdir, **kwargs):
  kwargs = {'process_index': 0, 'process_count': 1, **kwargs}
  return input_pipeline.get_datasets(config, workdir, **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _row_text(tokenizer, ids):
  ids = [int(i) for i in ids if i != 0]
  assert ids[-1] == tokenizer.eos_id, 'every sentence ends in eos'
  assert tokenizer.eos_id not in ids[:-1]
  return tokenizer.decode(ids)


def test_bucketed_batches_fit_token_budget(corpus, vocab_path, tmp_path):
  config = _config(corpus, vocab_path)
  tok, train_iter, _ = _datasets(config, tmp_path, batch_multiple=4)
  assert train_iter.spec.shapes() == [(32, 8), (16, 16), (8, 24)]
  pairs = dict(corpus['train'])
  seen_shapes = set()
  for batch in _take(train_iter, 60):
    rows, length = batch['targets'].shape
    assert batch['inputs'].shape == (rows, length)
    assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
    assert (rows, length) in train_iter.spec.shapes()
    assert rows % 4 == 0 and rows * length <= 256
    seen_shapes.add((rows, length))
    longest = np.maximum((batch['inputs'] > 0).sum(1), (batch['targets'] > 0).sum(1))
    shorter = [l for l in (0, 8, 16, 24) if l < length][-1]
    assert longest.max() <= length and longest.min() > shorter  # Its own bucket.
    for src_ids, tgt_ids in zip(batch['inputs'], batch['targets']):
      assert pairs[_row_text(tok, src_ids)] == _row_text(tok, tgt_ids)
  assert seen_shapes == set(train_iter.spec.shapes())
  stats = train_iter.stats()
  assert stats['batches'] == 60 and stats['dropped_too_long'] > 0
  assert stats['truncated'] == 0


def test_batch_multiple_floor_and_process_budget(corpus, vocab_path):
  config = _config(corpus, vocab_path, tokens_per_batch=100)
  spec = input_pipeline.BatchSpec.from_config(config.data, process_count=2, batch_multiple=4)
  # Per process 50 tokens: 50 // 8 = 6 -> 4 rows; 50 // 16 = 3 -> at least 4; 50 // 24 -> 4.
  assert spec.shapes() == [(4, 8), (4, 16), (4, 24)]
  assert input_pipeline.batch_size_for_length(25000, 64, 8) == 384


def test_same_seed_same_stream_other_seed_differs(corpus, vocab_path, tmp_path):
  config = _config(corpus, vocab_path)
  first = _take(_datasets(config, tmp_path)[1], 5)
  again = _take(_datasets(config, tmp_path)[1], 5)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])
  config.seed = 1
  other = _take(_datasets(config, tmp_path)[1], 5)
  assert any(a['inputs'].shape != b['inputs'].shape or (a['inputs'] != b['inputs']).any()
             for a, b in zip(first, other))


def test_one_epoch_reads_each_pair_once(corpus, vocab_path, tmp_path):
  tok, train_iter, _ = _datasets(_config(corpus, vocab_path, prefetch=0), tmp_path)
  seen = []
  while True:
    rows = [_row_text(tok, row) for row in next(train_iter)['inputs']]
    if train_iter.stats()['pairs_read'] > NUM_PAIRS:  # This batch reached epoch 2.
      break
    seen += rows
  assert len(seen) == len(set(seen))  # No pair twice within the first epoch.
  stats = train_iter.stats()
  assert len(seen) > NUM_PAIRS - stats['dropped_too_long'] - 3 * 32  # Minus open batches.


@pytest.mark.parametrize('packing', [False, True])
def test_resume_equals_uninterrupted_stream(corpus, vocab_path, tmp_path, packing):
  config = _config(corpus, vocab_path, packing=packing)
  _, train_iter, _ = _datasets(config, tmp_path)
  _take(train_iter, 7)
  state = json.loads(json.dumps(train_iter.get_state()))  # As a checkpoint stores it.
  assert any(state['pending']), 'the state must carry pairs waiting in open batches'
  # Far enough to cross an epoch boundary (1200 pairs).
  uninterrupted = _take(train_iter, 70)
  _, resumed_iter, _ = _datasets(config, tmp_path)
  resumed_iter.set_state(state)
  resumed = _take(resumed_iter, 70)
  for a, b in zip(uninterrupted, resumed):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert resumed_iter.stats() == train_iter.stats()
  assert train_iter.stats()['pairs_read'] > NUM_PAIRS


def test_state_from_another_config_is_rejected(corpus, vocab_path, tmp_path):
  _, train_iter, _ = _datasets(_config(corpus, vocab_path), tmp_path)
  state = train_iter.get_state()
  _, other, _ = _datasets(_config(corpus, vocab_path, tokens_per_batch=512), tmp_path)
  with pytest.raises(ValueError, match='data config, corpus or process count changed'):
    other.set_state(state)


def test_packed_batches_reconstruct_sentences(corpus, vocab_path, tmp_path):
  config = _config(corpus, vocab_path, packing=True, too_long='truncate')
  tok, train_iter, _ = _datasets(config, tmp_path, batch_multiple=2)
  assert train_iter.spec.shapes() == [(10, 24)]
  pairs = dict(corpus['train'])
  sentences = 0
  for batch in _take(train_iter, 20):
    assert {k: v.shape for k, v in batch.items()} == {
        k: (10, 24) for k in ('inputs', 'targets', 'inputs_segmentation', 'inputs_position',
                              'targets_segmentation', 'targets_position')}
    for row in range(10):
      segments = {}
      for side in ('inputs', 'targets'):
        ids, seg = batch[side][row], batch[side + '_segmentation'][row]
        pos = batch[side + '_position'][row]
        assert (ids[seg == 0] == 0).all() and (pos[seg == 0] == 0).all()
        count = seg.max()
        assert count >= 1
        # Segments are contiguous, numbered 1..k, left aligned; positions restart at 0.
        used = seg[seg > 0]
        np.testing.assert_array_equal(used, np.sort(used))
        assert set(used) == set(range(1, count + 1)) and (seg[:len(used)] > 0).all()
        for s in range(1, count + 1):
          np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
        segments[side] = [_row_text(tok, ids[seg == s]) for s in range(1, count + 1)]
      assert len(segments['inputs']) == len(segments['targets'])
      for source, target in zip(segments['inputs'], segments['targets']):
        sentences += 1
        if source in pairs:  # Truncated pairs decode to a prefix.
          assert pairs[source] == target
  assert sentences > 2 * 20 * 10  # Packing put several sentences in a row.


def test_too_long_truncate_keeps_eos(corpus, vocab_path, tmp_path):
  config = _config(corpus, vocab_path, too_long='truncate')
  _, train_iter, _ = _datasets(config, tmp_path)
  for batch in _take(train_iter, 40):
    for side in ('inputs', 'targets'):
      lengths = (batch[side] > 0).sum(1)
      assert lengths.max() <= 24
      assert (batch[side][np.arange(len(lengths)), lengths - 1] == 1).all()
  stats = train_iter.stats()
  assert stats['truncated'] > 0 and stats['dropped_too_long'] == 0


def test_processes_read_disjoint_shards(corpus, vocab_path, tmp_path):
  config = _config(corpus, vocab_path, too_long='truncate')
  seen = []
  for index in range(2):
    tok, train_iter, _ = _datasets(config, tmp_path, process_index=index, process_count=2)
    assert train_iter.num_pairs == NUM_PAIRS // 2
    assert train_iter.spec.shapes() == [(16, 8), (8, 16), (5, 24)]  # Half the budget.
    seen.append({_row_text(tok, row) for b in _take(train_iter, 15) for row in b['inputs']})
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_eval_set_ordered_fixed_shapes(corpus, vocab_path, tmp_path):
  tok, _, eval_sets = _datasets(_config(corpus, vocab_path), tmp_path)
  assert set(eval_sets) == {'validation'}  # No test_files configured.
  valid = eval_sets['validation']
  assert valid.sources == [p[0] for p in corpus['validation']]
  assert valid.references == [p[1] for p in corpus['validation']]
  batches = list(valid.batches(8))
  assert len(batches) == 3
  index = np.concatenate([b['index'] for b in batches])
  np.testing.assert_array_equal(index, list(range(21)) + [-1, -1, -1])
  for batch in batches:
    assert batch['inputs'].shape == batch['targets'].shape
    assert batch['inputs'].shape[0] == 8 and batch['inputs'].shape[1] in (8, 16, 24)
    for row, i in enumerate(batch['index']):
      if i < 0:
        assert not batch['inputs'][row].any() and not batch['targets'][row].any()
      elif len(tok.encode(valid.sources[i])) < 24:
        assert _row_text(tok, batch['inputs'][row]) == valid.sources[i]
        assert _row_text(tok, batch['targets'][row]) == valid.references[i]
  # Two processes: each holds its half of every global batch, with the same shapes.
  halves = [input_pipeline.EvalSet('v', corpus['validation'], tok, (8, 16, 24),
                                   process_index=p, process_count=2).batches(8)
            for p in range(2)]
  for whole, first, second in zip(batches, *halves):
    np.testing.assert_array_equal(np.concatenate([first['inputs'], second['inputs']]),
                                  whole['inputs'])
    np.testing.assert_array_equal(np.concatenate([first['index'], second['index']]),
                                  whole['index'])
  with pytest.raises(ValueError, match='not a multiple of the 2 processes'):
    next(input_pipeline.EvalSet('v', corpus['validation'], tok, (8, 16, 24),
                                process_index=0, process_count=2).batches(7))


def test_vocabulary_trained_in_workdir_and_reused(corpus, tmp_path):
  config = _config(corpus, None, vocab_size=250)
  tok, _, _ = _datasets(config, tmp_path)
  assert tok.path == str(tmp_path / 'vocab' / 'spm.model') and tok.vocab_size == 250
  again, _, _ = _datasets(config, tmp_path)
  assert again.fingerprint() == tok.fingerprint()


# Bad input.


def test_misaligned_files(tmp_path):
  src = _write(tmp_path / 'a.en', ['one', 'two', 'three'], gz=False)
  tgt = _write(tmp_path / 'a.de.gz', ['eins', 'zwei'], gz=True)
  with pytest.raises(ValueError, match=r'Misaligned.*a\.en has more lines \(line 3'):
    parallel_text.read_parallel(src, tgt)
  with pytest.raises(ValueError, match=r'Misaligned.*a\.en has more lines'):
    parallel_text.read_parallel(tgt, src)


def test_empty_lines_are_skipped_and_counted(tmp_path):
  src = _write(tmp_path / 'b.en', ['one', '', 'three', '  ', 'five'], gz=False)
  tgt = _write(tmp_path / 'b.de', ['eins', 'zwei', '', 'vier', 'fünf'], gz=False)
  text = parallel_text.read_parallel(src, tgt)
  assert text.pairs == [('one', 'eins'), ('five', 'fünf')]
  assert text.skipped_empty == [2, 3, 4]


def test_non_utf8_names_file_and_line(tmp_path):
  src = tmp_path / 'c.en'
  src.write_bytes(b'fine\nalso fine\nbad \xff\xfe byte\n')
  tgt = _write(tmp_path / 'c.de', ['gut', 'auch gut', 'schlecht'], gz=False)
  with pytest.raises(ValueError, match=r'c\.en, line 3: not valid UTF-8'):
    parallel_text.read_parallel(str(src), tgt)


def test_empty_corpus_and_missing_file(corpus, vocab_path, tmp_path):
  empty = (_write(tmp_path / 'e.en', ['', ' '], gz=False),
           _write(tmp_path / 'e.de', ['x', ''], gz=False))
  with pytest.raises(ValueError, match=r'Empty corpus.*e\.en.*2 empty pairs'):
    _datasets(_config(corpus, vocab_path, train_files=empty), tmp_path)
  missing = (str(tmp_path / 'missing.en'), corpus['train_files'][1])
  with pytest.raises(FileNotFoundError, match=r'Source file not found: .*missing\.en'):
    _datasets(_config(corpus, vocab_path, train_files=missing), tmp_path)
  with pytest.raises(ValueError, match=r'train_files must be \(source_path, target_path\)'):
    _datasets(_config(corpus, vocab_path, train_files=None), tmp_path)
  with pytest.raises(ValueError, match="too_long must be 'drop' or 'truncate'"):
    _datasets(_config(corpus, vocab_path, too_long='cut'), tmp_path)
  with pytest.raises(ValueError, match="source must be 'tfds', 'multi30k' or 'text'"):
    _datasets(_config(corpus, vocab_path, source='csv'), tmp_path)


# TFDS.


@pytest.mark.parametrize('name, source_lang, target_lang', [
    ('wmt14_translate/de-en', 'en', 'de'),
    ('wmt14_translate/de-en', 'de', 'en'),
    ('wmt14_translate/fr-en', 'en', 'fr'),
    ('wmt17_translate/de-en', 'en', 'de'),
])
def test_wmt_under_mock_data(corpus, vocab_path, tmp_path, name, source_lang, target_lang):
  config = _config(corpus, vocab_path, source='tfds', tfds_name=name,
                   source_lang=source_lang, target_lang=target_lang,
                   data_dir=str(tmp_path / 'tfds'), max_length=256, too_long='truncate')
  with tfds.testing.mock_data(num_examples=64):
    tok, train_iter, eval_sets = _datasets(config, tmp_path, batch_multiple=2)
    expected = tfds.data_source(name, split='validation')
    batches = _take(train_iter, 3)
  assert set(eval_sets) == {'validation', 'test'}
  valid = eval_sets['validation']
  assert len(valid) == 64
  first = expected[0]
  as_text = lambda x: x.decode() if isinstance(x, bytes) else x
  assert valid.sources[0] == as_text(first[source_lang]).strip()
  assert valid.references[0] == as_text(first[target_lang]).strip()
  for batch in batches:
    assert batch['inputs'].shape in [(r, l) for r, l in train_iter.spec.shapes()]
    assert batch['inputs'].shape[0] % 2 == 0


def test_tfds_errors(corpus, vocab_path, tmp_path):
  with pytest.raises(ValueError, match="Unknown TFDS dataset 'no_such_dataset'"):
    _datasets(_config(corpus, vocab_path, source='tfds', tfds_name='no_such_dataset'),
              tmp_path)
  config = _config(corpus, vocab_path, source='tfds', tfds_name='wmt14_translate/de-en',
                   source_lang='en', target_lang='fr', data_dir=str(tmp_path / 'tfds'))
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(ValueError, match=r"has no language \['fr'\]"):
      _datasets(config, tmp_path)


# Multi30k.


@pytest.fixture(scope='session')
def multi30k_dir(shared_data):
  folder = shared_data / 'multi30k'
  if not folder.is_dir():
    pytest.skip(f'Multi30k copy not found at {folder}')
  return folder


@pytest.fixture(scope='session')
def multi30k_builder(multi30k_dir, tmp_path_factory):
  builder = multi30k.Multi30k(data_dir=str(tmp_path_factory.mktemp('tfds')),
                              file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(multi30k_dir)))
  return builder


def test_multi30k_builder_from_manual_dir(multi30k_builder, multi30k_dir):
  sizes = {split: info.num_examples for split, info in multi30k_builder.info.splits.items()}
  assert sizes == {'train': 29000, 'validation': 1014, 'test': 1000}
  test = multi30k_builder.as_data_source('test')
  for lang in ('en', 'de'):
    with gzip.open(multi30k_dir / f'test2016.{lang}.gz', 'rt', encoding='utf-8') as f:
      lines = [f.readline().strip() for _ in range(3)]
    # The builder keeps the official order: example i is line i.
    assert [test[i][lang].decode() for i in range(3)] == lines


def test_multi30k_pipeline(multi30k_builder, multi30k_dir, vocab_path, corpus, tmp_path,
                           monkeypatch):
  monkeypatch.setenv('MULTI30K_DIR', str(multi30k_dir))  # No manual_dir in the config.
  config = _config(corpus, vocab_path, source='multi30k', data_dir=multi30k_builder.data_dir
                   .rsplit('/multi30k/', 1)[0], train_files=None, eval_files=None,
                   source_lang='de', target_lang='en', max_length=64)
  _, train_iter, eval_sets = _datasets(config, tmp_path)
  assert train_iter.num_pairs == 29000
  assert {k: len(v) for k, v in eval_sets.items()} == {'validation': 1014, 'test': 1000}
  assert eval_sets['test'].sources[0] == 'Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.'
  assert eval_sets['test'].references[0] == 'A man in an orange hat starring at something.'
  assert next(train_iter)['inputs'].shape in train_iter.spec.shapes()
  # Plain iteration (as the evaluate CLI does) stops at the end of the split.
  from transformer_jax.data.datasets import sources as sources_lib
  test_pairs = sources_lib.load_pairs(config.data, 'test')
  assert sum(1 for _ in test_pairs) == 1000
  assert list(test_pairs)[-1] == test_pairs[-1]


def test_multi30k_missing_manual_dir(corpus, vocab_path, tmp_path):
  config = _config(corpus, vocab_path, source='multi30k', manual_dir=str(tmp_path / 'nope'))
  with pytest.raises(FileNotFoundError, match='Multi30k manual_dir not found'):
    _datasets(config, tmp_path)
