"""Row F: post-2017 options beside the paper's choices, on Multi30k at equal budget.

  MULTI30K_DIR=../shared/data/multi30k python -m transformer_jax.main \
      --config=configs/modern.py:rope --workdir=/tmp/modern-rope

The argument names a variant (``VARIANTS`` below); ``VARIANT,cap16`` trains only on
pairs whose source and target have at most 16 tokens (eos included), for the
length-generalisation study. ``experiments/modern_study.py`` runs every row and
writes the README's tables (README, "Row F"). The model is a small one, sized for
many short runs on the shared 2-core CPU: 2+2 layers, d_model 128, 4 heads, d_ff 512,
the shared 8k vocabulary, packed rows of ~1k tokens a side; every variant gets the same
300 steps (about 0.8 epochs) and batch size.
"""

import os

from configs import default

# config.model overrides of each variant; 'paper' is the paper's configuration.
VARIANTS = {
    'paper': {},
    'learned': dict(positions='learned'),
    'rope': dict(positions='rope'),
    'alibi': dict(positions='alibi'),
    'rmsnorm': dict(norm='rmsnorm'),
    'swiglu': dict(feed_forward='swiglu'),
    'geglu': dict(feed_forward='geglu'),
    'pre_ln': dict(layer_norm='pre'),
    'no_bias': dict(use_bias=False),
    # The modern combination (LLaMA-style): pre-LN, RMSNorm, SwiGLU, RoPE.
    'modern': dict(layer_norm='pre', norm='rmsnorm', feed_forward='swiglu',
                   positions='rope'),
}


def get_config(arg=None):
  variant, *options = (arg or 'paper').split(',')
  if variant not in VARIANTS:
    raise ValueError(f'configs/modern.py: unknown variant {variant!r}; expected one of '
                     f'{sorted(VARIANTS)}.')
  # Every value the study depends on is set here (not inherited from multi30k.py),
  # so a rerun trains the same models.
  config = default.get_config()
  m = config.model
  m.num_encoder_layers = 2
  m.num_decoder_layers = 2
  m.d_model = 128
  m.num_heads = 4  # d_k = 32.
  m.d_ff = 512
  m.max_len = 256  # Covers the longest evaluation inputs (learned table rows).
  m.update(VARIANTS[variant])

  d = config.data
  # Plain files, no TFDS preparation: every run reads the same lines.
  root = os.environ.get('MULTI30K_DIR', '../shared/data/multi30k')
  d.source = 'text'
  d.vocab_size = 8000
  d.vocab_train_sentences = 29_000  # The whole training set.
  d.train_files = (f'{root}/train.en.gz', f'{root}/train.de.gz')
  d.eval_files = (f'{root}/val.en.gz', f'{root}/val.de.gz')
  d.test_files = (f'{root}/test2016.en.gz', f'{root}/test2016.de.gz')
  # Packed rows: one batch shape, so one compile per run (and packed RoPE/ALiBi
  # positions exercised in training).
  d.packing = True
  d.max_length = 64  # Longest Multi30k training pair: 57 tokens.
  d.tokens_per_batch = 1024  # 16 rows of 64 tokens a side.
  d.bucket_lengths = (64,)  # Dev-loss and decoding buckets: few compiles.
  d.eval_batch_size = 64
  for option in options:
    if option.startswith('cap'):
      # Length cap: longer pairs are dropped from training (and dev loss sees
      # only their first tokens; the length study decodes whole sentences).
      d.max_length = int(option[3:])
      d.bucket_lengths = (d.max_length, 64)
    else:
      raise ValueError(f'configs/modern.py: unknown option {option!r} (expected capN).')

  o = config.optim
  o.warmup_steps = 100
  o.learning_rate_scale = 0.4  # Peak 0.4 * 128^-0.5 * 100^-0.5 = 0.0035.

  t = config.train
  t.num_steps = 300  # The equal budget of every row (~0.8 epochs).
  t.log_every_steps = 50
  t.eval_every_steps = 300
  t.bleu_every_steps = -1  # BLEU comes from experiments/modern_study.py.

  c = config.checkpoint
  c.every_steps = 300
  c.every_minutes = 0.0
  c.max_to_keep = 1
  e = config.eval
  e.beam_size = 4  # Sec 6.1: beam 4, alpha 0.6, output <= input + 50.
  e.length_penalty = 0.6
  e.max_extra_length = 50
  e.average_last = 1  # Decode with the last parameters.
  return config
