"""SentencePiece vocabulary shared by source and target: train, load, encode, decode.

Sec 5.1: sentences are encoded with a shared source-target vocabulary (byte-pair
encoding of about 37000 tokens for EN-DE, 32000 word-pieces for EN-FR). The
vocabulary is trained once on a sample of the training data (both sides), stored
as ``workdir/vocab/spm.model`` and reused when a run resumes.

Token ids are fixed for the whole codebase: pad 0, eos 1, bos 2, unk 3. A sentence
encodes to its pieces followed by eos (the input pipeline appends it); the decoder
input is the target shifted right with bos at each sentence start.

A checkpoint stores ``Tokenizer.fingerprint()`` and compares it on restore with
``check_fingerprint`` so that a different vocabulary is an error, not silently
garbled translations.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import logging
import sentencepiece as spm

from transformer_jax.model.config import BOS_ID, EOS_ID, PAD_ID

UNK_ID = 3

VOCAB_DIRNAME = 'vocab'
VOCAB_FILENAME = 'spm.model'


class VocabularyMismatchError(ValueError):
  """A vocabulary differs from the one a checkpoint or config expects."""


class Tokenizer:
  """A SentencePiece model with the project's special ids (pad 0, eos 1, bos 2, unk 3).

  Attributes:
    path: the ``.model`` file it was loaded from.
    vocab_size: V, the number of ids (special ids included).
  """

  pad_id = PAD_ID
  eos_id = EOS_ID
  bos_id = BOS_ID
  unk_id = UNK_ID

  def __init__(self, path: str | os.PathLike[str]):
    self.path = str(path)
    if not os.path.exists(self.path):
      raise FileNotFoundError(f'SentencePiece model not found: {self.path}')
    with open(self.path, 'rb') as f:
      self._proto = f.read()
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._proto)
    except RuntimeError as e:
      raise ValueError(f'{self.path} is not a SentencePiece model: {e}') from e
    self.vocab_size = self._sp.get_piece_size()
    ids = {'pad': self._sp.pad_id(), 'eos': self._sp.eos_id(),
           'bos': self._sp.bos_id(), 'unk': self._sp.unk_id()}
    expected = {'pad': PAD_ID, 'eos': EOS_ID, 'bos': BOS_ID, 'unk': UNK_ID}
    if ids != expected:
      raise VocabularyMismatchError(
          f'{self.path} has special ids {ids}, but this codebase needs {expected}; '
          'retrain it with pad_id=0 eos_id=1 bos_id=2 unk_id=3.')

  def encode(self, text: str) -> list[int]:
    """Pieces of ``text`` as ids, WITHOUT the trailing eos."""
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """``encode`` over a list, using SentencePiece's threads."""
    return self._sp.encode(list(texts), out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ``ids``: stops at the first eos and drops pad and bos."""
    pieces = []
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i not in (PAD_ID, BOS_ID):
        pieces.append(i)
    return self._sp.decode(pieces)

  def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
    """``decode`` for each row of ``batch`` (e.g. a [B, T] array)."""
    return [self.decode(row) for row in batch]

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def fingerprint(self) -> dict[str, Any]:
    """What a checkpoint records about its vocabulary (json-able).

    Returns:
      ``{'vocab_size': V, 'sha256': hash of the serialized model,
      'special_ids': [pad, eos, bos, unk]}``.
    """
    return {
        'vocab_size': self.vocab_size,
        'sha256': hashlib.sha256(self._proto).hexdigest(),
        'special_ids': [PAD_ID, EOS_ID, BOS_ID, UNK_ID],
    }

  def __repr__(self) -> str:
    return f'Tokenizer({self.path!r}, vocab_size={self.vocab_size})'


def check_fingerprint(tokenizer: Tokenizer, expected: Mapping[str, Any],
                      where: str = 'the checkpoint') -> None:
  """Raises ``VocabularyMismatchError`` unless ``tokenizer`` is the vocabulary ``expected``.

  Args:
    tokenizer: the vocabulary in use.
    expected: a ``Tokenizer.fingerprint()`` stored earlier (e.g. in a checkpoint).
    where: what ``expected`` came from, for the message.
  """
  actual = tokenizer.fingerprint()
  diffs = [f'{k}: {where} has {expected.get(k)!r}, {tokenizer.path} has {actual[k]!r}'
           for k in actual if k in expected and _as_list(expected[k]) != actual[k]]
  if diffs:
    raise VocabularyMismatchError(
        'The vocabulary does not match ' + where + ':\n  ' + '\n  '.join(diffs) +
        '\nUse the vocabulary the checkpoint was trained with (config.data.vocab_path '
        'or the workdir/vocab it was saved in).')


def _as_list(x):
  """JSON round trips turn tuples into lists; compare them as lists."""
  return list(x) if isinstance(x, tuple) else x


def train_tokenizer(sentences: Iterable[str], model_path: str | os.PathLike[str], *,
                    vocab_size: int, model_type: str = 'bpe',
                    character_coverage: float = 1.0) -> Tokenizer:
  """Trains a SentencePiece model on ``sentences`` and writes it to ``model_path``.

  The file is written to a temporary name and renamed, so a crash never leaves a
  truncated vocabulary behind for a resumed run to pick up.
  """
  model_path = pathlib.Path(model_path)
  model_path.parent.mkdir(parents=True, exist_ok=True)
  counter = {'n': 0}

  def counted():
    for s in sentences:
      if s:
        counter['n'] += 1
        yield s

  start = time.time()
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=counted(), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(
        f'SentencePiece could not train a {model_type} vocabulary of {vocab_size} '
        f'tokens on {counter["n"]} sentences: {e}') from e
  with tempfile.NamedTemporaryFile(dir=model_path.parent, delete=False,
                                   suffix='.tmp') as tmp:
    tmp.write(model.getvalue())
  os.replace(tmp.name, model_path)
  logging.info('Trained a %d-token %s vocabulary on %d sentences in %.1fs: %s',
               vocab_size, model_type, counter['n'], time.time() - start, model_path)
  return Tokenizer(model_path)


def load_or_train_tokenizer(data_cfg, workdir: str | os.PathLike[str],
                            sentences: Callable[[], Iterable[str]], *,
                            process_index: int = 0, reserved_ids: int = 0,
                            wait_seconds: float = 3600.0) -> Tokenizer:
  """The run's vocabulary: ``data_cfg.vocab_path``, else ``workdir/vocab/spm.model``.

  The workdir vocabulary is trained on first use and reused on resume. With many
  processes only process 0 trains; the others wait for its file (the workdir is
  shared storage in multi-host runs, as for checkpoints).

  Args:
    data_cfg: ``config.data`` (uses ``vocab_path``, ``vocab_size``, ``vocab_model_type``).
    workdir: the run's directory.
    sentences: called only when training is needed; yields sample sentences of both
      languages.
    process_index: this process (``jax.process_index()``).
    reserved_ids: ids the model adds after the pieces (the encoder-only [MASK]):
      ``data_cfg.vocab_size`` counts them, so the vocabulary has that many fewer
      pieces.
    wait_seconds: how long processes other than 0 wait for the vocabulary.

  Raises:
    VocabularyMismatchError: the workdir vocabulary has a size other than
      ``data_cfg.vocab_size - reserved_ids`` (the config changed between runs).
  """
  pieces = int(data_cfg.vocab_size) - reserved_ids
  extra = f' + {reserved_ids} reserved' if reserved_ids else ''
  if data_cfg.get('vocab_path'):
    tokenizer = Tokenizer(data_cfg.vocab_path)
    logging.info('Using vocabulary %s (%d tokens)', tokenizer.path, tokenizer.vocab_size)
    return tokenizer
  path = pathlib.Path(workdir) / VOCAB_DIRNAME / VOCAB_FILENAME
  if not path.exists():
    if process_index == 0:
      return train_tokenizer(sentences(), path, vocab_size=pieces,
                             model_type=data_cfg.get('vocab_model_type', 'bpe'))
    deadline = time.time() + wait_seconds
    while not path.exists():
      if time.time() > deadline:
        raise TimeoutError(f'Process {process_index} waited {wait_seconds:.0f}s for '
                           f'process 0 to write the vocabulary {path}.')
      time.sleep(5)
  tokenizer = Tokenizer(path)
  if tokenizer.vocab_size != pieces:
    raise VocabularyMismatchError(
        f'{path} has {tokenizer.vocab_size}{extra} tokens but config.data.vocab_size is '
        f'{data_cfg.vocab_size}. This workdir was started with another vocabulary; use '
        'a new workdir, or set config.data.vocab_size to match.')
  logging.info('Reusing vocabulary %s (%d tokens)', path, tokenizer.vocab_size)
  return tokenizer
