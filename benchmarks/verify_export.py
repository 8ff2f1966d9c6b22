"""Does the exported model translate as ours? Multi30k test2016 through both engines.

  python benchmarks/verify_export.py --workdir=runs/multi30k \
      --source=../shared/data/multi30k/test2016.en.gz \
      --reference=../shared/data/multi30k/test2016.de.gz [--max_sentences=0] [--greedy]

Exports the workdir to CTranslate2 (float32 and int8, under /tmp), translates the
source with our beam search (the workdir's config.eval: beam 4, alpha 0.6, output
limit source + 50) and with CTranslate2 under the same beam, alpha and per-sentence
limit, and prints: the share of sentences with identical output, sacreBLEU of each,
and the differences. ``--greedy`` also compares greedy search, where the two engines
differ only in arithmetic. Where torch and transformers are installed it exports to
Hugging Face MarianMT and prints the largest logit difference against our model on
the first sentences (teacher-forced on our translations).

The searches differ by design (README, Export): CTranslate2 divides log P by |Y|^alpha
where we use GNMT's ((5 + |Y|) / 6)^alpha, and it stops after beam-size finished
hypotheses where we stop when no alive one can win.
"""

import argparse
import gzip
import os
import platform
import tempfile

import numpy as np

from transformer_jax.inference import bleu
from transformer_jax.inference import export
from transformer_jax.inference.translator import Translator


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


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


def _ct2(model_dir, lines, beam_size, alpha, max_extra):
  import ctranslate2
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, 'spm.model'))
  translator = ctranslate2.Translator(model_dir, device='cpu', intra_threads=os.cpu_count())
  pieces = export.ctranslate2_translate(
      translator, [sp.encode(line.strip(), out_type=str) for line in lines],
      beam_size=beam_size, length_penalty=alpha, max_extra_length=max_extra)
  return [sp.decode(p) for p in pieces]


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
  parser.add_argument('--max_sentences', type=int, default=0, help='0 = all.')
  parser.add_argument('--greedy', action='store_true', help='Also compare greedy search.')
  parser.add_argument('--hf_sentences', type=int, default=8)
  args = parser.parse_args()

  print(f'machine: {os.cpu_count()}-core CPU ({_cpu_model()}), load average '
        f'{", ".join(f"{x:.1f}" for x in os.getloadavg())}')
  lines = _read(args.source, args.max_sentences)
  references = _read(args.reference, args.max_sentences)
  out = tempfile.mkdtemp(prefix='verify-export-')
  dirs = {q: export.to_ctranslate2(args.workdir, os.path.join(out, q), quantization=q,
                                   step=args.checkpoint_step)
          for q in ('float32', 'int8')}
  translator = Translator.from_workdir(args.workdir, args.checkpoint_step, use_mesh=False)
  e = translator.config.eval
  step = translator.step
  print(f'{args.workdir} step {step}, {len(lines)} sentences, beam '
        f'{e.beam_size}, alpha {e.length_penalty}, limit source + {e.max_extra_length}')
  ours = translator.translate(lines)
  for q, model_dir in dirs.items():
    theirs = _ct2(model_dir, lines, e.beam_size, e.length_penalty, e.max_extra_length)
    _compare(f'beam {e.beam_size}, ctranslate2 {q} vs ours', ours, theirs, references)
    if q == 'float32':
      differing = [(s, a, b) for s, a, b in zip(lines, ours, theirs) if a != b]
      for src, a, b in differing[:10]:
        print(f'  differs: {src!r}\n    ours: {a!r}\n    ct2:  {b!r}')
  if args.greedy:
    ours_greedy = translator.with_search(beam_size=1).translate(lines)
    theirs = _ct2(dirs['float32'], lines, 1, 0.0, e.max_extra_length)
    _compare('greedy, ctranslate2 float32 vs ours', ours_greedy, theirs, references)
  _huggingface_logits(args.workdir, os.path.join(out, 'hf'), lines, ours,
                      args.hf_sentences)


if __name__ == '__main__':
  main()
