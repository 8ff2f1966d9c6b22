"""A tiny Transformer for tests and smoke runs: seconds per step on one CPU core.

  python -m transformer_jax.main --config=configs/tiny.py --workdir=/tmp/tiny \
      --config.data.train_files='("train.en.gz","train.de.gz")' ...

It learns nothing useful (no BLEU target); it exercises every code path. Heads,
d_ff and the vocabulary are multiples of 8 so any mesh over 8 devices divides them.
"""

from configs import default


def get_config(arg=None):
  del arg
  config = default.get_config()
  m = config.model
  m.num_encoder_layers = 1
  m.num_decoder_layers = 1
  m.d_model = 32
  m.num_heads = 8
  m.head_dim = 4
  m.d_ff = 64
  m.max_len = 64

  d = config.data
  d.source = 'text'
  d.vocab_size = 256
  d.vocab_model_type = 'unigram'
  d.vocab_train_sentences = 2000
  d.max_length = 32
  d.tokens_per_batch = 256
  d.bucket_lengths = (8, 16, 32)
  d.eval_batch_size = 8

  o = config.optim
  o.warmup_steps = 10
  o.learning_rate_scale = 2.0

  t = config.train
  t.num_steps = 20
  t.log_every_steps = 5
  t.eval_every_steps = 10
  t.eval_max_batches = 2
  t.bleu_max_sentences = 8

  c = config.checkpoint
  c.every_steps = 10
  c.every_minutes = 0.0
  c.max_to_keep = 3
  c.async_save = False

  config.eval.beam_size = 2
  config.eval.max_extra_length = 5
  return config
