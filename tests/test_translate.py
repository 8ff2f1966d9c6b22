"""Translation CLI and evaluation on a tiny Transformer trained to copy its input.

The fixture trains a 1+1-layer model for 500 steps (seconds) on a 15-word language to
copy sentences, and saves two checkpoints the way training does. A correct pipeline
(tokenize, sort, batch, search, restore order, detokenize) then returns every input
line unchanged: a round trip whose expected output is known.
"""

import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from transformer_jax import evaluate
from transformer_jax import model as model_lib
from transformer_jax import translate
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.run import checkpoint as checkpoint_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = 'red blue green cat dog bird runs sleeps eats big small the a on under'.split()
SENTENCES = ['the cat runs', 'a big red dog sleeps on cat', 'small bird',
             'the green cat eats a blue dog', 'dog']


def _sentence(rng):
  return ' '.join(rng.choice(WORDS) for _ in range(rng.randint(1, 7)))


def _config():
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
      sentence = tokenizer.encode(_sentence(rng)) + [tokenizer.eos_id]
      row[:len(sentence)] = sentence
    loss = train_step(model, optimizer, ids)
  return float(loss)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """config.json, vocab/spm.model and checkpoints at steps 250 and 500."""
  workdir = str(tmp_path_factory.mktemp('copy_workdir'))
  config = _config()
  with open(os.path.join(workdir, checkpoint_lib.CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  rng = random.Random(0)
  tokenizer = tokenizer_lib.train_tokenizer(
      [_sentence(rng) for _ in range(2000)], os.path.join(workdir, 'vocab', 'spm.model'),
      vocab_size=len(WORDS) + 4, model_type='word')
  cfg = model_lib.TransformerConfig.from_config(config.model, tokenizer.vocab_size)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  ckpt = checkpoint_lib.TrainCheckpointer(workdir, config.checkpoint)
  saved = {}
  for step, steps in ((250, 250), (500, 250)):
    loss = _train_copy_model(model, tokenizer, rng, steps)
    params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    meta = {'vocab_fingerprint': tokenizer.fingerprint()['sha256'],
            'vocab_size': tokenizer.vocab_size,
            'param_shapes': checkpoint_lib.param_shapes(params)}
    ckpt.save(step, params, {'count': np.zeros((), np.int32)}, {}, meta, force=True)
    saved[step] = params
  ckpt.wait()
  ckpt.close()
  assert loss < 0.1, loss  # It has learned to copy.
  return types.SimpleNamespace(path=workdir, params=saved, config=config)


def _cli(module, *args, stdin=None):
  return subprocess.run([sys.executable, '-m', f'transformer_jax.{module}', *args],
                        input=stdin, capture_output=True, text=True, timeout=600,
                        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_cli_round_trip_in_input_order_with_bad_lines(workdir):
  too_long = ' '.join(['the'] * 20)  # 21 tokens with eos; max_len is 16.
  lines = [SENTENCES[0], '', SENTENCES[1], too_long, 'the zebra runs', *SENTENCES[2:],
           '   ']
  result = _cli('translate', f'--workdir={workdir.path}', stdin='\n'.join(lines) + '\n')
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout.split('\n')
  assert out[-1] == '' and len(out) - 1 == len(lines)
  out = out[:-1]
  # Sorted by length inside, yet each copy is back on its own line.
  for line, translation in zip(lines, out):
    if line in SENTENCES:
      assert translation == line
  assert out[1] == '' and out[-1] == ''  # Empty and blank lines stay empty.
  assert out[3] and out[4]  # Over-long and unknown-word lines are translated.
  assert 'stdin line 4: 21 tokens with eos' in result.stderr
  assert 'lack' in result.stderr and 'lines 5' in result.stderr
  assert f'{len(lines)} lines in' in result.stderr
  assert 'Traceback' not in result.stderr


def test_translate_lines_matches_one_sentence_at_a_time(workdir):
  translator = translate.load_translator(workdir.path, beam_size=2)
  batched = translate.translate_lines(translator, SENTENCES, batch_size=4,
                                      progress=False)
  assert batched == SENTENCES
  for sentence, expected in zip(SENTENCES, batched):
    assert translate.translate_lines(translator, [sentence], batch_size=1,
                                     progress=False) == [expected]


def test_cli_files_checkpoint_step_and_greedy(workdir, tmp_path):
  src, out = tmp_path / 'in.txt', tmp_path / 'out.txt'
  src.write_text('\n'.join(SENTENCES) + '\n', encoding='utf-8')
  result = _cli('translate', f'--workdir={workdir.path}', '--checkpoint_step=500',
                '--beam_size=1', f'--input={src}', f'--output={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert out.read_text(encoding='utf-8').splitlines() == SENTENCES
  assert result.stdout == ''


def test_average_last_two_checkpoints_is_the_mean(workdir):
  translator = translate.load_translator(workdir.path, average_last=2, use_mesh=False)
  got = nnx.state(translator.model, nnx.Param)
  expected = jax.tree.map(lambda a, b: (a + b) / 2, workdir.params[250],
                          workdir.params[500])
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(g), e, rtol=1e-6, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(workdir.params[250])[0],
                         jax.tree.leaves(workdir.params[500])[0])


def test_missing_workdir_checkpoint_and_input_are_clear_errors(workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    translate.load_translator(str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match='average the last 5'):
    translate.load_translator(workdir.path, average_last=5)
  empty = tmp_path / 'empty_workdir'
  empty.mkdir()
  shutil.copy(os.path.join(workdir.path, 'config.json'), empty / 'config.json')
  result = _cli('translate', f'--workdir={empty}', stdin='the cat\n')
  assert result.returncode == 1
  assert 'translate: No checkpoints in' in result.stderr
  assert 'Traceback' not in result.stderr
  result = _cli('translate', f'--workdir={workdir.path}', f'--input={tmp_path / "x.txt"}')
  assert result.returncode == 1 and 'x.txt not found' in result.stderr


def test_bucket_length():
  assert translate.bucket_length(5, (8, 16), 64) == 8
  assert translate.bucket_length(9, (8, 16), 64) == 16
  assert translate.bucket_length(17, (8, 16), 64) == 32
  assert translate.bucket_length(40, (8, 16), 48) == 48
  assert translate.bucket_length(12, (8, 32), 16) == 16


def test_evaluate_bleu_writes_hypotheses_and_json(workdir, tmp_path):
  translator = translate.load_translator(workdir.path)
  references = list(SENTENCES)
  references[0] = 'the cat sleeps'  # One reference differs from the copy.
  eval_set = types.SimpleNamespace(name='validation', sources=SENTENCES,
                                   references=references)
  results = evaluate.evaluate_bleu(translator.model, translator.tokenizer, eval_set,
                                   workdir.config, workdir=str(tmp_path), step=500)
  hyps = (tmp_path / 'eval' / 'validation-step500.hyp.txt').read_text().splitlines()
  assert hyps == SENTENCES
  saved = json.loads((tmp_path / 'eval' / 'validation-step500.json').read_text())
  import sacrebleu
  assert saved['sacrebleu'] == pytest.approx(
      sacrebleu.corpus_bleu(SENTENCES, [references]).score)
  assert saved['tok_bleu'] == pytest.approx(
      evaluate.bleu.tokenized_bleu(SENTENCES, references, lang='de'))
  assert 0 < saved['tok_bleu'] < 100
  assert saved['num_sentences'] == 5 and saved['step'] == 500
  assert saved['sacrebleu_signature'].startswith('nrefs:1|case:mixed')
  assert saved['beam_size'] == 2 and saved['length_penalty'] == 0.6
  assert results == saved


def test_result_files_are_named_by_split_step_averaging_and_search(workdir):
  config = workdir.config  # beam 2, alpha 0.6.
  name = evaluate.result_name
  assert name('test', {'step': 2000, 'beam_size': 2, 'length_penalty': 0.6},
              config) == 'test-step2000'
  assert name('validation', {'step': 2000, 'averaged_steps': [1100, 1200, 1300]},
              config) == 'validation-step2000-avg3'
  assert name('test', {'step': 5, 'average_last': 10}, config) == 'test-step5-avg10'
  assert name('test', {'step': 5, 'average_last': 1, 'beam_size': 5,
                       'length_penalty': 1.0}, config) == 'test-step5-beam5-alpha1'
  assert name('test', {'step': None}) == 'test'


def test_evaluate_cli_on_text_files(workdir, tmp_path):
  src, ref = tmp_path / 'src.txt', tmp_path / 'ref.txt'
  src.write_text('\n'.join(SENTENCES) + '\n')
  ref.write_text('\n'.join(SENTENCES) + '\n')
  result = _cli('evaluate', f'--workdir={workdir.path}', '--average_last=1',
                f'--source_file={src}', f'--reference_file={ref}', '--split=test')
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads(pathlib.Path(workdir.path, 'eval', 'test-step500.json').read_text())
  assert saved['sacrebleu'] == pytest.approx(100.0)
  assert saved['tok_bleu'] == pytest.approx(100.0)
  assert saved['step'] == 500 and saved['num_sentences'] == 5
  assert json.loads(result.stdout) == saved


def test_evaluate_bleu_with_mesh_sharded_params_splits_the_batch(workdir, tmp_path):
  # Training hands over parameters sharded on its mesh; decoding then splits the
  # batch over ('data', 'fsdp') and must give the single-device translations.
  from transformer_jax import sharding
  translator = translate.load_translator(workdir.path, use_mesh=False)
  config = workdir.config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 2, 1
  mesh = sharding.create_mesh(config.mesh)
  graphdef, params, rest = nnx.split(translator.model, nnx.Param, ...)
  params = jax.device_put(params, sharding.param_shardings(
      params, mesh, sharding.rules_from_config(config.mesh)))
  model = nnx.merge(graphdef, params, rest)
  assert evaluate._params_mesh(model) is mesh
  eval_set = types.SimpleNamespace(name='test', sources=SENTENCES, references=SENTENCES)
  results = evaluate.evaluate_bleu(model, translator.tokenizer, eval_set, config,
                                   workdir=str(tmp_path), step=7)
  hyps = (tmp_path / 'eval' / 'test-step7.hyp.txt').read_text().splitlines()
  assert hyps == translate.translate_lines(translator, SENTENCES, progress=False)
  assert results['sacrebleu'] == pytest.approx(100.0) and results['step'] == 7
