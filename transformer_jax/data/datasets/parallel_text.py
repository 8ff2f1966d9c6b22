"""Line-aligned parallel text files (plain or gzip): read, check, and pair them.

Line ``i`` of the source file translates line ``i`` of the target file. Reading
checks what silently ruins a corpus: files of different lengths (misalignment),
bytes that are not UTF-8 (reported with file and line), and empty lines (the pair
is skipped and counted, since one empty side cannot be a translation).
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import os
from collections.abc import Iterator

from absl import logging

_GZIP_MAGIC = b'\x1f\x8b'


@dataclasses.dataclass
class ParallelText:
  """Sentence pairs read from two files.

  Attributes:
    pairs: (source, target) strings, stripped of surrounding whitespace.
    skipped_empty: 1-based line numbers of pairs skipped for an empty side.
    paths: (source path, target path).
  """
  pairs: list[tuple[str, str]]
  skipped_empty: list[int]
  paths: tuple[str, str]


def _open_binary(path: str, role: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{role} file not found: {path}')
  with open(path, 'rb') as f:
    magic = f.read(2)
  return gzip.open(path, 'rb') if magic == _GZIP_MAGIC else open(path, 'rb')


def read_lines(path: str | os.PathLike[str], role: str = 'Text') -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, line without its line ending) of a text file.

  Raises:
    FileNotFoundError: ``path`` does not exist (the message names ``role``).
    ValueError: a line is not UTF-8 (the message names file and line).
  """
  path = os.fspath(path)
  with _open_binary(path, role) as f:
    for number, raw in enumerate(f, start=1):
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise ValueError(
            f'{path}, line {number}: not valid UTF-8 ({e.reason} at byte {e.start}: '
            f'{raw[max(0, e.start - 10):e.start + 10]!r}).') from None
      yield number, line.rstrip('\r\n')


def read_parallel(source_path: str | os.PathLike[str],
                  target_path: str | os.PathLike[str]) -> ParallelText:
  """Reads two line-aligned files into sentence pairs.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: the files have different line counts, a line is not UTF-8, or no
      pair is left (empty corpus).
  """
  source_path, target_path = os.fspath(source_path), os.fspath(target_path)
  pairs, skipped = [], []
  source_lines = read_lines(source_path, 'Source')
  target_lines = read_lines(target_path, 'Target')
  for src, tgt in itertools.zip_longest(source_lines, target_lines):
    if src is None or tgt is None:
      longer, count = (target_path, tgt[0]) if src is None else (source_path, src[0])
      raise ValueError(
          f'Misaligned parallel files: {longer} has more lines (line {count} exists) '
          f'than {source_path if src is None else target_path} '
          f'({len(pairs) + len(skipped)} lines).')
    number, src_text = src
    src_text, tgt_text = src_text.strip(), tgt[1].strip()
    if not src_text or not tgt_text:
      skipped.append(number)
      continue
    pairs.append((src_text, tgt_text))
  if skipped:
    logging.warning('Skipped %d pairs with an empty side in %s / %s (lines %s%s).',
                    len(skipped), source_path, target_path,
                    ', '.join(map(str, skipped[:10])), ', ...' if len(skipped) > 10 else '')
  if not pairs:
    raise ValueError(f'Empty corpus: no sentence pairs in {source_path} / {target_path}'
                     f'{f" ({len(skipped)} empty pairs skipped)" if skipped else ""}.')
  return ParallelText(pairs=pairs, skipped_empty=skipped, paths=(source_path, target_path))
