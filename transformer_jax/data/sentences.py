"""Labelled sentences for the encoder-only family: reading, batching, BERT masking.

GLUE SST-2 as ``../shared/data/sst2`` ships it (TSV, header ``sentence<TAB>label``).
Sentences are SentencePiece-encoded (``tokenizer.py``) behind a [CLS] token (the
project's bos id) and cut to ``max_length``.

* ``SentenceVocabulary``: the SentencePiece model plus one extra id, [MASK], after
  its pieces (SentencePiece reserves none for it).
* ``SentenceBatches``: endless training batches, shuffled per epoch from the seed
  and grouped by length (each chunk of ``group`` batches is sorted by length, then
  its batches are shuffled), each padded to the smallest of ``bucket_lengths``
  that holds it. Batch k depends only on (seed, k), so the state is one integer
  and a resumed run sees exactly the batches of an uninterrupted one. With
  ``mlm_probability`` > 0 the batches are masked-LM batches instead.
* ``mask_tokens``: BERT's corruption (Devlin et al., 2019, Sec 3.1): 15% of the
  real tokens are chosen; of those 80% become [MASK], 10% a random piece and 10%
  stay, and only the chosen positions are scored.
* ``SentenceEvalSet``: ordered dev batches; padding rows have label -1.

Batch arrays are all [B, ...] 2-D (labels [B, 1]) so one batch sharding fits all.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from transformer_jax.data import resumable

from transformer_jax.data import tokenizer as tokenizer_lib

_SPECIALS = 4  # pad, eos, bos, unk: never chosen as random replacements.
LENGTH_GROUP = 32  # Batches per length-sorted chunk (config.data.length_group).


def read_labelled_tsv(path: str) -> tuple[list[str], np.ndarray]:
  """(sentences, int32 labels) of a ``sentence<TAB>label`` TSV with a header."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'Labelled sentences not found: {path}')
  opener = gzip.open if path.endswith('.gz') else open
  sentences, labels = [], []
  with opener(path, 'rt', encoding='utf-8') as f:
    header = f.readline().rstrip('\n').split('\t')
    if header[:2] != ['sentence', 'label']:
      raise ValueError(f'{path}: expected the header "sentence<TAB>label", got {header}.')
    for number, line in enumerate(f, start=2):
      fields = line.rstrip('\n').split('\t')
      if len(fields) != 2 or not fields[1].strip().lstrip('-').isdigit():
        raise ValueError(f'{path}:{number}: expected "sentence<TAB>label", got {line!r}.')
      sentences.append(fields[0])
      labels.append(int(fields[1]))
  return sentences, np.asarray(labels, np.int32)


class SentenceVocabulary:
  """A SentencePiece tokenizer with [CLS] (= bos) in front and a [MASK] id after it.

  ``config.data.vocab_size`` is V, the model's ids: the SentencePiece model is
  trained with V - EXTRA_IDS pieces (``tokenizer.load_or_train_tokenizer``'s
  ``reserved_ids``), so that V means the same in every family.

  Attributes:
    vocab_size: V, the SentencePiece pieces + EXTRA_IDS.
    mask_id: the [MASK] id (= the SentencePiece vocabulary size).
  """

  EXTRA_IDS = 1  # [MASK]: SentencePiece reserves no id for it.
  pad_id, eos_id = tokenizer_lib.PAD_ID, tokenizer_lib.EOS_ID
  cls_id, unk_id = tokenizer_lib.BOS_ID, tokenizer_lib.UNK_ID

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer):
    self.tokenizer = tokenizer
    self.mask_id = tokenizer.vocab_size
    self.vocab_size = tokenizer.vocab_size + self.EXTRA_IDS

  def encode_batch(self, sentences: Sequence[str], max_length: int) -> list[np.ndarray]:
    """[CLS] + pieces, at most ``max_length`` ids each (int32 arrays)."""
    return [np.asarray([self.cls_id] + ids[:max_length - 1], np.int32)
            for ids in self.tokenizer.encode_batch(list(sentences))]

  def fingerprint(self) -> dict[str, Any]:
    inner = self.tokenizer.fingerprint()
    digest = hashlib.sha256((inner['sha256'] + '+[MASK]').encode()).hexdigest()
    return {'sha256': digest, 'vocab_size': self.vocab_size}


def pad_rows(rows: Sequence[np.ndarray], num_rows: int, length: int) -> np.ndarray:
  """[num_rows, length] int32, zero (pad) padded."""
  out = np.zeros((num_rows, length), np.int32)
  for i, ids in enumerate(rows):
    out[i, :len(ids)] = ids
  return out


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  return next(b for b in buckets if length <= b)


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, *, mask_id: int,
                vocab_size: int, probability: float = 0.15,
                max_predictions: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """BERT's masked-LM corruption of a padded batch.

  Per row, round(probability * n) of its n real tokens (not padding, not the
  [CLS] at position 0; at least one) are chosen uniformly. A chosen token becomes
  [MASK] with probability 0.8, a uniformly random piece (ids 4 .. mask_id - 1)
  with probability 0.1, and stays itself otherwise.

  Args:
    ids: [B, S] int32, [CLS] first, pad = 0.
    rng: the generator (seeded per batch by the caller).
    mask_id, vocab_size: the [MASK] id and V (random pieces are below mask_id).
    probability: the chosen fraction (0.15 in BERT).
    max_predictions: P, the scored positions per row (default ceil(probability * S)).

  Returns:
    (corrupted ids [B, S], positions [B, P], targets [B, P]): the original ids
    at the chosen positions, 0 (no loss) in unused slots.
  """
  rows, length = ids.shape
  if max_predictions is None:
    max_predictions = max(1, math.ceil(probability * length))
  corrupted = ids.copy()
  positions = np.zeros((rows, max_predictions), np.int32)
  targets = np.zeros((rows, max_predictions), np.int32)
  del vocab_size  # The random replacements come from the pieces below [MASK].
  for r in range(rows):
    candidates = np.flatnonzero(ids[r] != tokenizer_lib.PAD_ID)
    candidates = candidates[candidates > 0]  # Never the [CLS] token.
    if not len(candidates):
      continue
    n = min(max(1, int(round(probability * len(candidates)))), max_predictions)
    chosen = np.sort(rng.choice(candidates, size=n, replace=False))
    positions[r, :n] = chosen
    targets[r, :n] = ids[r, chosen]
    action = rng.random(n)
    corrupted[r, chosen[action < 0.8]] = mask_id
    replace = chosen[(action >= 0.8) & (action < 0.9)]
    corrupted[r, replace] = rng.integers(_SPECIALS, mask_id, size=len(replace))
  return corrupted, positions, targets


def drop_words(ids: np.ndarray, rng: np.random.Generator, probability: float) -> np.ndarray:
  """Word dropout: each real token but the [CLS] becomes ``<unk>`` with ``probability``.

  The classifier then learns from sentences with words missing, as it meets them in
  the dev set's out-of-vocabulary words, instead of memorising whole training phrases
  (Iyyer et al., 2015, drop words; replacing keeps positions and lengths).

  Args:
    ids: [B, S] int32, [CLS] first, pad = 0.
    rng: the generator (seeded per batch by the caller).
    probability: the chance that a token is replaced.

  Returns:
    [B, S] int32: the same padding and [CLS], some tokens ``<unk>``.
  """
  hit = (rng.random(ids.shape) < probability) & (ids != tokenizer_lib.PAD_ID)
  hit[:, 0] = False
  return np.where(hit, tokenizer_lib.UNK_ID, ids).astype(ids.dtype)


def mlm_predictions(length: int, probability: float) -> int:
  """P for a bucket of ``length``: enough slots for round(probability * n) at any n."""
  return max(1, math.ceil(probability * length))


class SentenceBatches(resumable.CountedBatches):
  """Endless length-grouped training batches (classification or masked LM).

  Yields {'inputs' [B, L], 'labels' [B, 1]} (with ``word_dropout`` > 0, some
  inputs ``<unk>``, ``drop_words``) or, with ``mlm_probability`` > 0,
  {'inputs' [B, L] corrupted, 'mlm_positions' [B, P], 'mlm_targets' [B, P]}.
  """

  def __init__(self, ids: Sequence[np.ndarray], labels: np.ndarray | None, *,
               batch_size: int, buckets: Sequence[int], seed: int,
               group: int = LENGTH_GROUP,
               mlm_probability: float = 0.0, mask_id: int = 0, vocab_size: int = 0,
               word_dropout: float = 0.0):
    if not 0.0 <= word_dropout < 1.0:
      raise ValueError(f'word_dropout must be in [0, 1), got {word_dropout}.')
    if group < 1:
      raise ValueError(f'config.data.length_group must be at least 1, got {group}.')
    self._ids, self._labels = list(ids), labels
    self._rows, self._buckets, self._seed = batch_size, tuple(buckets), seed
    self._group = group
    self._per_epoch = len(self._ids) // (group * batch_size)
    if self._per_epoch == 0:
      group = max(1, len(self._ids) // batch_size)
      self._group, self._per_epoch = group, len(self._ids) // (group * batch_size)
    if self._per_epoch == 0:
      raise ValueError(f'{len(self._ids)} training sentences are fewer than one batch '
                       f'of {batch_size}.')
    self._lengths = np.asarray([len(x) for x in self._ids])
    self._mlm = float(mlm_probability)
    self._mask_id, self._vocab_size = mask_id, vocab_size
    self._word_dropout = float(word_dropout)
    self._batches = 0
    self._chunk_key, self._chunk = None, None

  def __iter__(self) -> 'SentenceBatches':
    return self

  def _chunk_batches(self, epoch: int, chunk: int) -> list[np.ndarray]:
    if self._chunk_key != (epoch, chunk):
      perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._ids))
      size = self._group * self._rows
      members = perm[chunk * size:(chunk + 1) * size]
      members = members[np.argsort(self._lengths[members], kind='stable')]
      batches = [members[i * self._rows:(i + 1) * self._rows] for i in range(self._group)]
      order = np.random.default_rng([self._seed, epoch, chunk]).permutation(self._group)
      self._chunk_key, self._chunk = (epoch, chunk), [batches[i] for i in order]
    return self._chunk

  def __next__(self) -> dict[str, np.ndarray]:
    k = self._batches
    self._batches += 1
    chunk_index, slot = divmod(k, self._group)
    epoch, chunk = divmod(chunk_index, self._per_epoch)
    members = self._chunk_batches(epoch, chunk)[slot]
    rows = [self._ids[i] for i in members]
    length = bucket_for(max(len(r) for r in rows), self._buckets)
    inputs = pad_rows(rows, self._rows, length)
    if self._mlm > 0:
      rng = np.random.default_rng([self._seed, 1, k])
      inputs, positions, targets = mask_tokens(
          inputs, rng, mask_id=self._mask_id, vocab_size=self._vocab_size,
          probability=self._mlm, max_predictions=mlm_predictions(length, self._mlm))
      return {'inputs': inputs, 'mlm_positions': positions, 'mlm_targets': targets}
    if self._word_dropout > 0:
      inputs = drop_words(inputs, np.random.default_rng([self._seed, 3, k]),
                          self._word_dropout)
    return {'inputs': inputs, 'labels': self._labels[members][:, None].astype(np.int32)}

  def _spec(self) -> dict[str, Any]:
    spec = {'rows': self._rows, 'buckets': list(self._buckets), 'group': self._group,
            'sentences': len(self._ids), 'mlm': self._mlm}
    if self._word_dropout:  # Only then, so runs saved before the option still resume.
      spec['word_dropout'] = self._word_dropout
    return spec


class SentenceEvalSet:
  """Ordered dev batches: classification ({'inputs', 'labels'}, padding rows -1) or,
  with ``mlm_probability``, masked-LM batches with a fixed masking per batch."""

  def __init__(self, name: str, ids: Sequence[np.ndarray], labels: np.ndarray, *,
               buckets: Sequence[int], process_index: int = 0, process_count: int = 1,
               mlm_probability: float = 0.0, mask_id: int = 0, vocab_size: int = 0,
               seed: int = 0):
    if not len(ids):
      raise ValueError(f'Empty evaluation set {name!r}.')
    self.name, self._ids, self._labels = name, list(ids), labels
    self._buckets = tuple(buckets)
    self._process_index, self._process_count = process_index, process_count
    self._mlm, self._mask_id, self._vocab_size = float(mlm_probability), mask_id, vocab_size
    self._seed = seed

  def __len__(self) -> int:
    return len(self._ids)

  def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    if batch_size % self._process_count:
      raise ValueError(f'Eval batch size {batch_size} is not a multiple of the '
                       f'{self._process_count} processes.')
    local = batch_size // self._process_count
    for number, start in enumerate(range(0, len(self), batch_size)):
      indices = list(range(start, min(start + batch_size, len(self))))
      length = bucket_for(max(len(self._ids[i]) for i in indices), self._buckets)
      mine = indices[self._process_index * local:(self._process_index + 1) * local]
      inputs = pad_rows([self._ids[i] for i in mine], local, length)
      if self._mlm > 0:
        rng = np.random.default_rng([self._seed, 2, number, self._process_index])
        inputs, positions, targets = mask_tokens(
            inputs, rng, mask_id=self._mask_id, vocab_size=self._vocab_size,
            probability=self._mlm, max_predictions=mlm_predictions(length, self._mlm))
        yield {'inputs': inputs, 'mlm_positions': positions, 'mlm_targets': targets}
        continue
      labels = np.full((local, 1), -1, np.int32)
      labels[:len(mine), 0] = self._labels[mine]
      yield {'inputs': inputs, 'labels': labels}
