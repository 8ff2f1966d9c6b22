"""Workdir: a run directory's layout, step resolution and the one restore path.

The fixture writes a tiny model's parameters at steps 10, 20 and 30 the way training
does (three different random initialisations), so every restored value is known.
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from transformer_jax import model as model_lib
from transformer_jax.run.workdir import Workdir

VOCAB = 24


def _config():
  from configs import tiny
  config = tiny.get_config()
  config.model.num_encoder_layers = config.model.num_decoder_layers = 1
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  path = tmp_path_factory.mktemp('run')
  wd = Workdir.create(path, _config())
  cfg = model_lib.TransformerConfig.from_config(wd.config.model, VOCAB)
  from transformer_jax.run import checkpoint as checkpoint_lib
  ckpt = wd.checkpointer(read_only=False)
  saved = {}
  for seed, step in enumerate((10, 20, 30)):
    params = jax.tree.map(np.asarray, nnx.state(
        model_lib.Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
    meta = {'vocab_fingerprint': 'abc', 'vocab_size': VOCAB,
            'param_shapes': checkpoint_lib.param_shapes(params)}
    ckpt.save(step, params, {'count': np.zeros((), np.int32)}, {}, meta, force=True)
    saved[step] = params
  wd.close()
  return str(path), saved


def _assert_params(got, expected):
  got, expected = jax.tree.leaves(got), jax.tree.leaves(expected)
  assert len(got) == len(expected)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(np.asarray(g), e, rtol=1e-6, atol=1e-7)


def test_layout_and_config_read_once(run):
  path, _ = run
  wd = Workdir.open(path)
  assert wd.config_path == os.path.join(path, 'config.json')
  assert wd.checkpoint_dir == os.path.join(path, 'checkpoints')
  assert wd.vocab_path == os.path.join(path, 'vocab', 'spm.model')
  assert wd.config is wd.config  # Read once, then kept.
  assert wd.config.model.d_model == _config().model.d_model
  assert wd.checkpointer() is wd.checkpointer()  # One checkpointer per mode.
  assert wd.steps() == [10, 20, 30] and wd.latest_step() == 30


def test_resolve_steps(run):
  wd = Workdir.open(run[0])
  assert wd.resolve_steps() == [30]
  assert wd.resolve_steps(20) == [20]
  assert wd.resolve_steps(average_last=2) == [20, 30]
  assert wd.resolve_steps(20, average_last=2) == [10, 20]
  assert wd.resolve_steps(None, None) == [30]
  with pytest.raises(FileNotFoundError, match=r'No checkpoint for step 25 .*\[10, 20, 30\]'):
    wd.resolve_steps(25)
  with pytest.raises(ValueError, match='average the last 3 checkpoints up to step 20'):
    wd.resolve_steps(20, average_last=3)
  with pytest.raises(ValueError, match='average_last must be >= 1'):
    wd.resolve_steps(average_last=0)


def test_restore_latest_step_and_average(run):
  path, saved = run
  wd = Workdir.open(path)
  restored = wd.restore()
  assert restored.step == 30 and restored.steps == [30]
  assert restored.meta['vocab_size'] == VOCAB and 'averaged_steps' not in restored.meta
  _assert_params(restored.params, saved[30])

  restored = wd.restore(step=10)
  assert restored.step == 10
  _assert_params(restored.params, saved[10])

  restored = wd.restore(step=30, average_last=2)
  assert restored.step == 30 and restored.steps == [20, 30]
  assert restored.meta['averaged_steps'] == [20, 30]
  _assert_params(restored.params, jax.tree.map(lambda a, b: (a + b) / 2, saved[20],
                                               saved[30]))
  model = wd.model(restored)
  assert isinstance(model, model_lib.Transformer) and model.cfg.vocab_size == VOCAB
  _assert_params(nnx.state(model, nnx.Param), restored.params)


def test_restore_onto_a_mesh(run):
  from transformer_jax import sharding
  path, saved = run
  wd = Workdir.open(path)
  mesh_cfg = wd.config.mesh.copy_and_resolve_references()
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 2, 2, 2
  mesh = sharding.create_mesh(mesh_cfg)
  restored = wd.restore(mesh=mesh)
  _assert_params(restored.params, saved[30])
  leaves = jax.tree.leaves(restored.params)
  assert all(leaf.sharding.mesh == mesh for leaf in leaves)
  assert any(not leaf.sharding.is_fully_replicated for leaf in leaves)


def test_missing_pieces_are_one_line_errors(run, tmp_path):
  with pytest.raises(FileNotFoundError, match='Workdir .*nowhere does not exist'):
    Workdir.open(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='is not a training workdir'):
    Workdir.open(tmp_path)
  wd = Workdir.create(tmp_path / 'fresh', _config())
  assert wd.steps() == [] and wd.latest_step() is None
  with pytest.raises(FileNotFoundError, match='No checkpoints in'):
    wd.restore()
  with pytest.raises(FileNotFoundError, match=r'Vocabulary .*spm.model not found'):
    Workdir.open(run[0]).tokenizer()
