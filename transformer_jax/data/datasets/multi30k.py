"""TFDS builder for Multi30k task 1, English-German (Elliott et al., 2016).

Splits: train (29,000 pairs), validation (1,014, the official ``val``) and test
(1,000, ``test_2016_flickr``), raw untokenized image descriptions. The builder
downloads the official gzip files from the multi30k/dataset repository (pinned to
a commit; checksums in ``checksums.tsv`` beside this file). Where the network is
out of reach it reads them from ``manual_dir``, which may use the official names
(``test_2016_flickr.en.gz``) or the short ones (``test2016.en.gz``)::

  builder = Multi30k(data_dir=..., file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir='../shared/data/multi30k'))
  train = builder.as_data_source('train')   # train[i] == {'en': ..., 'de': ...}

Importing this module registers the name ``multi30k`` with TFDS.
"""

from __future__ import annotations

import os

from etils import epath
import tensorflow_datasets as tfds

from transformer_jax.data.datasets import parallel_text

# Snapshot commit of github.com/multi30k/dataset; pinning it keeps the checksums valid.
_COMMIT = 'a3d2e0d26b56f3846f66a952536ffed4e401d05a'
_URL = f'https://raw.githubusercontent.com/multi30k/dataset/{_COMMIT}/data/task1/raw/'
LANGUAGES = ('en', 'de')
# TFDS split -> official file stem, and other stems accepted in manual_dir.
_SPLIT_FILES = {
    'train': ('train',),
    'validation': ('val',),
    'test': ('test_2016_flickr', 'test2016'),
}

_CITATION = """\
@inproceedings{elliott-etal-2016-multi30k,
  title = {Multi30K: Multilingual English-German Image Descriptions},
  author = {Elliott, Desmond and Frank, Stella and Sima'an, Khalil and Specia, Lucia},
  booktitle = {Proceedings of the 5th Workshop on Vision and Language},
  year = {2016},
  pages = {70--74},
}"""


def _local_files(folder: str) -> dict[str, dict[str, str]] | None:
  """{split: {lang: path}} when ``folder`` holds every split, else None."""
  found = {}
  for split, stems in _SPLIT_FILES.items():
    for stem in stems:
      paths = {lang: os.path.join(folder, f'{stem}.{lang}.gz') for lang in LANGUAGES}
      if all(os.path.isfile(p) for p in paths.values()):
        found[split] = paths
        break
    else:
      return None
  return found


class Multi30k(tfds.core.GeneratorBasedBuilder):
  """Multi30k task 1: English-German translations of Flickr30K image descriptions."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Task 1 en-de raw text: train, val, test2016.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Only needed without internet access: put train, val and test_2016_flickr '
      '(or test2016) .en.gz/.de.gz from github.com/multi30k/dataset '
      'data/task1/raw/ in manual_dir.')

  # TFDS finds checksums.tsv through code_path; its default lookup needs the
  # `importlib_resources` backport (absent on Python >= 3.9) for packages outside TFDS.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Multi30k task 1: English-German image descriptions (raw text).',
        features=tfds.features.Translation(languages=LANGUAGES),
        supervised_keys=LANGUAGES,
        homepage='https://github.com/multi30k/dataset',
        citation=_CITATION,
        # Keep the official line order, so test example i is line i of the files.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    files = None
    try:
      files = _local_files(os.fspath(dl_manager.manual_dir))
    except AssertionError:  # manual_dir missing or empty: download instead.
      pass
    if files is None:
      urls = {split: {lang: f'{_URL}{stems[0]}.{lang}.gz' for lang in LANGUAGES}
              for split, stems in _SPLIT_FILES.items()}
      try:
        files = dl_manager.download(urls)
      except Exception as e:  # pylint: disable=broad-except
        raise RuntimeError(
            f'Could not download Multi30k from {_URL} ({type(e).__name__}: {e}). '
            'Without internet access, set manual_dir (config.data.manual_dir or '
            'MULTI30K_DIR) to a folder with train/val/test2016 .en.gz and .de.gz.'
        ) from e
    return {split: self._generate_examples(paths) for split, paths in files.items()}

  def _generate_examples(self, paths):
    corpus = parallel_text.read_parallel(os.fspath(paths['en']), os.fspath(paths['de']))
    for i, (en, de) in enumerate(corpus.pairs):
      yield i, {'en': en, 'de': de}
