"""Translator: the Python API for translating text with a trained Transformer.

  from transformer_jax.inference.translator import Translator
  translator = Translator.from_workdir('runs/multi30k', average_last=5, beam_size=4)
  translator.translate(['A man rides a bike.'])            # -> ['Ein Mann fährt ...']
  translator.translate(['A man rides a bike.'], n_best=3)  # -> [[Hypothesis(text,
                                                           #      score, ids), ...]]

The translate, evaluate and explore command lines and training's BLEU all go through
:class:`Translator`. It tokenizes, sorts sentences by length and pads each batch to one
of the config's bucket lengths (:func:`length_batches`, so each shape compiles once and
little work is padding), runs the jitted beam or greedy search (:class:`BatchSearch`,
split over the batch axes of a device mesh when there is one) and returns the results
in input order.

Search settings default to the run's ``config.eval`` (Sec 6.1: beam 4, length penalty
0.6, output limit input + 50; ``beam_rules='ctranslate2'`` decodes as CTranslate2 does,
to check an export).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from transformer_jax import sharding
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.inference import search as search_lib


class Hypothesis(NamedTuple):
  """One translation of a sentence.

  Attributes:
    text: the detokenized translation.
    score: log P(translation | source) / length penalty, the beam search's ranking
      score (NaN for greedy search, which does not score).
    ids: the translation's token ids, without EOS.
  """
  text: str
  score: float
  ids: list[int]


# ----------------------------------------------------------------------------
# One padded batch of ids through the search.


@functools.lru_cache(maxsize=16)
def compiled_search(graphdef, beam_size: int, alpha: float, max_extra_len: int,
                     eos_id: int, bos_id: int, pad_id: int, beam_rules: str = 'paper'):
  """One jitted search per model structure and settings, shared by every BatchSearch,
  so decoding again with new parameters (BLEU during training) does not recompile."""
  return jax.jit(functools.partial(
      search_lib.search_model, graphdef, beam_size=beam_size, alpha=alpha,
      max_extra_len=max_extra_len, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id,
      beam_rules=beam_rules),
      static_argnames='max_decode_len')


class BatchSearch:
  """Runs the jitted search on [B, S] id batches; one compile per shape.

  With a ``mesh`` the parameters are placed by ``rules``, each batch is padded with
  empty rows to a multiple of the mesh's ('data', 'fsdp') size and split over those
  axes, and with several processes the results are gathered to every process.

  Example::

    search = BatchSearch(model, beam_size=4, alpha=0.6, max_extra_len=50)
    tokens, scores = search(src)  # src [B, S] -> [B, K, L] ids, [B, K] best first
  """

  def __init__(self, model, *, beam_size: int = 4, alpha: float = 0.6,
               max_extra_len: int = 50, mesh: jax.sharding.Mesh | None = None,
               rules: Sequence[tuple[str, Any]] | None = None,
               beam_rules: str = 'paper'):
    from flax import nnx
    if beam_size < 1:
      raise ValueError(f'beam_size must be >= 1, got {beam_size}.')
    if max_extra_len < 1:
      raise ValueError(f'max_extra_length must be >= 1, got {max_extra_len}.')
    self.model = model
    self.cfg = model.cfg
    self.beam_size, self.alpha, self.max_extra_len = beam_size, float(alpha), max_extra_len
    self.beam_rules = search_lib.check_beam_rules(beam_rules)
    self.mesh, self.rules = mesh, tuple(rules or ())
    graphdef, self.state = nnx.split(model)
    if mesh is not None:
      self.state = jax.device_put(
          self.state, sharding.param_shardings(self.state, mesh, self.rules))
    self._search = compiled_search(graphdef, beam_size, self.alpha, int(max_extra_len),
                                    search_lib.EOS_ID, self.cfg.bos_id, self.cfg.pad_id,
                                    self.beam_rules)

  @property
  def batch_multiple(self) -> int:
    """Batches are padded to a multiple of this (the mesh's batch shards)."""
    return 1 if self.mesh is None else sharding.batch_divisor(self.mesh)

  def max_decode_len(self, src_len: int) -> int:
    """L for a source bucket of length S: S + max_extra_len (Sec 6.1)."""
    length = src_len + self.max_extra_len
    if self.cfg.positions == 'learned':
      length = min(length, self.cfg.max_len)  # The position table ends there.
    return length

  def __call__(self, src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """src [B, S] int32 (pad 0) -> (tokens [B, K, L], scores [B, K]) as numpy,
    best first; tokens end with EOS and are padded after it."""
    src = np.asarray(src, np.int32)
    if src.ndim != 2:
      raise ValueError(f'src must be [batch, length], got shape {src.shape}.')
    batch = src.shape[0]
    max_decode_len = self.max_decode_len(src.shape[1])
    if self.mesh is None:
      tokens, scores = self._search(self.state, src, max_decode_len=max_decode_len)
    else:
      padded = np.pad(src, ((0, -batch % self.batch_multiple), (0, 0)),
                      constant_values=self.cfg.pad_id)
      with jax.set_mesh(self.mesh), sharding.logical_rules(self.rules):
        # Every process holds the whole batch and supplies its own devices' rows.
        placed = jax.make_array_from_callback(
            padded.shape, sharding.batch_sharding(self.mesh), lambda idx: padded[idx])
        tokens, scores = self._search(self.state, placed, max_decode_len=max_decode_len)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        tokens, scores = multihost_utils.process_allgather((tokens, scores), tiled=True)
    return np.asarray(tokens)[:batch], np.asarray(scores)[:batch]


# ----------------------------------------------------------------------------
# Length buckets: the same batching for evaluation sets and command-line input.


def bucket_length(length: int, buckets: Sequence[int], max_len: int) -> int:
  """The smallest bucket length that holds ``length`` (<= max_len); past the
  largest bucket, the next power of two, capped at ``max_len``."""
  for b in sorted(buckets):
    if length <= b:
      return min(b, max_len)
  return min(1 << (length - 1).bit_length(), max_len)


def length_batches(sources: Sequence[Sequence[int] | None], *, batch_size: int,
                   buckets: Sequence[int], max_len: int, pad_id: int = 0
                   ) -> Iterator[tuple[list[int], np.ndarray]]:
  """Sorted, bucketed batches of source ids.

  Sentences go longest first, ``batch_size`` rows a batch, each batch padded to the
  bucket length of its longest sentence; the last batch is filled with empty rows
  so that shapes repeat. None entries (empty lines) are skipped.

  Yields:
    ``(indices into sources, src [batch_size, bucket] int32)``; row r of ``src``
    holds ``sources[indices[r]]`` for r < len(indices), padding after.
  """
  order = sorted((i for i, s in enumerate(sources) if s), key=lambda i: -len(sources[i]))
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    length = bucket_length(max(len(sources[i]) for i in rows), buckets, max_len)
    src = np.full((batch_size, length), pad_id, np.int32)
    for r, i in enumerate(rows):
      src[r, :len(sources[i])] = sources[i]
    yield rows, src


def encode_sources(tokenizer: tokenizer_lib.Tokenizer, lines: Sequence[str],
                   max_len: int, *, where: str = 'input') -> list[list[int] | None]:
  """Source ids (pieces + eos) per line; None for an empty line.

  Lines longer than ``max_len`` tokens are cut to ``max_len`` (eos kept) with a
  warning naming the line; unknown characters become the unknown id (a warning
  counts them).
  """
  out, unknown_lines = [], []
  encoded = tokenizer.encode_batch([line.strip() for line in lines])
  for number, (line, ids) in enumerate(zip(lines, encoded), start=1):
    if not line.strip():
      out.append(None)
      continue
    if len(ids) + 1 > max_len:
      logging.warning('%s line %d: %d tokens with eos, more than the model\'s max_len '
                      '%d; translating its first %d tokens.', where, number,
                      len(ids) + 1, max_len, max_len - 1)
      ids = ids[:max_len - 1]
    if tokenizer.unk_id in ids:
      unknown_lines.append(number)
    out.append(list(ids) + [tokenizer.eos_id])
  if unknown_lines:
    shown = ', '.join(map(str, unknown_lines[:10]))
    more = ' ...' if len(unknown_lines) > 10 else ''
    logging.warning('%s: %d lines hold characters the vocabulary lacks (translated as '
                    'the unknown token): lines %s%s.', where, len(unknown_lines), shown, more)
  return out


# ----------------------------------------------------------------------------
# The Translator.


def data_parallel_mesh(config) -> jax.sharding.Mesh | None:
  """A ('data', 'fsdp', 'tensor') mesh that splits only the batch over all devices,
  or None on one device. Decoding needs no fsdp/tensor split of the weights, and
  the training mesh may not fit this machine."""
  if jax.device_count() == 1:
    return None
  mesh_cfg = config.mesh.copy_and_resolve_references()
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = -1, 1, 1
  return sharding.create_mesh(mesh_cfg)


def params_mesh(model) -> jax.sharding.Mesh | None:
  """The mesh the model's parameters are sharded over (e.g. training's), or None."""
  from flax import nnx
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    mesh = getattr(getattr(leaf, 'sharding', None), 'mesh', None)
    if isinstance(mesh, jax.sharding.Mesh) and mesh.size > 1:
      return mesh
  return None


@dataclasses.dataclass
class Translator:
  """A Transformer, its vocabulary and search settings: text in, text out.

  Build with :meth:`from_workdir` (a trained run) or :meth:`from_model` (a model in
  memory, e.g. training's). Attributes are read-only in spirit: use
  :meth:`with_search` for other search settings.

  Attributes:
    model: the Transformer.
    tokenizer: its vocabulary.
    search: the compiled search (beam size, alpha, output limit, mesh).
    batch_size: sentences per batch (rounded up to the mesh's batch shards).
    buckets: source lengths batches are padded to (``config.data.bucket_lengths``).
    config: the run's ConfigDict, when known.
    step: the checkpoint step (the last averaged one), when known.
    steps: the averaged checkpoint steps, when known.
  """
  model: Any
  tokenizer: tokenizer_lib.Tokenizer
  search: BatchSearch
  batch_size: int = 64
  buckets: tuple[int, ...] = (16, 32, 64, 128, 256)
  config: Any = None
  step: int | None = None
  steps: list[int] | None = None

  def __post_init__(self):
    multiple = self.search.batch_multiple
    self.batch_size = -(-max(1, int(self.batch_size)) // multiple) * multiple
    self.buckets = tuple(self.buckets)
    if self.tokenizer.vocab_size != self.model.cfg.vocab_size:
      raise ValueError(f'{self.tokenizer.path} has {self.tokenizer.vocab_size} pieces '
                       f'but the model has a {self.model.cfg.vocab_size}-token embedding.')

  @classmethod
  def from_workdir(cls, path: str, checkpoint_step: int | None = None,
                   average_last: int | None = 1, *, beam_size: int | None = None,
                   alpha: float | None = None, max_extra_length: int | None = None,
                   batch_size: int | None = None, use_mesh: bool = True,
                   mesh: jax.sharding.Mesh | None = None,
                   beam_rules: str | None = None) -> Translator:
    """Restores a trained run for translation.

    Args:
      path: the run's workdir (config.json, vocab/, checkpoints/).
      checkpoint_step: which checkpoint; None = the latest.
      average_last: the mean of the last K checkpoints up to ``checkpoint_step``
        (Sec 6.1: 5 base, 20 big).
      beam_size, alpha, max_extra_length, beam_rules: default ``config.eval``'s;
        beam 1 is greedy search.
      batch_size: sentences per batch; default ``config.data.eval_batch_size``.
      use_mesh: split batches over all devices when there are several.
      mesh: restore onto this mesh (e.g. training's, with its logical-axis rules)
        and split batches over it, instead of a data-parallel mesh of all devices.

    Raises:
      FileNotFoundError: no workdir, config, checkpoint or vocabulary.
      ValueError: vocabulary and checkpoint disagree; too few checkpoints to average.
    """
    from transformer_jax.run.workdir import Workdir
    workdir = Workdir.open(path)
    config = workdir.config
    if mesh is None and use_mesh:
      mesh = data_parallel_mesh(config)
    rules = sharding.rules_from_config(config.mesh) if mesh is not None else None
    loaded = workdir.load(checkpoint_step, average_last, family='encoder_decoder',
                          use='translation', mesh=mesh, rules=rules)
    return cls.from_model(loaded.model, loaded.vocab, config, step=loaded.restored.step,
                          steps=loaded.restored.steps, beam_size=beam_size, alpha=alpha,
                          max_extra_length=max_extra_length, batch_size=batch_size,
                          mesh=mesh, beam_rules=beam_rules)

  @classmethod
  def from_model(cls, model, tokenizer: tokenizer_lib.Tokenizer, config, *,
                 step: int | None = None, steps: list[int] | None = None,
                 beam_size: int | None = None, alpha: float | None = None,
                 max_extra_length: int | None = None, batch_size: int | None = None,
                 mesh: jax.sharding.Mesh | None | str = 'params',
                 beam_rules: str | None = None) -> Translator:
    """A Translator for a model in memory, settings from the run's ``config``.

    Args:
      model: a Transformer.
      tokenizer: its vocabulary.
      config: the run's ConfigDict (``eval``, ``data``, ``mesh`` groups).
      step, steps: recorded on the translator (evaluation results carry them).
      beam_size, alpha, max_extra_length, batch_size, beam_rules: as in
        :meth:`from_workdir`.
      mesh: split batches over this mesh; the default 'params' uses the mesh the
        model's parameters are sharded over (training's), if any.
    """
    if isinstance(mesh, str):
      mesh = params_mesh(model)
    e, data = config.eval, config.data
    search = BatchSearch(
        model, beam_size=e.beam_size if beam_size is None else beam_size,
        alpha=e.length_penalty if alpha is None else alpha,
        max_extra_len=e.max_extra_length if max_extra_length is None else max_extra_length,
        mesh=mesh, rules=sharding.rules_from_config(config.mesh) if mesh else None,
        # Runs trained before the option existed have no eval.beam_rules.
        beam_rules=e.get('beam_rules', 'paper') if beam_rules is None else beam_rules)
    return cls(model, tokenizer, search, batch_size=batch_size or data.eval_batch_size,
               buckets=tuple(data.bucket_lengths), config=config, step=step, steps=steps)

  def with_search(self, *, beam_size: int | None = None, alpha: float | None = None,
                  max_extra_length: int | None = None,
                  beam_rules: str | None = None) -> Translator:
    """The same model and vocabulary with other search settings (None = keep)."""
    s = self.search
    search = BatchSearch(
        self.model, beam_size=s.beam_size if beam_size is None else beam_size,
        alpha=s.alpha if alpha is None else alpha,
        max_extra_len=s.max_extra_len if max_extra_length is None else max_extra_length,
        mesh=s.mesh, rules=s.rules,
        beam_rules=s.beam_rules if beam_rules is None else beam_rules)
    return dataclasses.replace(self, search=search)

  @property
  def beam_size(self) -> int:
    return self.search.beam_size

  def translate(self, sentences: Sequence[str], n_best: int = 1, *,
                progress: bool = False, where: str = 'input'
                ) -> list[str] | list[list[Hypothesis]]:
    """Translates sentences; results in input order.

    Args:
      sentences: source sentences, one string each. An empty one translates to ''
        (no hypotheses with ``n_best`` > 1).
      n_best: 1 returns one string per sentence; K > 1 returns the K best
        :class:`Hypothesis` per sentence (text, score, ids), best first; K is at
        most the beam size.
      progress: show a progress bar on stderr.
      where: names the input in warnings (over-long lines, unknown characters).
    """
    hyps = self.translate_n_best(sentences, n_best, progress=progress, where=where)
    if n_best == 1:
      return [h[0].text if h else '' for h in hyps]
    return hyps

  def translate_n_best(self, sentences: Sequence[str], n_best: int = 1, *,
                       progress: bool = False, where: str = 'input'
                       ) -> list[list[Hypothesis]]:
    """The ``n_best`` best :class:`Hypothesis` of each sentence, in input order
    ([] for an empty sentence)."""
    if isinstance(sentences, str):
      raise TypeError('translate takes a list of sentences, not one string.')
    sources = encode_sources(self.tokenizer, sentences, self.model.cfg.max_len,
                             where=where)
    ids = self.translate_ids(sources, n_best, progress=progress)
    return [[Hypothesis(self.tokenizer.decode(t), s, t) for t, s in row] for row in ids]

  def translate_ids(self, sources: Sequence[Sequence[int] | None], n_best: int = 1, *,
                    progress: bool = False) -> list[list[tuple[list[int], float]]]:
    """The ``n_best`` best (ids without EOS, score) of each source (ids with EOS, or
    None for nothing to translate), in input order."""
    if not 1 <= n_best <= self.beam_size:
      raise ValueError(f'n_best must be between 1 and the beam size '
                       f'({self.beam_size}), got {n_best}.')
    greedy = self.beam_size == 1
    pad_id = self.model.cfg.pad_id
    results: list[list[tuple[list[int], float]]] = [[] for _ in sources]
    count = sum(1 for s in sources if s)
    # Fewer sentences than a batch (one line at a time, a short file): a smaller
    # batch, a power of two so that few shapes compile.
    multiple = self.search.batch_multiple
    rows = min(self.batch_size, 1 << max(count - 1, 0).bit_length())
    rows = -(-rows // multiple) * multiple
    bar = None
    if progress:
      import tqdm
      bar = tqdm.tqdm(total=count, unit='sent', file=sys.stderr, desc='translating',
                      dynamic_ncols=True)
    for indices, src in length_batches(sources, batch_size=rows, buckets=self.buckets,
                                       max_len=self.model.cfg.max_len, pad_id=pad_id):
      tokens, scores = self.search(src)
      for r, i in enumerate(indices):
        for k in range(n_best):
          if scores[r, k] <= search_lib.NEG_INF / 2:
            break  # An empty beam slot.
          ids = search_lib.strip_eos(tokens[r, k], self.tokenizer.eos_id, pad_id)
          results[i].append((ids, float('nan') if greedy else float(scores[r, k])))
      if bar is not None:
        bar.update(len(indices))
    if bar is not None:
      bar.close()
    return results
