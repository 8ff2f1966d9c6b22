"""Transformer (base) on WMT 2014 English->French: Table 2, 38.1 BLEU on newstest2014.

  python -m transformer_jax.main --config=configs/wmt14_en_fr_base.py --workdir=runs/enfr_base

Paper: 36M sentence pairs, a 32000 word-piece vocabulary (Sec 5.1), 100k steps,
last 5 checkpoints averaged.
"""

from configs import default


def get_config(arg=None):
  del arg
  config = default.get_config()
  d = config.data
  d.tfds_name = 'wmt14_translate/fr-en'
  d.source_lang = 'en'
  d.target_lang = 'fr'
  d.vocab_size = 32000  # Sec 5.1: 32000 word-piece vocabulary.
  d.vocab_model_type = 'unigram'  # Word-pieces rather than BPE.
  config.train.num_steps = 100_000
  config.eval.average_last = 5
  return config
