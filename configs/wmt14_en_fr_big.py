"""Transformer (big) on WMT 2014 English->French: Table 2, 41.8 BLEU (41.0 in the NeurIPS text).

  python -m transformer_jax.main --config=configs/wmt14_en_fr_big.py --workdir=runs/enfr_big

Paper: P_drop 0.1 for this model (Sec 6.1), 300k steps, last 20 checkpoints averaged.
"""

from configs import wmt14_en_fr_base


def get_config(arg=None):
  del arg
  config = wmt14_en_fr_base.get_config()
  m = config.model  # Table 3, row "big".
  m.d_model = 1024
  m.d_ff = 4096
  m.num_heads = 16
  m.dropout_rate = 0.1  # Sec 6.1: EN-FR big uses 0.1, not 0.3.
  config.train.num_steps = 300_000
  config.eval.average_last = 20
  return config
