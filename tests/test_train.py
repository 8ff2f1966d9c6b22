"""Tests for transformer_jax.train.loop on 8 fake CPU devices.

* Three train steps on meshes (8,1,1), (2,2,2), (1,2,4) and (1,1,8) give the losses,
  parameters and optimizer state of one device.
* Every parameter's logical names match the rules and give the expected spec.
* A run stopped by SIGTERM after k steps and resumed equals an uninterrupted run
  (loss at every step, final parameters), through ``train_and_evaluate`` on real text;
  a SIGTERM during a step stops the run at the next step, and a second one during
  the stop's save does not end the process before the save is complete.
* A budget fit ends the cosine and spaces the checkpoints as fitted, and holds when
  the run is resumed.
"""

import json
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest
from jax.experimental import io_callback
from jax.sharding import PartitionSpec as P

from configs import tiny
from transformer_jax import sharding
from transformer_jax.train import budget
from transformer_jax.train import tasks
from transformer_jax.run.workdir import Workdir
from transformer_jax.train import flops
from transformer_jax.train import loop as train

VOCAB = 256
MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]
# Sharded and single-device steps sum in different orders: float32 round-off.
ATOL = 2e-5


def _config(sizes=(1, 1, 1)):
  config = tiny.get_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
  return config


def _mesh(config, sizes):
  return sharding.create_mesh(config.mesh, jax.devices()[:int(np.prod(sizes))])


def _batches(num=3, rows=8):
  rng = np.random.RandomState(0)
  out = []
  for _ in range(num):
    inputs = rng.randint(4, VOCAB, (rows, 12)).astype(np.int32)
    targets = rng.randint(4, VOCAB, (rows, 10)).astype(np.int32)
    inputs[:, 9:] = 0  # Padding the loss and the attention masks must ignore.
    targets[::2, 6:] = 0
    out.append({'inputs': inputs, 'targets': targets})
  return out


def _run(sizes, initial=None):
  config = _config(sizes)
  mesh = _mesh(config, sizes)
  setup = train.TrainSetup.create(config, VOCAB, mesh)
  # The same initial values laid out on this mesh (init_state itself is tested
  # below); saves compiling the initialiser for every mesh.
  state = setup.init_state() if initial is None else jax.device_put(
      initial, setup.state_shardings)
  losses = []
  for batch in _batches():
    state, sums = setup.train_step(state, train.shard_batch(batch, mesh))
    losses.append(float(sums['loss_sum'] / sums['tokens']))
  return losses, jax.device_get(state), setup


@pytest.fixture(scope='session')
def one_device():
  config = _config()
  setup = train.TrainSetup.create(config, VOCAB, _mesh(config, (1, 1, 1)))
  initial = jax.device_get(setup.init_state())
  return (*_run((1, 1, 1), initial), initial)


def _named_leaves(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


@pytest.mark.parametrize('sizes', MESHES)
def test_sharded_steps_equal_one_device(sizes, one_device):
  ref_losses, ref_state, ref_setup, initial = one_device
  losses, state, _ = _run(sizes, initial)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert int(state['step']) == 3
  lr_total = sum(ref_setup.learning_rate(s) for s in range(3))
  ref, got = _named_leaves(ref_state['params']), _named_leaves(state['params'])
  for name, value in ref.items():
    if 'key_bias' in name:
      # softmax is invariant to a key bias: its gradient is exactly 0 and only
      # round-off, whose sign Adam amplifies to +-lr. Bounded by the lr sum.
      assert np.abs(got[name] - value).max() <= 2 * lr_total + 1e-6, name
    else:
      np.testing.assert_allclose(got[name], value, atol=ATOL, err_msg=name)
  ref_opt, got_opt = _named_leaves(ref_state['opt_state']), _named_leaves(
      state['opt_state'])
  assert ref_opt.keys() == got_opt.keys()
  for name, value in ref_opt.items():
    np.testing.assert_allclose(got_opt[name], value, atol=1e-6, rtol=1e-3, err_msg=name)


def test_gradient_accumulation_equals_one_big_batch():
  # Two micro-batches with equal token counts, accumulated, make the same update
  # as one batch holding both (per-token normalisation agrees when counts match).
  batches = _batches(2)
  for b in batches:
    b['targets'][:, 6:] = 0
  big = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  results = []
  for accum, feed in ((2, batches), (1, [big])):
    config = _config((1, 1, 1))
    config.model.dropout_rate = 0.0
    config.optim.grad_accum_steps = accum
    mesh = _mesh(config, (1, 1, 1))
    setup = train.TrainSetup.create(config, VOCAB, mesh)
    state = setup.init_state()
    for b in feed:
      state, _ = setup.train_step(state, train.shard_batch(b, mesh))
    results.append(_named_leaves(jax.device_get(state['params'])))
  for name, value in results[1].items():
    if 'key_bias' not in name:  # Zero gradient: see above.
      np.testing.assert_allclose(results[0][name], value, atol=ATOL, err_msg=name)


def _expected_spec(name: str) -> P:
  """Default rules: heads/mlp/vocab on 'tensor', embed on 'fsdp'."""
  last = re.findall(r"\['(\w+)'\]", name)[-1]
  if last == 'embedding':
    return P('tensor', 'fsdp')
  if last in ('query_kernel', 'key_kernel', 'value_kernel'):
    return P('fsdp', 'tensor', None)
  if last == 'out_kernel':
    return P('tensor', None, 'fsdp')
  if last in ('query_bias', 'key_bias', 'value_bias'):
    return P('tensor', None)
  if last == 'wi':
    return P('fsdp', 'tensor')
  if last == 'wo':
    return P('tensor', 'fsdp')
  if last == 'bi':
    return P('tensor')
  if last in ('out_bias', 'bo', 'scale', 'bias'):
    return P('fsdp')
  raise AssertionError(f'parameter {name} has no expected spec in this test')


def test_every_parameter_matches_a_rule_and_gets_its_spec():
  from flax import nnx
  config = _config((2, 2, 2))
  mesh = _mesh(config, (2, 2, 2))
  setup = train.TrainSetup.create(config, VOCAB, mesh)
  rule_names = {name for name, _ in setup.rules}
  abstract = nnx.state(nnx.eval_shape(lambda: train.model_lib.Transformer(
      setup.model_cfg, rngs=nnx.Rngs(params=0, dropout=0))), nnx.Param)
  variables = jax.tree_util.tree_flatten_with_path(
      abstract, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
  assert len(variables) > 20
  for path, variable in variables:
    names = variable.get_metadata().get('out_sharding')
    assert names, f'{jax.tree_util.keystr(path)} has no logical axis names'
    assert set(names) - {None} <= rule_names, (jax.tree_util.keystr(path), names)
  state = setup.init_state()
  params = _named_leaves(state['params'])
  for name, array in params.items():
    assert array.sharding.spec == _expected_spec(name), name
  # Adam's moments are sharded like the parameters they follow.
  for name, array in _named_leaves(state['opt_state']).items():
    match = [p for p in params if name.endswith(p)]
    if match and array.ndim:
      assert array.sharding.spec == params[match[0]].sharding.spec, name


def test_mesh_that_does_not_divide_is_a_clear_error():
  config = _config((1, 1, 8))
  config.model.num_heads = 4
  config.model.head_dim = 8
  with pytest.raises(ValueError,
                     match='4 attention heads are not divisible by tensor = 8'):
    train.TrainSetup.create(config, VOCAB, _mesh(config, (1, 1, 8)))
  config = _config((1, 1, 8))
  with pytest.raises(ValueError, match='vocabulary size 100 is not divisible'):
    train.TrainSetup.create(config, 100, _mesh(config, (1, 1, 8)))


def test_flops_count_the_papers_base_model():
  # 6 FLOPs per parameter per token it touches (encoder weights: source tokens,
  # decoder weights and the softmax matmul: target tokens) plus the attention
  # products, which add ~7% at length 250 for the base model.
  from transformer_jax import model as model_lib
  cfg = model_lib.TransformerConfig(vocab_size=37000)
  d, f = 512, 2048
  encoder = 6 * (4 * d * d + 2 * d * f)
  decoder = 6 * (8 * d * d + 2 * d * f) + d * 37000
  tokens = 100 * 250
  weights = 6 * tokens * (encoder + decoder)
  attention = 3 * 100 * 4 * 250 * 250 * d * (6 + 6 + 6)  # enc self, dec self, cross
  step_flops = flops.train_flops(cfg, batch=100, src_len=250, tgt_len=250)
  assert step_flops == pytest.approx(weights + attention, rel=1e-9)


# ----------------------------------------------------------------------------
# train_and_evaluate on real text: stop with SIGTERM, resume, compare.


def _text_config(shared_data, **train_overrides):
  config = _config((8, 1, 1))
  d = shared_data / 'multi30k'
  config.data.train_files = (str(d / 'train.en.gz'), str(d / 'train.de.gz'))
  config.data.eval_files = (str(d / 'val.en.gz'), str(d / 'val.de.gz'))
  config.data.bucket_lengths = (32,)  # One batch shape: one compile.
  config.data.eval_batch_size = 64
  config.train.num_steps = 6
  config.train.log_every_steps = 2
  config.train.eval_every_steps = 6
  config.train.eval_max_batches = 1
  config.train.bleu_every_steps = -1
  config.checkpoint.every_steps = 2
  config.train.update(train_overrides)
  return config


def _sigterm_while_step_2_runs(x):
  time.sleep(1.0)  # A slow device: the loop could dispatch many steps ahead meanwhile.
  os.kill(os.getpid(), signal.SIGTERM)
  return x


@pytest.fixture(scope='session')
def runs(shared_data, tmp_path_factory):
  """An uninterrupted 6-step run, and one stopped by SIGTERM during step 2 then resumed.

  The interrupted run logs (and so syncs) only at step 6; SIGTERM arrives from the
  device while step 2 computes, and a second one while the stop's asynchronous save
  is written (in ``Workdir.close``). The last element says what the loop dispatched
  and which SIGTERMs reached the handler the test had installed before the run.
  """
  full_dir = str(tmp_path_factory.mktemp('full'))
  full = train.train_and_evaluate(_text_config(shared_data), full_dir)

  resumed_dir = str(tmp_path_factory.mktemp('resumed'))
  # Eval changes no weights; no periodic save syncs the loop before the log step.
  config = _text_config(shared_data, eval_every_steps=0, log_every_steps=6)
  config.checkpoint.every_steps = 0
  config.checkpoint.async_save = True
  config.data.vocab_path = os.path.join(full_dir, 'vocab', 'spm.model')
  delayed = jax.jit(lambda x: io_callback(_sigterm_while_step_2_runs, x, x))
  original_step, original_close = train.TrainSetup.train_step, Workdir.close
  dispatched, outside = [], []

  def train_step(self, state, batch):
    state, sums = original_step(self, state, batch)
    dispatched.append(len(dispatched) + 1)
    if len(dispatched) == 2:
      sums = dict(sums, tokens=delayed(sums['tokens']))
    return state, sums

  def close(self):
    os.kill(os.getpid(), signal.SIGTERM)
    original_close(self)

  def outside_handler(signum, frame):
    del signum, frame
    outside.append(True)

  train.TrainSetup.train_step, Workdir.close = train_step, close
  previous = signal.signal(signal.SIGTERM, outside_handler)
  try:
    first = train.train_and_evaluate(config, resumed_dir)
    handler_after = signal.getsignal(signal.SIGTERM)
  finally:
    signal.signal(signal.SIGTERM, previous)
    train.TrainSetup.train_step, Workdir.close = original_step, original_close
  second = train.train_and_evaluate(config, resumed_dir)
  interruption = {'dispatched': max(dispatched), 'reached_outside': len(outside),
                  'handler_put_back': handler_after is outside_handler}
  return full_dir, full, resumed_dir, first, second, interruption


def test_sigterm_saves_and_resume_equals_uninterrupted(runs):
  full_dir, full, resumed_dir, first, second, interruption = runs
  # SIGTERM while step 2 ran: saved and stopped at the next step, not at the next
  # log step (the loop keeps one step in flight, not log_every_steps).
  assert first['step'] == 3 and interruption['dispatched'] == 3
  # The second SIGTERM, while step 3's save was written, did not end the process
  # (the test's handler stood in for the default action); the save is complete.
  assert interruption['reached_outside'] == 0 and interruption['handler_put_back']
  assert 3 in Workdir.open(resumed_dir).steps()
  assert sorted(first['train_loss']) == [1, 2, 3]
  assert sorted(second['train_loss']) == [4, 5, 6]
  resumed = {**first['train_loss'], **second['train_loss']}
  assert sorted(full['train_loss']) == list(range(1, 7))
  for step, loss in full['train_loss'].items():
    assert resumed[step] == pytest.approx(loss, rel=1e-6), step
  assert full['train_loss'][6] < full['train_loss'][1]  # It learns.
  a = _named_leaves(jax.device_get(full['state']['params']))
  b = _named_leaves(jax.device_get(second['state']['params']))
  for name in a:
    np.testing.assert_allclose(b[name], a[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_budget_fit_ends_the_cosine_early_and_holds_on_resume(runs, tmp_path, monkeypatch,
                                                              shared_data):
  """The budget made to hold 10 of 20 updates at the last warm-up step (4): the run
  ends at update 10 with the cosine at its floor and saves every 2 steps instead of
  4; a run that the budget stops at step 6 resumes on the same fit, read from its
  workdir, and ends with the same parameters."""
  vocab = os.path.join(runs[0], 'vocab', 'spm.model')

  def config():
    c = _text_config(shared_data, num_steps=20, max_minutes=60.0, fit_to_budget=True,
                     eval_every_steps=0, log_every_steps=1)
    c.optim.decay, c.optim.warmup_steps, c.optim.final_lr_fraction = 'cosine', 4, 0.05
    c.checkpoint.every_steps, c.checkpoint.max_to_keep = 4, 20
    c.data.vocab_path = vocab
    return c

  fits = []

  def fitted_num_steps(step, seconds_per_step, seconds_left, num_steps, accum=1):
    fits.append((step, num_steps))
    assert seconds_per_step > 0 and 0 < seconds_left <= 3600
    return 10

  monkeypatch.setattr(budget, 'fitted_num_steps', fitted_num_steps)
  monkeypatch.setattr(budget, 'MIN_TIMED_STEPS', 2)
  full_dir = str(tmp_path / 'full')
  full = train.train_and_evaluate(config(), full_dir)
  assert fits == [(4, 20)]
  assert full['step'] == 10 and not full['out_of_time']
  assert Workdir.open(full_dir).steps() == [4, 6, 8, 10]
  with open(os.path.join(full_dir, 'config.json')) as f:
    saved = json.load(f)
  assert (saved['train']['num_steps'], saved['checkpoint']['every_steps']) == (10, 2)
  c = config()
  peak = c.optim.learning_rate_scale * c.model.d_model**-0.5 * 4**-0.5
  assert full['setup'].learning_rate(3) == pytest.approx(peak, rel=1e-5)
  assert full['setup'].learning_rate(9) == pytest.approx(0.05 * peak, rel=1e-5)

  agree, calls = train._agree, []

  def budget_ends_at_step_6(flag):
    calls.append(flag)
    return len(calls) == 6

  monkeypatch.setattr(train, '_agree', budget_ends_at_step_6)
  resumed_dir = str(tmp_path / 'resumed')
  first = train.train_and_evaluate(config(), resumed_dir)
  assert first['step'] == 6 and first['out_of_time'] and len(fits) == 2
  monkeypatch.setattr(train, '_agree', agree)
  second = train.train_and_evaluate(config(), resumed_dir)
  assert len(fits) == 2  # Read from budget_fit.json, not fitted again.
  assert second['step'] == 10 and not second['out_of_time']
  a = _named_leaves(jax.device_get(full['state']['params']))
  b = _named_leaves(jax.device_get(second['state']['params']))
  for name in a:
    np.testing.assert_allclose(b[name], a[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_run_writes_config_summaries_and_dev_metrics(runs):
  full_dir, full, _, _, _, _ = runs
  with open(os.path.join(full_dir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['model']['d_model'] == 32 and saved['train']['num_steps'] == 6
  events = os.listdir(os.path.join(full_dir, 'tensorboard'))
  assert any(name.startswith('events.out.tfevents') for name in events)
  assert full['eval']['tokens'] > 0
  assert np.isfinite(full['eval']['loss'])
  # Six steps from uniform guessing: better than chance, far from perfect.
  assert 1.0 < full['eval']['perplexity'] < VOCAB


def test_checkpoint_saved_on_8_devices_restores_on_one_and_on_another_mesh(runs):
  full_dir, full, _, _, _, _ = runs
  expected = _named_leaves(jax.device_get(full['state']['params']))
  workdir = Workdir.open(full_dir)
  restored = workdir.restore()
  assert restored.step == 6 and restored.steps == [6]
  got = _named_leaves(restored.params)
  for name, value in expected.items():
    leaf = got[name]
    assert len(leaf.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(leaf), value, err_msg=name)
  mesh = sharding.create_mesh(_config((1, 2, 4)).mesh)
  got = _named_leaves(workdir.restore(mesh=mesh).params)
  for name, value in expected.items():
    assert got[name].sharding.spec == _expected_spec(name), name
    np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)
  # The restored parameters make the model of the workdir's config.
  model = workdir.model(restored)
  assert model.cfg.d_model == workdir.config.model.d_model
  batch = _batches(1)[0]
  logits = model(batch['inputs'], batch['targets'])
  assert logits.shape == (8, 10, VOCAB) and np.isfinite(np.asarray(logits)).all()


def test_main_rejects_an_unknown_config_key(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-m', 'transformer_jax.main', '--config=configs/tiny.py',
       f'--workdir={tmp_path}', '--config.train.num_step=3'],
      cwd=root, env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True,
      timeout=120)
  assert result.returncode != 0
  assert "unknown config key 'num_step'" in result.stderr
  assert 'Traceback' not in result.stderr


def _params_of(model):
  from flax import nnx
  return _named_leaves(jax.device_get(nnx.state(model, nnx.Param)))


def test_final_bleu_translator_averages_the_last_checkpoints(runs, shared_data):
  full_dir, full, _, _, _, _ = runs
  setup, params = full['setup'], full['state']['params']
  config = _text_config(shared_data)
  workdir = Workdir.open(full_dir)
  tokenizer = workdir.tokenizer()
  assert workdir.steps()[-3:] == [2, 4, 6]
  config.eval.average_last = 3  # Sec 6.1: average the last checkpoints.
  translator = tasks._bleu_translator(setup, params, tokenizer, config, full_dir, 6,
                                      final=True)
  # Restored as evaluate --average_last=3 restores, onto the training mesh.
  assert translator.steps == [2, 4, 6] and translator.step == 6
  assert translator.search.mesh is setup.mesh
  averaged = _params_of(translator.model)
  each = [_named_leaves(jax.device_get(workdir.restore(s).params)) for s in (2, 4, 6)]
  for name in averaged:
    np.testing.assert_allclose(averaged[name], sum(e[name] for e in each) / 3,
                               rtol=1e-5, atol=1e-7, err_msg=name)
  latest = _named_leaves(jax.device_get(params))
  assert any(not np.allclose(averaged[n], latest[n]) for n in latest)
  for k in (1, len(workdir.steps()) + 1):  # No averaging, or too few checkpoints:
    config.eval.average_last = k          # the live parameters themselves.
    translator = tasks._bleu_translator(setup, params, tokenizer, config, full_dir, 6,
                                        final=True)
    assert translator.step == 6 and translator.steps is None
    got = _params_of(translator.model)
    for name in latest:
      np.testing.assert_array_equal(got[name], latest[name], err_msg=name)


def test_time_budget_stops_saves_averages_and_evaluates(runs, shared_data, tmp_path,
                                                          monkeypatch):
  # A resumed run with a budget already spent: one step past the restored step 6,
  # then it saves, averages the last 2 checkpoints and runs the final BLEU.
  _, _, resumed_dir, _, _, _ = runs
  workdir = str(tmp_path / 'budget')
  shutil.copytree(resumed_dir, workdir)
  config = _text_config(shared_data, num_steps=1000, max_minutes=1e-6,
                        eval_every_steps=0, bleu_every_steps=0)
  with open(os.path.join(resumed_dir, 'config.json')) as f:
    config.data.vocab_path = json.load(f)['data']['vocab_path']
  config.eval.average_last = 2
  calls = []

  def fake_bleu(translator, eval_sets, config, workdir, step, writer):
    calls.append((_params_of(translator.model), step, translator.steps))
    return {'validation/sacrebleu': 0.0}

  monkeypatch.setattr(tasks, '_bleu', fake_bleu)
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 7 and result['out_of_time']
  assert sorted(result['train_loss']) == [7]
  assert Workdir.open(workdir).steps()[-2:] == [6, 7]
  assert len(calls) == 1 and calls[0][1:] == (7, [6, 7]) and result['bleu']
  each = [_named_leaves(jax.device_get(Workdir.open(workdir).restore(s).params))
          for s in (6, 7)]
  averaged = calls[0][0]
  for name in averaged:
    np.testing.assert_allclose(averaged[name], (each[0][name] + each[1][name]) / 2,
                               rtol=1e-5, atol=1e-7, err_msg=name)
