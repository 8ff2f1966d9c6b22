"""Checkpoints: an orbax CheckpointManager for one run, its save policies and resume.

A run's ``checkpoints/`` folder (the rest of the run directory is ``run/workdir.py``)::

  workdir/checkpoints/<step>/        one orbax checkpoint per saved step, items:
      params/      nnx.State of the model's Params (sharded arrays)
      opt_state/   the optax state (same shardings as the params)
      data/        input-iterator state, one JSON file per process
      meta/        JSON: step, vocab fingerprint, vocab size, parameter shapes

Orbax writes each step into a temporary folder and renames it when every item and
every process has finished, so a crash mid-save leaves the previous checkpoint as
the latest one. Arrays are restored onto whatever shardings the caller asks for, so
a checkpoint written on 8 devices restores onto 1 and back.

Restoring for decoding (a step, or the mean of the last K, onto any mesh) and
writing an averaged run go through ``run.workdir.Workdir``, which builds its
:class:`TrainCheckpointer` once; from the shell: ``python -m transformer_jax.checkpoint``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from absl import logging
from orbax.checkpoint import checkpoint_managers as ocm

from transformer_jax.run import integrity

CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'damaged_checkpoints'


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
  check_layer_layout(saved, expected, where)
  for name in sorted(set(saved) | set(expected)):
    if saved.get(name) != expected.get(name):
      raise IncompatibleCheckpointError(
          f'Checkpoint {where} does not fit the configured model: parameter '
          f'{name!r} has shape {saved.get(name)} in the checkpoint but '
          f'{expected.get(name)} in the model (missing = None). Check '
          f'config.model against the run\'s config.json.')
  if 'opt_state_shapes' in saved_meta and 'opt_state_shapes' in expected_meta:
    saved, expected = saved_meta['opt_state_shapes'], expected_meta['opt_state_shapes']
    if saved != expected:
      diff = sorted(k for k in set(saved) | set(expected)
                    if saved.get(k) != expected.get(k))
      raise IncompatibleCheckpointError(
          f'Checkpoint {where} holds a different optimizer state than config.optim '
          f'builds ({len(diff)} entries differ, e.g. {diff[0]!r}: {saved.get(diff[0])} '
          f'saved, {expected.get(diff[0])} now). Was grad_accum_steps, weight_decay, '
          'clip_grad_norm or skip_nonfinite_updates changed? Restore the original '
          'config.optim to resume.')


def check_layer_layout(saved_shapes, expected_shapes, where: str) -> None:
  """Raises IncompatibleCheckpointError when the checkpoint stores its stacks in the
  other ``model.scan_layers`` layout than the model (named, not a missing-parameter
  list: every layer parameter differs)."""
  from transformer_jax.model import stacking
  saved, expected = stacking.layout_of(saved_shapes), stacking.layout_of(expected_shapes)
  if saved and expected and saved != expected:
    raise IncompatibleCheckpointError(
        f'Checkpoint {where} stores its layers {saved} (model.scan_layers='
        f'{saved == "scanned"}) but the configured model has them {expected} '
        f'(model.scan_layers={expected == "scanned"}): set --config.model.scan_layers='
        f'{saved == "scanned"} to resume it (Workdir.restore converts parameters '
        f'between the layouts for decoding).')


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
  asynchronously when ``ckpt_cfg.async_save``. Lists only complete steps, writes
  a checksum manifest of each step it saved once orbax has committed it, and
  verifies manifest and finiteness on restore (``run/integrity.py``).
  """

  ITEMS = ('params', 'opt_state', 'data', 'meta')

  def __init__(self, workdir: str, ckpt_cfg, *, read_only: bool = False,
               items: tuple[str, ...] = ITEMS):
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
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
    self.read_only = read_only
    self.items = tuple(items)
    self._unhashed: set[int] = set()  # Saved by this process, manifest not yet written.
    self._problems: dict[int, str | None] = {}  # Cache of full verifications.
    self._warned: set[int] = set()
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=('params', 'opt_state', 'data', 'meta'))

  # -- listing -------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """The complete steps, oldest first; damaged ones are skipped with a warning."""
    good = []
    for step, path in sorted(integrity.step_dirs(self.directory).items()):
      problem = integrity.structure_problem(path, self.items)
      if problem is None:
        good.append(step)
      else:
        self._warn_skipped(step, problem)
    return good

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def problem(self, step: int) -> str | None:
    """Why ``step`` cannot be restored (structure, checksums), or None. Cached."""
    if step not in self._problems:
      path = self.step_path(step)
      self._problems[step] = (integrity.structure_problem(path, self.items) or
                              integrity.checksum_problem(path, self.items))
    return self._problems[step]

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def mark_damaged(self, step: int, problem: str) -> None:
    """Records (and warns once) that ``step`` is damaged; ``problem`` says how."""
    self._problems[step] = problem
    self._warn_skipped(step, problem)

  def _warn_skipped(self, step: int, problem: str) -> None:
    if step not in self._warned:
      self._warned.add(step)
      logging.warning('Skipping checkpoint %s: %s.', self.step_path(step), problem)

  # -- saving --------------------------------------------------------------

  def should_save(self, step: int) -> bool:
    """Whether a save policy (steps, minutes, preemption) asks to save ``step``."""
    return self.manager.should_save(step)

  def save(self, step: int, params, opt_state, data_state: dict, meta: dict, *,
           force: bool = False) -> bool:
    """Saves if a policy asks for it (or ``force``); returns whether it saved."""
    if not force and not self.manager.should_save(step):
      return False
    saved = self.manager.save(
        step, force=force,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=DataStateSave(data_state),
            meta=ocp.args.JsonSave(dict(meta, step=int(step)))))
    if saved:
      self._unhashed.add(int(step))
    self._write_checksums()
    return saved

  def _write_checksums(self) -> None:
    """Manifests for this run's steps that orbax has committed since the last call.

    The final folder appears only when orbax renames the finished temporary one,
    so a step still being written asynchronously is left for a later call.
    """
    if self.read_only or jax.process_index() != 0:
      self._unhashed.clear()
      return
    for step in sorted(self._unhashed):
      path = self.step_path(step)
      if not os.path.isdir(path):
        continue  # Still in its temporary folder, or already rotated out.
      if os.path.exists(os.path.join(path, integrity.COMMIT_FILE)):
        try:
          integrity.write_checksums(path)
        except FileNotFoundError:  # Deleted by max_to_keep meanwhile.
          pass
        self._unhashed.discard(step)

  def check_for_errors(self) -> None:
    """Raises the error of a failed asynchronous save (e.g. a full disk) now."""
    self.manager.check_for_errors()

  def save_params(self, step: int, params, meta: dict) -> None:
    """Saves parameters and metadata only (an averaged checkpoint), and waits."""
    self.manager.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave(dict(meta, step=int(step)))))
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  # -- restoring -----------------------------------------------------------

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

    Raises:
      integrity.CorruptCheckpointError: the step is incomplete, its files differ
        from its manifest, or its values are not finite.
    """
    where = self.step_path(step)
    problem = self.problem(step)
    if problem:
      raise integrity.CorruptCheckpointError(f'Checkpoint {where}: {problem}.')
    meta = self.read_meta(step)
    check_compatible(meta, expected_meta, where)
    out = self._restore_items(step, params=ocp.args.StandardRestore(abstract_params),
                              opt_state=ocp.args.StandardRestore(abstract_opt_state),
                              data=DataStateRestore())
    check_finite({'params': out.params, 'opt_state': out.opt_state}, where)
    return out.params, out.opt_state, out.data, meta

  def restore_params(self, step: int, abstract_params, expected_meta: dict):
    """Restores only a step's parameters (for decoding; ``Workdir.restore``).

    Args:
      step: which checkpoint.
      abstract_params: ShapeDtypeStructs with ``sharding`` set.
      expected_meta: as in :meth:`restore`; checked before arrays are read.

    Raises:
      integrity.CorruptCheckpointError: as in :meth:`restore`.
    """
    where = self.step_path(step)
    problem = self.problem(step)
    if problem:
      raise integrity.CorruptCheckpointError(f'Checkpoint {where}: {problem}.')
    check_compatible(self.read_meta(step), expected_meta, where)
    params = self._restore_items(
        step, params=ocp.args.StandardRestore(abstract_params)).params
    check_finite(params, where)
    return params

  def _restore_items(self, step: int, **args):
    """orbax restore; a read error of a step without a manifest is damage."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**args))
    except IncompatibleCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if integrity.has_checksums(self.step_path(step)):
        raise  # Files verified: not damage, a real error to report as is.
      raise integrity.CorruptCheckpointError(
          f'Checkpoint {self.step_path(step)} cannot be read (it has no checksum '
          f'manifest to tell which file is damaged): {integrity._first_line(e)}') from e

  def restore_latest(self, abstract_params, abstract_opt_state, expected_meta: dict):
    """Restores the newest intact step, skipping (and setting aside) damaged ones.

    A damaged step is moved to ``workdir/damaged_checkpoints/`` (kept for
    inspection) unless read-only, so training can save that step number again.
    A checkpoint of another model or vocabulary is not damage: it raises.

    Returns:
      ``(step, params, opt_state, data_state, meta)``, or None when no step is
      intact (a fresh start).
    """
    for step in sorted(integrity.step_dirs(self.directory), reverse=True):
      try:
        return (step,) + self.restore(step, abstract_params, abstract_opt_state,
                                      expected_meta)
      except integrity.CorruptCheckpointError as e:
        self._set_aside(step, str(e))
    return None

  def _set_aside(self, step: int, reason: str) -> None:
    if self.read_only or jax.process_index() != 0:
      self._warn_skipped(step, reason)
      return
    dest_dir = os.path.join(self.workdir, DAMAGED_DIR)
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, f'{step}-{int(time.time())}')
    os.rename(self.step_path(step), dest)
    self._warned.add(step)
    logging.warning('Skipping checkpoint %s (moved to %s): %s', self.step_path(step),
                    dest, reason.split(': ', 1)[-1])
    self.manager.reload()

  def read_meta(self, step: int) -> dict:
    return self._restore_items(step, meta=ocp.args.JsonRestore()).meta

  def wait(self):
    self.manager.wait_until_finished()
    self._write_checksums()

  def close(self):
    try:
      self.manager.wait_until_finished()
      self._write_checksums()
    finally:
      self.manager.close()

  def abandon(self) -> None:
    """Ends the run after an error: waits for saves in flight, but raises none of
    their errors (a full disk fails every save, and the caller reports the
    first), and leaves orbax's threads to the exiting process: closing them
    midway prints a traceback per pending write."""
    try:
      self.manager.wait_until_finished()
      self._write_checksums()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Saves in flight at the error failed too: %s',
                      integrity._first_line(e))


def check_finite(tree, where: str) -> None:
  """Raises CorruptCheckpointError naming the arrays of ``tree`` with NaN or inf."""
  bad = integrity.nonfinite_leaves(tree)
  if bad:
    raise integrity.CorruptCheckpointError(
        f'Checkpoint {where} holds NaN or infinite values in {len(bad)} arrays '
        f'(e.g. {bad[0]}): saved after the run diverged, or its data is damaged.')
