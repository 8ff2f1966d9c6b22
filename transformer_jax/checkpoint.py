"""Averages the last K checkpoints of a training workdir into a new workdir (Sec 6.1).

  python -m transformer_jax.checkpoint --workdir=DIR --average_last=5 [--out_dir=DIR2]

The checkpoint library itself is ``transformer_jax.run.checkpoint``.
"""

from __future__ import annotations

from absl import app, flags

from transformer_jax.run import checkpoint as checkpoint_lib


def main(argv):
  del argv
  f = flags.FLAGS
  out = checkpoint_lib.average_checkpoints(f.workdir, f.average_last, f.out_dir, f.step)
  print(f'Averaged the last {f.average_last} checkpoints of {f.workdir} into {out}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Training workdir.', required=True)
  flags.DEFINE_integer('average_last', 5, 'How many checkpoints to average.')
  flags.DEFINE_string('out_dir', None, 'Output workdir (default workdir/averaged_lastK).')
  flags.DEFINE_integer('step', None, 'Last step to average (default the latest).')
  app.run(main)
