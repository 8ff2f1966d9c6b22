"""Parallel text -> SentencePiece ids -> length-bucketed or packed batches.

``get_datasets(config, workdir)`` returns the run's tokenizer, an endless training
iterator and the evaluation sets, chosen by ``config.data`` (corpora are read by
``datasets/sources.py``):

* ``source='tfds'``: a TFDS translation dataset (``wmt14_translate/de-en``,
  ``wmt14_translate/fr-en``, ``wmt17_translate/de-en``, ...) in either direction;
* ``source='multi30k'``: our Multi30k builder (``transformer_jax/data/datasets``), read from
  ``config.data.manual_dir`` or ``$MULTI30K_DIR`` when the network is out of reach;
* ``source='text'``: line-aligned files, ``train_files=(source_path, target_path)``.

Training batches (Sec 5.1: batches hold about 25000 source and 25000 target tokens)
come in a few fixed shapes so that the train step compiles once per shape:

* buckets: a pair goes to the smallest length L in ``bucket_lengths`` that holds both
  of its sides; bucket L's batch has ``tokens_per_batch / process_count // L`` rows
  (rounded down to a multiple of ``batch_multiple``), so rows * L target tokens,
  padding included, stay within the per-process budget;
* packing: pairs are packed first-fit into rows of ``max_length`` tokens, with
  segment ids (1, 2, ... per sentence, 0 for padding) and positions restarting at 0.

Determinism and resume: the training pairs form a grain ``MapDataset`` (random
access, shuffled per epoch from ``config.seed``), and the batcher reads it by index.
Its state is the next index plus the indices of the pairs waiting in unfinished
batches (a few integers per pair), so ``set_state(get_state())`` after k batches
continues exactly the stream an uninterrupted run would see. Each process reads
its own slice ``[process_index::process_count]`` of the training pairs.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import grain
import numpy as np

from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.data.datasets import sources

Pair = sources.Pair
Batch = dict[str, np.ndarray]
_STATE_VERSION = 1


# ----------------------------------------------------------------------------------
# Training batches.


def batch_size_for_length(tokens_per_batch: int, length: int, batch_multiple: int = 1) -> int:
  """Rows of a batch padded to ``length``: the token budget // length, rounded down to a
  multiple of ``batch_multiple`` and at least ``batch_multiple``."""
  rows = (tokens_per_batch // length) // batch_multiple * batch_multiple
  return max(rows, batch_multiple)


def bucket_lengths(data_cfg) -> tuple[int, ...]:
  """``config.data.bucket_lengths`` below ``max_length``, then ``max_length`` itself."""
  max_length = int(data_cfg.max_length)
  return tuple(sorted({int(b) for b in data_cfg.bucket_lengths if b < max_length})) + (
      max_length,)


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """How training pairs become batches (per process).

  Attributes:
    lengths: padded lengths (buckets); for packing, the single row length.
    rows: rows of the batch for each length.
    max_length: longest pair side kept (tokens, eos included).
    too_long: 'drop' or 'truncate' pairs with a side over ``max_length``.
    packing: pack pairs into rows with segment ids and positions.
  """
  lengths: tuple[int, ...]
  rows: tuple[int, ...]
  max_length: int
  too_long: str
  packing: bool

  @classmethod
  def from_config(cls, data_cfg, process_count: int = 1, batch_multiple: int = 1) -> 'BatchSpec':
    max_length = int(data_cfg.max_length)
    if data_cfg.too_long not in ('drop', 'truncate'):
      raise ValueError(f"config.data.too_long must be 'drop' or 'truncate', got {data_cfg.too_long!r}.")
    budget = data_cfg.tokens_per_batch // process_count
    if budget < 1:
      raise ValueError(f'config.data.tokens_per_batch={data_cfg.tokens_per_batch} is less '
                       f'than one token per process ({process_count} processes).')
    lengths = (max_length,) if data_cfg.packing else bucket_lengths(data_cfg)
    rows = tuple(batch_size_for_length(budget, length, batch_multiple) for length in lengths)
    return cls(lengths, rows, max_length, data_cfg.too_long, bool(data_cfg.packing))

  def shapes(self) -> list[tuple[int, int]]:
    """Every (B, L) a training batch can have."""
    return list(zip(self.rows, self.lengths))


def _encoder(tokenizer: tokenizer_lib.Tokenizer):
  eos = [tokenizer.eos_id]

  def encode(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(tokenizer.encode(pair[0]) + eos, np.int32),
            np.asarray(tokenizer.encode(pair[1]) + eos, np.int32))
  return encode


def _new_counts() -> dict[str, int]:
  return {'pairs_read': 0, 'batches': 0, 'dropped_too_long': 0, 'truncated': 0,
          'skipped_empty': 0}


def _truncate(ids: np.ndarray, max_length: int) -> np.ndarray:
  return np.concatenate([ids[:max_length - 1], ids[-1:]]) if len(ids) > max_length else ids


class _TokenBatchIterator(grain.DatasetIterator):
  """Reads an endless, shuffled, encoded ``MapDataset`` by index into bucketed or packed batches.

  Written by hand because the waiting (not yet batched) pairs of each bucket come
  from different points of the stream: keeping their indices lets ``set_state``
  fetch them again from the random-access source, where grain's replay-from-parent
  checkpointing (used by its packers) cannot express several open buckets.
  """

  def __init__(self, examples: grain.MapDataset, spec: BatchSpec, epoch_length: int):
    super().__init__()
    self._examples = examples
    self._spec = spec
    self._epoch_length = epoch_length
    self._next_index = 0
    self._counts = _new_counts()
    self._pending: list[list[tuple[int, Any]]] = [[] for _ in spec.lengths]
    self._rows_used: list[list[int]] = []  # packing: [source, target] tokens per row.

  # Reading and filtering.

  def _read(self, index: int):
    """Encoded pair ``index`` after the too-long policy, or None when skipped."""
    source, target = self._examples[index]
    if len(source) <= 1 or len(target) <= 1:  # Only eos: an empty side.
      self._counts['skipped_empty'] += 1
      return None
    max_length = self._spec.max_length
    if len(source) > max_length or len(target) > max_length:
      if self._spec.too_long == 'drop':
        self._counts['dropped_too_long'] += 1
        return None
      self._counts['truncated'] += 1
      source, target = _truncate(source, max_length), _truncate(target, max_length)
    return source, target

  def _add(self, index: int, example) -> Batch | None:
    """Adds an example; returns a batch when one is complete."""
    if self._spec.packing:
      return self._add_packed(index, example)
    length = max(len(example[0]), len(example[1]))
    bucket = next(b for b, l in enumerate(self._spec.lengths) if length <= l)
    self._pending[bucket].append((index, example))
    if len(self._pending[bucket]) < self._spec.rows[bucket]:
      return None
    batch = _pad_batch([e for _, e in self._pending[bucket]], self._spec.rows[bucket],
                       self._spec.lengths[bucket])
    self._pending[bucket] = []
    return batch

  def _add_packed(self, index: int, example) -> Batch | None:
    """First fit: the pair goes to the first row with room for both sides. When no
    row has room and the batch has all its rows, the batch is complete and the pair
    opens the next one."""
    sizes = (len(example[0]), len(example[1]))
    capacity = self._spec.max_length
    row = next((r for r, used in enumerate(self._rows_used)
                if used[0] + sizes[0] <= capacity and used[1] + sizes[1] <= capacity), None)
    batch = None
    if row is None:
      if len(self._rows_used) == self._spec.rows[0]:
        batch = _pack_batch(self._pending[0], self._spec.rows[0], capacity)
        self._pending[0], self._rows_used = [], []
      row = len(self._rows_used)
      self._rows_used.append([0, 0])
    self._rows_used[row][0] += sizes[0]
    self._rows_used[row][1] += sizes[1]
    self._pending[0].append((index, example, row))
    return batch

  def __next__(self) -> Batch:
    while True:
      index = self._next_index
      self._next_index += 1
      self._counts['pairs_read'] += 1
      if self._next_index % self._epoch_length == 0:
        logging.info('Training data: epoch %d done; %s', self._next_index // self._epoch_length,
                     self._counts)
      example = self._read(index)
      if example is None:
        continue
      batch = self._add(index, example)
      if batch is not None:
        self._counts['batches'] += 1
        return batch

  # Checkpointing.

  def get_state(self) -> dict[str, Any]:
    return {
        'version': _STATE_VERSION,
        'spec': _spec_state(self._spec, self._epoch_length),
        'next_index': self._next_index,
        'pending': [[int(p[0]) for p in bucket] for bucket in self._pending],
        'stats': dict(self._counts),
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    expected = _spec_state(self._spec, self._epoch_length)
    saved = state.get('spec')
    if state.get('version') != _STATE_VERSION or saved != expected:
      raise ValueError(
          'The saved data iterator state does not fit this input pipeline '
          f'(saved {saved}, now {expected}); the data config, corpus or process count '
          'changed since the checkpoint.')
    self._next_index = int(state['next_index'])
    self._counts = dict(state['stats'])
    self._pending = [[] for _ in self._spec.lengths]
    self._rows_used = []
    stats = dict(self._counts)
    for indices in state['pending']:
      for index in indices:
        if self._add(int(index), self._read(int(index))) is not None:
          raise ValueError('Corrupt data iterator state: its pending pairs fill a batch.')
    self._counts = stats  # Re-reading pending pairs must not count them twice.


def _spec_state(spec: BatchSpec, epoch_length: int) -> dict[str, Any]:
  return {'lengths': list(spec.lengths), 'rows': list(spec.rows), 'packing': spec.packing,
          'max_length': spec.max_length, 'too_long': spec.too_long,
          'epoch_length': epoch_length}


def _pad_batch(examples, rows: int, length: int) -> Batch:
  """'inputs' [B, L] and 'targets' [B, L], zero (pad) padded."""
  inputs = np.zeros((rows, length), np.int32)
  targets = np.zeros((rows, length), np.int32)
  for row, (source, target) in enumerate(examples):
    inputs[row, :len(source)] = source
    targets[row, :len(target)] = target
  return {'inputs': inputs, 'targets': targets}


def _pack_batch(placed, rows: int, length: int) -> Batch:
  """Packed 'inputs'/'targets' [B, L] with '*_segmentation' (1.., 0 = pad) and '*_position'."""
  batch = {}
  for name in ('inputs', 'targets'):
    for suffix in ('', '_segmentation', '_position'):
      batch[name + suffix] = np.zeros((rows, length), np.int32)
  fill = np.zeros((rows, 2), np.int64)
  segments = np.zeros(rows, np.int32)
  for _, example, row in placed:
    segments[row] += 1
    for side, name in enumerate(('inputs', 'targets')):
      ids, start = example[side], fill[row, side]
      end = start + len(ids)
      batch[name][row, start:end] = ids
      batch[name + '_segmentation'][row, start:end] = segments[row]
      batch[name + '_position'][row, start:end] = np.arange(len(ids))
      fill[row, side] = end
  return batch


class _TokenBatchDataset(grain.IterDataset):
  """``IterDataset`` face of ``_TokenBatchIterator`` (so grain prefetching can wrap it)."""

  def __init__(self, examples: grain.MapDataset, spec: BatchSpec, epoch_length: int):
    super().__init__()
    self._examples, self._spec, self._epoch_length = examples, spec, epoch_length

  def __iter__(self) -> _TokenBatchIterator:
    return _TokenBatchIterator(self._examples, self._spec, self._epoch_length)


def _close_iterators(holder: list) -> None:
  while holder:
    holder.pop().close()


class TrainIterator:
  """Endless training batches with exact checkpointing.

  Attributes:
    spec: the batch shapes (``spec.shapes()``: every (B, L) it yields).
    num_pairs: training pairs this process reads per epoch.
  """

  def __init__(self, pairs: Sequence[Pair], tokenizer: tokenizer_lib.Tokenizer,
               spec: BatchSpec, *, seed: int, process_index: int = 0,
               process_count: int = 1, prefetch: int = 2):
    shard = grain.MapDataset.source(pairs)[process_index::process_count]
    if len(shard) == 0:
      raise ValueError(f'Process {process_index} of {process_count} has no training pairs '
                       f'({len(pairs)} in all).')
    self.spec = spec
    self.num_pairs = len(shard)
    examples = shard.shuffle(seed=seed).repeat().map(_encoder(tokenizer))
    dataset = _TokenBatchDataset(examples, spec, len(shard))
    if prefetch:
      dataset = grain.experimental.ThreadPrefetchIterDataset(
          dataset, prefetch_buffer_size=prefetch)
    # Held in a list that the finalizer empties: grain's prefetch thread must stop
    # (and its iterator be freed) before the interpreter tears modules down.
    self._holder = [iter(dataset)]
    weakref.finalize(self, _close_iterators, self._holder)

  @property
  def _iterator(self):
    if not self._holder:
      raise RuntimeError('The training iterator is closed.')
    return self._holder[0]

  def close(self) -> None:
    """Stops the prefetch thread; the iterator cannot be used afterwards."""
    _close_iterators(self._holder)

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> Batch:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    """Json-able state; ``set_state`` of it resumes exactly after the last batch taken."""
    return self._iterator.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._iterator.set_state(dict(state))

  def stats(self) -> dict[str, int]:
    """Pairs read, batches, and pairs dropped/truncated/skipped so far (for the log)."""
    return dict(self.get_state()['stats'])


# ----------------------------------------------------------------------------------
# Evaluation sets.


class EvalSet:
  """An ordered evaluation split: raw text for BLEU and fixed-shape id batches.

  Attributes:
    name: e.g. 'validation'.
    sources: raw source sentences, in corpus order.
    references: raw target sentences (BLEU references), in corpus order.
  """

  def __init__(self, name: str, pairs: Sequence[Pair], tokenizer: tokenizer_lib.Tokenizer,
               lengths: Sequence[int], *, process_index: int = 0, process_count: int = 1):
    self.name = name
    pairs = [pairs[i] for i in range(len(pairs))]
    self.sources = [p[0] for p in pairs]
    self.references = [p[1] for p in pairs]
    if not pairs:
      raise ValueError(f'Empty corpus: evaluation set {name!r} has no pairs.')
    self._lengths = tuple(lengths)
    max_length = self._lengths[-1]
    eos = [tokenizer.eos_id]
    encoded = [tokenizer.encode_batch(side) for side in (self.sources, self.references)]
    self._ids = [[_truncate(np.asarray(ids + eos, np.int32), max_length) for ids in side]
                 for side in encoded]
    truncated = sum(len(ids) + 1 > max_length for side in encoded for ids in side)
    if truncated:
      logging.warning('Evaluation set %s: %d sentences truncated to %d tokens.', name,
                      truncated, max_length)
    self._process_index, self._process_count = process_index, process_count

  def __len__(self) -> int:
    return len(self.sources)

  def batches(self, batch_size: int) -> Iterator[Batch]:
    """Ordered batches of this process's rows.

    Args:
      batch_size: GLOBAL rows per batch (a multiple of the process count); each
        process gets its contiguous ``batch_size / process_count`` rows.

    Yields:
      'inputs' [B, L], 'targets' [B, L] int32 (L: the smallest bucket length that
      holds the global batch), and 'index' [B]: the sentence's position in
      ``sources``, -1 for the padding rows that fill the last batch.
    """
    if batch_size % self._process_count:
      raise ValueError(f'Eval batch size {batch_size} is not a multiple of the '
                       f'{self._process_count} processes.')
    local = batch_size // self._process_count
    for start in range(0, len(self), batch_size):
      indices = list(range(start, min(start + batch_size, len(self))))
      longest = max(max(len(self._ids[0][i]), len(self._ids[1][i])) for i in indices)
      length = next(l for l in self._lengths if longest <= l)
      mine = indices[self._process_index * local:(self._process_index + 1) * local]
      batch = _pad_batch([(self._ids[0][i], self._ids[1][i]) for i in mine], local, length)
      batch['index'] = np.full((local,), -1, np.int32)
      batch['index'][:len(mine)] = mine
      yield batch


# ----------------------------------------------------------------------------------
# Everything a run needs.


def get_datasets(config, workdir: str | os.PathLike[str], *, process_index: int | None = None,
                 process_count: int | None = None, batch_multiple: int = 1
                 ) -> tuple[tokenizer_lib.Tokenizer, TrainIterator, dict[str, EvalSet]]:
  """Tokenizer, training iterator and evaluation sets for ``config``.

  Args:
    config: the run config (uses ``config.data`` and ``config.seed``).
    workdir: run directory; the vocabulary lives in ``workdir/vocab/spm.model``.
    process_index, process_count: this process and the number of processes
      (default: ``jax.process_index()`` / ``jax.process_count()``).
    batch_multiple: every training batch size is a multiple of it (the local
      devices along the batch axes).

  Returns:
    ``(tokenizer, train_iter, eval_sets)``: ``train_iter`` is a ``TrainIterator``;
    ``eval_sets`` maps 'validation' and 'test' (those the config names) to ``EvalSet``.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  data_cfg = config.data
  train_pairs = sources.load_pairs(data_cfg, 'train')
  tokenizer = tokenizer_lib.load_or_train_tokenizer(
      data_cfg, workdir, sources.vocab_sample(train_pairs, data_cfg.vocab_train_sentences),
      process_index=process_index)
  spec = BatchSpec.from_config(data_cfg, process_count, batch_multiple)
  train_iter = TrainIterator(train_pairs, tokenizer, spec, seed=config.seed,
                             process_index=process_index, process_count=process_count,
                             prefetch=data_cfg.get('prefetch', 2))
  lengths = bucket_lengths(data_cfg)
  eval_sets = {}
  for role in ('validation', 'test'):
    pairs = sources.load_pairs(data_cfg, role)
    if pairs is not None:
      eval_sets[role] = EvalSet(role, pairs, tokenizer, lengths,
                                process_index=process_index, process_count=process_count)
  logging.info('Data: %d training pairs (%d on this process), batch shapes %s, '
               'vocabulary %s; evaluation sets %s.', len(train_pairs), train_iter.num_pairs,
               spec.shapes(), tokenizer.fingerprint(),
               {k: len(v) for k, v in eval_sets.items()})
  return tokenizer, train_iter, eval_sets

