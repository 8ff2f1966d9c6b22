"""Test setup: 8 fake CPU devices for the sharding tests, and the shared corpora."""

import os
import pathlib

# Must be set before jax is imported anywhere.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The read-only corpora live beside the repository; TRANSFORMER_JAX_DATA overrides.
SHARED_DATA = pathlib.Path(
    os.environ.get('TRANSFORMER_JAX_DATA', REPO_ROOT.parent / 'shared' / 'data'))


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  """Folder of the shared parallel corpora; skips the test when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'shared corpora not found at {SHARED_DATA} '
                '(set TRANSFORMER_JAX_DATA to their folder)')
  return SHARED_DATA


# ----------------------------------------------------------------------------
# Example source and target rows of the model tests (test_model, test_model_variants,
# test_decode): eos = 1 ends each sentence, pad = 0 after it; the rows' lengths
# differ, and the last source row has no padding.

SRC = np.array([[5, 6, 7, 8, 1, 0, 0],
                [9, 10, 11, 1, 0, 0, 0],
                [12, 13, 14, 15, 16, 17, 1]], np.int32)
TGT = np.array([[20, 21, 22, 1, 0, 0],
                [23, 24, 25, 26, 27, 1],
                [28, 1, 0, 0, 0, 0]], np.int32)
SRC.flags.writeable = TGT.flags.writeable = False  # Shared: no test may change them.


# ----------------------------------------------------------------------------
# A trained run every inference test can read: a tiny Transformer trained to copy.

COPY_WORDS = 'red blue green cat dog bird runs sleeps eats big small the a on under'.split()
COPY_SENTENCES = ['the cat runs', 'a big red dog sleeps on cat', 'small bird',
                  'the green cat eats a blue dog', 'dog']


def copy_sentence(rng):
  return ' '.join(rng.choice(COPY_WORDS) for _ in range(rng.randint(1, 7)))


def copy_config():
  """configs/tiny.py cut to 1+1 layers, d_model 32, max_len 16, beam 2."""
  from configs import tiny
  config = tiny.get_config()
  m = config.model
  m.num_encoder_layers = m.num_decoder_layers = 1
  m.d_model, m.num_heads, m.head_dim, m.d_ff = 32, 4, None, 64
  m.dropout_rate, m.max_len = 0.0, 16
  config.data.bucket_lengths = (8, 16)
  config.data.eval_batch_size = 4
  config.eval.beam_size = 2
  config.eval.max_extra_length = 3
  return config


def _train_copy_model(model, tokenizer, rng, steps):
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from transformer_jax import model as model_lib
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, ids):
    def loss_fn(model):
      logits = model(ids, model_lib.shift_right(ids))
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
      return jnp.sum(loss * (ids != 0)) / jnp.sum(ids != 0)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  for _ in range(steps):
    ids = np.zeros((64, 8), np.int32)
    for row in ids:
      sentence = tokenizer.encode(copy_sentence(rng)) + [tokenizer.eos_id]
      row[:len(sentence)] = sentence
    loss = train_step(model, optimizer, ids)
  return float(loss)


def _save_params(ckpt, step, model, vocab):
  """Saves ``model``'s parameters as checkpoint ``step`` with the metadata training
  writes (the vocabulary's fingerprint and size, the parameter shapes) and a fresh
  optimiser count; returns the parameters as numpy arrays."""
  import jax
  import numpy as np
  from flax import nnx
  from transformer_jax.run import checkpoint as checkpoint_lib
  params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  meta = {'vocab_fingerprint': vocab.fingerprint()['sha256'],
          'vocab_size': vocab.vocab_size,
          'param_shapes': checkpoint_lib.param_shapes(params)}
  ckpt.save(step, params, {'count': np.zeros((), np.int32)}, {}, meta, force=True)
  return params


@pytest.fixture(scope='session')
def copy_run(tmp_path_factory):
  """A workdir (config.json, vocab/spm.model, checkpoints at steps 250 and 500) of a
  1+1-layer model trained for 500 steps (seconds) to copy sentences of a 15-word
  language, written the way training writes it. A correct pipeline (tokenize, sort,
  batch, search, restore order, detokenize) returns every input line unchanged.

  Returns:
    namespace(path, params={step: numpy params}, config).
  """
  import random
  import types
  from flax import nnx
  from transformer_jax import model as model_lib
  from transformer_jax.data import tokenizer as tokenizer_lib
  from transformer_jax.run.workdir import Workdir
  path = str(tmp_path_factory.mktemp('copy_workdir'))
  config = copy_config()
  workdir = Workdir.create(path, config)
  rng = random.Random(0)
  tokenizer = tokenizer_lib.train_tokenizer(
      [copy_sentence(rng) for _ in range(2000)], os.path.join(path, 'vocab', 'spm.model'),
      vocab_size=len(COPY_WORDS) + 4, model_type='word')
  cfg = model_lib.TransformerConfig.from_config(config.model, tokenizer.vocab_size)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  ckpt = workdir.checkpointer(read_only=False)
  saved = {}
  for step, steps in ((250, 250), (500, 250)):
    loss = _train_copy_model(model, tokenizer, rng, steps)
    saved[step] = _save_params(ckpt, step, model, tokenizer)
  workdir.close()
  assert loss < 0.1, loss  # It has learned to copy.
  return types.SimpleNamespace(path=path, params=saved, config=config)


# ----------------------------------------------------------------------------
# Runs of the other two families, as training writes them (random parameters).


def _save_random_run(path, config, vocab, steps=(3, 6)):
  """config.json and checkpoints of ``config``'s model (one random init per step)."""
  from flax import nnx
  from transformer_jax import model as model_lib
  from transformer_jax.model import families
  from transformer_jax.run.workdir import Workdir
  workdir = Workdir.create(path, config)
  cfg = model_lib.TransformerConfig.from_config(config.model, vocab.vocab_size)
  ckpt = workdir.checkpointer(read_only=False)
  saved = {}
  for seed, step in enumerate(steps):
    saved[step] = _save_params(ckpt, step, families.build_model(cfg, rngs=nnx.Rngs(seed)),
                               vocab)
  workdir.close()
  return saved


@pytest.fixture(scope='session')
def lm_run(tmp_path_factory):
  """A decoder-only run (configs/lm_shakespeare.py cut to 1 layer, d_model 32, learned
  positions up to 32): vocab/chars.json and random checkpoints at steps 3 and 6."""
  import types
  from configs import lm_shakespeare
  from transformer_jax.data import char_text
  config = lm_shakespeare.get_config()
  m = config.model
  m.num_decoder_layers, m.d_model, m.num_heads, m.d_ff, m.max_len = 1, 32, 4, 64, 32
  path = str(tmp_path_factory.mktemp('lm_run'))
  vocab = char_text.CharVocabulary.from_text('ROMEO: JULIET\nabcdefghij,.')
  vocab.save(os.path.join(path, char_text.VOCAB_FILE))
  config.data.vocab_size = vocab.vocab_size
  params = _save_random_run(path, config, vocab)
  return types.SimpleNamespace(path=path, config=config, params=params)


@pytest.fixture(scope='session')
def classifier_run(tmp_path_factory):
  """An encoder-only run (configs/sst2.py cut to 1 layer, d_model 32, max_length 16):
  a word-level SentencePiece vocabulary of COPY_WORDS (+ [MASK]) and random
  checkpoints at steps 3 and 6."""
  import random
  import types
  from configs import sst2
  from transformer_jax.data import sentences
  from transformer_jax.data import tokenizer as tokenizer_lib
  config = sst2.get_config()
  m = config.model
  m.num_encoder_layers, m.d_model, m.num_heads, m.d_ff, m.max_len = 1, 32, 4, 64, 16
  config.data.max_length, config.data.bucket_lengths = 16, (8,)
  path = str(tmp_path_factory.mktemp('classifier_run'))
  rng = random.Random(0)
  tokenizer = tokenizer_lib.train_tokenizer(
      [copy_sentence(rng) for _ in range(500)], os.path.join(path, 'vocab', 'spm.model'),
      vocab_size=len(COPY_WORDS) + 4, model_type='word')
  vocab = sentences.SentenceVocabulary(tokenizer)
  config.data.vocab_size = vocab.vocab_size
  params = _save_random_run(path, config, vocab)
  return types.SimpleNamespace(path=path, config=config, params=params)
