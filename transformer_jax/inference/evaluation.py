"""BLEU of a Translator on a corpus, and the result files it writes.

:func:`evaluate_translator` translates sources with a :class:`Translator`, scores the
translations both ways (``bleu.py``: sacreBLEU and the paper's tokenized BLEU) and
writes ``<name>.hyp.txt`` and ``<name>.json`` (:func:`result_name`: split, step,
averaging and search). The evaluate command line and training's BLEU (``train/tasks.py``)
both call it; :func:`evaluate_bleu` is the same for a model in memory.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import jax
from absl import logging

from transformer_jax.inference import bleu
from transformer_jax.inference.translator import Translator

EVAL_DIR = 'eval'  # Under a run's directory: where its evaluations are written.


def eval_dir(workdir: str) -> str:
  """``workdir/eval``, the default folder of a run's evaluation results."""
  return os.path.join(workdir, EVAL_DIR)


def result_name(split: str, results: dict, config=None) -> str:
  """The file stem of one evaluation: split, step and what was decoded.

  ``test-step2000``, ``validation-step2000-avg10`` (the average of 10 checkpoints),
  and ``-beam{K}`` / ``-alpha{A}`` / ``-ctranslate2`` when the search differs from
  ``config.eval``'s, so
  evaluating other checkpoints or searches never overwrites an earlier result.
  """
  name = split if results.get('step') is None else f'{split}-step{results["step"]}'
  averaged = results.get('averaged_steps') or []
  k = len(averaged) if averaged else int(results.get('average_last') or 1)
  if k > 1:
    name += f'-avg{k}'
  e = config.eval if config is not None else None
  if e is not None and results.get('beam_size', e.beam_size) != e.beam_size:
    name += f'-beam{results["beam_size"]}'
  if e is not None and results.get('length_penalty', e.length_penalty) != e.length_penalty:
    name += f'-alpha{results["length_penalty"]:g}'
  rules = results.get('beam_rules', 'paper')
  if e is not None and rules != e.get('beam_rules', 'paper'):
    name += f'-{rules}'
  return name


def write_results(folder: str, name: str, hypotheses: Sequence[str],
                  results: dict) -> str:
  """Writes <folder>/<name>.hyp.txt and <folder>/<name>.json atomically.

  Args:
    folder: e.g. DIR/eval.
    name: the file stem, ``result_name(...)``.

  Returns:
    The path of the JSON file.
  """
  os.makedirs(folder, exist_ok=True)
  for filename, text in ((f'{name}.hyp.txt', ''.join(h + '\n' for h in hypotheses)),
                         (f'{name}.json', json.dumps(results, indent=2) + '\n')):
    path = os.path.join(folder, filename)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(path + '.tmp', path)
  return path


def score_translations(hypotheses: Sequence[str], references: Sequence[str], *,
                       lang: str, step: int | None) -> dict:
  """The JSON-able result of one evaluation (both BLEU figures, corpus size, step)."""
  scores = bleu.compute_bleu(hypotheses, references, lang=lang)
  return {'sacrebleu': scores.sacrebleu, 'tok_bleu': scores.tok_bleu,
          'lc_tok_bleu': scores.lc_tok_bleu, 'num_sentences': scores.num_sentences,
          'step': None if step is None else int(step),
          'sacrebleu_signature': scores.sacrebleu_signature,
          'tok_bleu_method': f'moses tokenizer -l {lang}, ##AT##-##AT## compounds, '
                             'multi-bleu',
          'lc_tok_bleu_method': f'lower-cased, moses normalize-punctuation and tokenizer '
                                f'-l {lang} (Multi30k task1-tokenize.sh), multi-bleu'}


def evaluate_translator(translator: Translator, sources: Sequence[str],
                        references: Sequence[str], *, split: str,
                        output: str | None = None, progress: bool = True,
                        extra: dict | None = None) -> dict:
  """Translates ``sources``, scores against ``references``, writes the files.

  Args:
    translator: the model and search; its ``step`` (and averaged ``steps``) are
      recorded in the results.
    sources, references: the corpus, aligned.
    split: its name (the files' names).
    output: the folder for ``<split>.hyp.txt`` and ``<split>.json``; None writes
      nothing.
    progress: a progress bar on stderr.
    extra: entries that join the results.
  """
  if len(sources) != len(references):
    raise ValueError(f'{split}: {len(sources)} sources but {len(references)} references.')
  start = time.perf_counter()
  hypotheses = translator.translate(sources, progress=progress, where=f'{split} split')
  seconds = time.perf_counter() - start
  search = translator.search
  results = score_translations(hypotheses, references,
                               lang=translator.config.data.target_lang, step=translator.step)
  results.update(split=split, beam_size=search.beam_size, length_penalty=search.alpha,
                 max_extra_length=search.max_extra_len, beam_rules=search.beam_rules,
                 decode_seconds=seconds)
  if translator.steps and len(translator.steps) > 1:
    results['averaged_steps'] = list(translator.steps)
  results.update(extra or {})
  if output is not None and jax.process_index() == 0:
    path = write_results(output, result_name(split, results, translator.config),
                         hypotheses, results)
    logging.info('%s: sacreBLEU %.2f, tokenized BLEU %.2f, lower-cased tokenized BLEU '
                 '%.2f on %d sentences -> %s', split, results['sacrebleu'],
                 results['tok_bleu'], results['lc_tok_bleu'], len(sources), path)
    for source, hypothesis, reference in list(zip(sources, hypotheses, references))[:3]:
      logging.info('%s example:\n  source:      %s\n  translation: %s\n  reference:   %s',
                   split, source, hypothesis, reference)
  return results


def evaluate_bleu(model, tokenizer, eval_set, config, *, workdir: str | None = None,
                  step: int | None = None, split: str | None = None,
                  max_sentences: int | None = None, progress: bool = False,
                  extra: dict | None = None) -> dict:
  """BLEU of ``model`` on an evaluation set, with ``config.eval``'s beam search.

  Args:
    model: a Transformer (e.g. ``nnx.merge`` of the training parameters); when
      its parameters are sharded over a mesh, the batch is split over that mesh's
      ('data', 'fsdp') axes (``Translator.from_model``).
    tokenizer: the run's Tokenizer.
    eval_set: anything with ``sources`` and ``references`` lists
      (``input_pipeline.EvalSet``).
    config: the run's ConfigDict (``eval``, ``data`` groups).
    workdir: the run; ``eval/<split>.json`` and ``eval/<split>.hyp.txt`` go
      there. None writes nothing.
    step: the training step, recorded in the results.
    split: the split's name (default ``eval_set.name``).
    max_sentences: score only the first N sentences.
    extra: entries that join the results (``averaged_steps``: the checkpoints
      the parameters average, which also name the result files).

  Returns:
    {'sacrebleu', 'tok_bleu', 'num_sentences', 'step', 'sacrebleu_signature', ...}.
  """
  split = split or getattr(eval_set, 'name', 'eval')
  n = max_sentences or len(eval_set.sources)
  translator = Translator.from_model(model, tokenizer, config, step=step)
  return evaluate_translator(
      translator, list(eval_set.sources[:n]), list(eval_set.references[:n]),
      split=split, output=eval_dir(workdir) if workdir else None,
      progress=progress, extra=extra)
