"""End to end through the command lines: train, resume, translate, score BLEU.

The tiny config on a slice of the real Multi30k data (../shared/data/multi30k), on
one CPU device, as a user would run it.
"""

import gzip
import json
import math
import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_LINES = 3000
EVAL_LINES = 32


def _slice(src: str, dst: str, lines: int) -> str:
  with gzip.open(src, 'rt', encoding='utf-8') as f_in, open(dst, 'w',
                                                           encoding='utf-8') as f_out:
    for _, line in zip(range(lines), f_in):
      f_out.write(line)
  return dst


def _run(module: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')  # One device.
  proc = subprocess.run([sys.executable, '-m', module, *args], input=stdin,
                        capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _losses(log: str) -> dict[int, float]:
  return {int(step): float(loss) for step, loss in
          re.findall(r'step (\d+)/\d+ \(update \d+\) loss ([\d.]+)', log)}


@pytest.fixture(scope='module')
def trained(shared_data, tmp_path_factory):
  """150 steps, then the same command with 200 steps resumes from step 150."""
  data = tmp_path_factory.mktemp('data')
  m30k = shared_data / 'multi30k'
  files = {}
  for split, src, lines in (('train', 'train', TRAIN_LINES), ('eval', 'val', EVAL_LINES),
                            ('test', 'test2016', EVAL_LINES)):
    files[split] = tuple(_slice(str(m30k / f'{src}.{lang}.gz'), str(data / f'{split}.{lang}'),
                                lines) for lang in ('en', 'de'))
  workdir = str(tmp_path_factory.mktemp('workdir'))
  flags = [
      '--config=configs/tiny.py', f'--workdir={workdir}',
      f'--config.data.train_files={files["train"]!r}',
      f'--config.data.eval_files={files["eval"]!r}',
      f'--config.data.test_files={files["test"]!r}',
      '--config.data.vocab_size=500', '--config.model.d_model=64', '--config.model.d_ff=128',
      '--config.optim.learning_rate_scale=1.0', '--config.optim.warmup_steps=50',
      '--config.train.log_every_steps=25', '--config.train.eval_every_steps=0',
      '--config.train.bleu_every_steps=0', f'--config.train.bleu_max_sentences={EVAL_LINES}',
      '--config.checkpoint.every_steps=50',
  ]
  first = _run('transformer_jax.main', *flags, '--config.train.num_steps=150')
  second = _run('transformer_jax.main', *flags, '--config.train.num_steps=200')
  return workdir, first.stderr, second.stderr


def test_loss_falls_far_below_its_start(trained):
  _, first_log, _ = trained
  losses = _losses(first_log)
  assert sorted(losses) == [25, 50, 75, 100, 125, 150]
  # Uniform guessing over the 500-token vocabulary costs ln(500) = 6.2 nats.
  assert losses[150] < math.log(500) - 1.5, losses
  assert losses[150] < losses[25] - 1.0, losses


def test_rerun_resumes_from_the_last_checkpoint(trained):
  workdir, _, second_log = trained
  assert sorted(_losses(second_log)) == [175, 200]  # Steps 1-150 were not redone.
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                 if s.isdigit())
  assert steps[-1] == 200 and 150 in steps


def test_final_bleu_on_test_split(trained):
  workdir, _, _ = trained
  with open(os.path.join(workdir, 'eval', 'test-step200.json')) as f:
    result = json.load(f)
  assert result['step'] == 200 and result['num_sentences'] == EVAL_LINES
  assert 0.0 <= result['sacrebleu'] <= 100.0 and 0.0 <= result['tok_bleu'] <= 100.0
  assert result['sacrebleu_signature'].startswith('nrefs:1|case:mixed')
  with open(os.path.join(workdir, 'eval', 'test-step200.hyp.txt'), encoding='utf-8') as f:
    assert len(f.read().splitlines()) == EVAL_LINES


def test_translate_cli_on_the_trained_workdir(trained):
  workdir, _, _ = trained
  lines = ['A man is riding a bike.', '', 'Two dogs play in the snow.']
  out = _run('transformer_jax.translate', f'--workdir={workdir}',
             stdin='\n'.join(lines) + '\n').stdout.splitlines()
  assert len(out) == 3 and out[1] == ''  # In input order; an empty line stays empty.
  assert out[0] and out[2]
