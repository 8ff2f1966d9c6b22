"""Sentence classification on GLUE SST-2 (encoder-only family), optionally after
masked-LM pre-training on the training sentences.

From scratch:

  .venv/bin/python -m transformer_jax.main --config=configs/sst2.py --workdir=runs/sst2

Masked-LM pre-training (BERT's 15% with 80/10/10), then fine-tuning from it:

  .venv/bin/python -m transformer_jax.main --config=configs/sst2.py:mlm \
      --workdir=runs/sst2_mlm
  .venv/bin/python -m transformer_jax.main --config=configs/sst2.py \
      --config.train.init_from=runs/sst2_mlm --workdir=runs/sst2_finetuned
  echo "a gorgeous , witty , seductive movie ." | \
      .venv/bin/python -m transformer_jax.classify --workdir=runs/sst2

67,349 training and 872 dev sentences (GLUE's split), a shared 8k SentencePiece
vocabulary (+ [MASK]), a small pre-LN encoder with [CLS] pooling. Measured on the
2-core AMD EPYC with 10-minute budgets (README): 79.2% dev accuracy from scratch with
dropout 0.3 (best 80.0% during the run), 79.6% fine-tuned after 10 minutes of
masked-LM pre-training (best 80.2%), short of the 82% target.
"""

from configs import default


def get_config(arg=None):
  config = default.get_config()
  m = config.model
  m.family = 'encoder_only'
  m.num_encoder_layers = 3
  m.num_decoder_layers = 1  # Unused by encoder_only.
  m.d_model = 192
  m.num_heads = 6
  m.d_ff = 768
  m.dropout_rate = 0.1
  m.layer_norm = 'pre'
  m.positions = 'learned'
  m.max_len = 64
  m.num_classes = 2
  m.pooling = 'cls'  # The [CLS] (bos) token in front of every sentence.

  d = config.data
  d.source = 'labelled_tsv'
  d.data_dir = '../shared/data/sst2'  # Relative to the cwd.
  d.train_file = 'train.tsv.gz'
  d.eval_file = 'dev.tsv.gz'
  d.vocab_size = 8000  # The model's ids: 7,999 SentencePiece pieces + [MASK].
  d.vocab_model_type = 'unigram'
  d.vocab_train_sentences = 67_349
  d.max_length = 64  # [CLS] + pieces; the longest dev sentence needs ~60.
  d.bucket_lengths = (16, 32, 48)
  d.batch_size = 64  # Sentences per step (global).
  d.eval_batch_size = 128
  d.mlm_probability = 0.15  # Used by train.task='mlm' (BERT Sec 3.1).
  d.label_names = ('negative', 'positive')  # GLUE SST-2: label 0, label 1.

  o = config.optim
  # Peak 0.5 * 192^-0.5 * 300^-0.5 = 2.1e-3, then the paper's 1/sqrt decay.
  o.warmup_steps = 300
  o.learning_rate_scale = 0.5
  o.label_smoothing = 0.0
  o.clip_grad_norm = 1.0

  t = config.train
  t.num_steps = 3000
  t.log_every_steps = 50
  t.eval_every_steps = 200  # Dev loss and accuracy.
  t.bleu_every_steps = -1

  c = config.checkpoint
  c.every_steps = 500
  c.every_minutes = 5.0
  c.max_to_keep = 3

  if arg == 'mlm':
    t.task = 'mlm'
    d.batch_size = 128
    o.learning_rate_scale = 0.5
  elif arg:
    raise ValueError(f'configs/sst2.py takes no argument or "mlm", got {arg!r}.')
  return config
