"""Transformer (base) on WMT 2014 English->German: Table 2, 27.3 BLEU on newstest2014.

  python -m transformer_jax.main --config=configs/wmt14_en_de_base.py --workdir=runs/ende_base

Paper: 8 P100 GPUs, 100k steps of ~25000 source + ~25000 target tokens, 12 hours;
newstest2013 (dev) PPL 4.92 / BLEU 25.8 without averaging (Table 3); 27.3 tokenized
BLEU on newstest2014 after averaging the last 5 checkpoints (10-minute intervals),
beam 4, alpha 0.6. On fewer devices keep the 25k-token batch with
``--config.optim.grad_accum_steps=K`` and ``--config.data.tokens_per_batch=25000/K``.
"""

from configs import default


def get_config(arg=None):
  del arg
  config = default.get_config()  # Defaults are the base model on EN-DE.
  config.train.num_steps = 100_000  # Sec 5.2.
  config.eval.average_last = 5  # Sec 6.1.
  return config
