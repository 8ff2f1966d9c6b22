"""Character-level text for language modelling: vocabulary, random windows, eval windows.

Tiny Shakespeare as nanoGPT's ``shakespeare_char`` reads it: the characters of one
file, the first 90% for training and the last 10% for validation.

* ``CharVocabulary``: one id per distinct character of the corpus, after the
  project's fixed specials (pad 0, eos 1, bos 2, unk 3); stored as JSON in
  ``workdir/vocab/chars.json`` and fingerprinted like the SentencePiece vocabulary.
* ``WindowIterator``: endless batches of random context windows (inputs = chars
  [o, o + T), targets = chars [o + 1, o + T + 1)). Batch k's offsets come from a
  generator seeded by (seed, process, k), so the state is one integer and a resumed
  run sees exactly the batches of an uninterrupted one.
* ``WindowEvalSet``: the validation text cut into consecutive windows, each
  position scored once; padding rows have target 0 and no weight.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from transformer_jax.data import resumable

from transformer_jax.model.config import BOS_ID, EOS_ID, PAD_ID

UNK_ID = 3
_SPECIALS = 4
VOCAB_FILE = os.path.join('vocab', 'chars.json')


def read_text(path: str) -> str:
  """The whole file as text (gzip when the name ends in .gz)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'Text corpus not found: {path}')
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt', encoding='utf-8') as f:
    return f.read()


def split_text(text: str, train_fraction: float) -> tuple[str, str]:
  """(first ``train_fraction`` of the characters, the rest)."""
  if not 0.0 < train_fraction < 1.0:
    raise ValueError(f'train_fraction must be in (0, 1), got {train_fraction}.')
  cut = int(len(text) * train_fraction)
  return text[:cut], text[cut:]


class CharVocabulary:
  """Characters <-> ids. Specials: pad 0, eos 1, bos 2, unk 3; characters from 4.

  Attributes:
    chars: the characters in id order (id = 4 + index).
    vocab_size: V, the id count rounded up to a multiple of ``multiple`` so that
      tensor-parallel meshes split the embedding (the extra ids are never seen).
  """

  pad_id, eos_id, bos_id, unk_id = PAD_ID, EOS_ID, BOS_ID, UNK_ID

  def __init__(self, chars: Sequence[str], multiple: int = 8):
    self.chars = list(chars)
    if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
      raise ValueError('A character vocabulary needs distinct single characters.')
    self._ids = {c: i + _SPECIALS for i, c in enumerate(self.chars)}
    count = len(self.chars) + _SPECIALS
    self.vocab_size = -(-count // multiple) * multiple
    self._multiple = multiple

  @classmethod
  def from_text(cls, text: str, multiple: int = 8) -> 'CharVocabulary':
    return cls(sorted(set(text)), multiple)

  @classmethod
  def load(cls, path: str) -> 'CharVocabulary':
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
    return cls(data['chars'], data['multiple'])

  def save(self, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      json.dump({'chars': self.chars, 'multiple': self._multiple}, f)
    os.replace(path + '.tmp', path)

  def encode(self, text: str) -> list[int]:
    return [self._ids.get(c, UNK_ID) for c in text]

  def encode_array(self, text: str) -> np.ndarray:
    """[len(text)] int32, vectorised through a code-point table (fast on 1M chars)."""
    codes = np.frombuffer(text.encode('utf-32-le'), np.uint32)
    table = np.full(max(max(map(ord, self.chars), default=0), int(codes.max(initial=0))) + 1,
                    UNK_ID, np.int32)
    for c, i in self._ids.items():
      table[ord(c)] = i
    return table[codes]

  def decode(self, ids) -> str:
    """Characters of ``ids``; specials and unused ids are dropped (unk as U+FFFD)."""
    out = []
    for i in ids:
      i = int(i)
      if i == UNK_ID:
        out.append('\ufffd')
      elif _SPECIALS <= i < _SPECIALS + len(self.chars):
        out.append(self.chars[i - _SPECIALS])
    return ''.join(out)

  def fingerprint(self) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(self.chars).encode('utf-8')).hexdigest()
    return {'sha256': digest, 'vocab_size': self.vocab_size}


def load_or_build_vocabulary(workdir: str, text: str, process_index: int = 0
                             ) -> CharVocabulary:
  """``workdir/vocab/chars.json``, built from ``text`` on first use."""
  path = os.path.join(workdir, VOCAB_FILE)
  if os.path.exists(path):
    return CharVocabulary.load(path)
  vocab = CharVocabulary.from_text(text)
  if process_index == 0:
    vocab.save(path)
  return vocab


class WindowIterator(resumable.CountedBatches):
  """Endless [B, T] batches of random windows of ``ids`` (exactly resumable)."""

  def __init__(self, ids: np.ndarray, batch_size: int, length: int, *, seed: int,
               process_index: int = 0):
    if len(ids) < length + 2:
      raise ValueError(f'The training text ({len(ids)} tokens) is shorter than one '
                       f'context window of {length} + 1.')
    self._ids, self._rows, self._length = ids, batch_size, length
    self._seed, self._process = seed, process_index
    self._batches = 0

  def __iter__(self) -> 'WindowIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self._seed, self._process, self._batches])
    self._batches += 1
    starts = rng.integers(0, len(self._ids) - self._length - 1, size=self._rows)
    window = starts[:, None] + np.arange(self._length + 1)[None, :]  # [B, T + 1]
    chunk = self._ids[window]
    return {'inputs': chunk[:, :-1], 'targets': chunk[:, 1:]}

  def _spec(self) -> dict[str, Any]:
    return {'rows': self._rows, 'length': self._length, 'tokens': int(len(self._ids))}


class WindowEvalSet:
  """Consecutive [B, T] windows of the validation ids; every position scored once."""

  def __init__(self, name: str, ids: np.ndarray, length: int, *, process_index: int = 0,
               process_count: int = 1):
    if len(ids) < 2:
      raise ValueError(f'Evaluation set {name!r} has fewer than 2 tokens.')
    self.name, self._ids, self._length = name, ids, length
    self._process_index, self._process_count = process_index, process_count
    self._windows = -(-(len(ids) - 1) // length)

  def __len__(self) -> int:
    return self._windows

  def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of each global batch of ``batch_size`` windows."""
    if batch_size % self._process_count:
      raise ValueError(f'Eval batch size {batch_size} is not a multiple of the '
                       f'{self._process_count} processes.')
    local = batch_size // self._process_count
    t = self._length
    for start in range(0, self._windows, batch_size):
      inputs = np.zeros((local, t), np.int32)
      targets = np.zeros((local, t), np.int32)
      first = start + self._process_index * local
      for row, w in enumerate(range(first, min(first + local, self._windows))):
        piece = self._ids[w * t:w * t + t + 1]
        inputs[row, :len(piece) - 1] = piece[:-1]
        targets[row, :len(piece) - 1] = piece[1:]
      yield {'inputs': inputs, 'targets': targets}
