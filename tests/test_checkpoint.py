"""Tests for transformer_jax.checkpoint (orbax CheckpointManager) on 8 fake devices.

* Saved on 1 device, restored onto a (2, 2, 2) mesh (8 devices -> 1 is in
  test_train.py): equal values, the requested shardings.
* A half-written step (orbax tmp folder) never becomes the latest checkpoint.
* A different model shape or vocabulary is a clear error.
* Averaging the last K checkpoints equals the mean of their parameters, in
  Python and through the command line; async and time-based saves happen.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from transformer_jax import sharding
from transformer_jax.run import checkpoint as checkpoint_lib
from transformer_jax.run.workdir import Workdir, write_average
from transformer_jax.train import loop as train

VOCAB = 256
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(sizes=(1, 1, 1)):
  config = tiny.get_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
  return config


def _setup(sizes):
  config = _config(sizes)
  mesh = sharding.create_mesh(config.mesh, jax.devices()[:int(np.prod(sizes))])
  return train.TrainSetup.create(config, VOCAB, mesh)


def _meta(setup, fingerprint='f' * 64):
  return {'vocab_fingerprint': fingerprint, 'vocab_size': VOCAB,
          'param_shapes': checkpoint_lib.param_shapes(setup.abstract_state['params'])}


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


@pytest.fixture(scope='session')
def saved(tmp_path_factory):
  """A workdir with checkpoints at steps 1, 2, 3 written from one device."""
  workdir = str(tmp_path_factory.mktemp('ckpt'))
  setup = _setup((1, 1, 1))
  Workdir.create(workdir, setup.config)
  state = setup.init_state()
  ckpt = checkpoint_lib.TrainCheckpointer(workdir, setup.config.checkpoint)
  rng = np.random.RandomState(1)
  params_by_step = {}
  for step in (1, 2, 3):
    batch = {'inputs': rng.randint(4, VOCAB, (8, 8)).astype(np.int32),
             'targets': rng.randint(4, VOCAB, (8, 8)).astype(np.int32)}
    state, _ = setup.train_step(state, train.shard_batch(batch, setup.mesh))
    params_by_step[step] = _leaves(state['params'])
    assert ckpt.save(step, state['params'], state['opt_state'], {'position': step},
                     _meta(setup), force=True)
  ckpt.close()
  return workdir, setup, params_by_step, _leaves(state['opt_state'])


def test_saved_on_one_device_restores_onto_eight(saved):
  workdir, setup, params_by_step, opt_state = saved
  target = _setup((2, 2, 2))
  ckpt = checkpoint_lib.TrainCheckpointer(workdir, target.config.checkpoint)
  assert ckpt.latest_step() == 3
  params, opt, data, meta = ckpt.restore(
      3, target.abstract_state['params'], target.abstract_state['opt_state'],
      _meta(target))
  ckpt.close()
  assert data == {'position': 3} and meta['step'] == 3
  for name, value in _leaves(params).items():
    np.testing.assert_array_equal(value, params_by_step[3][name], err_msg=name)
  for name, value in _leaves(opt).items():
    np.testing.assert_array_equal(value, opt_state[name], err_msg=name)
  expected = jax.tree.leaves(target.state_shardings['params'])
  for array, sharding_ in zip(jax.tree.leaves(params), expected):
    assert array.sharding == sharding_
  # The restored state trains on the new mesh.
  state = {'params': params, 'opt_state': opt,
           'step': jax.device_put(np.int32(3), target.state_shardings['step'])}
  batch = {'inputs': np.full((8, 8), 5, np.int32), 'targets': np.full((8, 8), 6, np.int32)}
  state, sums = target.train_step(state, train.shard_batch(batch, target.mesh))
  assert np.isfinite(float(sums['loss_sum'])) and int(state['step']) == 4


def test_half_written_step_is_not_the_latest(saved):
  workdir, setup, params_by_step, _ = saved
  # What a crash mid-save leaves: orbax's temporary folder, never renamed.
  tmp = os.path.join(workdir, 'checkpoints', '4.orbax-checkpoint-tmp-123')
  os.makedirs(os.path.join(tmp, 'params'))
  with open(os.path.join(tmp, 'params', 'garbage'), 'w') as f:
    f.write('partial')
  params = Workdir.open(workdir).restore().params
  for name, value in _leaves(params).items():
    np.testing.assert_array_equal(value, params_by_step[3][name], err_msg=name)


def test_incompatible_checkpoint_is_a_clear_error(saved):
  workdir, setup, _, _ = saved
  bigger = _config()
  bigger.model.d_ff = 128
  mesh = sharding.create_mesh(bigger.mesh, jax.devices()[:1])
  other = train.TrainSetup.create(bigger, VOCAB, mesh)
  ckpt = checkpoint_lib.TrainCheckpointer(workdir, bigger.checkpoint, read_only=True)
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                     match=r"feed_forward/bi' has shape \[64\] in the checkpoint but "
                           r"\[128\] in the model"):
    ckpt.restore(3, other.abstract_state['params'], other.abstract_state['opt_state'],
                 _meta(other))
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                     match='different vocabulary'):
    ckpt.restore(3, setup.abstract_state['params'], setup.abstract_state['opt_state'],
                 _meta(setup, fingerprint='0' * 64))


def test_average_of_last_k_is_the_mean(saved, tmp_path):
  workdir, _, params_by_step, _ = saved
  run = Workdir.open(workdir)
  params = run.restore(average_last=2).params
  for name, value in _leaves(params).items():
    expected = (params_by_step[2][name] + params_by_step[3][name]) / 2
    np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=name)
  params = run.restore(step=2, average_last=2).params
  name = next(iter(params_by_step[1]))
  np.testing.assert_allclose(_leaves(params)[name],
                             (params_by_step[1][name] + params_by_step[2][name]) / 2,
                             rtol=1e-6)
  with pytest.raises(ValueError, match='holds only'):
    run.restore(average_last=5)
  out, averaged = write_average(run, 3, str(tmp_path / 'avg3'))
  assert averaged.steps == [1, 2, 3]
  restored = out.restore()
  assert restored.step == 3 and restored.meta['averaged_steps'] == [1, 2, 3]
  params = restored.params
  for name, value in _leaves(params).items():
    expected = sum(params_by_step[s][name] for s in (1, 2, 3)) / 3
    np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=name)


def test_average_command_line(saved, tmp_path):
  workdir, _, params_by_step, _ = saved
  out = str(tmp_path / 'cli_avg')
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu')

  def average():
    return subprocess.run(
        [sys.executable, '-m', 'transformer_jax.checkpoint', f'--workdir={workdir}',
         '--average_last=2', f'--output={out}'], env=env, cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=300)

  result = average()
  assert result.returncode == 0, result.stderr[-2000:]
  # One line of result, no library log lines.
  assert result.stdout.splitlines() == [
      f'Averaged checkpoints [2, 3] of {workdir} into {out} (step 3).']
  assert 'orbax' not in result.stderr.lower() and len(result.stderr.splitlines()) <= 2
  # Again into the same output: one clear line, not orbax's StepAlreadyExistsError.
  again = average()
  assert again.returncode == 1 and 'Traceback' not in again.stderr
  assert again.stderr.strip().splitlines()[-1] == (
      f'checkpoint: {out} already holds a checkpoint for step 3; pick another output '
      'folder or delete that one.')
  params = Workdir.open(out).restore().params
  for name, value in _leaves(params).items():
    expected = (params_by_step[2][name] + params_by_step[3][name]) / 2
    np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=name)


class _Clock:
  """A settable ``datetime`` for orbax's CheckpointManager and our minutes policy,
  so the time-based decisions do not depend on how fast a loaded machine runs."""

  def __init__(self, monkeypatch):
    import datetime
    import types
    from orbax.checkpoint import checkpoint_manager
    self.now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    clock = self

    class FakeDateTime(datetime.datetime):
      @classmethod
      def now(cls, tz=None):
        return clock.now if tz is None else clock.now.astimezone(tz)

    fake = types.ModuleType('datetime')
    fake.__dict__.update(datetime.__dict__)
    fake.datetime = FakeDateTime
    for module in (checkpoint_manager, checkpoint_lib):
      monkeypatch.setattr(module, 'datetime', fake)

  def advance(self, seconds):
    import datetime
    self.now += datetime.timedelta(seconds=seconds)


def test_async_and_time_based_saves(tmp_path, monkeypatch):
  setup = _setup((1, 1, 1))
  cfg = setup.config.checkpoint
  cfg.async_save = True
  cfg.every_steps = 0
  cfg.every_minutes = 0.5 / 60  # Half a second.
  state = setup.init_state()
  clock = _Clock(monkeypatch)
  ckpt = checkpoint_lib.TrainCheckpointer(str(tmp_path), cfg)
  args = (state['params'], state['opt_state'], {}, _meta(setup))
  clock.advance(0.4)
  assert not ckpt.save(1, *args)  # Too soon after the start.
  clock.advance(0.2)
  assert ckpt.save(2, *args)  # 0.6 s after the start.
  ckpt.wait()
  clock.advance(0.4)
  assert not ckpt.save(3, *args)  # Too soon after the last save.
  clock.advance(0.2)
  assert ckpt.save(4, *args)  # 0.6 s after it.
  ckpt.close()
  assert checkpoint_lib.TrainCheckpointer(str(tmp_path), cfg).all_steps() == [2, 4]


def test_changed_optimizer_is_a_clear_error(tmp_path):
  setup = _setup((1, 1, 1))
  state = setup.init_state()
  meta = dict(_meta(setup), opt_state_shapes=checkpoint_lib.param_shapes(
      setup.abstract_state['opt_state']))
  ckpt = checkpoint_lib.TrainCheckpointer(str(tmp_path), setup.config.checkpoint)
  ckpt.save(1, state['params'], state['opt_state'], {}, meta, force=True)
  ckpt.close()
  config = _config()
  config.optim.grad_accum_steps = 4
  other = train.TrainSetup.create(config, VOCAB, setup.mesh)
  expected = dict(_meta(other), opt_state_shapes=checkpoint_lib.param_shapes(
      other.abstract_state['opt_state']))
  ckpt = checkpoint_lib.TrainCheckpointer(str(tmp_path), config.checkpoint)
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                     match='different optimizer state.*grad_accum_steps'):
    ckpt.restore(1, other.abstract_state['params'], other.abstract_state['opt_state'],
                 expected)
  ckpt.close()
