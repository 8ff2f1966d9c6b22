"""Our JAX beam search beside CTranslate2 float32 and int8, same model and sentences.

  python benchmarks/export_speed.py --workdir=runs/multi30k \
      --source=../shared/data/multi30k/test2016.en.gz [--sentences=200] [--rounds=3]
      [--batch_size=32] [--average_last=K] [--beam_rules=ctranslate2|paper]

Exports the workdir to CTranslate2 (float32, int8; under /tmp), then translates the
first ``--sentences`` lines with the workdir's config.eval search (beam, alpha, limit
source + 50) one sentence at a time (batch 1) and in batches, with each engine. Ours
runs CTranslate2's beam rules by default (the same algorithm; ``--beam_rules=paper``
times Sec 6.1's). Our searches are compiled first (every bucket shape); CTranslate2
warms up on the same text. The machine is shared, so the six configurations run interleaved for
``--rounds`` rounds and each figure is the fastest round (median beside it), with the
CPU model and the load average. Target tokens are SentencePiece pieces of each
engine's own output, plus eos.
"""

import argparse
import dataclasses
import gzip
import os
import statistics
import tempfile
import time

from transformer_jax.inference import export
from transformer_jax.inference.translator import Translator
import machine  # benchmarks/machine.py


def _load():
  return ', '.join(f'{x:.1f}' for x in os.getloadavg())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--source', required=True)
  parser.add_argument('--sentences', type=int, default=200)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--average_last', type=int, default=1)
  parser.add_argument('--beam_rules', default='ctranslate2', choices=('ctranslate2', 'paper'))
  parser.add_argument('--max_source_tokens', type=int, default=0,
                      help='Keep only sources of at most this many pieces (0 = all): '
                      'fewer bucket shapes for our search to compile on a busy machine.')
  args = parser.parse_args()

  import ctranslate2
  import sentencepiece as spm
  opener = gzip.open if args.source.endswith('.gz') else open
  with opener(args.source, 'rt', encoding='utf-8') as f:
    lines = [line.strip() for line in f]
  out = tempfile.mkdtemp(prefix='export-speed-')
  ours = Translator.from_workdir(args.workdir, average_last=args.average_last,
                                 use_mesh=False, beam_rules=args.beam_rules)
  e = ours.config.eval
  sp = spm.SentencePieceProcessor(model_file=ours.tokenizer.path)
  if args.max_source_tokens:
    lines = [l for l in lines if len(sp.encode(l)) <= args.max_source_tokens]
  lines = lines[:args.sentences]
  pieces = [sp.encode(line, out_type=str) for line in lines]
  threads = os.cpu_count()
  engines = {}
  for q in ('float32', 'int8'):
    model_dir = export.to_ctranslate2(args.workdir, os.path.join(out, q), quantization=q,
                                      average_last=args.average_last)
    engines[q] = ctranslate2.Translator(model_dir, device='cpu', intra_threads=threads)

  def run_ours(batch_size):
    outputs = dataclasses.replace(ours, batch_size=batch_size).translate(lines)
    return sum(len(sp.encode(o)) + 1 for o in outputs)

  def run_ct2(q, batch_size):
    outputs = export.ctranslate2_translate(
        engines[q], pieces, beam_size=e.beam_size, length_penalty=e.length_penalty,
        max_extra_length=e.max_extra_length, batch_size=batch_size)
    return sum(len(o) + 1 for o in outputs)

  configs = {}
  for batch_size in (1, args.batch_size):
    configs[f'ours (JAX, float32), batch {batch_size}'] = (run_ours, batch_size)
    for q in engines:
      configs[f'ctranslate2 {q}, batch {batch_size}'] = (
          lambda b, q=q: run_ct2(q, b), batch_size)

  print(f'machine: {os.cpu_count()}-core CPU ({machine.cpu_model()}); CTranslate2 '
        f'{ctranslate2.__version__}, {threads} threads')
  print(f'{args.workdir}: {len(lines)} sentences, beam {e.beam_size}, alpha '
        f'{e.length_penalty}, ours under {args.beam_rules} rules; warming up (compiles), '
        f'load average {_load()}')
  for fn, batch_size in configs.values():
    fn(batch_size)
  times = {name: [] for name in configs}
  tokens = {}
  for r in range(args.rounds):
    for name, (fn, batch_size) in configs.items():
      start = time.perf_counter()
      tokens[name] = fn(batch_size)
      times[name].append(time.perf_counter() - start)
    print(f'round {r + 1}/{args.rounds} done, load average {_load()}')
  print('| engine | sentences/s | target tokens/s | median s/round |')
  print('|---|---:|---:|---:|')
  for name in configs:
    best = min(times[name])
    print(f'| {name} | {len(lines) / best:.1f} | {tokens[name] / best:.0f} | '
          f'{statistics.median(times[name]):.1f} |')
  print(f'load average at the end: {_load()}')


if __name__ == '__main__':
  main()
