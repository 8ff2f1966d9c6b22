"""Parallel corpora as random-access sequences of (source, target) sentence pairs.

``load_pairs(config.data, role)`` reads the pairs of a role ('train', 'validation',
'test') from the source ``config.data.source`` names:

* 'tfds': a TFDS translation dataset through ``tfds.data_source`` (array_record
  files, random access), e.g. ``wmt14_translate/de-en`` in either direction;
* 'multi30k': our Multi30k builder (``datasets/multi30k.py``), from
  ``config.data.manual_dir`` or ``$MULTI30K_DIR`` when the network is out of reach;
* 'text': line-aligned files (``datasets/parallel_text.py``).

Random access lets grain shuffle globally and lets a checkpoint name pairs by index.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from transformer_jax.data.datasets import parallel_text

Pair = tuple[str, str]


def _as_text(value, where: str) -> str:
  if isinstance(value, bytes):
    try:
      value = value.decode('utf-8')
    except UnicodeDecodeError as e:
      raise ValueError(f'{where}: not valid UTF-8 ({e.reason} at byte {e.start}).') from None
  return str(value).strip()


class _TfdsPairs(Sequence):
  """(source, target) view of a TFDS translation data source (``{'en': b'..', 'de': ..}``)."""

  def __init__(self, source, source_lang: str, target_lang: str, name: str):
    self._source = source
    self._langs = (source_lang, target_lang)
    self._name = name
    if len(source) == 0:
      raise ValueError(f'Empty corpus: {name} has no examples.')
    missing = [lang for lang in self._langs if lang not in source[0]]
    if missing:
      raise ValueError(f'{name} has no language {missing} (its examples have '
                       f'{sorted(source[0])}); check config.data.source_lang/target_lang.')

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Pair:
    # Sequence's __iter__ stops on IndexError; array_record raises ValueError.
    if not -len(self) <= index < len(self):
      raise IndexError(f'{self._name} has {len(self)} examples, not index {index}.')
    example = self._source[index % len(self)]
    where = f'{self._name} example {index}'
    return (_as_text(example[self._langs[0]], f'{where} ({self._langs[0]})'),
            _as_text(example[self._langs[1]], f'{where} ({self._langs[1]})'))


def _tfds_pairs(data_cfg, split: str) -> _TfdsPairs:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = data_cfg.tfds_name
  prepare = {}
  if data_cfg.manual_dir:
    prepare['download_config'] = tfds.download.DownloadConfig(manual_dir=data_cfg.manual_dir)
  try:
    source = tfds.data_source(name, split=split, data_dir=data_cfg.data_dir,
                              download_and_prepare_kwargs=prepare or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'Unknown TFDS dataset {name!r} (config.data.tfds_name).') from e
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f'Could not prepare TFDS {name} split {split!r} in data_dir '
        f'{data_cfg.data_dir or "~/tensorflow_datasets"}: {type(e).__name__}: {e}\n'
        'WMT sources need internet access to download; otherwise prepare the dataset '
        'where there is and point config.data.data_dir at it, or give the raw files '
        'in config.data.manual_dir.') from e
  return _TfdsPairs(source, data_cfg.source_lang, data_cfg.target_lang, f'{name}[{split}]')


def _multi30k_pairs(data_cfg, split: str) -> _TfdsPairs:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from transformer_jax.data.datasets import multi30k  # pylint: disable=g-import-not-at-top
  manual_dir = data_cfg.manual_dir or os.environ.get('MULTI30K_DIR')
  if manual_dir and not os.path.isdir(manual_dir):
    raise FileNotFoundError(f'Multi30k manual_dir not found: {manual_dir} '
                            '(config.data.manual_dir or $MULTI30K_DIR).')
  builder = multi30k.Multi30k(data_dir=data_cfg.data_dir, file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  for lang in (data_cfg.source_lang, data_cfg.target_lang):
    if lang not in multi30k.LANGUAGES:
      raise ValueError(f'Multi30k has languages {multi30k.LANGUAGES}, not {lang!r}.')
  return _TfdsPairs(builder.as_data_source(split), data_cfg.source_lang,
                    data_cfg.target_lang, f'multi30k[{split}]')


def _text_pairs(files, key: str) -> list[Pair]:
  if not files or len(files) != 2:
    raise ValueError(f'config.data.{key} must be (source_path, target_path), got {files!r}.')
  return parallel_text.read_parallel(*files).pairs


_SPLITS = {'train': ('train_split', 'train_files'),
           'validation': ('eval_split', 'eval_files'),
           'test': ('test_split', 'test_files')}


def load_pairs(data_cfg, role: str) -> Sequence[Pair] | None:
  """The (source, target) pairs of ``role`` ('train', 'validation' or 'test').

  Returns None for an evaluation role the config leaves out (no ``eval_files`` /
  empty ``eval_split``).
  """
  split_key, files_key = _SPLITS[role]
  if data_cfg.source == 'text':
    files = data_cfg.get(files_key)
    if files is None and role != 'train':
      return None
    return _text_pairs(files, files_key)
  split = data_cfg.get(split_key)
  if not split:
    if role == 'train':
      raise ValueError(f'config.data.{split_key} is empty.')
    return None
  if data_cfg.source == 'tfds':
    return _tfds_pairs(data_cfg, split)
  if data_cfg.source == 'multi30k':
    return _multi30k_pairs(data_cfg, split)
  raise ValueError(f"config.data.source must be 'tfds', 'multi30k' or 'text', "
                   f'got {data_cfg.source!r}.')


def vocab_sample(pairs: Sequence[Pair], num_sentences: int) -> Callable[[], Iterator[str]]:
  """Sentences of both sides of up to ``num_sentences / 2`` pairs spread evenly over the corpus."""
  def sentences():
    count = min(len(pairs), max(1, num_sentences // 2))
    for index in np.linspace(0, len(pairs) - 1, count).astype(np.int64):
      source, target = pairs[int(index)]
      yield source
      yield target
  return sentences
