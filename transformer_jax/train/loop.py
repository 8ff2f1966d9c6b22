"""Training: sharded state, the jitted train/eval steps and the loop.

``train_and_evaluate(config, workdir)`` is the whole run: vocabulary and data,
mesh, parameters created already sharded, Adam with the paper's schedule, a
``jax.jit`` train step with in/out shardings and donated state, checkpoints
(resume, preemption), console progress, TensorBoard summaries, dev loss and
perplexity, and BLEU through the ``Translator`` at the end. The run directory
(config.json, checkpoints, vocabulary) is a ``run.workdir.Workdir``, the same
object every command line reads it through.

The same loop trains every model family (``config.model.family``): a task object
(``tasks.py``) supplies the data, the loss and its summed metrics, FLOPs and any
extra evaluation (BLEU for translation, accuracy for classification).

The pieces it is built from (``TrainSetup``, ``shard_batch``) are public so
tests and benchmarks drive the same code.

The train state is a plain dict ``{'params': nnx.State, 'opt_state': optax state,
'step': int32}``; ``step`` counts micro-batches (with gradient accumulation, k of
them make one optimizer update) and seeds dropout, so a resumed run repeats an
uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from transformer_jax.model import families
from transformer_jax import model as model_lib
from transformer_jax import sharding
from transformer_jax.train import tasks as tasks_lib
from transformer_jax.run import checkpoint as checkpoint_lib
from transformer_jax.run import lock as lock_lib
from transformer_jax.run import workdir as workdir_lib
from transformer_jax.train import flops as flops_lib
from transformer_jax.train import budget
from transformer_jax.train import optim

Batch = dict[str, Any]
# The model inputs of any task's batch; other keys (e.g. an eval set's 'index')
# stay on host.
BATCH_KEYS = ('inputs', 'targets', 'inputs_segmentation', 'inputs_position',
              'targets_segmentation', 'targets_position', 'labels', 'mlm_positions',
              'mlm_targets')

# ----------------------------------------------------------------------------
# Sharded state and steps.


def _full_tree(abstract, shardings):
  """The ``shardings`` prefix tree expanded to ``abstract``'s full structure."""
  leaves, treedef = jax.tree.flatten(abstract)
  return treedef.unflatten(jax.tree.leaves(shardings))


def shard_batch(batch: Batch, mesh: jax.sharding.Mesh) -> Batch:
  """This process's numpy batch -> global jax arrays split over ('data', 'fsdp').

  Every process passes its own rows; the global batch is their concatenation.
  """
  shards = sharding.batch_divisor(mesh)
  out = {}
  for key, value in batch.items():
    if key not in BATCH_KEYS:
      continue
    value = np.asarray(value)
    rows = value.shape[0] * jax.process_count()
    if rows % shards:
      raise ValueError(
          f'Batch {key!r} has {value.shape[0]} rows on each of {jax.process_count()} '
          f'processes ({rows} in all), which the mesh {dict(mesh.shape)} cannot split '
          f'into {shards} equal shards along (data, fsdp).')
    out[key] = jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh, value.ndim), value)
  return out


@dataclasses.dataclass
class TrainSetup:
  """Model, optimizer, shardings and jitted steps for one config on one mesh.

  Attributes:
    model_cfg: the TransformerConfig.
    task: what is trained (``tasks.for_config(config)``): loss, data, evaluation.
    mesh, rules: the device mesh and logical-axis rules.
    graphdef, rest: the model's structure and its non-parameter state (RNG
      streams), which is not trained.
    tx: the optax transformation.
    state_shardings: NamedShardings of the train-state dict.
    abstract_state: ShapeDtypeStructs (with shardings) of the train-state dict.
  """
  config: Any
  model_cfg: model_lib.TransformerConfig
  task: tasks_lib.Task
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  graphdef: Any
  rest: Any
  tx: optax.GradientTransformation
  state_shardings: dict
  abstract_state: dict
  _compiled: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def create(cls, config, vocab_size: int, mesh: jax.sharding.Mesh, *,
             compile_only: bool = False) -> 'TrainSetup':
    """Builds the setup; ``compile_only``: the mesh's devices can compile but not run
    (a TPU topology description in ``dry_run``), so the RNG-stream state the step
    closes over is made on the host instead of on the mesh."""
    model_cfg = model_lib.TransformerConfig.from_config(config.model, vocab_size)
    task = tasks_lib.for_config(config)
    sharding.check_divides(mesh, num_heads=model_cfg.num_heads, vocab_size=vocab_size,
                           d_ff=model_cfg.ffn_hidden_dim)
    rules = sharding.rules_from_config(config.mesh)
    tx = optim.make_optimizer(config.optim, model_cfg.d_model, config.train.num_steps)
    abstract_model = nnx.eval_shape(
        lambda: families.build_model(model_cfg, rngs=nnx.Rngs(params=0, dropout=0)))
    graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = {'params': abstract_params, 'opt_state': abstract_opt,
                'step': jax.ShapeDtypeStruct((), jnp.int32)}
    shardings = {
        'params': _full_tree(abstract_params, sharding.param_shardings(
            abstract_params, mesh, rules)),
        'opt_state': _full_tree(abstract_opt, sharding.param_shardings(
            abstract_opt, mesh, rules)),
        'step': replicated,
    }
    del abstract_rest
    rest = _init_rest(model_cfg, config.seed, jax.sharding.SingleDeviceSharding(
        jax.devices('cpu')[0]) if compile_only else replicated)
    return cls(config=config, model_cfg=model_cfg, task=task, mesh=mesh, rules=rules,
               graphdef=graphdef, rest=rest, tx=tx, state_shardings=shardings,
               abstract_state=checkpoint_lib.with_shardings(abstract, shardings))

  def with_config(self, config) -> 'TrainSetup':
    """This setup for ``config`` whose cosine ends at another ``train.num_steps`` (a
    budget fit): an optimizer with the same state structure, compiled anew."""
    tx = optim.make_optimizer(config.optim, self.model_cfg.d_model, config.train.num_steps)
    return dataclasses.replace(self, config=config, tx=tx, _compiled={})

  def init_state(self) -> dict:
    """Fresh parameters and optimizer state, created directly with their shardings."""
    model_cfg, tx, seed = self.model_cfg, self.tx, self.config.seed

    def init():
      model = families.build_model(
          model_cfg, rngs=nnx.Rngs(params=jax.random.key(seed), dropout=0))
      params = nnx.state(model, nnx.Param)
      return {'params': params, 'opt_state': tx.init(params),
              'step': jnp.zeros((), jnp.int32)}

    with jax.set_mesh(self.mesh):
      return jax.jit(init, out_shardings=self.state_shardings)()

  # -- steps ---------------------------------------------------------------

  def _dropout_rest(self, params, step):
    """The RNG-stream state reseeded for ``step``.

    Dropout masks depend only on (seed, step), so a resumed run is exact. Done
    outside ``jax.grad``: NNX variables may only change at their own trace level.
    """
    model = nnx.merge(self.graphdef, params, self.rest, copy=True)
    # match_shape: scanned layers hold one dropout key per layer ([N] keys), each
    # reseeded from its own split of the step's key.
    nnx.reseed(model, dropout=jax.random.fold_in(
        jax.random.key(self.config.seed + 1), step), policy='match_shape')
    return nnx.split(model, nnx.Param, ...)[2]

  def _loss_fn(self, params, rest, batch: Batch, *, train: bool):
    # Fresh Variables at this trace level: dropout advances its RNG counter.
    model = nnx.merge(self.graphdef, params, rest, copy=True)
    return self.task.loss(model, batch, self.config, train=train)

  def _train_step(self, state: dict, batch: Batch):
    grad_fn = jax.value_and_grad(functools.partial(self._loss_fn, train=True),
                                 has_aux=True)
    rest = self._dropout_rest(state['params'], state['step'])
    (_, sums), grads = grad_fn(state['params'], rest, batch)
    updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    sums['grad_norm'] = optax.global_norm(grads)
    return {'params': params, 'opt_state': opt_state,
            'step': state['step'] + 1}, sums

  def _eval_step(self, params, batch: Batch):
    return self._loss_fn(params, self.rest, batch, train=False)[1]

  @functools.cached_property
  def _jitted_train(self):
    batch_spec = sharding.batch_sharding(self.mesh, 2)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    return jax.jit(self._train_step,
                   in_shardings=(self.state_shardings, batch_spec),
                   out_shardings=(self.state_shardings, replicated),
                   donate_argnums=(0,))

  @functools.cached_property
  def _jitted_eval(self):
    batch_spec = sharding.batch_sharding(self.mesh, 2)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    return jax.jit(self._eval_step,
                   in_shardings=(self.state_shardings['params'], batch_spec),
                   out_shardings=replicated)

  def compiled_train_step(self, batch: Batch) -> Callable:
    """The train step compiled for this batch's shapes (one compile per shape)."""
    key = tuple(sorted((k, v.shape) for k, v in batch.items()))
    if key not in self._compiled:
      with jax.set_mesh(self.mesh), sharding.logical_rules(self.rules):
        lowered = self._jitted_train.lower(self.abstract_state, batch)
        compiled = lowered.compile()
      if not self._compiled:
        _log_memory(compiled, key)
      self._compiled[key] = compiled
    return self._compiled[key]

  def train_step(self, state: dict, batch: Batch):
    """One step: (state, global batch) -> (new state, metric sums). Donates state."""
    with jax.set_mesh(self.mesh), sharding.logical_rules(self.rules):
      return self.compiled_train_step(batch)(state, batch)

  def eval_step(self, params, batch: Batch) -> dict:
    """Deterministic loss sums over a global batch (no update)."""
    with jax.set_mesh(self.mesh), sharding.logical_rules(self.rules):
      return self._jitted_eval(params, batch)

  def learning_rate(self, step: int) -> float:
    """The learning rate the update at micro-step ``step`` (0-based) used."""
    schedule = optim.schedule_from_config(self.config.optim, self.model_cfg.d_model,
                                          self.config.train.num_steps)
    return float(schedule(step // max(1, self.config.optim.grad_accum_steps)))


def _init_rest(model_cfg, seed, out_sharding):
  """The model's RNG-stream state; jit drops the unused parameter initialisers."""

  def init():
    model = families.build_model(model_cfg, rngs=nnx.Rngs(params=0, dropout=seed + 1))
    return nnx.split(model, nnx.Param, ...)[2]

  return jax.jit(init, out_shardings=out_sharding)()


def _log_memory(compiled, key) -> None:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # Some backends do not implement it.
    mem = None
  if mem is None:
    logging.info('Compiled train step for %s (no memory analysis on this backend).', key)
    return
  logging.info(
      'Compiled train step for %s, per device: arguments %s, outputs %s (%s aliased '
      'by donation), temporaries %s, code %s.', key, _bytes(mem.argument_size_in_bytes),
      _bytes(mem.output_size_in_bytes), _bytes(mem.alias_size_in_bytes),
      _bytes(mem.temp_size_in_bytes), _bytes(mem.generated_code_size_in_bytes))


def _bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.1f} {unit}'
    n /= 1024
  return ''


# ----------------------------------------------------------------------------
# The loop.


class _Preemption:
  """Turns SIGTERM into a flag the loop polls, so it can save before exiting.

  With several processes, jax's preemption service (jax.distributed) owns
  SIGTERM and orbax's ``reached_preemption`` makes every process agree.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # Not the main thread.
        self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint and stopping.')
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def evaluate_loss(setup: TrainSetup, params, eval_set, batch_size: int,
                  max_batches: int = 0) -> dict[str, float]:
  """Dev loss (label-smoothed) and per-token perplexity (plain NLL), Table 3's PPL,
  plus the task's other summed metrics (e.g. 'accuracy'), see ``tasks.summarize``.

  ``eval_set.batches(batch_size)`` yields this process's rows of each global batch.
  """
  totals = {'loss_sum': 0.0, 'nll_sum': 0.0, 'tokens': 0.0}
  for i, batch in enumerate(eval_set.batches(batch_size)):
    if max_batches and i >= max_batches:
      break
    sums = jax.device_get(setup.eval_step(params, shard_batch(batch, setup.mesh)))
    for k, value in sums.items():
      totals[k] = totals.get(k, 0.0) + float(value)
  return tasks_lib.summarize(totals)


def evaluate_workdir(workdir: str, step: int | None = None,
                     max_batches: int = 0) -> dict[str, float]:
  """The dev metrics of a run's checkpoint (latest by default), any family: dev loss
  and perplexity, plus accuracy for the encoder-only tasks; every batch unless
  ``max_batches``. E.g. the validation nats per character of a language model."""
  wd = workdir_lib.Workdir.open(workdir)
  config = wd.config
  restored = wd.restore(step)
  mesh = sharding.create_mesh(config.mesh)
  setup = TrainSetup.create(config, int(restored.meta['vocab_size']), mesh)
  _, train_iter, eval_sets = setup.task.get_datasets(
      config, wd.path, process_index=jax.process_index(),
      process_count=jax.process_count(), batch_multiple=sharding.batch_divisor(mesh))
  if hasattr(train_iter, 'close'):
    train_iter.close()
  params = jax.device_put(restored.params, setup.state_shardings['params'])
  metrics = evaluate_loss(setup, params, eval_sets['validation'],
                          config.data.eval_batch_size, max_batches)
  return dict(metrics, step=restored.step)


def _init_from(setup: TrainSetup, workdir: str):
  """Parameters of ``workdir``'s latest checkpoint (e.g. masked-LM pre-training), laid
  out on this run's shardings, to start fine-tuning from."""
  try:
    params = workdir_lib.Workdir.open(workdir).restore(mesh=setup.mesh).params
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f'config.train.init_from={workdir!r}: {e}') from e
  want = checkpoint_lib.param_shapes(setup.abstract_state['params'])
  got = checkpoint_lib.param_shapes(params)
  if want != got:
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    raise checkpoint_lib.IncompatibleCheckpointError(
        f'config.train.init_from={workdir!r} holds a different model: e.g. {diff[0]!r} '
        f'is {got.get(diff[0])} there and {want.get(diff[0])} here.')
  return jax.device_put(params, setup.state_shardings['params'])


def _summary_writer(run_dir: workdir_lib.Workdir):
  if jax.process_index() != 0:
    return None
  try:
    from flax.metrics import tensorboard
  except ImportError as e:
    raise ModuleNotFoundError(
        f'TensorBoard summaries need TensorFlow, which flax.metrics.tensorboard imports '
        f'({e}): install requirements.txt (tensorflow-cpu).') from e
  return tensorboard.SummaryWriter(run_dir.tensorboard_dir)


def _get_datasets(config, workdir, batch_multiple):
  return tasks_lib.for_config(config).get_datasets(
      config, workdir, process_index=jax.process_index(),
      process_count=jax.process_count(), batch_multiple=batch_multiple)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint).

  Returns:
    ``{'step', 'train_loss': {step: loss}, 'eval': last dev metrics, 'bleu',
    'averaged_eval': the dev metrics of the last eval.average_last checkpoints
    averaged (tasks with ``final_eval_averages``; {} otherwise), 'state': the final
    train state, 'setup': the TrainSetup}``; the per-step
    losses are those of this invocation (steps count micro-batches).
  """
  start_time = time.time()
  if config.train.get('needs_init_from') and not config.train.get('init_from'):
    raise ValueError('This config fine-tunes a pre-trained run: give its workdir with '
                     '--config.train.init_from=DIR.')
  workdir = os.path.abspath(workdir)
  lock = None
  if jax.process_index() == 0:
    lock = lock_lib.WorkdirLock(workdir).acquire()
    if lock.took_over:
      logging.warning('Took over the workdir lock of pid %s on host %s, which ended '
                      'without releasing it.', lock.took_over.get('pid'),
                      lock.took_over.get('host'))
  try:
    return _train_locked(config, workdir, start_time)
  finally:
    if lock is not None:
      lock.release()


def _train_locked(config, workdir: str, start_time: float) -> dict:
  # Nothing but the lock (and a fresh run's vocabulary) is written into the
  # workdir before the restart is known to fit: mesh, vocabulary, shapes.
  budget_fit = budget.read(workdir) if budget.applies(config) else None
  if budget_fit is not None:
    config = budget.apply(config, budget_fit)
    logging.info('The budget fit made at step %d holds: the cosine ends at update %d, '
                 'checkpoints every %d steps (%s).', budget_fit.fitted_at_step,
                 budget_fit.num_steps, budget_fit.checkpoint_every_steps, budget.FIT_FILE)
  mesh = sharding.create_mesh(config.mesh)
  # Every local device holding a batch shard gets whole rows.
  local_batch_shards = max(1, sharding.batch_divisor(mesh) // jax.process_count())
  tokenizer, train_iter, eval_sets = _get_datasets(config, workdir, local_batch_shards)
  setup = TrainSetup.create(config, tokenizer.vocab_size, mesh)
  if eval_sets:
    sharding.check_divides(mesh, global_batch=config.data.eval_batch_size)
  run_dir = workdir_lib.Workdir(workdir, config)
  ckpt = run_dir.checkpointer(read_only=False)
  meta = {'vocab_fingerprint': tokenizer.fingerprint()['sha256'],
          'vocab_size': tokenizer.vocab_size,
          'param_shapes': checkpoint_lib.param_shapes(setup.abstract_state['params']),
          'opt_state_shapes': checkpoint_lib.param_shapes(
              setup.abstract_state['opt_state'])}

  restored = ckpt.restore_latest(setup.abstract_state['params'],
                                 setup.abstract_state['opt_state'], meta)
  run_dir.write_config(config)
  if restored is None:
    latest = None
    state = setup.init_state()
    logging.info('Initialised %s parameters on mesh %s.', f'{_count(state["params"]):,}',
                 dict(mesh.shape))
    init_from = config.train.get('init_from')
    if init_from:
      params = _init_from(setup, init_from)
      state = {'params': params, 'opt_state': jax.jit(
          setup.tx.init, out_shardings=setup.state_shardings['opt_state'])(params),
               'step': state['step']}
      logging.info('Parameters initialised from the latest checkpoint of %s.', init_from)
  else:
    latest, params, opt_state, data_state, _ = restored
    state = {'params': params, 'opt_state': opt_state,
             'step': jax.device_put(jnp.asarray(latest, jnp.int32),
                                    setup.state_shardings['step'])}
    train_iter.set_state(data_state)
    logging.info('Resumed from step %d in %s.', latest, ckpt.directory)

  accum = max(1, config.optim.grad_accum_steps)
  total_steps = config.train.num_steps * accum
  step = int(latest or 0)
  writer = _summary_writer(run_dir)
  if writer is not None and step == 0:
    writer.hparams(_flat_hparams(config))
  peak = flops_lib.peak_flops_per_device(config.train)
  preemption = _Preemption()
  log_every = max(1, config.train.log_every_steps)
  history, pending, eval_metrics = {}, [], {}
  window_start, window_flops = time.time(), 0.0
  skip_tokens = step
  profiler = _Profiler(run_dir.profile_dir) if config.train.profile else None
  max_minutes = float(config.train.get('max_minutes', 0.0) or 0.0)
  out_of_time = False
  guard = _FiniteGuard(int(config.optim.get('skip_nonfinite_updates', 0) or 0), ckpt)
  previous_sums = None
  # The fit is made once, at the last warm-up step: the learning rates so far do not
  # depend on where the cosine ends.
  fit_step = (config.optim.warmup_steps * accum if budget.applies(config) and
              budget_fit is None and max_minutes else None)
  timed_from = None  # (time, step) after the first compiled step.
  try:
    while step < total_steps:
      local = next(train_iter)
      if jax.process_count() > 1:
        _check_same_shapes(local, step + 1)
      batch = shard_batch(local, mesh)
      compiles = len(setup._compiled)
      state, sums = setup.train_step(state, batch)
      step += 1
      # One step in flight, no more: jax dispatches asynchronously, and unchecked the
      # loop would run up to log_every_steps steps ahead of the device, so SIGTERM
      # (polled below) would be acted on only once all of those had run, past the
      # grace period before SIGKILL. The device still has this step while this one
      # waits for the previous one.
      if previous_sums is not None:
        jax.block_until_ready(previous_sums)
      previous_sums = sums
      if len(setup._compiled) != compiles:  # Time compiling is not step time.
        jax.block_until_ready(sums)
        window_start, window_flops, skip_tokens = time.time(), 0.0, step
        timed_from = timed_from or (window_start, step)
      else:
        window_flops += setup.task.train_flops(setup.model_cfg, batch)
      pending.append((step, sums))
      if profiler is not None:
        profiler(step - skip_tokens, step)

      if step == fit_step:
        budget_fit = _fit_to_budget(config, step, timed_from, start_time)
        if budget_fit is not None:
          config = budget.apply(config, budget_fit)
          setup = setup.with_config(config)
          total_steps = config.train.num_steps * accum
          run_dir.close()  # The checkpointer saves at the fitted interval from now on.
          run_dir = workdir_lib.Workdir(workdir, config)
          run_dir.write_config(config)
          ckpt = guard.ckpt = run_dir.checkpointer(read_only=False)
          if jax.process_index() == 0:
            budget.write(workdir, budget_fit)

      if config.checkpoint.async_save:
        ckpt.check_for_errors()  # A failed background save (full disk) stops the run.
      stop = preemption.requested or ckpt.reached_preemption(step)
      if (max_minutes and not stop and step < total_steps
          and (jax.process_count() == 1 or step % log_every == 0)):
        # Several processes compare clocks only at log steps (one all-gather).
        out_of_time = _agree(time.time() - start_time >= 60 * max_minutes)
        stop = out_of_time
      save = stop or step == total_steps or ckpt.should_save(step)
      if save and not (step % log_every == 0 or step == total_steps or stop):
        # Never save parameters made from a non-finite loss or gradient.
        guard.check([(i, jax.device_get(m)) for i, m in pending])
      if step % log_every == 0 or step == total_steps or stop:
        fetched = jax.device_get([p[1] for p in pending])
        guard.check([(i, m) for (i, _), m in zip(pending, fetched)])
        kept = [(p, m) for p, m in zip(pending, fetched) if _finite(m)]
        pending, fetched = [p for p, _ in kept], [m for _, m in kept]
        for (i, _), m in zip(pending, fetched):
          history[i] = float(m['loss_sum']) / max(float(m['tokens']), 1.0)
        tokens = sum(float(m['tokens']) for m in fetched)
        timed = [(i, m) for (i, _), m in zip(pending, fetched) if i > skip_tokens]
        timed_tokens = sum(float(m['tokens']) for _, m in timed)
        loss = sum(float(m['loss_sum']) for m in fetched) / max(tokens, 1.0)
        nll = sum(float(m['nll_sum']) for m in fetched) / max(tokens, 1.0)
        elapsed = time.time() - window_start
        metrics = {
            'train/loss': loss, 'train/perplexity': float(np.exp(nll)),
            'train/learning_rate': setup.learning_rate(step - 1),
            'train/grad_norm': float(fetched[-1]['grad_norm']) if fetched else 0.0}
        extra = {k: v for k, v in tasks_lib.summarize(
            {k: sum(float(m[k]) for m in fetched) for k in fetched[-1]}).items()
                 if k not in ('loss', 'perplexity', 'nll', 'tokens')} if fetched else {}
        metrics.update({f'train/{k}': v for k, v in extra.items()})
        speed = 'compiling'
        if timed:
          metrics['train/tokens_per_second'] = timed_tokens / elapsed
          metrics['train/step_seconds'] = elapsed / len(timed)
          speed = (f'{timed_tokens / elapsed:,.0f} {setup.task.unit}/s, '
                   f'{elapsed / len(timed):.3g} s/step')
          if peak:
            metrics['train/mfu'] = window_flops / elapsed / (peak * jax.device_count())
            speed += f', MFU {100 * metrics["train/mfu"]:.1f}%'
          speed += f', ETA {_eta((total_steps - step) * elapsed / len(timed))}'
        logging.info('step %d/%d (update %d) loss %.4f ppl %.2f%s lr %.3g %s', step,
                     total_steps, step // accum, loss, np.exp(nll),
                     ''.join(f' {k} {v:.4f}' for k, v in extra.items()),
                     metrics['train/learning_rate'], speed)
        if writer is not None:
          _write_scalars(writer, step, metrics)
        pending, window_flops = [], 0.0
        window_start = time.time()

      # Time spent evaluating and saving is not step time: shift the window.
      pause_start = time.time()
      every_eval = config.train.eval_every_steps
      if eval_sets and every_eval and (step % every_eval == 0 or step == total_steps
                                       or out_of_time):
        eval_metrics = evaluate_loss(
            setup, state['params'], eval_sets['validation'],
            config.data.eval_batch_size, config.train.eval_max_batches)
        extra = {k: v for k, v in eval_metrics.items()
                 if k not in ('loss', 'perplexity', 'nll', 'tokens')}
        logging.info('step %d dev loss %.4f dev ppl %.2f%s', step, eval_metrics['loss'],
                     eval_metrics['perplexity'],
                     ''.join(f' dev {k} {v:.4f}' for k, v in extra.items()))
        if writer is not None:
          _write_scalars(writer, step, {'eval/loss': eval_metrics['loss'],
                                        'eval/perplexity': eval_metrics['perplexity'],
                                        **{f'eval/{k}': v for k, v in extra.items()}})
          writer.flush()

      if save:
        ckpt.save(step, state['params'], state['opt_state'], train_iter.get_state(),
                  meta, force=True)
        logging.info('Saving checkpoint for step %d.', step)
      if out_of_time:
        logging.info('Time budget of train.max_minutes=%g reached at step %d (%.1f '
                     'minutes): saved.', max_minutes, step, (time.time() - start_time) / 60)
        break
      if stop:
        logging.warning('Stopped at step %d after a preemption request.', step)
        break
      every_bleu = config.train.bleu_every_steps
      if every_bleu > 0 and step % every_bleu == 0 and step != total_steps:
        setup.task.extra_eval(setup, state['params'], tokenizer, eval_sets, config,
                              workdir, step, writer, final=False)
      window_start += time.time() - pause_start
  except BaseException:
    ckpt.abandon()  # Let good saves in flight finish; the error in flight is the news.
    preemption.restore()
    raise
  # A second SIGTERM while the last save is written must not kill the process before
  # orbax commits it: the handler stays until the saves are done.
  run_dir.close()
  preemption.restore()

  bleu, averaged = {}, {}
  finished = step >= total_steps or out_of_time
  if finished and eval_sets and config.train.bleu_every_steps >= 0:
    bleu = setup.task.extra_eval(setup, state['params'], tokenizer, eval_sets, config,
                                 workdir, step, writer, final=True)
  if finished and eval_sets and setup.task.final_eval_averages:
    averaged = _averaged_eval(setup, workdir, eval_sets['validation'], config, step,
                              writer)
  if writer is not None:
    writer.close()
  return {'step': step, 'train_loss': history, 'eval': eval_metrics, 'bleu': bleu,
          'averaged_eval': averaged, 'state': state, 'setup': setup,
          'out_of_time': out_of_time, 'minutes': (time.time() - start_time) / 60}


def _averaged_eval(setup: TrainSetup, workdir: str, eval_set, config, step: int,
                   writer) -> dict[str, float]:
  """Dev metrics of the average of the last ``config.eval.average_last`` checkpoints
  (Sec 6.1), restored as ``classify --average_last`` restores them; {} when the
  config asks for no average or fewer checkpoints were kept."""
  k = int(config.eval.average_last or 1)
  run_dir = workdir_lib.Workdir(workdir, config)
  if k < 2 or len(run_dir.steps()) < k:
    return {}
  restored = run_dir.restore(average_last=k, mesh=setup.mesh)
  params = jax.device_put(restored.params, setup.state_shardings['params'])
  metrics = evaluate_loss(setup, params, eval_set, config.data.eval_batch_size)
  extra = {name: value for name, value in metrics.items()
           if name not in ('loss', 'perplexity', 'nll', 'tokens')}
  logging.info('step %d, average of checkpoints %s: dev loss %.4f%s', step,
               list(restored.steps), metrics['loss'],
               ''.join(f' dev {n} {v:.4f}' for n, v in extra.items()))
  if writer is not None:
    _write_scalars(writer, step, {'eval_averaged/loss': metrics['loss'],
                                  **{f'eval_averaged/{n}': v for n, v in extra.items()}})
    writer.flush()
  return dict(metrics, steps=list(restored.steps))


def _fit_to_budget(config, step: int, timed_from, start_time: float
                   ) -> budget.BudgetFit | None:
  """The budget fit at ``step`` (process 0's, on every process), logged; None when
  the configured schedule fits or too few steps were timed to tell."""
  timed = step - timed_from[1] if timed_from else 0
  if timed < budget.MIN_TIMED_STEPS:
    logging.warning('train.fit_to_budget: only %d steps timed by step %d; the schedule '
                    'stays as configured.', timed, step)
    return None
  now = time.time()
  seconds_per_step = (now - timed_from[0]) / timed
  seconds_left = 60 * float(config.train.max_minutes) - (now - start_time)
  fitted = budget.fit(config, step, seconds_per_step, seconds_left)
  if jax.process_count() > 1:  # Every process trains on process 0's fit.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    ends, every = multihost_utils.broadcast_one_to_all(np.asarray(
        [fitted.num_steps, fitted.checkpoint_every_steps] if fitted else [0, 0], np.int64))
    fitted = budget.BudgetFit(int(ends), int(every), step, seconds_per_step,
                              float(config.train.max_minutes)) if ends else None
  if fitted is None:
    logging.info('train.fit_to_budget: %.3g s/step leaves room for all %d updates in '
                 'the budget; the schedule stays.', seconds_per_step, config.train.num_steps)
  else:
    logging.info('train.fit_to_budget: %.3g s/step over steps %d-%d; the %g-minute '
                 'budget holds ~%d updates: the cosine now ends there (was %d), '
                 'checkpoints every %d steps.', seconds_per_step, timed_from[1], step,
                 config.train.max_minutes, fitted.num_steps, config.train.num_steps,
                 fitted.checkpoint_every_steps)
  return fitted


def _agree(flag: bool) -> bool:
  """Whether any process says ``flag``: every process stops at the same step."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN or infinite: the run diverged."""


def _finite(metrics) -> bool:
  return bool(np.isfinite(float(metrics['loss_sum'])) and
              np.isfinite(float(metrics['grad_norm'])))


class _FiniteGuard:
  """Checks each step's loss and gradient norm as the loop fetches them.

  With ``skip == 0`` the first non-finite value stops the run before anything
  is saved. With ``skip = N`` the optimizer (``optax.apply_if_finite``) has
  already dropped those updates; up to N in a row are tolerated with a warning,
  the (N+1)-th stops the run, since apply_if_finite then applies it.
  """

  def __init__(self, skip: int, ckpt):
    self.skip, self.ckpt, self.in_a_row, self._seen = skip, ckpt, 0, 0

  def check(self, steps_metrics) -> None:
    for step, m in steps_metrics:
      if step <= self._seen:
        continue
      self._seen = step
      if _finite(m):
        self.in_a_row = 0
        continue
      self.in_a_row += 1
      loss = float(m['loss_sum']) / max(float(m['tokens']), 1.0)
      what = f'loss {loss:.4g}, gradient norm {float(m["grad_norm"]):.4g}'
      if self.in_a_row <= self.skip:
        logging.warning('Step %d: %s; update skipped (%d in a row, at most %d).', step,
                        what, self.in_a_row, self.skip)
        continue
      steps = self.ckpt.manager.all_steps()
      last = (f'step {max(steps)} in {self.ckpt.directory}' if steps else
              'none (the run never saved one)')
      raise NonFiniteLossError(
          f'Training diverged at step {step} ({what}); stopped before saving. Last good '
          f'checkpoint: {last}. Lower config.optim.learning_rate_scale or raise '
          'warmup_steps, or set config.optim.skip_nonfinite_updates=N to skip up to N '
          'such updates in a row.')


def _check_same_shapes(local: Batch, step: int) -> None:
  """Every process must feed the same local shapes, or the step cannot run."""
  from jax.experimental import multihost_utils
  shapes = np.array([d for k in BATCH_KEYS if k in local for d in local[k].shape])
  multihost_utils.assert_equal(
      shapes, f'Step {step}: the processes drew training batches of different shapes '
      f'(this one: {[(k, v.shape) for k, v in local.items()]}). Use '
      'config.data.packing=True (one shape) or a pipeline that picks the same bucket '
      'on every process.')


class _Profiler:
  """Traces 10 steps, starting 5 after a compile, into workdir/profile (TensorBoard)."""

  def __init__(self, path: str):
    self.path, self.start = path, None

  def __call__(self, steps_since_compile: int, step: int) -> None:
    if self.start is None and steps_since_compile == 5:
      jax.profiler.start_trace(self.path)
      self.start = step
    elif self.start is not None and step == self.start + 10:
      jax.profiler.stop_trace()
      logging.info('Wrote a profile of steps %d-%d to %s.', self.start, step, self.path)
      self.start = -1


def _write_scalars(writer, step: int, scalars: dict) -> None:
  for name, value in scalars.items():
    writer.scalar(name, value, step)


def _count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _eta(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


def _flat_hparams(config) -> dict:
  flat = {}

  def visit(prefix, value):
    if hasattr(value, 'items'):
      for k, v in value.items():
        visit(f'{prefix}{k}.', v)
    else:
      flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(
          value)

  visit('', config)
  return flat
