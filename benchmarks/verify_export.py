"""Does the exported model translate as ours? Multi30k test2016 through both engines.

  python benchmarks/verify_export.py --workdir=runs/multi30k \
      --source=../shared/data/multi30k/test2016.en.gz \
      --reference=../shared/data/multi30k/test2016.de.gz [--max_sentences=0] [--greedy] \
      [--checkpoint_step=N] [--average_last=K] [--beam_sizes=4,5] [--output=DIR] \
      [--paper] [--bucket=64]

Exports the workdir to CTranslate2 (float32 and int8, under ``--output`` or /tmp),
translates the source with our beam search under CTranslate2's rules
(``beam_rules='ctranslate2'``: its length penalty |Y|^alpha, what finishes and when
it stops) and with CTranslate2, same beam, alpha (the workdir's config.eval) and
per-sentence limit (source + 50), and prints: the share of sentences with identical
output, sacreBLEU of each, and each differing sentence with both outputs' scores
log P / |Y|^alpha under the float32 export (teacher-forced), which tells a near-tie
in the arithmetic from a search that went elsewhere. ``--paper`` also compares our
paper search (Sec 6.1's GNMT penalty and stopping); ``--greedy`` greedy search.
``--bucket=S`` pads every source to S pieces: one compilation per search instead of
one per bucket length, for a busy machine. Where torch and transformers are installed it exports to Hugging Face
MarianMT and prints the largest logit difference against our model on the first
sentences (teacher-forced on our translations).
"""

import argparse
import dataclasses
import gzip
import os
import tempfile

import numpy as np

from transformer_jax.inference import bleu
from transformer_jax.inference import export
from transformer_jax.inference.translator import Translator
import machine  # benchmarks/machine.py


def _read(path, limit):
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt', encoding='utf-8') as f:
    lines = [line.rstrip('\n') for line in f]
  return lines[:limit] if limit else lines


def _compare(name, ours, theirs, references):
  same = sum(a == b for a, b in zip(ours, theirs))
  ours_bleu = bleu.compute_bleu(ours, references).sacrebleu
  theirs_bleu = bleu.compute_bleu(theirs, references).sacrebleu
  print(f'{name}: identical {same}/{len(ours)} ({100 * same / len(ours):.1f}%), '
        f'sacreBLEU ours {ours_bleu:.2f}, theirs {theirs_bleu:.2f}, '
        f'difference {theirs_bleu - ours_bleu:+.2f}')
  return theirs_bleu


def _engine(model_dir):
  import ctranslate2
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, 'spm.model'))
  return sp, ctranslate2.Translator(model_dir, device='cpu', intra_threads=os.cpu_count())


def _ct2(model_dir, lines, beam_size, alpha, max_extra):
  sp, translator = _engine(model_dir)
  pieces = export.ctranslate2_translate(
      translator, [sp.encode(line.strip(), out_type=str) for line in lines],
      beam_size=beam_size, length_penalty=alpha, max_extra_length=max_extra)
  return [sp.decode(p) for p in pieces]


def _print_differences(model_dir, lines, ours, theirs, alpha, limit=20):
  """Each differing sentence with both outputs and their scores log P / |Y|^alpha
  (|Y| without eos, CTranslate2's ranking) under the float32 export."""
  sp, translator = _engine(model_dir)
  differing = [(s, a, b) for s, a, b in zip(lines, ours, theirs) if a != b]
  print(f'  {len(differing)} differ' + (f'; the first {limit}:' if len(differing) > limit
                                        else ':'))
  for src, a, b in differing[:limit]:
    source = sp.encode(src.strip(), out_type=str)
    scores = []
    for hyp in (a, b):
      target = sp.encode(hyp, out_type=str)
      logp = sum(translator.score_batch([source], [target])[0].log_probs)
      scores.append(logp / max(len(target), 1) ** alpha)
    print(f'  differs: {src!r}\n    ours: {a!r} ({scores[0]:.5f})\n'
          f'    ct2:  {b!r} ({scores[1]:.5f})')


def _huggingface_logits(workdir, out_dir, lines, ours, n):
  try:
    import torch
    import transformers
  except ImportError:
    print('huggingface: torch/transformers not installed (pip install -e .[huggingface]); '
          'logits check skipped')
    return
  import jax.numpy as jnp
  from transformer_jax import model as model_lib
  from transformer_jax.run import workdir as workdir_lib
  export.to_huggingface(workdir, out_dir, force=True)
  hf = transformers.MarianMTModel.from_pretrained(out_dir).eval()
  tokenizer = transformers.MarianTokenizer.from_pretrained(out_dir)
  wd = workdir_lib.Workdir.open(workdir)
  model = wd.model(wd.restore())
  worst, top1 = 0.0, []
  for src_line, tgt_line in zip(lines[:n], ours[:n]):
    src = tokenizer([src_line], return_tensors='pt')
    tgt = tokenizer(text_target=[tgt_line], return_tensors='pt')['input_ids'].numpy()
    tgt_in = np.array(model_lib.shift_right(jnp.asarray(tgt, jnp.int32)))
    with torch.no_grad():
      theirs = hf(**src, decoder_input_ids=torch.from_numpy(tgt_in).long()).logits.numpy()
    mine = np.asarray(model(jnp.asarray(src['input_ids'].numpy(), jnp.int32),
                            jnp.asarray(tgt_in, jnp.int32)))
    worst = max(worst, float(np.abs(theirs - mine).max()))
    top1.append(np.mean(theirs.argmax(-1) == mine.argmax(-1)))
  print(f'huggingface MarianMT: largest |logit difference| over {n} sentences '
        f'{worst:.2e}; same argmax at {100 * np.mean(top1):.1f}% of positions')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--source', required=True)
  parser.add_argument('--reference', required=True)
  parser.add_argument('--checkpoint_step', type=int, default=None)
  parser.add_argument('--average_last', type=int, default=1,
                      help='Export and decode the mean of the last K checkpoints.')
  parser.add_argument('--beam_sizes', default='',
                      help='Comma-separated beam sizes (default config.eval.beam_size).')
  parser.add_argument('--output', default='',
                      help='Folder for the exports (default a new one under /tmp).')
  parser.add_argument('--reuse', action='store_true',
                      help='Keep exports already in --output (same checkpoints).')
  parser.add_argument('--paper', action='store_true',
                      help='Also compare our search under the paper rules.')
  parser.add_argument('--bucket', type=int, default=0,
                      help='Pad all sources to this length (0 = the config buckets).')
  parser.add_argument('--max_sentences', type=int, default=0, help='0 = all.')
  parser.add_argument('--greedy', action='store_true', help='Also compare greedy search.')
  parser.add_argument('--hf_sentences', type=int, default=8)
  args = parser.parse_args()

  print(f'machine: {os.cpu_count()}-core CPU ({machine.cpu_model()}), load average '
        f'{", ".join(f"{x:.1f}" for x in os.getloadavg())}')
  lines = _read(args.source, args.max_sentences)
  references = _read(args.reference, args.max_sentences)
  out = args.output or tempfile.mkdtemp(prefix='verify-export-')
  dirs = {}
  for q in ('float32', 'int8'):
    dirs[q] = os.path.join(out, q)
    if args.reuse and os.path.exists(os.path.join(dirs[q], 'model.bin')):
      print(f'reusing the export in {dirs[q]}')
      continue
    export.to_ctranslate2(args.workdir, dirs[q], quantization=q, step=args.checkpoint_step,
                          average_last=args.average_last, force=True)
  translator = Translator.from_workdir(args.workdir, args.checkpoint_step,
                                       args.average_last, use_mesh=False)
  if args.bucket:
    translator = dataclasses.replace(translator, buckets=(args.bucket,))
  e = translator.config.eval
  steps = translator.steps or [translator.step]
  print(f'{args.workdir} step {translator.step} (mean of {len(steps)} checkpoints), '
        f'{len(lines)} sentences, alpha {e.length_penalty}, limit source + '
        f'{e.max_extra_length}')
  beams = [int(b) for b in args.beam_sizes.split(',')] if args.beam_sizes else [e.beam_size]
  ours = None
  for beam in beams:
    ours = translator.with_search(beam_size=beam, beam_rules='ctranslate2').translate(lines)
    for q, model_dir in dirs.items():
      theirs = _ct2(model_dir, lines, beam, e.length_penalty, e.max_extra_length)
      _compare(f'beam {beam}, ctranslate2 {q} vs ours (ctranslate2 rules)', ours, theirs,
               references)
      if q == 'float32':
        _print_differences(model_dir, lines, ours, theirs, e.length_penalty)
        if args.paper:
          paper = translator.with_search(beam_size=beam, beam_rules='paper').translate(lines)
          _compare(f'beam {beam}, ctranslate2 {q} vs ours (paper rules)', paper, theirs,
                   references)
  if args.greedy:
    ours_greedy = translator.with_search(beam_size=1, beam_rules='ctranslate2').translate(
        lines)
    theirs = _ct2(dirs['float32'], lines, 1, 0.0, e.max_extra_length)
    _compare('greedy, ctranslate2 float32 vs ours', ours_greedy, theirs, references)
  if args.hf_sentences:
    _huggingface_logits(args.workdir, os.path.join(out, 'hf'), lines, ours,
                        args.hf_sentences)


if __name__ == '__main__':
  main()
