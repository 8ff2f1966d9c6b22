"""What the one train loop trains: a small task object per family and objective.

``train.py`` owns the sharded state, the jitted steps, checkpoints, TensorBoard and
the loop; a task supplies what differs between families:

  get_datasets   vocabulary, endless training iterator, evaluation sets
  loss           (scalar to minimise, summed metrics) for a model and a batch
  train_flops    FLOPs of one train step on a batch (for MFU)
  abstract_batch the largest global training batch as shapes (for dry runs)
  extra_eval     evaluation beyond the summed dev metrics (BLEU for translation)

Summed metrics always hold 'loss_sum', 'nll_sum' and 'tokens' (what both sums are
divided by: target tokens, characters, sentences or masked tokens); any further
key (e.g. 'correct') is reported divided by 'tokens' (as 'accuracy').

  translation      encoder_decoder   label-smoothed cross-entropy, BLEU (Sec 5-6)
  lm               decoder_only      next-token cross-entropy (nats per token)
  classification   encoder_only      cross-entropy of the pooled head, accuracy
  mlm              encoder_only      BERT's masked-LM cross-entropy, accuracy

``config.model.family`` picks the model and its default task;
``config.train.task='mlm'`` pre-trains an encoder-only model instead.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from transformer_jax import model as model_lib
from transformer_jax.train import optim

Batch = dict[str, Any]
_FAMILY_TASKS = {'encoder_decoder': 'translation', 'decoder_only': 'lm',
                 'encoder_only': 'classification'}


def _layer_flops(cfg, length: int) -> float:
  """Forward matmul FLOPs of one self-attention + FFN layer over ``length`` positions."""
  nh = cfg.num_heads * cfg.qkv_head_dim
  return length * (8 * cfg.d_model * nh + 4 * cfg.d_model * cfg.d_ff) + 4 * length ** 2 * nh


class Task:
  """Base: what a family's training needs besides the shared loop."""

  name = ''
  batch_keys: tuple[str, ...] = ()
  unit = 'tokens'  # What 'tokens' counts, for the progress line.
  # Whether training ends with the dev metrics of the average of the last
  # config.eval.average_last checkpoints (translation averages in its BLEU instead).
  final_eval_averages = False

  def get_datasets(self, config, workdir, *, process_index: int, process_count: int,
                   batch_multiple: int):
    raise NotImplementedError

  def loss(self, model, batch: Batch, config, *, train: bool):
    raise NotImplementedError

  def train_flops(self, model_cfg, batch: Batch) -> float:
    raise NotImplementedError

  def abstract_batch(self, config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The largest global training batch: int32 shapes split over the batch axes."""
    from transformer_jax import sharding  # pylint: disable=g-import-not-at-top
    shapes = self._batch_shapes(config, mesh)
    sharding.check_divides(mesh, global_batch=next(iter(shapes.values()))[0])
    spec = sharding.batch_sharding(mesh, 2)
    return {k: jax.ShapeDtypeStruct(v, jnp.int32, sharding=spec) for k, v in shapes.items()}

  def _batch_shapes(self, config, mesh) -> dict[str, tuple[int, int]]:
    raise NotImplementedError

  def extra_eval(self, setup, params, vocab, eval_sets, config, workdir: str, step: int,
                 writer, *, final: bool) -> dict[str, float]:
    del setup, params, vocab, eval_sets, config, workdir, step, writer, final
    return {}


class TranslationTask(Task):
  """The paper's task: teacher-forced, label-smoothed translation; BLEU at the end."""

  name = 'translation'
  batch_keys = ('inputs', 'targets', 'inputs_segmentation', 'inputs_position',
                'targets_segmentation', 'targets_position')
  unit = 'target tokens'

  def get_datasets(self, config, workdir, *, process_index, process_count, batch_multiple):
    from transformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    data_cfg = _data_config(config, workdir)
    if data_cfg is not config.data:
      config = config.copy_and_resolve_references()
      config.data = data_cfg
    return pipeline.get_datasets(
        config, workdir, process_index=process_index, process_count=process_count,
        batch_multiple=batch_multiple)

  def loss(self, model, batch, config, *, train):
    cfg = model.cfg
    targets = batch['targets']
    tgt_in = model_lib.shift_right(targets, batch.get('targets_position'),
                                   bos_id=cfg.bos_id, pad_id=cfg.pad_id)
    logits = model(batch['inputs'], tgt_in,
                   src_segments=batch.get('inputs_segmentation'),
                   tgt_segments=batch.get('targets_segmentation'),
                   src_positions=batch.get('inputs_position'),
                   tgt_positions=batch.get('targets_position'),
                   deterministic=not train)
    loss_sum, nll_sum, ntok = optim.label_smoothed_loss(
        logits, targets, config.optim.label_smoothing, cfg.pad_id)
    return loss_sum / jnp.maximum(ntok, 1.0), {
        'loss_sum': loss_sum, 'nll_sum': nll_sum, 'tokens': ntok}

  def train_flops(self, model_cfg, batch):
    from transformer_jax.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
    b, s = batch['inputs'].shape
    return flops_lib.train_flops(model_cfg, b, s, batch['targets'].shape[1])

  def _batch_shapes(self, config, mesh):
    from transformer_jax import dry_run  # pylint: disable=g-import-not-at-top
    b, length = dry_run.batch_shape(config, mesh)
    keys = self.batch_keys if config.data.packing else ('inputs', 'targets')
    return {k: (b, length) for k in keys}

  def extra_eval(self, setup, params, vocab, eval_sets, config, workdir, step, writer, *,
                 final):
    if jax.process_count() > 1:
      # Beam search runs eagerly on this process's arrays; sharded over several
      # hosts it cannot. The evaluate CLI scores the saved checkpoint instead.
      logging.info('Skipping BLEU in a %d-process run: run python -m '
                   'transformer_jax.evaluate --workdir=%s.', jax.process_count(), workdir)
      return {}
    translator = _bleu_translator(setup, params, vocab, config, workdir, step, final=final)
    return _bleu(translator, eval_sets, config, workdir, step, writer)


def _data_config(config, workdir: str):
  """``config.data`` as training reads it: a run started from another's parameters
  (``train.init_from``) reads that run's vocabulary (``Workdir.vocab_path``), the ids
  its embeddings were trained on."""
  from transformer_jax.run.workdir import Workdir  # pylint: disable=g-import-not-at-top
  run_dir = Workdir(workdir, config)
  if config.data.get('vocab_path') or run_dir.parent() is None:
    return config.data
  data = config.data.copy_and_resolve_references()
  with data.unlocked():
    data.vocab_path = run_dir.vocab_path
  return data


def _bleu_translator(setup, params, tokenizer, config, workdir: str, step: int, *,
                     final: bool):
  """The Translator training's BLEU decodes with (beam search, Sec 6.1).

  The final BLEU uses the average of the last ``config.eval.average_last``
  checkpoints (Sec 6.1), restored exactly as ``evaluate --average_last`` restores
  them (``Translator.from_workdir``), onto the training mesh. Otherwise, and when
  fewer checkpoints were saved, the parameters in memory.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from transformer_jax.inference.translator import Translator  # pylint: disable=g-import-not-at-top
  from transformer_jax.run.workdir import Workdir  # pylint: disable=g-import-not-at-top
  if final:
    k = int(config.eval.average_last or 1)
    if k > 1 and len(Workdir(workdir, config).steps()) >= k:
      translator = Translator.from_workdir(workdir, average_last=k, mesh=setup.mesh)
      logging.info('Final BLEU with the average of checkpoints %s (Sec 6.1).',
                   translator.steps)
      return translator
    logging.info('Final BLEU with the latest parameters (eval.average_last=%s).', k)
  model = nnx.merge(setup.graphdef, params, setup.rest)
  return Translator.from_model(model, tokenizer, config, step=step)


def _bleu(translator, eval_sets, config, workdir: str, step: int, writer
          ) -> dict[str, float]:
  """Dev/test BLEU of ``translator`` on each evaluation set; results in workdir/eval."""
  from transformer_jax.inference import evaluation  # pylint: disable=g-import-not-at-top
  results = {}
  for split, eval_set in eval_sets.items():
    n = config.train.bleu_max_sentences or len(eval_set.sources)
    scores = evaluation.evaluate_translator(
        translator, list(eval_set.sources[:n]), list(eval_set.references[:n]),
        split=split, output=evaluation.eval_dir(workdir), progress=False)
    for name in ('sacrebleu', 'tok_bleu', 'lc_tok_bleu'):
      if name in scores:
        results[f'{split}/{name}'] = float(scores[name])
  logging.info('step %d BLEU: %s', step, results)
  if writer is not None:
    for name, value in results.items():
      writer.scalar(name, value, step)
    writer.flush()
  return results


class LanguageModelTask(Task):
  """Next-token prediction over random context windows (decoder-only)."""

  name = 'lm'
  batch_keys = ('inputs', 'targets')
  unit = 'tokens'

  def get_datasets(self, config, workdir, *, process_index, process_count, batch_multiple):
    from transformer_jax.data import char_text  # pylint: disable=g-import-not-at-top
    d = config.data
    if d.source != 'char_text':
      raise ValueError(f"The lm task reads config.data.source='char_text', got {d.source!r}.")
    path = d.text_path
    if not path:
      raise ValueError('config.data.text_path is not set.')
    text = char_text.read_text(path)
    train_text, val_text = char_text.split_text(text, d.train_fraction)
    vocab = char_text.load_or_build_vocabulary(workdir, train_text + val_text,
                                               process_index)
    global_rows = int(d.batch_size)
    if global_rows % process_count:
      raise ValueError(f'config.data.batch_size={global_rows} is not a multiple of the '
                       f'{process_count} processes.')
    local = global_rows // process_count
    if local % batch_multiple:
      raise ValueError(f'config.data.batch_size={global_rows} gives {local} rows per '
                       f'process, not a multiple of its {batch_multiple} batch shards.')
    train_ids = vocab.encode_array(train_text)
    train_iter = char_text.WindowIterator(train_ids, local, int(d.context_length),
                                          seed=config.seed, process_index=process_index)
    eval_sets = {'validation': char_text.WindowEvalSet(
        'validation', vocab.encode_array(val_text), int(d.context_length),
        process_index=process_index, process_count=process_count)}
    logging.info('Data: %s, %d training and %d validation characters, vocabulary %d '
                 '(%d characters), batches [%d, %d] per process.', path, len(train_text),
                 len(val_text), vocab.vocab_size, len(vocab.chars), local,
                 d.context_length)
    return vocab, train_iter, eval_sets

  def loss(self, model, batch, config, *, train):
    logits = model(batch['inputs'], deterministic=not train)
    loss_sum, nll_sum, ntok = optim.label_smoothed_loss(
        logits, batch['targets'], config.optim.label_smoothing, model.cfg.pad_id)
    return loss_sum / jnp.maximum(ntok, 1.0), {
        'loss_sum': loss_sum, 'nll_sum': nll_sum, 'tokens': ntok}

  def train_flops(self, model_cfg, batch):
    b, t = batch['inputs'].shape
    forward = model_cfg.num_decoder_layers * _layer_flops(model_cfg, t)
    forward += t * 2 * model_cfg.d_model * model_cfg.vocab_size
    return 3.0 * b * forward

  def _batch_shapes(self, config, mesh):
    shape = (int(config.data.batch_size), int(config.data.context_length))
    return {'inputs': shape, 'targets': shape}


class _SentenceTask(Task):
  """Shared data of the encoder-only tasks (labelled sentences, SentencePiece)."""

  mlm = False

  def get_datasets(self, config, workdir, *, process_index, process_count, batch_multiple):
    from transformer_jax.data import sentences as sentences_lib  # pylint: disable=g-import-not-at-top
    from transformer_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    d = config.data
    if d.source != 'labelled_tsv':
      raise ValueError(f"The {self.name} task reads config.data.source='labelled_tsv', "
                       f'got {d.source!r}.')
    folder = d.data_dir
    if not folder:
      raise ValueError('config.data.data_dir is not set.')
    train_sentences, train_labels = sentences_lib.read_labelled_tsv(
        os.path.join(folder, d.train_file))
    dev_sentences, dev_labels = sentences_lib.read_labelled_tsv(
        os.path.join(folder, d.eval_file))
    tokenizer = tokenizer_lib.load_or_train_tokenizer(
        _data_config(config, workdir), workdir,
        lambda: train_sentences[:d.vocab_train_sentences], process_index=process_index,
        reserved_ids=sentences_lib.SentenceVocabulary.EXTRA_IDS)
    vocab = sentences_lib.SentenceVocabulary(tokenizer)
    global_rows = int(d.batch_size)
    local = global_rows // process_count
    if global_rows % process_count or local % batch_multiple:
      raise ValueError(f'config.data.batch_size={global_rows} does not split into whole '
                       f'rows over {process_count} processes x {batch_multiple} shards.')
    buckets = tuple(sorted({int(b) for b in d.bucket_lengths if b < d.max_length})) + (
        int(d.max_length),)
    mlm = float(d.mlm_probability) if self.mlm else 0.0
    # Each process reads its own slice of the training sentences.
    train_ids = vocab.encode_batch(train_sentences, int(d.max_length))
    min_tokens = int(d.get('min_train_tokens', 0))
    if min_tokens:  # E.g. train on the longer phrases only, nearer the dev sentences.
      keep = np.flatnonzero([len(x) >= min_tokens for x in train_ids])
      if not len(keep):
        raise ValueError(f'No training sentence has config.data.min_train_tokens='
                         f'{min_tokens} tokens.')
      train_ids, train_labels = [train_ids[i] for i in keep], train_labels[keep]
    mine = slice(process_index, None, process_count)
    train_iter = sentences_lib.SentenceBatches(
        train_ids[mine], train_labels[mine], batch_size=local, buckets=buckets,
        seed=config.seed, group=int(d.get('length_group', sentences_lib.LENGTH_GROUP)),
        mlm_probability=mlm, mask_id=vocab.mask_id, vocab_size=vocab.vocab_size,
        word_dropout=0.0 if self.mlm else float(d.get('word_dropout', 0.0)))
    eval_sets = {'validation': sentences_lib.SentenceEvalSet(
        'validation', vocab.encode_batch(dev_sentences, int(d.max_length)), dev_labels,
        buckets=buckets, process_index=process_index, process_count=process_count,
        mlm_probability=mlm, mask_id=vocab.mask_id, vocab_size=vocab.vocab_size,
        seed=config.seed)}
    logging.info('Data: %d training and %d dev sentences from %s, %d pieces (+[MASK]),'
                 ' %d rows per process, buckets %s%s.', len(train_ids),
                 len(dev_sentences), folder, tokenizer.vocab_size, local, buckets,
                 f', masked LM p={mlm}' if mlm else '')
    return vocab, train_iter, eval_sets


class ClassificationTask(_SentenceTask):
  """Sentence classification from the pooled encoder output; reports accuracy."""

  name = 'classification'
  batch_keys = ('inputs', 'labels')
  unit = 'sentences'
  final_eval_averages = True

  def loss(self, model, batch, config, *, train):
    logits = model(batch['inputs'], deterministic=not train)  # [B, C]
    labels = batch['labels'][:, 0]  # [B]; -1 marks padding rows.
    weights = (labels >= 0).astype(jnp.float32)
    safe = jnp.maximum(labels, 0)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe)  # [B]
    smoothing = config.optim.label_smoothing
    if smoothing > 0:
      soft = optax.smooth_labels(jax.nn.one_hot(safe, logits.shape[-1]), smoothing)
      loss = optax.softmax_cross_entropy(logits, soft)
    else:
      loss = nll
    count = jnp.sum(weights)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weights)
    loss_sum = jnp.sum(loss * weights)
    return loss_sum / jnp.maximum(count, 1.0), {
        'loss_sum': loss_sum, 'nll_sum': jnp.sum(nll * weights), 'tokens': count,
        'correct': correct}

  def train_flops(self, model_cfg, batch):
    b, s = batch['inputs'].shape
    return 3.0 * b * model_cfg.num_encoder_layers * _layer_flops(model_cfg, s)

  def _batch_shapes(self, config, mesh):
    b = int(config.data.batch_size)
    return {'inputs': (b, int(config.data.max_length)), 'labels': (b, 1)}


class MaskedLMTask(_SentenceTask):
  """BERT's masked-LM pre-training of the encoder on the training sentences."""

  name = 'mlm'
  mlm = True
  batch_keys = ('inputs', 'mlm_positions', 'mlm_targets')
  unit = 'masked tokens'

  def loss(self, model, batch, config, *, train):
    logits = model.masked_lm(batch['inputs'], batch['mlm_positions'],
                             deterministic=not train)  # [B, P, V]
    targets = batch['mlm_targets']
    loss_sum, nll_sum, ntok = optim.label_smoothed_loss(
        logits, targets, config.optim.label_smoothing, model.cfg.pad_id)
    weights = (targets != model.cfg.pad_id).astype(jnp.float32)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
    return loss_sum / jnp.maximum(ntok, 1.0), {
        'loss_sum': loss_sum, 'nll_sum': nll_sum, 'tokens': ntok, 'correct': correct}

  def train_flops(self, model_cfg, batch):
    b, s = batch['inputs'].shape
    p = batch['mlm_positions'].shape[1]
    d = model_cfg.d_model
    forward = model_cfg.num_encoder_layers * _layer_flops(model_cfg, s)
    forward += p * (2 * d * d + 2 * d * model_cfg.vocab_size)
    return 3.0 * b * forward

  def _batch_shapes(self, config, mesh):
    from transformer_jax.data import sentences as sentences_lib  # pylint: disable=g-import-not-at-top
    b, length = int(config.data.batch_size), int(config.data.max_length)
    p = sentences_lib.mlm_predictions(length, float(config.data.mlm_probability))
    return {'inputs': (b, length), 'mlm_positions': (b, p), 'mlm_targets': (b, p)}


_TASKS = {t.name: t for t in (TranslationTask, LanguageModelTask, ClassificationTask,
                              MaskedLMTask)}
_TASK_FAMILY = {'translation': 'encoder_decoder', 'lm': 'decoder_only',
                'classification': 'encoder_only', 'mlm': 'encoder_only'}


def for_config(config) -> Task:
  """The task ``config`` trains: ``config.train.task``, else the family's own."""
  family = config.model.get('family', 'encoder_decoder')
  if family not in _FAMILY_TASKS:
    raise ValueError(f'config.model.family={family!r}: expected one of '
                     f'{sorted(_FAMILY_TASKS)}.')
  name = config.train.get('task') or _FAMILY_TASKS[family]
  if name not in _TASKS:
    raise ValueError(f'config.train.task={name!r}: expected one of {sorted(_TASKS)}.')
  if _TASK_FAMILY[name] != family:
    raise ValueError(f'config.train.task={name!r} trains an {_TASK_FAMILY[name]} model, '
                     f'but config.model.family={family!r}.')
  return _TASKS[name]()


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Summed metrics -> {'loss', 'perplexity', 'tokens', extra keys / tokens}."""
  tokens = max(float(sums['tokens']), 1.0)
  out = {'loss': float(sums['loss_sum']) / tokens,
         'perplexity': float(np.exp(float(sums['nll_sum']) / tokens)),
         'nll': float(sums['nll_sum']) / tokens, 'tokens': float(sums['tokens'])}
  for key, value in sums.items():
    if key not in ('loss_sum', 'nll_sum', 'tokens', 'grad_norm'):
      out['accuracy' if key == 'correct' else key] = float(value) / tokens
  return out
