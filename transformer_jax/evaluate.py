"""BLEU of a dev/test split: translate it, score it both ways, write the results.

  python -m transformer_jax.evaluate --workdir=DIR [--split=test] [--average_last=5]
      [--checkpoint_step=N] [--beam_size=4] [--source_file=F --reference_file=F]
      [--output=FOLDER]

translates the split named by the workdir's config (``validation`` =
``config.data.eval_split``, newstest2013 for WMT14; ``test`` = ``test_split``,
newstest2014) or the given text files with beam search (Sec 6.1), and writes

(into ``--output``, default DIR/eval)

  DIR/eval/<name>.hyp.txt    the translations, one a line, in corpus order
  DIR/eval/<name>.json       {'sacrebleu', 'sacrebleu_signature', 'tok_bleu', 'lc_tok_bleu',
                              'num_sentences', 'step', ...}

one pair of files per (split, step, averaging, search): ``<name>`` is e.g.
``test-step2000-avg10`` (``inference.evaluation.result_name``).

``tok_bleu`` is the paper's tokenized, compound-split BLEU; ``sacrebleu`` the
detokenized figure people compare today; ``lc_tok_bleu`` the lower-cased,
Moses-tokenized BLEU Multi30k papers report (see ``inference/bleu.py``). The library
behind this command, which training's BLEU calls too, is ``inference/evaluation.py``.
"""

from __future__ import annotations

import json

from absl import flags, logging

from transformer_jax import cli
from transformer_jax import translate
from transformer_jax.inference import evaluation


def _read_pairs(source_file: str, reference_file: str) -> tuple[list[str], list[str]]:
  from transformer_jax.data.datasets import parallel_text
  text = parallel_text.read_parallel(source_file, reference_file)
  if text.skipped_empty:
    logging.warning('%s / %s: skipped %d pairs with an empty side (lines %s).',
                    source_file, reference_file, len(text.skipped_empty),
                    text.skipped_empty[:10])
  return [p[0] for p in text.pairs], [p[1] for p in text.pairs]


def main(f: flags.FlagValues) -> None:
  if f.source_file or f.reference_file:
    if not (f.source_file and f.reference_file):
      raise ValueError('--source_file and --reference_file go together.')
    sources, references = _read_pairs(f.source_file, f.reference_file)
  translator = translate.translator_from_flags(f)
  if not f.source_file:
    from transformer_jax.data.datasets import sources as sources_lib
    pairs = sources_lib.load_pairs(translator.config.data, f.split)
    if pairs is None:
      raise ValueError(f'The config of {f.workdir} names no {f.split} split; pass '
                       '--source_file and --reference_file.')
    sources, references = [p[0] for p in pairs], [p[1] for p in pairs]
  if f.max_sentences:
    sources, references = sources[:f.max_sentences], references[:f.max_sentences]
  results = evaluation.evaluate_translator(
      translator, sources, references, split=f.split,
      output=f.output or evaluation.eval_dir(f.workdir),
      extra={'average_last': f.average_last})
  print(json.dumps(results, indent=2))


def define_flags() -> None:
  cli.define_run_flags()
  cli.define_search_flags()
  flags.DEFINE_enum('split', 'test', ['validation', 'test'],
                    'validation = config.data.eval_split, test = config.data.test_split.')
  flags.DEFINE_string('source_file', None, 'Evaluate these sources instead of the split.')
  flags.DEFINE_string('reference_file', None, 'References aligned with --source_file.')
  flags.DEFINE_integer('max_sentences', None, 'Only the first N sentences.')
  flags.DEFINE_string('output', None, 'Folder for <split>.hyp.txt and <split>.json '
                      '(default WORKDIR/eval).')


if __name__ == '__main__':
  define_flags()
  cli.run(main, 'evaluate')
