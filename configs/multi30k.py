"""Transformer-Tiny on Multi30k English->German: at most an hour of training on a 2-core CPU.

  MULTI30K_DIR=../shared/data/multi30k .venv/bin/python -m transformer_jax.main \
      --config=configs/multi30k.py --workdir=runs/multi30k

The model and recipe of Wu et al. 2021 ("Good for Misconceived Reasons",
Transformer-Tiny, 41.0 BLEU on lower-cased, Moses-tokenized test2016 after 8k
updates): 4+4 layers, d_model 128, d_ff 256, 4 heads, dropout 0.3, shared 8k BPE
vocabulary, ~4k tokens a batch, beam 5, the average of the last 10 checkpoints.
Training ends after ``train.max_minutes`` (60) or at ``train.num_steps`` (Wu et al.'s
8k updates), whichever comes first; on a 2-core CPU the time budget ends it. Then
the final BLEU (validation and test2016, every metric) with the average of the
last 10 checkpoints. Measured results: README, Results.
"""

from configs import default


def get_config(arg=None):
  del arg
  config = default.get_config()
  m = config.model
  m.num_encoder_layers = 4
  m.num_decoder_layers = 4
  m.d_model = 128
  m.num_heads = 4  # d_k = 32.
  m.d_ff = 256
  m.dropout_rate = 0.3  # Wu et al.'s Transformer-Tiny; the paper's base uses 0.1.
  m.max_len = 128

  d = config.data
  d.source = 'multi30k'
  d.vocab_size = 8000
  d.vocab_train_sentences = 29_000  # The whole training set.
  d.max_length = 100
  d.tokens_per_batch = 4096  # Padded target (and source) tokens a step, as fairseq's 4096.
  d.bucket_lengths = (16, 24, 32, 48, 64, 100)
  d.eval_batch_size = 128

  o = config.optim
  # The paper's schedule with a short warm-up: 29k pairs give ~100 steps an epoch.
  # Peak lr 0.6 * 128^-0.5 * 400^-0.5 = 0.0027 at step 400, then the paper's
  # inverse square-root decay (the schedule does not depend on num_steps).
  o.warmup_steps = 400
  o.learning_rate_scale = 0.6

  t = config.train
  t.num_steps = 8000  # Wu et al.'s updates; max_minutes usually ends the run first.
  t.max_minutes = 60.0  # Training time budget; the final BLEU runs after it.
  t.log_every_steps = 50
  t.eval_every_steps = 500
  t.bleu_every_steps = 0  # BLEU (beam 5) on validation and test2016 at the end.

  c = config.checkpoint
  c.every_steps = 100  # About an epoch; the last 10 are averaged for decoding.
  c.every_minutes = 0.0
  c.max_to_keep = 10

  e = config.eval
  e.beam_size = 5  # Wu et al.
  e.average_last = 10  # Wu et al.: the average of the last 10 checkpoints.
  return config
