"""Translate text with a trained run, from a file, a pipe or a terminal.

  python -m transformer_jax.translate --workdir=DIR [--checkpoint_step=N]
      [--average_last=K] [--beam_size=4] [--n_best=K] [--input=in.txt]
      [--output=out.txt] [--interactive]

reads one sentence a line (``--input``, default stdin) and writes one translation a
line (``--output``, default stdout) in input order. A whole input is translated in
sorted, length-bucketed batches (``inference.translator``); with ``--interactive``
(the default when stdin is a terminal) each line is translated and printed as soon as
it is read. ``--n_best=K`` writes the K best translations of each line as
``line number <TAB> score <TAB> translation`` (score = log P / length penalty, the
beam search's ranking; best first). Progress and timing go to stderr.

Defaults come from the run's ``config.json`` (``config.eval``: Sec 6.1's beam 4,
alpha 0.6, output limit input + 50). Bad input does not stop a file midway: an empty
line gives an empty line; a line longer than the model's ``max_len`` tokens is cut
(with a warning naming the line); characters the vocabulary lacks become the unknown
token (counted in a warning).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from typing import TextIO

from absl import flags

from transformer_jax import cli
from transformer_jax.inference.translator import Hypothesis, Translator


def translator_from_flags(f: flags.FlagValues, **overrides) -> Translator:
  """The Translator the shared run and search flags ask for."""
  kwargs = dict(checkpoint_step=f.checkpoint_step, average_last=f.average_last,
                beam_size=f.beam_size, alpha=f.alpha, max_extra_length=f.max_extra_length,
                batch_size=f.batch_size, beam_rules=f.beam_rules)
  kwargs.update(overrides)
  return Translator.from_workdir(f.workdir, **kwargs)


def format_translations(hyps: Sequence[list[Hypothesis]], n_best: int | None,
                        first_line: int = 1) -> str:
  """Output text: one translation a line, or with ``n_best`` K lines an input
  (``number <TAB> score <TAB> translation``; none for an empty input line)."""
  out = []
  for number, row in enumerate(hyps, start=first_line):
    if n_best is None:
      out.append((row[0].text if row else '') + '\n')
    else:
      out.extend(f'{number}\t{h.score:.4f}\t{h.text}\n' for h in row[:n_best])
  return ''.join(out)


def _lines(stream: TextIO) -> Iterator[str]:
  """Lines as they arrive (readline does not wait for a full buffer)."""
  while True:
    line = stream.readline()
    if not line:
      return
    yield line.rstrip('\r\n')


def translate_interactively(translator: Translator, source: TextIO, out: TextIO, *,
                            n_best: int | None = None, prompt: bool = False) -> int:
  """Translates each line of ``source`` as soon as it is read; returns the count."""
  count = 0
  if prompt:
    print('Type a sentence and press Enter (Ctrl-D ends).', file=sys.stderr)
  for count, line in enumerate(_lines(source), start=1):
    hyps = translator.translate_n_best([line], n_best or 1, where=f'line {count}')
    out.write(format_translations(hyps, n_best, first_line=count))
    out.flush()
  return count


def main(f: flags.FlagValues) -> None:
  if f.n_best is not None and f.n_best < 1:
    raise ValueError(f'--n_best must be >= 1, got {f.n_best}.')
  interactive = f.interactive
  if interactive is None:
    interactive = f.input is None and sys.stdin.isatty()
  if interactive and f.input is not None:
    raise ValueError('--interactive reads stdin; drop --input.')
  lines = None if interactive else cli.read_lines(f.input, 'translate')
  translator = translator_from_flags(f)
  start = time.perf_counter()
  if interactive:
    if f.output is None:
      count = translate_interactively(translator, sys.stdin, sys.stdout, n_best=f.n_best,
                                      prompt=sys.stdin.isatty())
    else:
      with open(f.output, 'w', encoding='utf-8') as out:
        count = translate_interactively(translator, sys.stdin, out, n_best=f.n_best)
  else:
    hyps = translator.translate_n_best(lines, f.n_best or 1, progress=True,
                                       where=f.input or 'stdin')
    cli.write_output(f.output, format_translations(hyps, f.n_best))
    count = len(lines)
  seconds = time.perf_counter() - start
  print(f'translate: {count} lines in {seconds:.1f} s '
        f'({count / max(seconds, 1e-9):.1f} lines/s, compile included)', file=sys.stderr)


def define_flags() -> None:
  cli.define_run_flags()
  cli.define_search_flags()
  flags.DEFINE_string('input', None, 'Source text, one sentence a line (default stdin).')
  flags.DEFINE_string('output', None, 'Translations, one a line (default stdout).')
  flags.DEFINE_integer('n_best', None, 'Write the K best translations of each line with '
                       'their scores: "line<TAB>score<TAB>translation" (K <= beam size).')
  flags.DEFINE_bool('interactive', None, 'Translate each stdin line as soon as it is read '
                    '(default: when stdin is a terminal).')


if __name__ == '__main__':
  define_flags()
  cli.run(main, 'translate')
