"""The translate and evaluate command lines, and evaluation with a Translator.

They run on ``copy_run`` (conftest.py): a tiny Transformer trained to copy sentences,
so a correct pipeline (tokenize, sort, batch, search, restore order, detokenize)
returns every input line unchanged, a round trip whose expected output is known.
"""

import json
import os
import pathlib
import queue
import re
import shutil
import subprocess
import sys
import threading
import types

import jax
import pytest
from flax import nnx

from conftest import COPY_SENTENCES as SENTENCES
from transformer_jax.inference import evaluation
from transformer_jax.inference.translator import Translator

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def workdir(copy_run):
  return copy_run


def _cli(module, *args, stdin=None):
  return subprocess.run([sys.executable, '-m', f'transformer_jax.{module}', *args],
                        input=stdin, capture_output=True, text=True, timeout=600,
                        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_cli_round_trip_in_input_order_with_bad_lines(workdir):
  too_long = ' '.join(['the'] * 20)  # 21 tokens with eos; max_len is 16.
  lines = [SENTENCES[0], '', SENTENCES[1], too_long, 'the zebra runs', *SENTENCES[2:],
           '   ']
  result = _cli('translate', f'--workdir={workdir.path}', stdin='\n'.join(lines) + '\n')
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout.split('\n')
  assert out[-1] == '' and len(out) - 1 == len(lines)
  out = out[:-1]
  # Sorted by length inside, yet each copy is back on its own line.
  for line, translation in zip(lines, out):
    if line in SENTENCES:
      assert translation == line
  assert out[1] == '' and out[-1] == ''  # Empty and blank lines stay empty.
  assert out[3] and out[4]  # Over-long and unknown-word lines are translated.
  assert 'stdin line 4: 21 tokens with eos' in result.stderr
  assert 'lack' in result.stderr and 'lines 5' in result.stderr
  assert f'{len(lines)} lines in' in result.stderr
  assert 'Traceback' not in result.stderr


def test_cli_files_checkpoint_step_and_greedy(workdir, tmp_path):
  src, out = tmp_path / 'in.txt', tmp_path / 'out.txt'
  src.write_text('\n'.join(SENTENCES) + '\n', encoding='utf-8')
  result = _cli('translate', f'--workdir={workdir.path}', '--checkpoint_step=500',
                '--beam_size=1', f'--input={src}', f'--output={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert out.read_text(encoding='utf-8').splitlines() == SENTENCES
  assert result.stdout == ''


def test_missing_workdir_checkpoint_and_input_are_clear_errors(workdir, tmp_path):
  empty = tmp_path / 'empty_workdir'
  empty.mkdir()
  shutil.copy(os.path.join(workdir.path, 'config.json'), empty / 'config.json')
  result = _cli('translate', f'--workdir={empty}', stdin='the cat\n')
  assert result.returncode == 1
  assert 'translate: No checkpoints in' in result.stderr
  assert 'Traceback' not in result.stderr
  result = _cli('translate', f'--workdir={workdir.path}', f'--input={tmp_path / "x.txt"}')
  assert result.returncode == 1 and 'x.txt not found' in result.stderr
  result = _cli('translate', f'--workdir={workdir.path}', '--n_best=3', stdin='dog\n')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert 'translate: n_best must be between 1 and the beam size (2), got 3' in result.stderr


def test_evaluate_bleu_writes_hypotheses_and_json(workdir, tmp_path):
  translator = Translator.from_workdir(workdir.path, use_mesh=False)
  references = list(SENTENCES)
  references[0] = 'the cat sleeps'  # One reference differs from the copy.
  eval_set = types.SimpleNamespace(name='validation', sources=SENTENCES,
                                   references=references)
  results = evaluation.evaluate_bleu(translator.model, translator.tokenizer, eval_set,
                                   workdir.config, workdir=str(tmp_path), step=500)
  hyps = (tmp_path / 'eval' / 'validation-step500.hyp.txt').read_text().splitlines()
  assert hyps == SENTENCES
  saved = json.loads((tmp_path / 'eval' / 'validation-step500.json').read_text())
  import sacrebleu
  assert saved['sacrebleu'] == pytest.approx(
      sacrebleu.corpus_bleu(SENTENCES, [references]).score)
  assert saved['tok_bleu'] == pytest.approx(
      evaluation.bleu.tokenized_bleu(SENTENCES, references, lang='de'))
  assert 0 < saved['tok_bleu'] < 100
  assert saved['num_sentences'] == 5 and saved['step'] == 500
  assert saved['sacrebleu_signature'].startswith('nrefs:1|case:mixed')
  assert saved['beam_size'] == 2 and saved['length_penalty'] == 0.6
  assert results == saved


def test_result_files_are_named_by_split_step_averaging_and_search(workdir):
  config = workdir.config  # beam 2, alpha 0.6.
  name = evaluation.result_name
  assert name('test', {'step': 2000, 'beam_size': 2, 'length_penalty': 0.6},
              config) == 'test-step2000'
  assert name('validation', {'step': 2000, 'averaged_steps': [1100, 1200, 1300]},
              config) == 'validation-step2000-avg3'
  assert name('test', {'step': 5, 'average_last': 10}, config) == 'test-step5-avg10'
  assert name('test', {'step': 5, 'average_last': 1, 'beam_size': 5,
                       'length_penalty': 1.0}, config) == 'test-step5-beam5-alpha1'
  assert name('test', {'step': None}) == 'test'


def test_evaluate_cli_on_text_files(workdir, tmp_path):
  src, ref = tmp_path / 'src.txt', tmp_path / 'ref.txt'
  src.write_text('\n'.join(SENTENCES) + '\n')
  ref.write_text('\n'.join(SENTENCES) + '\n')
  out = tmp_path / 'results'
  result = _cli('evaluate', f'--workdir={workdir.path}', '--average_last=2',
                f'--source_file={src}', f'--reference_file={ref}', '--split=test',
                f'--output={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads((out / 'test-step500-avg2.json').read_text())
  assert saved['sacrebleu'] == pytest.approx(100.0)
  assert saved['tok_bleu'] == pytest.approx(100.0)
  assert saved['step'] == 500 and saved['num_sentences'] == 5
  assert saved['average_last'] == 2 and saved['averaged_steps'] == [250, 500]
  assert json.loads(result.stdout) == saved
  # Quiet by default: no orbax/tensorstore lines, nothing but the progress bar.
  assert 'orbax' not in result.stderr.lower() and 'WARNING' not in result.stderr


def test_evaluate_bleu_with_mesh_sharded_params_splits_the_batch(workdir, tmp_path):
  # Training hands over parameters sharded on its mesh; decoding then splits the
  # batch over ('data', 'fsdp') and must give the single-device translations.
  from transformer_jax import sharding
  translator = Translator.from_workdir(workdir.path, use_mesh=False)
  config = workdir.config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 2, 1
  mesh = sharding.create_mesh(config.mesh)
  graphdef, params, rest = nnx.split(translator.model, nnx.Param, ...)
  params = jax.device_put(params, sharding.param_shardings(
      params, mesh, sharding.rules_from_config(config.mesh)))
  model = nnx.merge(graphdef, params, rest)
  assert Translator.from_model(model, translator.tokenizer, config).search.mesh is mesh
  eval_set = types.SimpleNamespace(name='test', sources=SENTENCES, references=SENTENCES)
  results = evaluation.evaluate_bleu(model, translator.tokenizer, eval_set, config,
                                   workdir=str(tmp_path), step=7)
  hyps = (tmp_path / 'eval' / 'test-step7.hyp.txt').read_text().splitlines()
  assert hyps == translator.translate(SENTENCES)
  assert results['sacrebleu'] == pytest.approx(100.0) and results['step'] == 7


def test_interactive_mode_answers_each_line_before_the_next_is_sent(workdir):
  process = subprocess.Popen(
      [sys.executable, '-m', 'transformer_jax.translate', f'--workdir={workdir.path}',
       '--interactive', '--n_best=2'],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  lines = queue.Queue()
  threading.Thread(target=lambda: [lines.put(l) for l in process.stdout],
                   daemon=True).start()
  try:
    for number, sentence in enumerate(SENTENCES[:3], start=1):
      process.stdin.write(sentence + '\n')
      process.stdin.flush()  # stdin stays open: the answer cannot wait for its end.
      answers = [lines.get(timeout=300).rstrip('\n').split('\t') for _ in range(2)]
      assert [a[0] for a in answers] == [str(number)] * 2
      assert answers[0][2] == sentence and answers[1][2] != sentence
      assert float(answers[0][1]) >= float(answers[1][1])
    process.stdin.close()
    assert process.wait(timeout=120) == 0
  finally:
    process.kill()
  assert '3 lines in' in process.stderr.read()


def test_n_best_file_output(workdir, tmp_path):
  src, out = tmp_path / 'in.txt', tmp_path / 'out.tsv'
  src.write_text('\n'.join([SENTENCES[0], '', SENTENCES[1]]) + '\n', encoding='utf-8')
  result = _cli('translate', f'--workdir={workdir.path}', '--n_best=2', f'--input={src}',
                f'--output={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [line.split('\t') for line in out.read_text(encoding='utf-8').splitlines()]
  assert [r[0] for r in rows] == ['1', '1', '3', '3']  # Line 2 is empty: no rows.
  assert rows[0][2] == SENTENCES[0] and rows[2][2] == SENTENCES[1]
  assert float(rows[0][1]) >= float(rows[1][1]) and float(rows[2][1]) >= float(rows[3][1])


SHARED_FLAGS = ('--workdir', '--checkpoint_step', '--average_last')


@pytest.mark.parametrize('command, own', [
    ('translate', ('--beam_size', '--beam_rules', '--input', '--output', '--n_best',
                   '--interactive')),
    ('evaluate', ('--beam_size', '--split', '--source_file', '--output')),
    ('explore', ('--beam_size', '--text', '--output')),
    ('checkpoint', ('--output',)),
    ('sample', ('--prompt', '--max_new_tokens', '--temperature', '--output')),
    ('classify', ('--embeddings', '--input', '--output')),
])
def test_helpshort_lists_the_shared_flags(command, own):
  result = _cli(command, '--helpshort')
  assert result.returncode in (0, 1), result.stderr[-2000:]
  text = result.stdout + result.stderr
  for flag in SHARED_FLAGS + own:
    assert re.search(rf'  --(\[no\])?{flag[2:]}:', text), (command, flag, text[-2000:])
  for old in ('--step:', '--out:', '--out_dir:'):
    assert old not in text
