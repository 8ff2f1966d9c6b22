"""Random-kill drill: SIGKILL a training run again and again, restart it each time.

  .venv/bin/python benchmarks/kill_drill.py [--kills=20] [--steps=150] [--seed=0]
      [--data=../shared/data/multi30k] [--out=/tmp/kill_drill]

Trains the tiny config on Multi30k with a checkpoint every step (asynchronous,
``max_to_keep=3``), first once without interruption (the reference), then as the
drill: a training process is started, killed with SIGKILL, and restarted, until
``--kills`` kills have happened; the last start runs to the end. Kills land in
turn during training (0-3 s after the process's first step), at a save (when an
orbax temporary folder appears, plus 0-50 ms) and during start-up (0-10 s).
Every process logs each step's loss at full precision. Prints:

* kills survived: restarts that resumed from a complete checkpoint and went on;
  how many kills landed while a save was in progress;
* steps lost: steps computed before a kill that had to be computed again;
* losses identical: each step's loss, every time the drill computed it, against
  the reference run's (exact float equality);
* steps set aside by the integrity checks (``damaged_checkpoints/``).
"""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

# Where in a process's life a kill lands, in turn.
MODES = ('training', 'save', 'start-up', 'save')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_KILLS = flags.DEFINE_integer('kills', 20, 'SIGKILLs to send.')
_STEPS = flags.DEFINE_integer('steps', 150, 'Training steps of the run.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the kill times.')
_DATA = flags.DEFINE_string('data', os.path.join(os.path.dirname(REPO), 'shared', 'data',
                                                 'multi30k'), 'Multi30k folder.')
_OUT = flags.DEFINE_string('out', '/tmp/kill_drill', 'Scratch folder (emptied first).')
_CHILD = flags.DEFINE_string('child', None, 'Internal: run one training process '
                             'logging losses to this file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Internal: the child\'s workdir.')
_VOCAB = flags.DEFINE_string('vocab', None, 'Internal: the vocabulary to reuse.')


def _config(steps, data, vocab=None):
  from configs import tiny
  config = tiny.get_config()
  config.data.train_files = (os.path.join(data, 'train.en.gz'),
                             os.path.join(data, 'train.de.gz'))
  config.data.bucket_lengths = (32,)
  if vocab:
    config.data.vocab_path = vocab
  config.train.num_steps = steps
  config.train.log_every_steps = 1  # Every step's loss is fetched and recorded.
  config.train.eval_every_steps = 0
  config.train.bleu_every_steps = -1
  config.checkpoint.every_steps = 1
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True
  return config


def child(losses_file, workdir, steps, data, vocab):
  """One training process; appends 'step loss' lines (repr floats) as it goes."""
  from transformer_jax.train import loop as train
  write = train._write_scalars
  out = open(losses_file, 'a', encoding='utf-8')

  def record(writer, step, scalars):
    if 'train/loss' in scalars:
      out.write(f'{step} {scalars["train/loss"]!r}\n')
      out.flush()
    write(writer, step, scalars)

  train._write_scalars = record
  train.train_and_evaluate(_config(steps, data, vocab), workdir)
  out.write('done\n')
  out.close()


def _start(losses_file, workdir, vocab=None):
  args = [sys.executable, os.path.abspath(__file__), f'--child={losses_file}',
          f'--workdir={workdir}', f'--steps={_STEPS.value}', f'--data={_DATA.value}']
  if vocab:
    args.append(f'--vocab={vocab}')
  return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=open(losses_file + '.stderr', 'a'),
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))


def _read(losses_file):
  """[(step, loss)] in the order recorded; 'done' marks a finished run."""
  out, done = [], False
  if not os.path.exists(losses_file):
    return out, done
  with open(losses_file, encoding='utf-8') as f:
    for line in f:
      if line.strip() == 'done':
        done = True
      elif line.endswith('\n'):
        step, loss = line.split()
        out.append((int(step), float(loss)))
  return out, done


def _saving(workdir):
  return bool(glob.glob(os.path.join(workdir, 'checkpoints', '*orbax-checkpoint-tmp*')))


def main(argv):
  del argv
  if _CHILD.value:
    child(_CHILD.value, _WORKDIR.value, _STEPS.value, _DATA.value, _VOCAB.value)
    return
  rng = random.Random(_SEED.value)
  shutil.rmtree(_OUT.value, ignore_errors=True)
  os.makedirs(_OUT.value)
  ref_dir, drill_dir = os.path.join(_OUT.value, 'ref'), os.path.join(_OUT.value, 'drill')
  ref_log, drill_log = ref_dir + '.losses', drill_dir + '.losses'
  start = time.time()
  proc = _start(ref_log, ref_dir)
  proc.wait()
  reference, done = _read(ref_log)
  if proc.returncode or not done:
    sys.exit(f'The reference run failed (exit {proc.returncode}); see {ref_log}.stderr')
  reference = dict(reference)
  ref_seconds = time.time() - start
  vocab = os.path.join(ref_dir, 'vocab', 'spm.model')
  print(f'reference: {len(reference)} steps in {ref_seconds:.0f} s')

  kills = mid_save = 0
  by_mode = {}
  lost = 0
  resumed_from = []
  while True:
    before = len(_read(drill_log)[0])
    proc = _start(drill_log, drill_dir, vocab)
    if kills < _KILLS.value:
      mode = MODES[kills % len(MODES)]
      if mode == 'start-up':
        deadline = time.time() + rng.uniform(0, 10)
      else:  # Once this process has trained a step: at random, or mid-save.
        while proc.poll() is None and len(_read(drill_log)[0]) == before:
          time.sleep(0.01)
        deadline = time.time() + rng.uniform(0, 3)
      while proc.poll() is None and time.time() < deadline:
        if mode == 'save' and _saving(drill_dir):
          time.sleep(rng.uniform(0, 0.05))
          break
        time.sleep(0.002)
      if proc.poll() is None:
        saving = _saving(drill_dir)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        mid_save += saving
        by_mode[mode] = by_mode.get(mode, 0) + 1
    proc.wait()
    records, done = _read(drill_log)
    new = records[before:]
    if new:
      resumed_from.append(new[0][0] - 1)
    if done:
      break
    if proc.returncode not in (0, -signal.SIGKILL):
      sys.exit(f'A training process failed (exit {proc.returncode}); see '
               f'{drill_log}.stderr')
  # Steps lost: computed (recorded) before a kill, then computed again.
  records, _ = _read(drill_log)
  seen, lost = set(), 0
  for step, _ in records:
    lost += step in seen
    seen.add(step)
  compared = sum(1 for step, _ in records)
  same = sum(1 for step, loss in records if reference.get(step) == loss)
  missing = sorted(set(reference) - seen)
  damaged = os.listdir(os.path.join(drill_dir, 'damaged_checkpoints')) if os.path.isdir(
      os.path.join(drill_dir, 'damaged_checkpoints')) else []
  print(f'kills survived: {kills} of {kills} ({mid_save} while a save was in progress; '
        f'aimed {by_mode}); {len(resumed_from)} starts that trained, resumed from steps '
        f'{resumed_from}')
  print(f'steps lost: {lost} recomputed after kills '
        f'({lost / max(kills, 1):.1f} per kill); steps never computed: {missing}')
  print(f'losses identical: {same} of {compared} per-step losses equal the '
        f'uninterrupted run\'s exactly')
  print(f'steps set aside as damaged: {len(damaged)} {sorted(damaged)}')
  print(f'wall time: {time.time() - start:.0f} s')
  if same != compared or missing:
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
