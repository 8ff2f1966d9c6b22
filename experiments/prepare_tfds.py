"""Downloads and prepares the TFDS dataset a config trains on, once, before training.

  python experiments/prepare_tfds.py --config=configs/wmt14_en_de_base.py \
      --data_dir=gs://my-bucket/tensorflow_datasets

Multi-host launches run this on one machine first, so the processes that start
together find the prepared dataset instead of racing to build it. Configs whose data
come from text files or a local folder need nothing here.
"""

import pathlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import tensorflow_datasets as tfds

# Config files import their base (``from configs import default``) from the checkout.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir (local or gs://).')


def main(argv):
  del argv
  data = _CONFIG.value.data
  if data.source != 'tfds':
    print(f'data.source={data.source!r}: nothing to prepare.')
    return
  data_dir = _DATA_DIR.value or data.data_dir
  builder = tfds.builder(data.tfds_name, data_dir=data_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=data.manual_dir)
  builder.download_and_prepare(download_config=download_config)
  print(f'{data.tfds_name} ready in {builder.data_dir}: {builder.info.splits}')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
