"""Transformer (big) on WMT 2014 English->German: Table 2, 28.4 BLEU on newstest2014.

  python -m transformer_jax.main --config=configs/wmt14_en_de_big.py --workdir=runs/ende_big

Paper: 8 P100 GPUs, 300k steps (3.5 days); dev PPL 4.33 / BLEU 26.4 (Table 3);
28.4 tokenized BLEU on newstest2014 after averaging the last 20 checkpoints.
"""

from configs import default


def get_config(arg=None):
  del arg
  config = default.get_config()
  m = config.model  # Table 3, row "big".
  m.d_model = 1024
  m.d_ff = 4096
  m.num_heads = 16  # d_k = d_v = 64.
  m.dropout_rate = 0.3  # Sec 6.1: P_drop 0.3 for EN-DE big.
  config.train.num_steps = 300_000  # Sec 5.2.
  config.eval.average_last = 20  # Sec 6.1.
  return config
