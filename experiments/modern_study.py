"""Row F and the length-generalisation study: every run, its evaluation, the tables.

  MULTI30K_DIR=../shared/data/multi30k nice -n 10 .venv/bin/python \
      experiments/modern_study.py --out=/tmp/modern-study

trains ``configs/modern.py`` once per row, sequentially, each with the same number
of steps (``--steps``), then decodes with beam 4 (Sec 6.1) and writes, under
``--out``:

  RUN/            the run's workdir (train.log, checkpoint, result.json)
  rowF.md         test2016 sacreBLEU and dev perplexity of every Row F variant
  length.md       BLEU by target-length bucket for the capped runs (+ length.png)

Row F runs train on all of Multi30k; the length runs (``LENGTH_RUNS``) keep only
pairs of at most ``--cap`` tokens a side and are scored on the whole of Multi30k's
dev and test2016 sets (most of their longer sentences were never seen at training
length) and on the first ``--wmt_sentences`` sentences of WMT newstest2013 (news,
far longer than any caption). A finished run (its result.json) is not rerun, so the
script resumes where it stopped; ``--only`` picks runs by name.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # This checkout's package, not an installed one.
ROW_F = ['paper', 'modern', 'rope', 'alibi', 'learned', 'rmsnorm', 'swiglu', 'geglu',
         'pre_ln', 'no_bias']
LENGTH_RUNS = ['sinusoidal', 'learned', 'rope', 'alibi']  # Position kinds, capped.
# Target-length buckets (SentencePiece tokens with eos): the first is the training range.
BUCKETS = [(1, 16), (17, 20), (21, 24), (25, 32), (33, 48), (49, 64), (65, 256)]


def run_plan(cap: int) -> list[tuple[str, str]]:
  """(run name, configs/modern.py argument) in the order they run: the rows the
  study most needs first, so a cut-short study still answers the main questions."""
  capped = {k: f'{"paper" if k == "sinusoidal" else k},cap{cap}' for k in LENGTH_RUNS}
  order = [('paper', 'paper'), ('modern', 'modern')]
  order += [(f'cap{cap}_{k}', capped[k]) for k in LENGTH_RUNS]
  order += [(name, name) for name in ROW_F if name not in ('paper', 'modern')]
  return order


def train(out: pathlib.Path, name: str, arg: str, steps: int, timeout: int) -> dict:
  """Trains one run through the main CLI; returns its wall time and dev metrics."""
  workdir = out / name
  workdir.mkdir(parents=True, exist_ok=True)
  vocab = out / 'vocab' / 'spm.model'
  cmd = [sys.executable, '-m', 'transformer_jax.main', f'--config=configs/modern.py:{arg}',
         f'--workdir={workdir}', f'--config.train.num_steps={steps}',
         f'--config.train.eval_every_steps={steps}', f'--config.checkpoint.every_steps={steps}']
  if vocab.exists():
    cmd.append(f'--config.data.vocab_path={vocab}')
  start = time.time()
  with open(workdir / 'train.log', 'a') as log:
    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          timeout=timeout, check=False)
  minutes = (time.time() - start) / 60
  if proc.returncode:
    raise RuntimeError(f'{name}: training exited with {proc.returncode}; see '
                       f'{workdir}/train.log')
  if not vocab.exists():  # The first run's vocabulary serves every later run.
    vocab.parent.mkdir(exist_ok=True)
    shutil.copy(workdir / 'vocab' / 'spm.model', vocab)
  text = (workdir / 'train.log').read_text()
  dev = re.findall(r'dev loss ([\d.]+) dev ppl ([\d.]+)', text)
  speed = re.findall(r'([\d,]+) target tokens/s, ([\d.]+) s/step', text)
  params = re.findall(r'Initialised ([\d,]+) parameters', text)
  return {'train_minutes': minutes, 'steps': steps,
          'dev_loss': float(dev[-1][0]) if dev else None,
          'dev_ppl': float(dev[-1][1]) if dev else None,
          'params': int(params[-1].replace(',', '')) if params else None,
          'last_s_per_step': float(speed[-1][1]) if speed else None}


def _read(path: pathlib.Path, limit: int | None = None) -> list[str]:
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    lines = [line.rstrip('\n') for line in f]
  return lines[:limit] if limit else lines


def evaluate(workdir: pathlib.Path, data: pathlib.Path, wmt: pathlib.Path | None,
             capped: bool, wmt_sentences: int) -> dict:
  """Beam-4 translations of test2016 (and, for capped runs, dev and WMT), scored
  overall and per target-length bucket."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  from transformer_jax.inference.translator import Translator  # pylint: disable=g-import-not-at-top
  translator = Translator.from_workdir(str(workdir))
  sets = {'test2016': (_read(data / 'test2016.en.gz'), _read(data / 'test2016.de.gz'))}
  if capped:
    sets['dev'] = (_read(data / 'val.en.gz'), _read(data / 'val.de.gz'))
    if wmt is not None:
      sets['newstest2013'] = (_read(wmt / 'newstest2013.en.gz', wmt_sentences),
                              _read(wmt / 'newstest2013.de.gz', wmt_sentences))
  result = {}
  for split, (sources, references) in sets.items():
    start = time.time()
    hypotheses = translator.translate(sources, where=split)
    lengths = [len(ids) + 1 for ids in translator.tokenizer.encode_batch(references)]
    entry = {'sacrebleu': sacrebleu.corpus_bleu(hypotheses, [references]).score,
             'sentences': len(sources), 'decode_seconds': time.time() - start,
             'buckets': {}}
    for low, high in BUCKETS:
      keep = [i for i, n in enumerate(lengths) if low <= n <= high]
      if keep:
        bleu = sacrebleu.corpus_bleu([hypotheses[i] for i in keep],
                                     [[references[i] for i in keep]])
        hyp_len = sum(len(hypotheses[i].split()) for i in keep)
        ref_len = sum(len(references[i].split()) for i in keep)
        entry['buckets'][f'{low}-{high}'] = {'bleu': bleu.score, 'sentences': len(keep),
                                             'length_ratio': hyp_len / max(ref_len, 1)}
    result[split] = entry
  return result


MIN_BUCKET = 10  # Fewer sentences than this: no BLEU shown (too noisy).


def _cell(bucket: dict | None) -> str:
  if not bucket or bucket['sentences'] < MIN_BUCKET:
    return ''
  return f'{bucket["bleu"]:.1f} ({bucket["length_ratio"]:.2f})'


def _fmt(x, spec='.2f'):
  return '' if x is None else format(x, spec)


def write_reports(out: pathlib.Path, cap: int) -> None:
  """rowF.md, length.md and length.png from every finished run's result.json."""
  results = {}
  for path in sorted(out.glob('*/result.json')):
    results[path.parent.name] = json.loads(path.read_text())
  lines = ['| variant | params | steps | train minutes | dev PPL | test2016 sacreBLEU |',
           '|---|---:|---:|---:|---:|---:|']
  for name in ROW_F:
    r = results.get(name)
    if r is None:
      lines.append(f'| {name} | | | | | (not run) |')
      continue
    lines.append(f'| {name} | {r["params"]:,} | {r["steps"]} | {_fmt(r["train_minutes"], ".1f")} '
                 f'| {_fmt(r["dev_ppl"])} | {_fmt(r["eval"]["test2016"]["sacrebleu"])} |')
  (out / 'rowF.md').write_text('\n'.join(lines) + '\n')

  capped = {k: results.get(f'cap{cap}_{k}') for k in LENGTH_RUNS}
  lines = []
  for split in ('dev', 'test2016', 'newstest2013'):
    names = [b for b in (f'{lo}-{hi}' for lo, hi in BUCKETS)
             if any(r and b in r['eval'].get(split, {}).get('buckets', {})
                    for r in capped.values())]
    if not names:
      continue
    counts = next(r['eval'][split]['buckets'] for r in capped.values()
                  if r and split in r['eval'])
    lines.append(f'{split}: sacreBLEU by target length (tokens with eos; sentences '
                 'in each bucket)\n')
    lines.append('| positions | ' + ' | '.join(
        f'{b} ({counts.get(b, {}).get("sentences", 0)})' for b in names) + ' | all |')
    lines.append('|---|' + '---:|' * (len(names) + 1))
    for kind, r in capped.items():
      if r is None or split not in r['eval']:
        lines.append(f'| {kind} | (not run) |')
        continue
      buckets = r['eval'][split]['buckets']
      lines.append(f'| {kind} | ' + ' | '.join(_cell(buckets.get(b)) for b in names) +
                   f' | {_fmt(r["eval"][split]["sacrebleu"])} |')
    lines.append('\nEach cell: sacreBLEU of the bucket (output/reference word-length ratio); '
                 f'buckets of fewer than {MIN_BUCKET} sentences are left blank.\n')
  (out / 'length.md').write_text('\n'.join(lines) + '\n')
  _plot(out, capped, cap)


def _plot(out: pathlib.Path, capped: dict, cap: int) -> None:
  """length.png: BLEU by bucket on dev and test2016; output/reference length ratio
  by bucket on test2016 (solid) and newstest2013 (dashed), whose BLEU is ~0."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = {k: r for k, r in capped.items() if r}
  if not runs:
    return
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  colors = dict(zip(LENGTH_RUNS, ('C0', 'C1', 'C2', 'C3')))

  def series(r, split, key):
    buckets = r['eval'].get(split, {}).get('buckets', {})
    xs = [f'{lo}-{hi}' for lo, hi in BUCKETS]
    return [(i, buckets[b][key]) for i, b in enumerate(xs)
            if b in buckets and buckets[b]['sentences'] >= MIN_BUCKET]

  for ax, split in zip(axes[:2], ('dev', 'test2016')):
    for kind, r in runs.items():
      points = series(r, split, 'bleu')
      ax.plot(*zip(*points), marker='o', color=colors[kind], label=kind)
    ax.set_title(f'{split}: sacreBLEU')
    ax.set_ylabel('sacreBLEU')
  ax = axes[2]
  for kind, r in runs.items():
    for split, style in (('test2016', '-'), ('newstest2013', '--')):
      points = series(r, split, 'length_ratio')
      if points:
        ax.plot(*zip(*points), style, marker='o', color=colors[kind],
                label=f'{kind}, {split}' if split == 'newstest2013' else kind)
  ax.axhline(1.0, color='grey', lw=0.8)
  ax.set_title('length ratio (test2016; dashed: newstest2013)')
  ax.set_ylabel('length ratio (words)')
  for ax in axes:
    ax.axvline(0.5, color='grey', ls=':', lw=0.8)  # The training cap.
    ax.set_xticks(range(len(BUCKETS)), [f'{lo}-{hi}' for lo, hi in BUCKETS], rotation=30)
    ax.set_xlabel('reference length (tokens)')
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(f'Trained on pairs of <= {cap} tokens (dotted line), 300 steps each')
  fig.tight_layout()
  fig.savefig(out / 'length.png', dpi=100)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='/tmp/modern-study')
  parser.add_argument('--steps', type=int, default=300, help='Train steps of every run.')
  parser.add_argument('--cap', type=int, default=16, help='Token cap of the length runs.')
  parser.add_argument('--only', default='', help='Comma-separated run names.')
  parser.add_argument('--timeout', type=int, default=1800, help='Seconds per training.')
  parser.add_argument('--wmt_sentences', type=int, default=300)
  parser.add_argument('--evaluate', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--capped', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--report_only', action='store_true')
  args = parser.parse_args()
  out = pathlib.Path(args.out).resolve()
  data = pathlib.Path(os.environ.get('MULTI30K_DIR', REPO.parent / 'shared/data/multi30k'))
  data = data if data.is_absolute() else (REPO / data).resolve()
  wmt = data.parent / 'wmt14_en_de'
  wmt = wmt if wmt.is_dir() else None
  if args.evaluate:  # Child process: decode one workdir, print JSON.
    print(json.dumps(evaluate(pathlib.Path(args.evaluate), data, wmt, args.capped,
                              args.wmt_sentences)))
    return
  out.mkdir(parents=True, exist_ok=True)
  if args.report_only:
    write_reports(out, args.cap)
    return
  env = dict(os.environ, MULTI30K_DIR=str(data), PYTHONPATH=str(REPO))
  only = set(filter(None, args.only.split(',')))
  for name, arg in run_plan(args.cap):
    if (only and name not in only) or (out / name / 'result.json').exists():
      continue
    print(f'[{time.strftime("%H:%M:%S")}] {name}: training configs/modern.py:{arg}',
          flush=True)
    os.environ.update(MULTI30K_DIR=str(data), PYTHONPATH=str(REPO))
    result = train(out, name, arg, args.steps, args.timeout)
    start = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, f'--out={out}', f'--evaluate={out / name}',
         f'--wmt_sentences={args.wmt_sentences}'] + (['--capped'] if 'cap' in arg else []),
        cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
      print(proc.stderr[-3000:], file=sys.stderr)
      raise RuntimeError(f'{name}: evaluation failed')
    result.update(name=name, config_arg=arg, eval_minutes=(time.time() - start) / 60,
                  eval=json.loads(proc.stdout.strip().splitlines()[-1]),
                  load_average=os.getloadavg(), finished=time.strftime('%H:%M:%S'))
    (out / name / 'result.json').write_text(json.dumps(result, indent=2))
    print(f'[{time.strftime("%H:%M:%S")}] {name}: {json.dumps(result)}', flush=True)
    write_reports(out, args.cap)


if __name__ == '__main__':
  main()
