"""Table 3 of the paper: variations on the base model, EN-DE, newstest2013 (dev).

One variant per row, chosen by the config argument:

  python -m transformer_jax.main --config=configs/table3.py:C_N2 --workdir=/tmp/C_N2

Every row trains like the base model (100k steps, ~25k source + 25k target tokens
a batch, 8 P100s in the paper) except ``big`` (300k steps), and is scored on the dev
set (newstest2013) with no checkpoint averaging. Perplexity is per word-piece.

  variant        change from base                   dev PPL  dev BLEU  params
  base           (N 6, d_model 512, d_ff 2048, h 8)    4.92     25.8    65M
  A_h1           h=1,  d_k=d_v=512                      5.29     24.9
  A_h4           h=4,  d_k=d_v=128                      5.00     25.5
  A_h16          h=16, d_k=d_v=32                       4.91     25.8
  A_h32          h=32, d_k=d_v=16                       5.01     25.4
  B_dk16         d_k=16 (d_v stays 64)                  5.16     25.1    58M
  B_dk32         d_k=32 (d_v stays 64)                  5.01     25.4    60M
  C_N2           N=2                                    6.11     23.7    36M
  C_N4           N=4                                    5.19     25.3    50M
  C_N8           N=8                                    4.88     25.5    80M
  C_d256         d_model=256, d_k=d_v=32                5.75     24.5    28M
  C_d1024        d_model=1024, d_k=d_v=128              4.66     26.0   168M
  C_dff1024      d_ff=1024                              5.12     25.4    53M
  C_dff4096      d_ff=4096                              4.75     26.2    90M
  D_drop0        P_drop=0.0                             5.77     24.6
  D_drop02       P_drop=0.2                             4.95     25.5
  D_ls0          eps_ls=0.0                             4.67     25.3
  D_ls02         eps_ls=0.2                             5.47     25.7
  E_learned_pos  learned positional embedding           4.92     25.7
  big            N 6, d_model 1024, d_ff 4096, h 16,    4.33     26.4   213M
                 P_drop 0.3, 300k steps

The same figures live in ``ROWS`` below, where tests read them. Our counts, with a
37000-token shared vocabulary, run up to 7% below the paper's (base 63.1M vs 65M,
C_N2 33.7M vs 36M; big 214.2M vs 213M), whose exact vocabulary size is not stated.
"""

import dataclasses
from typing import Any

from configs import wmt14_en_de_base
from configs import wmt14_en_de_big


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of Table 3: what changes from the base config, and the paper's result."""
  model: dict[str, Any]  # Overrides of config.model.
  dev_ppl: float  # Paper: newstest2013 perplexity per word-piece.
  dev_bleu: float  # Paper: newstest2013 BLEU.
  params_m: float | None = None  # Paper: parameters in millions, where given.
  optim: dict[str, Any] = dataclasses.field(default_factory=dict)


ROWS: dict[str, Row] = {
    'base': Row({}, 4.92, 25.8, 65),
    # (A) heads, keeping the computation constant: d_k = d_v = d_model / h.
    'A_h1': Row(dict(num_heads=1, head_dim=512), 5.29, 24.9),
    'A_h4': Row(dict(num_heads=4, head_dim=128), 5.00, 25.5),
    'A_h16': Row(dict(num_heads=16, head_dim=32), 4.91, 25.8),
    'A_h32': Row(dict(num_heads=32, head_dim=16), 5.01, 25.4),
    # (B) smaller attention keys only: the table leaves d_v at the base 64.
    'B_dk16': Row(dict(key_dim=16), 5.16, 25.1, 58),
    'B_dk32': Row(dict(key_dim=32), 5.01, 25.4, 60),
    # (C) model size.
    'C_N2': Row(dict(num_encoder_layers=2, num_decoder_layers=2), 6.11, 23.7, 36),
    'C_N4': Row(dict(num_encoder_layers=4, num_decoder_layers=4), 5.19, 25.3, 50),
    'C_N8': Row(dict(num_encoder_layers=8, num_decoder_layers=8), 4.88, 25.5, 80),
    'C_d256': Row(dict(d_model=256, head_dim=32), 5.75, 24.5, 28),
    'C_d1024': Row(dict(d_model=1024, head_dim=128), 4.66, 26.0, 168),
    'C_dff1024': Row(dict(d_ff=1024), 5.12, 25.4, 53),
    'C_dff4096': Row(dict(d_ff=4096), 4.75, 26.2, 90),
    # (D) regularisation.
    'D_drop0': Row(dict(dropout_rate=0.0), 5.77, 24.6),
    'D_drop02': Row(dict(dropout_rate=0.2), 4.95, 25.5),
    'D_ls0': Row({}, 4.67, 25.3, optim=dict(label_smoothing=0.0)),
    'D_ls02': Row({}, 5.47, 25.7, optim=dict(label_smoothing=0.2)),
    # (E) learned instead of sinusoidal positions (Sec 3.5).
    'E_learned_pos': Row(dict(positions='learned'), 4.92, 25.7),
    # The big model (Sec 6.1, Table 3 last row).
    # configs/wmt14_en_de_big.py: d_model 1024, d_ff 4096, h 16, P_drop 0.3, 300k steps.
    'big': Row({}, 4.33, 26.4, 213),
}


def get_config(arg=None):
  """The Table 3 row named by ``arg`` (see the table above)."""
  if arg not in ROWS:
    raise ValueError(f'configs/table3.py needs a row name after ":", one of '
                     f'{", ".join(ROWS)}; got {arg!r}.')
  row = ROWS[arg]
  table2 = wmt14_en_de_big if arg == 'big' else wmt14_en_de_base
  config = table2.get_config()
  config.model.update(row.model)
  config.optim.update(row.optim)
  config.eval.average_last = 1  # Table 3 is reported without checkpoint averaging.
  return config
