"""Shared defaults: the paper's base Transformer on WMT14 English->German.

Every experiment config starts from ``get_config()`` here and changes only what
differs. Launch (the paper's base model; see configs/wmt14_en_de_base.py):

  python -m transformer_jax.main --config=configs/wmt14_en_de_base.py --workdir=/tmp/base
"""

import dataclasses
import typing

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from transformer_jax.model.config import TransformerConfig

# TransformerConfig fields that are not options of config.model: the vocabulary size
# comes from the data, the special ids are fixed for the codebase.
_NOT_OPTIONS = ('vocab_size', 'pad_id', 'bos_id')


def model_defaults() -> ml_collections.ConfigDict:
  """``config.model``: every TransformerConfig option at its dataclass default.

  Dtypes become their names ('float32'); an option whose default is None becomes a
  typed placeholder, so ``--config.model.head_dim=64`` parses. Built from the
  dataclass so that the defaults live in one place (tests/test_configs.py checks the
  round trip).
  """
  hints = typing.get_type_hints(TransformerConfig)
  model = ml_collections.ConfigDict()
  for field in dataclasses.fields(TransformerConfig):
    if field.name in _NOT_OPTIONS:
      continue
    value = field.default
    if field.name in ('dtype', 'param_dtype'):
      value = jnp.dtype(value).name
    elif value is None:
      kinds = [t for t in typing.get_args(hints[field.name]) if t is not type(None)]
      value = config_dict.placeholder(kinds[0])
    model[field.name] = value
  return model


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0  # Parameter init, dropout and data order all derive from it.

  # Sec 3 / Table 3 base row: TransformerConfig's defaults (the one definition, with
  # a comment per field, is transformer_jax/model/config.py).
  config.model = model_defaults()

  config.data = ml_collections.ConfigDict()
  d = config.data
  d.source = 'tfds'  # 'tfds', 'multi30k' (our TFDS builder) or 'text'.
  d.tfds_name = 'wmt14_translate/de-en'  # TFDS dataset (for source='tfds').
  d.source_lang = 'en'
  d.target_lang = 'de'
  d.data_dir = config_dict.placeholder(str)  # TFDS data_dir.
  d.manual_dir = config_dict.placeholder(str)  # TFDS manual_dir (local files).
  d.train_split = 'train'
  d.eval_split = 'validation'  # newstest2013 for wmt14.
  d.test_split = 'test'  # newstest2014 for wmt14.
  # For source='text': line-aligned files (gzip allowed), source side first.
  d.train_files = config_dict.placeholder(tuple)
  d.eval_files = config_dict.placeholder(tuple)
  d.test_files = config_dict.placeholder(tuple)
  d.vocab_size = 37000  # Sec 5.1: ~37000 shared BPE tokens for EN-DE.
  d.vocab_model_type = 'bpe'  # SentencePiece model type ('bpe' or 'unigram').
  d.vocab_train_sentences = 2_000_000  # Sentences sampled to train the vocabulary.
  d.vocab_path = config_dict.placeholder(str)  # Reuse this .model instead.
  d.max_length = 256  # Longest source or target kept (tokens, with EOS).
  d.too_long = 'drop'  # 'drop' or 'truncate' longer pairs.
  d.tokens_per_batch = 25000  # Sec 5.1: ~25000 source and target tokens a batch.
  d.bucket_lengths = (16, 32, 64, 128, 256)  # Padded lengths: one compile each.
  d.packing = False  # Pack sentences into rows with segment ids instead.
  d.prefetch = 2  # Training batches made ahead in a thread (0: none). Shuffling is global, per epoch.
  d.eval_batch_size = 64  # Sentences per evaluation/decoding batch.

  config.optim = ml_collections.ConfigDict()
  o = config.optim
  o.b1 = 0.9  # Sec 5.3: Adam beta1.
  o.b2 = 0.98  # Sec 5.3: Adam beta2.
  o.eps = 1e-9  # Sec 5.3: Adam epsilon.
  o.warmup_steps = 4000  # Sec 5.3.
  o.learning_rate_scale = 1.0  # Multiplies d_model^-0.5 * min(...), the paper's lrate.
  # After warm-up: 'inverse_sqrt' (Sec 5.3) or 'cosine' (to final_lr_fraction of the
  # peak at train.num_steps).
  o.decay = 'inverse_sqrt'
  o.final_lr_fraction = 0.1  # Used by decay='cosine'.
  o.label_smoothing = 0.1  # Sec 5.4: eps_ls.
  o.grad_accum_steps = 1  # optax.MultiSteps: micro-batches per update.
  o.clip_grad_norm = 0.0  # 0 disables; the paper does not clip.
  o.weight_decay = 0.0
  # NaN/inf loss or gradient: 0 = stop before saving; N = skip up to N such updates in
  # a row (optax.apply_if_finite).
  o.skip_nonfinite_updates = 0

  config.train = ml_collections.ConfigDict()
  t = config.train
  t.num_steps = 100_000  # Sec 5.2: base 100k steps, big 300k.
  # What is trained: '' = the family's task (translation, lm, classification);
  # 'mlm' = masked-LM pre-training of an encoder_only model (transformer_jax/tasks.py).
  t.task = ''
  # A workdir whose latest parameters start this run (fine-tuning after pre-training).
  t.init_from = ''
  t.log_every_steps = 100
  t.eval_every_steps = 1000  # Dev loss/perplexity.
  t.bleu_every_steps = 0  # Dev/test BLEU with beam search; 0 = only at the end, -1 never.
  t.eval_max_batches = 0  # 0 = the whole dev split.
  t.bleu_max_sentences = 0  # 0 = the whole split.
  # Training time budget in minutes from the start of main (vocabulary, data and
  # compiles included); when reached the loop saves and the final averaging and BLEU
  # run as at num_steps. 0 = none. A resumed run starts a new budget.
  t.max_minutes = 0.0
  # With max_minutes and optim.decay='cosine': time the warm-up steps and, if the rest
  # of the budget cannot hold num_steps, end the cosine (and space the checkpoints) at
  # the step it can reach instead of being cut mid-decay (train/budget.py).
  t.fit_to_budget = False
  t.profile = False
  # MFU denominator (dense bf16 TFLOP/s per device); None = look up the device kind.
  t.peak_tflops_per_device = config_dict.placeholder(float)

  config.checkpoint = ml_collections.ConfigDict()
  c = config.checkpoint
  c.every_steps = 5000  # Train steps (micro-batches with accumulation); 0 = off.
  c.every_minutes = 10.0  # Sec 6.1: checkpoints at 10-minute intervals; 0 = off.
  c.max_to_keep = 20  # Enough to average the last 20 (big model).
  c.async_save = True  # Write in the background while training goes on.

  config.mesh = ml_collections.ConfigDict()
  mesh = config.mesh
  mesh.data = -1  # Pure data parallelism by default.
  mesh.fsdp = 1
  mesh.tensor = 1
  # Logical axis -> mesh axes. Heads and the FFN hidden layer split over 'tensor';
  # weights over 'fsdp'; the batch over ('data', 'fsdp').
  mesh.rules = (
      ('vocab', 'tensor'),
      ('embed', 'fsdp'),
      ('layers', None),  # The stacked-layer axis of model.scan_layers: replicated.
      ('heads', 'tensor'),
      ('head_dim', None),
      ('mlp', 'tensor'),
      ('act_batch', ('data', 'fsdp')),
      ('act_length', None),
      ('act_embed', None),
      ('act_heads', 'tensor'),
      ('act_mlp', 'tensor'),
  )

  config.eval = ml_collections.ConfigDict()
  e = config.eval
  e.beam_size = 4  # Sec 6.1.
  e.length_penalty = 0.6  # Sec 6.1: alpha, GNMT form ((5 + |Y|) / 6)^alpha.
  e.max_extra_length = 50  # Sec 6.1: output length <= input length + 50.
  # 'paper' (Sec 6.1) or 'ctranslate2' (its scoring and stopping, to check an export).
  e.beam_rules = 'paper'
  e.average_last = 5  # Sec 6.1: base averages the last 5 checkpoints, big 20.
  return config
