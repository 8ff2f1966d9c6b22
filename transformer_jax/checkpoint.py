"""Averages the last K checkpoints of a training run into a new run (Sec 6.1).

  python -m transformer_jax.checkpoint --workdir=DIR [--average_last=5]
      [--checkpoint_step=N] [--output=DIR2]

writes DIR2 (default ``DIR/averaged_lastK``) with the run's config.json, its vocabulary
and one checkpoint at the last averaged step holding the mean parameters, so
translate, evaluate, explore and export read it like any run. An output that already
holds that step is an error (pick another ``--output`` or delete it).

The checkpoint library itself is ``transformer_jax.run.checkpoint``; the run
directory's layout and restore are ``transformer_jax.run.workdir``.
"""

from __future__ import annotations

from absl import flags

from transformer_jax import cli
from transformer_jax.run.workdir import Workdir, write_average


def main(f: flags.FlagValues) -> None:
  out, restored = write_average(Workdir.open(f.workdir), f.average_last, f.output,
                                f.checkpoint_step)
  print(f'Averaged checkpoints {restored.steps} of {f.workdir} into {out.path} '
        f'(step {restored.step}).')


if __name__ == '__main__':
  cli.define_run_flags(average_last=5)
  flags.DEFINE_string('output', None, 'The new run folder (default '
                      'WORKDIR/averaged_lastK).')
  cli.run(main, 'checkpoint')
