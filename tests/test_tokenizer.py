"""Tests for transformer_jax/data/tokenizer.py: special ids, round trips, reuse, mismatch errors."""

import json

import numpy as np
import pytest
import sentencepiece as spm
from ml_collections import ConfigDict

from transformer_jax.data import tokenizer as tokenizer_lib

_WORDS = ('the a man woman dog child street red blue runs sits looks at with in on big small '
          'Straße Mädchen Hund läuft über grün schön Fußball café naïve').split()


def _corpus(n=2000, seed=0):
  rng = np.random.default_rng(seed)
  sentences = []
  for _ in range(n):
    words = rng.choice(_WORDS, size=rng.integers(1, 15))
    sentences.append(' '.join(words).capitalize() + rng.choice(['.', '!', '', ' ?']))
  return sentences


@pytest.fixture(scope='session')
def corpus():
  return _corpus()


@pytest.fixture(scope='session')
def trained(tmp_path_factory, corpus):
  workdir = tmp_path_factory.mktemp('tok_workdir')
  cfg = ConfigDict({'vocab_size': 200, 'vocab_model_type': 'bpe', 'vocab_path': None})
  tok = tokenizer_lib.load_or_train_tokenizer(cfg, workdir, lambda: iter(corpus))
  return tok, workdir, cfg


def test_special_ids_and_size(trained):
  tok, workdir, _ = trained
  assert tok.path == str(workdir / 'vocab' / 'spm.model')
  assert tok.vocab_size == 200
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert [tok.id_to_piece(i) for i in range(4)] == ['<pad>', '</s>', '<s>', '<unk>']
  assert not list((workdir / 'vocab').glob('*.tmp'))


def test_round_trip(trained, corpus):
  tok, _, _ = trained
  for sentence in corpus[:300]:
    ids = tok.encode(sentence)
    assert ids and all(4 <= i < tok.vocab_size for i in ids)  # No eos/unk: covered chars.
    assert tok.decode(ids) == sentence
  batch = tok.encode_batch(corpus[:5])
  assert batch == [tok.encode(s) for s in corpus[:5]]
  assert tok.decode_batch([[2] + b + [1] for b in batch]) == corpus[:5]


def test_decode_stops_at_eos_and_drops_pad_bos(trained):
  tok, _, _ = trained
  ids = tok.encode('The dog runs.')
  other = tok.encode('A red café')
  assert tok.decode([2] + ids + [1] + other + [0, 0]) == 'The dog runs.'
  assert tok.decode(np.asarray([0, 2] + ids[:2] + [0] + ids[2:] + [1])) == 'The dog runs.'
  assert tok.decode([1] + ids) == ''


def test_reused_not_retrained(trained):
  tok, workdir, cfg = trained

  def must_not_train():
    raise AssertionError('retrained an existing vocabulary')

  again = tokenizer_lib.load_or_train_tokenizer(cfg, workdir, must_not_train)
  assert again.fingerprint() == tok.fingerprint()
  # The fingerprint survives the json round trip a checkpoint puts it through.
  tokenizer_lib.check_fingerprint(again, json.loads(json.dumps(tok.fingerprint())))


def test_config_vocab_size_change_is_an_error(trained):
  _, workdir, cfg = trained
  other = ConfigDict(cfg.to_dict())
  other.vocab_size = 300
  with pytest.raises(tokenizer_lib.VocabularyMismatchError, match='300'):
    tokenizer_lib.load_or_train_tokenizer(other, workdir, lambda: iter(()))


def test_other_vocabulary_fails_fingerprint_check(trained, tmp_path, corpus):
  tok, _, _ = trained
  other = tokenizer_lib.train_tokenizer(corpus[::-1], tmp_path / 'other.model', vocab_size=180)
  with pytest.raises(tokenizer_lib.VocabularyMismatchError, match='vocab_size'):
    tokenizer_lib.check_fingerprint(other, tok.fingerprint(), where='checkpoint 1000')
  same_size = tokenizer_lib.train_tokenizer(corpus[:500], tmp_path / 'same.model',
                                            vocab_size=200)
  with pytest.raises(tokenizer_lib.VocabularyMismatchError, match='sha256'):
    tokenizer_lib.check_fingerprint(same_size, tok.fingerprint())


def test_vocab_path_with_other_special_ids_is_rejected(tmp_path, corpus):
  prefix = tmp_path / 'default_ids'
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(prefix),
                                 vocab_size=100, minloglevel=2)  # unk 0, bos 1, eos 2.
  cfg = ConfigDict({'vocab_size': 100, 'vocab_path': f'{prefix}.model'})
  with pytest.raises(tokenizer_lib.VocabularyMismatchError, match='special ids'):
    tokenizer_lib.load_or_train_tokenizer(cfg, tmp_path, lambda: iter(()))


def test_missing_vocab_path_and_non_model_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.model'):
    tokenizer_lib.Tokenizer(tmp_path / 'nope.model')
  bad = tmp_path / 'bad.model'
  bad.write_bytes(b'not a model')
  with pytest.raises(ValueError, match='not a SentencePiece model'):
    tokenizer_lib.Tokenizer(bad)


def test_vocab_too_large_for_corpus_names_sizes(tmp_path):
  with pytest.raises(ValueError, match='5000 tokens on 3 sentences'):
    tokenizer_lib.train_tokenizer(['a b', 'c d', 'e f'], tmp_path / 'x.model', vocab_size=5000)


def test_other_processes_wait_for_process_zero(tmp_path):
  cfg = ConfigDict({'vocab_size': 200, 'vocab_path': None})
  with pytest.raises(TimeoutError, match='process 0'):
    tokenizer_lib.load_or_train_tokenizer(cfg, tmp_path, lambda: iter(()), process_index=1,
                                          wait_seconds=0)
