"""Workdir: the one place that knows a training run directory's layout.

A run directory holds::

  config.json        the experiment's ConfigDict (written when training starts)
  vocab/spm.model    the shared SentencePiece vocabulary (unless config.data.vocab_path)
  vocab/chars.json   a character-level language model's vocabulary instead
  checkpoints/<N>/   one orbax checkpoint per saved step (``checkpoint.TrainCheckpointer``)
  tensorboard/       training's summaries; profile/ a trace when config.train.profile
  eval/, explore/    what evaluate and explore write

Every command line, training's final BLEU and the exporters open a run through
:class:`Workdir`: it reads the config once, builds the checkpointer once, resolves
which steps a request means (``step=None`` = the latest; ``average_last=K`` = the K
checkpoints up to it, Sec 6.1) and restores parameters onto any device layout through
:meth:`Workdir.restore`, the single restore path for decoding, so checks on
checkpoints apply to every user.

  wd = Workdir.open('runs/multi30k')
  restored = wd.restore(average_last=5)     # .params, .step, .meta, .steps
  model = wd.model(restored)                # the Transformer with those parameters
  loaded = wd.load(average_last=5)          # .model, .vocab (the family's), .restored

Training writes through it too (``Workdir(path, config)``: config.json, the
read-write checkpointer, the summary and profile folders).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import ml_collections

from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.run import checkpoint as checkpoint_lib
from transformer_jax.run import integrity

CONFIG_FILE = 'config.json'


class Restored(NamedTuple):
  """What :meth:`Workdir.restore` returns.

  Attributes:
    params: nnx.State of the model's Params (the mean over ``steps``).
    step: the resolved step (the last of ``steps``).
    meta: that step's checkpoint metadata (vocab fingerprint and size, parameter
      shapes) plus ``averaged_steps`` when more than one step was averaged.
    steps: the checkpoint steps whose parameters were averaged, oldest first.
  """
  params: Any
  step: int
  meta: dict
  steps: list[int]


class Loaded(NamedTuple):
  """What :meth:`Workdir.load` returns: the model, its vocabulary, what was restored."""
  model: Any
  vocab: Any
  restored: Restored


class Workdir:
  """A training run directory: its config, vocabulary and checkpoints.

  Construct with :meth:`open` for an existing run (decoding, evaluation, export) or
  :meth:`create` when training starts one.
  """

  def __init__(self, path: str | os.PathLike[str],
               config: ml_collections.ConfigDict | None = None):
    self.path = os.path.abspath(os.fspath(path))
    self._config = config
    self._checkpointers: dict[bool, checkpoint_lib.TrainCheckpointer] = {}
    self._abstract: dict[int, tuple] = {}

  @classmethod
  def open(cls, path: str | os.PathLike[str]) -> Workdir:
    """An existing run; reads its config.json.

    Raises:
      FileNotFoundError: no such directory, or it holds no config.json.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f'Workdir {path} does not exist.')
    wd = cls(path)
    wd.config  # pylint: disable=pointless-statement  # Fail now if it is no run.
    return wd

  @classmethod
  def create(cls, path: str | os.PathLike[str],
             config: ml_collections.ConfigDict) -> Workdir:
    """A run that training writes ``config`` into (process 0 writes config.json)."""
    wd = cls(path, config)
    wd.write_config(config)
    return wd

  # --------------------------------------------------------------------------
  # Layout.

  @property
  def config_path(self) -> str:
    return os.path.join(self.path, CONFIG_FILE)

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.path, checkpoint_lib.CHECKPOINT_DIR)

  @property
  def tensorboard_dir(self) -> str:
    return os.path.join(self.path, 'tensorboard')

  @property
  def profile_dir(self) -> str:
    return os.path.join(self.path, 'profile')

  @property
  def explore_dir(self) -> str:
    """Where the attention explorer writes by default."""
    return os.path.join(self.path, 'explore')

  @property
  def vocab_dir(self) -> str:
    """The run's own vocabulary folder (copied by averaging and export)."""
    return os.path.join(self.path, tokenizer_lib.VOCAB_DIRNAME)

  @property
  def vocab_path(self) -> str:
    """The SentencePiece model: ``config.data.vocab_path``; else, for a run started
    from another run's parameters (``config.train.init_from``), that run's vocabulary
    (the ids its embeddings were trained on); else ``vocab/spm.model``."""
    given = self.config.data.get('vocab_path')
    if given:
      return given
    parent = self.parent()
    if parent is not None:
      return parent.vocab_path
    return os.path.join(self.vocab_dir, tokenizer_lib.VOCAB_FILENAME)

  def parent(self) -> Workdir | None:
    """The run whose parameters started this one (``config.train.init_from``).

    Raises:
      FileNotFoundError: ``init_from`` names no training run.
      ValueError: ``init_from`` is this run.
    """
    init_from = self.config.train.get('init_from') if 'train' in self.config else None
    if not init_from:
      return None
    if os.path.abspath(init_from) == self.path:
      raise ValueError(f'config.train.init_from={init_from!r} is the run itself.')
    return Workdir.open(init_from)

  @property
  def config(self) -> ml_collections.ConfigDict:
    """The run's ConfigDict, read from config.json once."""
    if self._config is None:
      if not os.path.exists(self.config_path):
        raise FileNotFoundError(
            f'{self.config_path} not found: {self.path} is not a training workdir.')
      with open(self.config_path) as f:
        self._config = ml_collections.ConfigDict(json.load(f))
    return self._config

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    """Writes config.json atomically (process 0 only)."""
    self._config = config
    if jax.process_index() == 0:
      os.makedirs(self.path, exist_ok=True)
      with open(self.config_path + '.tmp', 'w') as f:
        f.write(config.to_json_best_effort(indent=2))
      os.replace(self.config_path + '.tmp', self.config_path)

  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    """The run's SentencePiece vocabulary (translation, encoder-only).

    Raises:
      FileNotFoundError: the SentencePiece model is missing.
    """
    path = self.vocab_path
    if not os.path.exists(path):
      raise FileNotFoundError(
          f'Vocabulary {path} not found (training writes it to {self.vocab_dir}/).')
    return tokenizer_lib.Tokenizer(path)

  @property
  def family(self) -> str:
    """``config.model.family``: 'encoder_decoder', 'decoder_only' or 'encoder_only'."""
    return self.config.model.get('family', 'encoder_decoder')

  def vocabulary(self):
    """The vocabulary the run's model reads, whose ``vocab_size`` is its V.

    encoder_decoder: the SentencePiece :class:`~data.tokenizer.Tokenizer`;
    decoder_only: the ``vocab/chars.json`` character vocabulary; encoder_only: the
    SentencePiece pieces plus [MASK] (``data.sentences.SentenceVocabulary``).

    Raises:
      FileNotFoundError: the vocabulary file is missing.
    """
    if self.family == 'decoder_only':
      from transformer_jax.data import char_text  # pylint: disable=g-import-not-at-top
      path = os.path.join(self.path, char_text.VOCAB_FILE)
      if not os.path.exists(path):
        raise FileNotFoundError(f'Vocabulary {path} not found (training writes it).')
      return char_text.CharVocabulary.load(path)
    if self.family == 'encoder_only':
      from transformer_jax.data import sentences  # pylint: disable=g-import-not-at-top
      return sentences.SentenceVocabulary(self.tokenizer())
    return self.tokenizer()

  # --------------------------------------------------------------------------
  # Checkpoints.

  def checkpointer(self, *, read_only: bool = True) -> checkpoint_lib.TrainCheckpointer:
    """The run's orbax checkpointer (one per mode, reused). Training asks for
    ``read_only=False``; everything else reads."""
    if read_only not in self._checkpointers:
      # Decoding needs only params and meta (an averaged workdir holds no more).
      items = ('params', 'meta') if read_only else checkpoint_lib.TrainCheckpointer.ITEMS
      self._checkpointers[read_only] = checkpoint_lib.TrainCheckpointer(
          self.path, self.config.checkpoint, read_only=read_only, items=items)
    return self._checkpointers[read_only]

  def close(self) -> None:
    """Waits for pending saves and closes the checkpointers."""
    for ckpt in self._checkpointers.values():
      ckpt.close()
    self._checkpointers.clear()

  def steps(self) -> list[int]:
    """The saved checkpoint steps, oldest first."""
    if not os.path.isdir(self.checkpoint_dir):
      return []
    return sorted(self.checkpointer().all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def resolve_steps(self, step: int | None = None, average_last: int | None = 1
                    ) -> list[int]:
    """The checkpoints a request means: the ``average_last`` steps up to ``step``.

    Only complete steps whose files match their checksums count: a damaged step
    is skipped with a warning naming the damage (the newest intact one stands in
    for a damaged latest), unless it is the explicitly requested ``step``.

    Args:
      step: the last step; None = the latest.
      average_last: how many checkpoints to average (None or 1 = just ``step``).

    Returns:
      Steps, oldest first; the last is the resolved ``step``.

    Raises:
      FileNotFoundError: no checkpoints, or none for ``step``.
      ValueError: ``average_last`` < 1, or fewer checkpoints than it asks for.
      CorruptCheckpointError: the requested ``step`` is damaged, or every one is.
    """
    k = 1 if average_last is None else int(average_last)
    if k < 1:
      raise ValueError(f'average_last must be >= 1, got {k}.')
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f'No checkpoints in {self.checkpoint_dir}.')
    explicit = step is not None
    step = steps[-1] if step is None else int(step)
    ckpt = self.checkpointer()
    if step not in steps:
      path = ckpt.step_path(step)
      why = (integrity.structure_problem(path, ckpt.items) if os.path.isdir(path)
             else 'no such step')
      raise FileNotFoundError(f'No checkpoint for step {step} in '
                              f'{self.checkpoint_dir} ({why}; steps: {steps}).')
    chosen = []
    for s in reversed([s for s in steps if s <= step]):
      problem = ckpt.problem(s)
      if problem:
        if explicit and s == step:
          raise integrity.CorruptCheckpointError(f'Checkpoint {ckpt.step_path(s)}: '
                                                 f'{problem}.')
        ckpt.mark_damaged(s, problem)
        continue
      chosen.append(s)
      if len(chosen) == k:
        break
    if not chosen:
      raise integrity.CorruptCheckpointError(
          f'No intact checkpoint in {self.checkpoint_dir}: every step up to {step} is '
          'damaged (see the warnings above).')
    if len(chosen) < k:
      raise ValueError(f'Asked to average the last {k} checkpoints up to step {step}, '
                       f'but {self.checkpoint_dir} holds only {sorted(chosen)} intact.')
    return sorted(chosen)

  def read_meta(self, step: int) -> dict:
    """A checkpoint's metadata (vocab fingerprint and size, parameter shapes)."""
    return self.checkpointer().read_meta(step)

  # --------------------------------------------------------------------------
  # The model.

  def abstract_model(self, vocab_size: int, *, scan_layers: bool | None = None):
    """The run's model (of its ``config.model.family``) with shape-only arrays.

    ``scan_layers``: the other layer layout than the config's, when not None.

    Returns:
      ``(graphdef, abstract_params, rest)``: ``abstract_params`` is the nnx.State
      of Params as ShapeDtypeStructs, ``rest`` the other state (dropout RNGs).
    """
    key = (vocab_size, scan_layers)
    if key not in self._abstract:
      import dataclasses
      from flax import nnx
      from transformer_jax.model import families
      from transformer_jax import model as model_lib
      cfg = model_lib.TransformerConfig.from_config(self.config.model, vocab_size)
      if scan_layers is not None:
        cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
      model = nnx.eval_shape(
          lambda: families.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=0)))
      self._abstract[key] = nnx.split(model, nnx.Param, ...)
    return self._abstract[key]

  def restore(self, step: int | None = None, average_last: int | None = 1, *,
              mesh: jax.sharding.Mesh | None = None,
              rules: Sequence[tuple[str, Any]] | None = None) -> Restored:
    """Restores the model parameters of checkpoint(s), without the optimizer state.

    Args:
      step: which checkpoint; None = the latest.
      average_last: the mean of the last K checkpoints up to ``step`` (Sec 6.1: 5
        for base, 20 for big); None or 1 = no averaging.
      mesh: place the parameters on this mesh following ``rules`` (default the
        config's ``mesh`` rules); None = the first local device.
      rules: logical-axis rules for ``mesh``.

    Returns:
      :class:`Restored` (params, resolved step, its metadata, averaged steps).

    Raises:
      FileNotFoundError, ValueError: see :meth:`resolve_steps`.
      checkpoint.IncompatibleCheckpointError: a checkpoint does not fit the model.
    """
    while True:  # Until the steps resolved restore finite, or an error.
      restored = self._restore(step, average_last, mesh, rules)
      if restored is not None:
        return restored

  def _restore(self, step, average_last, mesh, rules) -> Restored | None:
    """One attempt of :meth:`restore`; None when a step proved damaged (it is
    then marked, and the next :meth:`resolve_steps` skips it)."""
    explicit = step
    steps = self.resolve_steps(step, average_last)
    step = steps[-1]
    meta = self.read_meta(step)
    _, abstract, _ = self.abstract_model(int(meta['vocab_size']))

    def shardings_of(abstract):
      if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: device, abstract)
      from transformer_jax import sharding
      return sharding.param_shardings(
          abstract, mesh, rules or sharding.rules_from_config(self.config.mesh))

    # A checkpoint of the other model.scan_layers layout is read in its own layout
    # and converted (stacked or unstacked) afterwards.
    from transformer_jax.model import stacking
    saved_layout = stacking.layout_of(meta['param_shapes'])
    layout = stacking.layout_of(checkpoint_lib.param_shapes(abstract))
    convert = None
    source = abstract
    if saved_layout and layout and saved_layout != layout:
      source = self.abstract_model(int(meta['vocab_size']),
                                   scan_layers=saved_layout == 'scanned')[1]
      convert = (stacking.stack_params if layout == 'scanned'
                 else stacking.unstack_params)
    target = checkpoint_lib.with_shardings(source, shardings_of(source))
    expected = dict(meta, param_shapes=checkpoint_lib.param_shapes(source))
    ckpt = self.checkpointer()
    total = None
    for s in steps:
      try:
        params = ckpt.restore_params(s, target, expected)
      except integrity.CorruptCheckpointError as e:  # Unreadable or not finite.
        if explicit is not None and s == int(explicit):
          raise
        ckpt.mark_damaged(s, str(e).split(': ', 1)[-1].rstrip('.'))
        return None
      total = params if total is None else jax.tree.map(lambda a, b: a + b, total, params)
    if len(steps) > 1:
      total = jax.tree.map(lambda a: (a / len(steps)).astype(a.dtype), total)
      meta = dict(meta, averaged_steps=list(steps))
    if convert is not None:
      total = jax.device_put(convert(total), shardings_of(abstract))
      meta = dict(meta, param_shapes=checkpoint_lib.param_shapes(abstract))
    return Restored(total, step, meta, list(steps))

  def model(self, restored: Restored):
    """The model (Transformer, LanguageModel, ...) holding :meth:`restore`'s parameters."""
    from flax import nnx
    graphdef, _, rest = self.abstract_model(int(restored.meta['vocab_size']))
    return nnx.merge(graphdef, restored.params, jax.tree.map(_concrete, rest))

  def check_family(self, family: str, use: str) -> None:
    """Raises ValueError unless the run's model is of ``family``; ``use`` names what
    needs it (e.g. 'sample'), for the message."""
    if self.family != family:
      examples = {'encoder_decoder': 'configs/multi30k.py',
                  'decoder_only': 'configs/lm_shakespeare.py',
                  'encoder_only': 'configs/sst2.py'}
      raise ValueError(f'{self.path} holds {a_family(self.family)} model; {use} needs '
                       f'{a_family(family)} one (e.g. {examples[family]}).')

  def load(self, step: int | None = None, average_last: int | None = 1, *,
           family: str | None = None, use: str = 'this command',
           mesh: jax.sharding.Mesh | None = None,
           rules: Sequence[tuple[str, Any]] | None = None) -> Loaded:
    """The restored model with its vocabulary: what every command decodes with.

    Args:
      step, average_last, mesh, rules: as in :meth:`restore`.
      family: the family the caller needs, checked before anything is restored;
        ``use`` names the caller in the error.

    Raises:
      ValueError: another family; a vocabulary that does not fit the checkpoint.
      FileNotFoundError: see :meth:`restore` and :meth:`vocabulary`.
    """
    if family is not None:
      self.check_family(family, use)
    self.resolve_steps(step, average_last)  # Cheap checks first: steps, vocabulary.
    vocab = self.vocabulary()
    restored = self.restore(step, average_last, mesh=mesh, rules=rules)
    model = self.model(restored)
    if vocab.vocab_size != model.cfg.vocab_size:
      raise ValueError(f'The vocabulary of {self.path} has {vocab.vocab_size} ids but its '
                       f'checkpoint a {model.cfg.vocab_size}-token embedding.')
    return Loaded(model, vocab, restored)

  def __repr__(self) -> str:
    return f'Workdir({self.path!r})'


def a_family(family: str) -> str:
  """'an encoder_only', 'a decoder_only': a family name for messages."""
  return ('an ' if family[:1] in 'aeiou' else 'a ') + family


def _concrete(leaf):
  """A value for non-parameter state known only by shape (the dropout RNG keys,
  never drawn from when decoding)."""
  import jax.numpy as jnp
  if not isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    key = jax.random.key(0)
    return jax.random.split(key, leaf.shape) if leaf.shape else key
  return jnp.zeros(leaf.shape, leaf.dtype)


def write_average(source: Workdir, average_last: int, output: str | None = None,
                  step: int | None = None) -> tuple[Workdir, Restored]:
  """Writes the mean of ``source``'s last ``average_last`` checkpoints as a new run.

  The output holds config.json, the vocabulary and one checkpoint (at the last
  averaged step, parameters only), so every command reads it like any run.

  Args:
    source: the training run.
    average_last: K, how many checkpoints up to ``step`` (Sec 6.1: 5 base, 20 big).
    output: the new run directory; default ``<source>/averaged_last<K>``.
    step: the last step to average; default the latest.

  Returns:
    ``(the output Workdir, what was averaged)``.

  Raises:
    FileExistsError: the output already holds a checkpoint for that step.
    FileNotFoundError, ValueError: see :meth:`Workdir.resolve_steps`.
  """
  steps = source.resolve_steps(step, average_last)
  out = Workdir(output or os.path.join(source.path, f'averaged_last{average_last}'),
                source.config)
  if out.path == source.path:
    raise ValueError(f'The output must differ from the source run {source.path}.')
  if os.path.exists(os.path.join(out.checkpoint_dir, str(steps[-1]))):
    raise FileExistsError(
        f'{out.path} already holds a checkpoint for step {steps[-1]}; pick another '
        'output folder or delete that one.')
  restored = source.restore(steps[-1], average_last)
  if jax.process_index() == 0:
    os.makedirs(out.path, exist_ok=True)
    shutil.copy(source.config_path, out.config_path)
    if os.path.isdir(source.vocab_dir):
      shutil.copytree(source.vocab_dir, out.vocab_dir, dirs_exist_ok=True)
  out.checkpointer(read_only=False).save_params(restored.step, restored.params,
                                                dict(restored.meta, averaged_steps=steps))
  out.close()
  return out, restored
