"""Character-level language model on Tiny Shakespeare (decoder-only family).

  .venv/bin/python -m transformer_jax.main --config=configs/lm_shakespeare.py \
      --workdir=runs/lm_shakespeare
  .venv/bin/python -m transformer_jax.sample --workdir=runs/lm_shakespeare \
      --prompt="ROMEO:" --max_new_tokens=120

nanoGPT's ``shakespeare_char`` split (first 90% of the characters for training, the
last 10% for validation) and random context windows. A pre-LN GPT-style stack of the
paper's decoder layers without cross-attention, learned positions, no dropout, tied
embeddings; sized for a 2-core CPU: 6,000 steps with a cosine decay, at most 20
minutes. Measured on the idle 2-core AMD EPYC: 19 minutes, validation 1.550 nats per
character on the whole split. The paper's inverse square-root decay instead
(``--config.optim.decay=inverse_sqrt``) under the same 20 minutes, with niced jobs
beside it: 5,151 steps, 1.639. The curves are in the README.
"""

from configs import default


def get_config(arg=None):
  del arg
  config = default.get_config()
  m = config.model
  m.family = 'decoder_only'
  m.num_encoder_layers = 1  # Unused by decoder_only.
  m.num_decoder_layers = 4
  m.d_model = 192
  m.num_heads = 6  # Head dim 32.
  m.d_ff = 768
  m.dropout_rate = 0.0  # A short run does not overfit 1M characters.
  m.layer_norm = 'pre'  # GPT-2's placement; trains faster without warm-up tuning.
  m.positions = 'learned'
  m.max_len = 128  # = the context length.

  d = config.data
  d.source = 'char_text'
  d.vocab_size = 72  # 65 characters + 4 specials, to a multiple of 8 (dry runs read it).
  d.text_path = '../shared/data/tinyshakespeare/input.txt.gz'  # Relative to the cwd.
  d.train_fraction = 0.9  # nanoGPT's split: first 90% train, last 10% validation.
  d.context_length = 128  # T: characters per window.
  d.batch_size = 16  # Windows per step (global): 2048 characters.
  d.eval_batch_size = 128  # Validation windows per batch.

  o = config.optim
  # The paper's warm-up, short: peak 0.28 * 192^-0.5 * 100^-0.5 = 2e-3, then a cosine
  # decay to 5% of it at num_steps.
  o.warmup_steps = 100
  o.learning_rate_scale = 0.28
  o.decay = 'cosine'
  o.final_lr_fraction = 0.05
  o.label_smoothing = 0.0  # Report plain nats per character.
  o.clip_grad_norm = 1.0

  t = config.train
  t.num_steps = 6000  # Where the cosine ends.
  t.max_minutes = 20.0  # Ends training on machines slower than the measured one.
  t.log_every_steps = 25
  t.eval_every_steps = 100  # The points of the README curve...
  t.eval_max_batches = 2  # ... on the first 32,768 validation characters (29%).
  t.bleu_every_steps = -1

  c = config.checkpoint
  c.every_steps = 200
  c.every_minutes = 5.0
  c.max_to_keep = 3
  return config
