"""Checkpoints: orbax CheckpointManager, resume, restore for decoding, averaging.

Layout of a training workdir::

  workdir/config.json                the experiment's ConfigDict (train/loop.py writes it)
  workdir/vocab/spm.model            the SentencePiece vocabulary
  workdir/checkpoints/<step>/        one orbax checkpoint per saved step, items:
      params/      nnx.State of the model's Params (sharded arrays)
      opt_state/   the optax state (same shardings as the params)
      data/        input-iterator state, one JSON file per process
      meta/        JSON: step, vocab fingerprint, vocab size, parameter shapes

Orbax writes each step into a temporary folder and renames it when every item and
every process has finished, so a crash mid-save leaves the previous checkpoint as
the latest one. Arrays are restored onto whatever shardings the caller asks for, so
a checkpoint written on 8 devices restores onto 1 and back.

For decoding: ``restore_params(workdir, step=None, average_last=None)`` and
``average_checkpoints(workdir, last_k, out_dir)``; from the shell through the CLI
``python -m transformer_jax.checkpoint`` (transformer_jax/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'
VOCAB_DIR = 'vocab'


class IncompatibleCheckpointError(ValueError):
  """The checkpoint was written for a different model shape or vocabulary."""


# ----------------------------------------------------------------------------
# Per-process input-iterator state.
#
# Orbax's JsonCheckpointHandler writes from the primary process only, but every
# process owns its own share of the data and so its own iterator position; grain's
# handler needs grain iterators. This handler writes one JSON file per process.


class DataStateHandler(ocp.CheckpointHandler):
  """Saves and restores one JSON-able dict per process."""

  def save(self, directory: epath.Path, args: 'DataStateSave'):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _process_file()
    path.write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: 'DataStateRestore' = None):
    path = directory / _process_file()
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise IncompatibleCheckpointError(
          f'{path} not found (checkpoint data states: {found}); the checkpoint '
          f'was written by a different number of processes.')
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


def _process_file() -> str:
  return f'process_{jax.process_index()}-of-{jax.process_count()}.json'


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


# ----------------------------------------------------------------------------
# Save decisions.


class _EveryMinutesPolicy(ocm.ContinuousCheckpointingPolicy):
  """Saves when ``minutes`` have passed since the last checkpoint or the start.

  Orbax's continuous policy saves at once when no checkpoint exists yet; timing
  from the start of the run instead avoids a checkpoint at step 1. The primary
  process decides and broadcasts (inside orbax), so all processes agree.
  """

  def __init__(self, minutes: float):
    super().__init__(minimum_interval_secs=minutes * 60)
    self._start = _Info(step=-1, metrics=None,
                        time=datetime.datetime.now(tz=datetime.timezone.utc))

  def should_save(self, step, previous_steps, *, context):
    return super().should_save(step, list(previous_steps) or [self._start],
                               context=context)


@dataclasses.dataclass
class _Info:
  step: int
  metrics: Any
  time: datetime.datetime


# ----------------------------------------------------------------------------
# Training checkpoints.


def param_shapes(params) -> dict[str, list[int]]:
  """{'path/to/param': shape} of an (abstract) params pytree."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {_path_str(path): list(np.shape(leaf)) for path, leaf in flat}


def _path_str(path) -> str:
  parts = []
  for key in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return '/'.join(p for p in parts if p != 'value')


def check_compatible(saved_meta: dict, expected_meta: dict, where: str) -> None:
  """Raises IncompatibleCheckpointError naming the first difference found."""
  if saved_meta.get('vocab_fingerprint') != expected_meta.get('vocab_fingerprint'):
    raise IncompatibleCheckpointError(
        f'Checkpoint {where} was trained with a different vocabulary '
        f'(sha256 {str(saved_meta.get("vocab_fingerprint"))[:12]}..., '
        f'{saved_meta.get("vocab_size")} pieces) than the current one '
        f'(sha256 {str(expected_meta.get("vocab_fingerprint"))[:12]}..., '
        f'{expected_meta.get("vocab_size")} pieces). Use a fresh workdir or the '
        f'original vocabulary (config.data.vocab_path).')
  saved, expected = saved_meta['param_shapes'], expected_meta['param_shapes']
  for name in sorted(set(saved) | set(expected)):
    if saved.get(name) != expected.get(name):
      raise IncompatibleCheckpointError(
          f'Checkpoint {where} does not fit the configured model: parameter '
          f'{name!r} has shape {saved.get(name)} in the checkpoint but '
          f'{expected.get(name)} in the model (missing = None). Check '
          f'config.model against {where}/../../{CONFIG_FILE}.')
  if 'opt_state_shapes' in saved_meta and 'opt_state_shapes' in expected_meta:
    saved, expected = saved_meta['opt_state_shapes'], expected_meta['opt_state_shapes']
    if saved != expected:
      diff = sorted(k for k in set(saved) | set(expected)
                    if saved.get(k) != expected.get(k))
      raise IncompatibleCheckpointError(
          f'Checkpoint {where} holds a different optimizer state than config.optim '
          f'builds ({len(diff)} entries differ, e.g. {diff[0]!r}: {saved.get(diff[0])} '
          f'saved, {expected.get(diff[0])} now). Was grad_accum_steps, weight_decay or '
          f'clip_grad_norm changed? Restore the original config.optim to resume.')


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs of ``abstract`` carrying the matching ``shardings`` leaves."""
  leaves, treedef = jax.tree.flatten(abstract)
  sh = jax.tree.leaves(shardings)
  if len(sh) != len(leaves):
    raise ValueError(f'{len(sh)} shardings for {len(leaves)} arrays.')
  return treedef.unflatten([
      jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) for a, s in zip(leaves, sh)])


class TrainCheckpointer:
  """An orbax CheckpointManager for one training run in ``workdir/checkpoints``.

  Saves every ``ckpt_cfg.every_steps`` steps, every ``ckpt_cfg.every_minutes``
  minutes and on preemption; keeps the last ``ckpt_cfg.max_to_keep``; saves
  asynchronously when ``ckpt_cfg.async_save``.
  """

  def __init__(self, workdir: str, ckpt_cfg, *, read_only: bool = False):
    policies = [ocm.PreemptionCheckpointingPolicy()]
    if ckpt_cfg.every_steps and ckpt_cfg.every_steps > 0:
      policies.append(ocm.FixedIntervalPolicy(int(ckpt_cfg.every_steps)))
    if ckpt_cfg.every_minutes and ckpt_cfg.every_minutes > 0:
      policies.append(_EveryMinutesPolicy(float(ckpt_cfg.every_minutes)))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.max_to_keep,
        save_decision_policy=ocm.AnySavePolicy(policies),
        enable_async_checkpointing=bool(ckpt_cfg.async_save),
        cleanup_tmp_directories=True,
        read_only=read_only,
        create=not read_only)
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=('params', 'opt_state', 'data', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether a save policy (steps, minutes, preemption) asks to save ``step``."""
    return self.manager.should_save(step)

  def save(self, step: int, params, opt_state, data_state: dict, meta: dict, *,
           force: bool = False) -> bool:
    """Saves if a policy asks for it (or ``force``); returns whether it saved."""
    if not force and not self.manager.should_save(step):
      return False
    return self.manager.save(
        step, force=force,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=DataStateSave(data_state),
            meta=ocp.args.JsonSave(dict(meta, step=int(step)))))

  def save_params(self, step: int, params, meta: dict) -> None:
    """Saves parameters and metadata only (an averaged checkpoint), and waits."""
    self.manager.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave(dict(meta, step=int(step)))))
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def restore(self, step: int, abstract_params, abstract_opt_state,
              expected_meta: dict):
    """Restores a step onto the shardings carried by the abstract targets.

    Args:
      step: which checkpoint.
      abstract_params, abstract_opt_state: pytrees of jax.ShapeDtypeStruct with
        ``sharding`` set (any mesh).
      expected_meta: this run's meta (vocab fingerprint, parameter shapes);
        a mismatch raises IncompatibleCheckpointError before arrays are read.

    Returns:
      ``(params, opt_state, data_state, meta)``.
    """
    where = os.path.join(self.directory, str(step))
    meta = self.read_meta(step)
    check_compatible(meta, expected_meta, where)
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state),
        data=DataStateRestore()))
    return out.params, out.opt_state, out.data, meta

  def restore_params(self, step: int, abstract_params, expected_meta: dict):
    """Restores only a step's parameters (for decoding; ``Workdir.restore``).

    Args:
      step: which checkpoint.
      abstract_params: ShapeDtypeStructs with ``sharding`` set.
      expected_meta: as in :meth:`restore`; checked before arrays are read.
    """
    where = os.path.join(self.directory, str(step))
    check_compatible(self.read_meta(step), expected_meta, where)
    return self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params))).params

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# ----------------------------------------------------------------------------
# Parameters for decoding.


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The ConfigDict train/loop.py wrote to ``workdir/config.json``."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir} is not a training workdir.')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def abstract_model(workdir: str, vocab_size: int | None = None):
  """The workdir's model with abstract (shape-only) arrays, and its config.

  Returns:
    ``(graphdef, abstract_params, rest, config)`` where ``abstract_params`` is
    the nnx.State of Params as ShapeDtypeStructs.
  """
  from flax import nnx
  from transformer_jax.model import families
  from transformer_jax import model as model_lib
  config = load_config(workdir)
  if vocab_size is None:
    ckpt = TrainCheckpointer(workdir, config.checkpoint, read_only=True)
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f'No checkpoints in {ckpt.directory}.')
    vocab_size = ckpt.read_meta(steps[-1])['vocab_size']
  cfg = model_lib.TransformerConfig.from_config(config.model, vocab_size)
  model = nnx.eval_shape(
      lambda: families.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest, config


def restore_params(workdir: str, step: int | None = None,
                   average_last: int | None = None, *, mesh=None):
  """Restores the model parameters of a training workdir (no optimizer state).

  Args:
    workdir: the training workdir (or the output of ``average_checkpoints``).
    step: which checkpoint; default the latest.
    average_last: average the parameters of the last K checkpoints up to
      ``step`` (Sec 6.1: 5 for base, 20 for big); None or 1 = no averaging.
    mesh: place the parameters on this mesh with the config's rules; default
      replicated on the first local device.

  Returns:
    ``(params, graphdef, rest, config)``: an nnx.State of Params such that
    ``nnx.merge(graphdef, params, rest)`` is the Transformer; ``config`` is the
    workdir's ConfigDict.
  """
  config = load_config(workdir)
  ckpt = TrainCheckpointer(workdir, config.checkpoint, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f'No checkpoints in {ckpt.directory}.')
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise FileNotFoundError(f'No checkpoint for step {step} in {ckpt.directory} '
                            f'(steps: {steps}).')
  k = int(average_last or 1)
  chosen = [s for s in steps if s <= step][-k:]
  if len(chosen) < k:
    raise ValueError(f'Asked to average the last {k} checkpoints up to step {step}, '
                     f'but {ckpt.directory} holds only {chosen}.')
  meta = ckpt.read_meta(step)
  graphdef, abstract, rest, config = abstract_model(workdir, meta['vocab_size'])
  if mesh is None:
    shardings = jax.tree.map(
        lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), abstract)
  else:
    from transformer_jax import sharding
    shardings = sharding.param_shardings(
        abstract, mesh, sharding.rules_from_config(config.mesh))
  target = with_shardings(abstract, shardings)
  expected = dict(meta, param_shapes=param_shapes(abstract))
  total = None
  for s in chosen:
    check_compatible(ckpt.read_meta(s), expected, os.path.join(ckpt.directory, str(s)))
    params = ckpt.manager.restore(s, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target))).params
    if total is None:
      total = params
    else:
      total = jax.tree.map(lambda a, b: a + b, total, params)
  if len(chosen) > 1:
    total = jax.tree.map(lambda a: (a / len(chosen)).astype(a.dtype), total)
  return total, graphdef, rest, config


def average_checkpoints(workdir: str, last_k: int, out_dir: str | None = None,
                        step: int | None = None) -> str:
  """Writes the average of the last ``last_k`` checkpoints as a new workdir.

  The output holds config.json, the vocabulary and one checkpoint (at the last
  averaged step) with the averaged params, so ``restore_params(out_dir)`` and the
  translate CLI read it like any workdir.

  Returns:
    The output directory (default ``workdir/averaged_last{K}``).
  """
  params, _, _, config = restore_params(workdir, step, average_last=last_k)
  ckpt = TrainCheckpointer(workdir, config.checkpoint, read_only=True)
  steps = ckpt.all_steps()
  step = steps[-1] if step is None else int(step)
  meta = ckpt.read_meta(step)
  out_dir = out_dir or os.path.join(workdir, f'averaged_last{last_k}')
  os.makedirs(out_dir, exist_ok=True)
  shutil.copy(os.path.join(workdir, CONFIG_FILE), os.path.join(out_dir, CONFIG_FILE))
  if os.path.isdir(os.path.join(workdir, VOCAB_DIR)):
    shutil.copytree(os.path.join(workdir, VOCAB_DIR), os.path.join(out_dir, VOCAB_DIR),
                    dirs_exist_ok=True)
  averaged = [s for s in steps if s <= step][-last_k:]
  manager = ocp.CheckpointManager(
      os.path.join(os.path.abspath(out_dir), CHECKPOINT_DIR),
      item_names=('params', 'meta'))
  manager.save(step, force=True, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      meta=ocp.args.JsonSave(dict(meta, averaged_steps=averaged))))
  manager.wait_until_finished()
  manager.close()
  return out_dir

