"""Export a trained workdir to CTranslate2 or Hugging Face MarianMT.

  python -m transformer_jax.export --workdir=DIR --to=ctranslate2 --output=OUT
      [--checkpoint_step=N | --average_last=K] [--quantization=int8|int16|float16|bfloat16]
      [--force]
  python -m transformer_jax.export --workdir=DIR --to=huggingface --output=OUT

CTranslate2: ``ctranslate2.Translator(OUT)`` translates SentencePiece pieces of
``OUT/spm.model`` (see README, Export). Hugging Face: ``MarianMTModel.from_pretrained(OUT)``
with ``MarianTokenizer.from_pretrained(OUT)``. The library functions are
``transformer_jax.inference.export.to_ctranslate2`` / ``to_huggingface``.
"""

from __future__ import annotations

import sys

from absl import flags

from transformer_jax import cli
from transformer_jax.inference import export

TARGETS = ('ctranslate2', 'huggingface')


def define_flags() -> None:
  cli.define_run_flags()
  flags.DEFINE_enum('to', None, TARGETS, 'Export format.', required=True)
  flags.DEFINE_string('output', None, 'Directory to write.', required=True)
  flags.DEFINE_enum('quantization', None, export.QUANTIZATIONS,
                    'CTranslate2 weight type (default float32).')
  flags.DEFINE_integer('max_positions', export.DEFAULT_MAX_POSITIONS,
                       'Longest sequence the exported sinusoidal position table covers.')
  flags.DEFINE_boolean('force', False, 'Replace --output if it exists.')


def main(f: flags.FlagValues) -> None:
  if f.to == 'huggingface' and f.quantization:
    raise ValueError('--quantization applies to --to=ctranslate2 only.')
  common = dict(step=f.checkpoint_step, average_last=f.average_last,
                max_positions=f.max_positions, force=f.force)
  if f.to == 'ctranslate2':  # An ExportError (a ValueError) is cli.run's one line.
    out = export.to_ctranslate2(f.workdir, f.output, quantization=f.quantization,
                                **common)
  else:
    out = export.to_huggingface(f.workdir, f.output, **common)
  print(f'export: wrote {f.to} model to {out}', file=sys.stderr)


if __name__ == '__main__':
  define_flags()
  cli.run(main, 'export')
