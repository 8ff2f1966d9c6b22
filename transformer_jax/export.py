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

from absl import app, flags

from transformer_jax import translate
from transformer_jax.inference import export

TARGETS = ('ctranslate2', 'huggingface')


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json, vocab/, '
                      'checkpoints/).', required=True)
  flags.DEFINE_enum('to', None, TARGETS, 'Export format.', required=True)
  flags.DEFINE_string('output', None, 'Directory to write.', required=True)
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_integer('average_last', None,
                       'Export the mean of the last K checkpoints (Sec 6.1).')
  flags.DEFINE_enum('quantization', None, export.QUANTIZATIONS,
                    'CTranslate2 weight type (default float32).')
  flags.DEFINE_integer('max_positions', export.DEFAULT_MAX_POSITIONS,
                       'Longest sequence the exported sinusoidal position table covers.')
  flags.DEFINE_boolean('force', False, 'Replace --output if it exists.')


def main(argv):
  f = translate.start_cli(argv)
  if f.to == 'huggingface' and f.quantization:
    print('export: --quantization applies to --to=ctranslate2 only.', file=sys.stderr)
    sys.exit(1)
  common = dict(step=f.checkpoint_step, average_last=f.average_last,
                max_positions=f.max_positions, force=f.force)
  try:
    if f.to == 'ctranslate2':
      out = export.to_ctranslate2(f.workdir, f.output, quantization=f.quantization,
                                  **common)
    else:
      out = export.to_huggingface(f.workdir, f.output, **common)
  except export.ExportError as e:
    print(f'export: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'export: wrote {f.to} model to {out}', file=sys.stderr)


if __name__ == '__main__':
  define_flags()
  app.run(main)
