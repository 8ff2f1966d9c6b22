"""Command line: continue prompts with a decoder-only language model (KV cache).

  python -m transformer_jax.sample --workdir=runs/lm_shakespeare --prompt="ROMEO:" \
      --max_new_tokens=120 --temperature=0.8 --top_k=40 --seed=0
  python -m transformer_jax.sample --workdir=... --prompt="ROMEO:" --prompt="JULIET:"
  python -m transformer_jax.sample --workdir=... --prompt="ROMEO:" --temperature=0  # greedy
      [--checkpoint_step=N] [--average_last=K] [--output=samples.txt]

Several ``--prompt`` flags are sampled as one batch; the samples (prompt included) go
to ``--output`` (default stdout), separated by a line of dashes. The Python
equivalent is ``transformer_jax.inference.sampling.load_sampler(workdir).sample([...])``.
"""

from __future__ import annotations

from absl import flags

from transformer_jax import cli

SEPARATOR = '\n' + '-' * 40 + '\n'


def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  cli.define_run_flags()
  flags.DEFINE_multi_string('prompt', ['\n'], 'Prompt text; repeat the flag for a batch.')
  flags.DEFINE_integer('max_new_tokens', 100, 'Tokens generated after each prompt (prompt '
                       '+ new tokens <= config.model.max_len with learned positions).')
  flags.DEFINE_float('temperature', 1.0, 'Softmax temperature; 0 = greedy.')
  flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0 = all.')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling: the smallest set reaching this '
                     'probability; 1.0 = all.')
  flags.DEFINE_integer('seed', 0, 'Random seed of the draws.')
  flags.DEFINE_string('output', None, 'Write the samples to this file (default stdout).')


def main(f: flags.FlagValues) -> None:
  from transformer_jax.inference import sampling  # pylint: disable=g-import-not-at-top
  sampler = sampling.load_sampler(f.workdir, step=f.checkpoint_step,
                                  average_last=f.average_last)
  texts = sampler.sample(f.prompt, max_new_tokens=f.max_new_tokens,
                         temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                         seed=f.seed)
  cli.write_output(f.output, SEPARATOR.join(texts) + '\n')


if __name__ == '__main__':
  define_flags()
  cli.run(main, 'sample')
