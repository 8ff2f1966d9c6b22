"""Faults an operator meets, and what the package does about them.

* Damaged checkpoints (truncated or bit-flipped data file, missing manifest,
  garbled metadata, empty step folder, half-deleted old step) are skipped with a
  warning naming the damage: decoding and training fall back to the newest intact
  step; asking for the damaged step is an error naming it.
* A diverging run (huge learning rate) stops before saving, naming the step and
  the last good checkpoint; with ``skip_nonfinite_updates`` it skips the updates.
* A refused restart (another d_model) leaves config.json untouched.
* A workdir lock names its holder; a dead holder's lock is taken over.
* A training process SIGKILLed while it saves restarts from a complete step.
* The command lines turn these failures into one line and exit 1.

One 6-step run on a Multi30k slice is shared; every test works on a copy.
"""

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from transformer_jax import cli
from transformer_jax.run import checkpoint as checkpoint_lib
from transformer_jax.run import integrity
from transformer_jax.run import lock as lock_lib
from transformer_jax.run.workdir import Workdir
from transformer_jax.train import loop as train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _text_config(shared_data, **overrides):
  config = tiny.get_config()
  config.mesh.data = 8
  d = shared_data / 'multi30k'
  config.data.train_files = (str(d / 'train.en.gz'), str(d / 'train.de.gz'))
  config.data.bucket_lengths = (32,)  # One batch shape: one compile.
  config.train.num_steps = 6
  config.train.log_every_steps = 2
  config.train.eval_every_steps = 0
  config.train.bleu_every_steps = -1
  config.checkpoint.every_steps = 2
  for key, value in overrides.items():
    group, name = key.split('__')
    config[group][name] = value
  return config


@pytest.fixture(scope='module')
def run(shared_data, tmp_path_factory):
  """Checkpoints at steps 2, 4, 6 (with manifests) and the per-step losses."""
  path = str(tmp_path_factory.mktemp('run'))
  result = train.train_and_evaluate(_text_config(shared_data), path)
  assert sorted(result['train_loss']) == [1, 2, 3, 4, 5, 6]
  return path, result['train_loss']


def _copy(run, tmp_path) -> str:
  dest = str(tmp_path / 'copy')
  shutil.copytree(run[0], dest)
  return dest


def _largest_data_file(step_dir: str) -> str:
  files = glob.glob(os.path.join(step_dir, 'params', '**', 'd', '*'), recursive=True)
  return max(files, key=os.path.getsize)


def _flip_bit(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


DAMAGE = {
    'truncated data file': (lambda d: _truncate(_largest_data_file(d)),
                            'truncated or overwritten'),
    'flipped bit': (lambda d: _flip_bit(_largest_data_file(d)), 'SHA-256 mismatch'),
    'missing manifest': (lambda d: os.remove(os.path.join(d, 'params', 'manifest.ocdbt')),
                         'manifest.ocdbt is missing'),
    'garbled metadata': (
        lambda d: open(os.path.join(d, 'meta', 'metadata'), 'w').write('{"step": 6,'),
        'meta/metadata is unreadable'),
    'empty step directory': (_empty, 'empty step directory'),
    'half-deleted step': (lambda d: shutil.rmtree(os.path.join(d, 'params')),
                          "item 'params' is missing"),
}


@pytest.mark.parametrize('kind', sorted(DAMAGE))
def test_damaged_latest_step_falls_back_for_decoding(run, tmp_path, kind, caplog):
  path = _copy(run, tmp_path)
  damage, reason = DAMAGE[kind]
  damage(os.path.join(path, 'checkpoints', '6'))
  caplog.set_level(logging.WARNING)
  restored = Workdir.open(path).restore()
  assert restored.step == 4
  skipped = [r.getMessage() for r in caplog.records if 'Skipping checkpoint' in r.getMessage()]
  assert len(skipped) == 1 and reason in skipped[0] and '/6' in skipped[0], skipped
  assert not integrity.nonfinite_leaves(restored.params)
  with pytest.raises((integrity.CorruptCheckpointError, FileNotFoundError), match=reason):
    Workdir.open(path).restore(step=6)
  # Averaging skips the damaged step too.
  assert Workdir.open(path).restore(average_last=2).steps == [2, 4]


def test_nonfinite_checkpoint_is_not_restored(run, tmp_path):
  path = _copy(run, tmp_path)
  ckpt = checkpoint_lib.TrainCheckpointer(path, tiny.get_config().checkpoint)
  restored = Workdir.open(path).restore(step=6)
  bad = jax.tree.map(lambda x: np.full(x.shape, np.nan, x.dtype), restored.params)
  ckpt.save(8, bad, {'count': np.zeros((), np.int32)}, {}, dict(restored.meta),
            force=True)
  ckpt.close()
  assert integrity.has_checksums(os.path.join(path, 'checkpoints', '8'))
  assert Workdir.open(path).restore().step == 6
  with pytest.raises(integrity.CorruptCheckpointError, match='NaN or infinite'):
    Workdir.open(path).restore(step=8)


def test_training_resumes_from_the_newest_intact_step(run, tmp_path, shared_data):
  path = _copy(run, tmp_path)
  _flip_bit(_largest_data_file(os.path.join(path, 'checkpoints', '6')))
  config = _text_config(shared_data, train__num_steps=8)
  result = train.train_and_evaluate(config, path)
  # Steps 5 and 6 are redone from step 4 exactly as the first time.
  assert sorted(result['train_loss']) == [5, 6, 7, 8]
  for step in (5, 6):
    assert result['train_loss'][step] == pytest.approx(run[1][step], rel=1e-6)
  moved = os.listdir(os.path.join(path, checkpoint_lib.DAMAGED_DIR))
  assert len(moved) == 1 and moved[0].startswith('6-')
  assert Workdir.open(path).steps() == [4, 6, 8]


def test_divergence_stops_before_saving(run, tmp_path, shared_data):
  path = _copy(run, tmp_path)
  config = _text_config(shared_data, train__num_steps=12, optim__learning_rate_scale=1e30)
  with pytest.raises(train.NonFiniteLossError,
                     match=r'diverged at step [78] .*Last good checkpoint: step 6 in '):
    train.train_and_evaluate(config, path)
  assert Workdir.open(path).steps() == [2, 4, 6]  # Nothing saved after step 6.


def test_divergence_can_skip_updates(tmp_path, shared_data, run, caplog):
  config = _text_config(shared_data, train__num_steps=12, optim__learning_rate_scale=1e30,
                        optim__skip_nonfinite_updates=3, data__vocab_path=os.path.join(
                            run[0], 'vocab', 'spm.model'))
  caplog.set_level(logging.WARNING)
  with pytest.raises(train.NonFiniteLossError, match='diverged at step'):
    train.train_and_evaluate(config, str(tmp_path / 'skip'))
  skipped = [r.getMessage() for r in caplog.records if 'update skipped' in r.getMessage()]
  assert len(skipped) == 3 and '3 in a row, at most 3' in skipped[-1], skipped
  # Every saved step holds finite parameters (the skipped updates were not applied).
  wd = Workdir.open(str(tmp_path / 'skip'))
  for step in wd.steps():
    assert not integrity.nonfinite_leaves(wd.restore(step=step).params)


def test_refused_restart_leaves_config_json_alone(run, tmp_path, shared_data):
  path = _copy(run, tmp_path)
  with open(os.path.join(path, 'config.json'), 'rb') as f:
    before = f.read()
  config = _text_config(shared_data, model__d_model=64)
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match='shape'):
    train.train_and_evaluate(config, path)
  with open(os.path.join(path, 'config.json'), 'rb') as f:
    assert f.read() == before
  assert Workdir.open(path).restore().step == 6


def test_workdir_lock_names_the_holder_and_is_taken_over_when_it_dies(tmp_path):
  path = str(tmp_path / 'locked')
  with lock_lib.WorkdirLock(path):
    with pytest.raises(lock_lib.WorkdirLockedError,
                       match=rf'in use by pid {os.getpid()} on host \S+'):
      lock_lib.WorkdirLock(path).acquire()
  # A holder killed without releasing: the kernel drops its flock.
  child = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from transformer_jax.run import lock; '
       'lock.WorkdirLock(sys.argv[1]).acquire(); print("held", flush=True); '
       'time.sleep(60)', path], cwd=REPO, stdout=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert child.stdout.readline().strip() == 'held'
  with pytest.raises(lock_lib.WorkdirLockedError, match=f'pid {child.pid}'):
    lock_lib.WorkdirLock(path).acquire()
  child.kill()
  child.wait()
  lock = lock_lib.WorkdirLock(path).acquire()
  assert lock.took_over['pid'] == child.pid
  lock.release()


def _checkpoint_names(path):
  try:
    return os.listdir(os.path.join(path, 'checkpoints'))
  except FileNotFoundError:
    return []


def test_kill_mid_save_then_restart_resumes_from_a_complete_step(run, tmp_path,
                                                                shared_data):
  path = str(tmp_path / 'killed')
  d = shared_data / 'multi30k'
  vocab = os.path.join(run[0], 'vocab', 'spm.model')
  args = [sys.executable, '-m', 'transformer_jax.main', '--config=configs/tiny.py',
          f'--workdir={path}', '--config.mesh.data=8', '--config.data.bucket_lengths=(32,)',
          f'--config.data.train_files=("{d}/train.en.gz","{d}/train.de.gz")',
          f'--config.data.vocab_path={vocab}', '--config.train.num_steps=400',
          '--config.train.eval_every_steps=0', '--config.train.bleu_every_steps=-1',
          '--config.checkpoint.every_steps=1', '--config.checkpoint.max_to_keep=2',
          '--config.checkpoint.async_save=True']
  child = subprocess.Popen(args, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline, killed_in_tmp = time.time() + 900, False  # Generous: loaded CI machines.
  try:
    while time.time() < deadline and child.poll() is None:
      names = _checkpoint_names(path)
      committed = [n for n in names if n.isdigit()]
      if len(committed) >= 2 and any('tmp' in n for n in names):
        child.send_signal(signal.SIGKILL)  # While orbax writes a step.
        killed_in_tmp = True
        break
      time.sleep(0.005)
  finally:
    child.kill()
    child.wait()
  assert killed_in_tmp, 'the training process never reached a save'
  config = _text_config(shared_data, checkpoint__every_steps=1,
                        checkpoint__max_to_keep=2, data__vocab_path=vocab)
  resumed_from = Workdir.open(path).latest_step()
  config.train.num_steps = resumed_from + 2
  result = train.train_and_evaluate(config, path)
  assert sorted(result['train_loss']) == [resumed_from + 1, resumed_from + 2]
  assert all(np.isfinite(v) for v in result['train_loss'].values())
  assert Workdir.open(path).latest_step() == resumed_from + 2
  assert not [n for n in _checkpoint_names(path) if 'tmp' in n]


# ----------------------------------------------------------------------------
# Command lines.


def _cli(module, *args, stdin=None):
  return subprocess.run([sys.executable, '-m', f'transformer_jax.{module}', *args],
                        input=stdin, capture_output=True, timeout=300, cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'))


def test_translate_names_the_line_of_undecodable_input(run, tmp_path):
  result = _cli('translate', f'--workdir={run[0]}', stdin=b'ein Hund\n\xff\xfe binary\n')
  err = result.stderr.decode()
  assert result.returncode == 1 and 'Traceback' not in err, err
  assert 'stdin, line 2: not UTF-8' in err.strip().splitlines()[-1]
  assert result.stdout == b''


def test_training_cli_failures_are_one_line(run, tmp_path):
  path = _copy(run, tmp_path)
  with lock_lib.WorkdirLock(path):
    result = _cli('main', '--config=configs/tiny.py', f'--workdir={path}')
  err = result.stderr.decode().strip().splitlines()
  assert result.returncode == 1 and 'Traceback' not in result.stderr.decode()
  assert err[-1].startswith('main: error: ') and f'pid {os.getpid()}' in err[-1], err
  twice = _cli('main', '--config=configs/tiny.py', f'--workdir={path}',
               '--config.data.bucket_lengths=(8,)', '--config.data.bucket_lengths=(16,)')
  assert twice.returncode != 0
  assert 'given twice' in twice.stderr.decode().strip().splitlines()[-1]


def test_one_line_messages_for_expected_failures(monkeypatch):
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  full = OSError(28, 'No space left on device', '/ckpt/6/params/d/x')
  assert cli.one_line(full) == 'No space left on device: /ckpt/6/params/d/x'
  wrapped = ValueError('Error writing "d/abc": [OS error: No space left on device]')
  assert cli.one_line(wrapped).startswith('No space left on device (Error writing')
  assert cli.one_line(PermissionError(13, 'Permission denied', '/ro/config.json')) == (
      'Permission denied: /ro/config.json')
  assert cli.one_line(lock_lib.WorkdirLockedError('w is in use')) == 'w is in use'
  assert cli.one_line(KeyError('a bug')) is None  # Bugs keep their traceback.


def test_summary_writer_without_tensorflow_is_a_one_line_error(monkeypatch, tmp_path):
  # None in sys.modules makes the import fail, as on a machine without TensorFlow;
  # the package attribute goes too, in case another test imported the module.
  import flax.metrics  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, 'flax.metrics.tensorboard', None)
  monkeypatch.delattr(flax.metrics, 'tensorboard', raising=False)
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  with pytest.raises(ModuleNotFoundError) as raised:
    train._summary_writer(Workdir(str(tmp_path)))
  message = cli.one_line(raised.value)
  assert message.startswith('TensorBoard summaries need TensorFlow') and 'tensorflow-cpu' in message
  assert cli.one_line(ImportError('cannot import name x (circular import)')) is None
