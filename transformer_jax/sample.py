"""Command line: continue prompts with a decoder-only language model (KV cache).

  python -m transformer_jax.sample --workdir=runs/lm_shakespeare --prompt="ROMEO:" \
      --max_new_tokens=120 --temperature=0.8 --top_k=40 --seed=0
  python -m transformer_jax.sample --workdir=... --prompt="ROMEO:" --prompt="JULIET:"
  python -m transformer_jax.sample --workdir=... --prompt="ROMEO:" --temperature=0  # greedy

Several ``--prompt`` flags are sampled as one batch. The Python equivalent is
``transformer_jax.sampling.load_sampler(workdir).sample([...], ...)``.
"""

import sys

from absl import app, flags

from transformer_jax import translate

def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_string('workdir', None, 'Training workdir of a decoder_only model.',
                      required=True)
  flags.DEFINE_multi_string('prompt', ['\n'], 'Prompt text; repeat the flag for a batch.')
  flags.DEFINE_integer('max_new_tokens', 100, 'Tokens generated after each prompt (prompt '
                       '+ new tokens <= config.model.max_len with learned positions).')
  flags.DEFINE_float('temperature', 1.0, 'Softmax temperature; 0 = greedy.')
  flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0 = all.')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling: the smallest set reaching this '
                     'probability; 1.0 = all.')
  flags.DEFINE_integer('seed', 0, 'Random seed of the draws.')
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step (default: the latest).')


def main(argv):
  f = translate.start_cli(argv)
  from transformer_jax.inference import sampling  # pylint: disable=g-import-not-at-top
  try:
    sampler = sampling.load_sampler(f.workdir, step=f.checkpoint_step)
    texts = sampler.sample(f.prompt, max_new_tokens=f.max_new_tokens,
                           temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                           seed=f.seed)
  except (FileNotFoundError, ValueError) as e:
    print(f'sample: {e}', file=sys.stderr)
    sys.exit(1)
  for i, text in enumerate(texts):
    if i:
      sys.stdout.write('\n' + '-' * 40 + '\n')
    sys.stdout.write(text + '\n')


if __name__ == '__main__':
  define_flags()
  app.run(main)
