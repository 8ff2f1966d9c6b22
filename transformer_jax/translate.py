"""Translate text with a trained workdir: beam search over sorted, bucketed batches.

  python -m transformer_jax.translate --workdir=DIR [--checkpoint_step=N]
      [--average_last=K] [--beam_size=4] [--input=in.txt] [--output=out.txt]

reads one sentence a line (stdin by default) and writes one translation a line
(stdout by default), in input order. Sentences are sorted by length and padded to
the config's bucket lengths, so each batch shape compiles once and little work is
spent on padding. Progress goes to stderr.

Defaults come from the workdir's ``config.json`` (``config.eval``: Sec 6.1's beam 4,
alpha 0.6, output limit input + 50); the vocabulary is ``DIR/vocab/spm.model``.
With ``--average_last=K`` the parameters are the mean of the last K checkpoints
(Sec 6.1: 5 for the base model, 20 for big).

Bad input does not stop a file midway: an empty line gives an empty line; a line
longer than the model's ``max_len`` tokens is cut (with a warning naming the line);
characters the vocabulary lacks become the unknown token (counted in a warning).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from transformer_jax import model as model_lib
from transformer_jax import sharding
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.inference import search as search_lib
from transformer_jax.run import checkpoint as checkpoint_lib


@dataclasses.dataclass
class Translator:
  """A restored model with its vocabulary, config and a compiled decoder."""
  model: model_lib.Transformer
  tokenizer: tokenizer_lib.Tokenizer
  config: object  # The workdir's ConfigDict.
  decoder: search_lib.Decoder
  step: int | None


def _concrete(leaf):
  """A value for non-parameter state restored as shapes only (the dropout RNG keys,
  never drawn from when decoding)."""
  if not isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    key = jax.random.key(0)
    return jax.random.split(key, leaf.shape) if leaf.shape else key
  return jnp.zeros(leaf.shape, leaf.dtype)


def data_parallel_mesh(config):
  """A ('data', 'fsdp', 'tensor') mesh that splits only the batch over all devices,
  or None on one device. Decoding needs no fsdp/tensor split of the small weights,
  and the training mesh may not fit this machine."""
  if jax.device_count() == 1:
    return None
  mesh_cfg = config.mesh.copy_and_resolve_references()
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = -1, 1, 1
  return sharding.create_mesh(mesh_cfg)


def load_translator(workdir: str, *, step: int | None = None,
                    average_last: int | None = None, beam_size: int | None = None,
                    alpha: float | None = None, max_extra_length: int | None = None,
                    use_mesh: bool = True) -> Translator:
  """Restores a training workdir for translation.

  Args:
    workdir: written by training (config.json, vocab/, checkpoints/).
    step: checkpoint step; default the latest.
    average_last: average the last K checkpoints up to ``step``.
    beam_size, alpha, max_extra_length: default ``config.eval``'s.
    use_mesh: split batches over all local devices.

  Raises:
    FileNotFoundError: no workdir, config, checkpoint or vocabulary.
    ValueError: vocabulary and checkpoint disagree; too few checkpoints to average.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'Workdir {workdir} does not exist.')
  config = checkpoint_lib.load_config(workdir)
  mesh = data_parallel_mesh(config) if use_mesh else None
  params, graphdef, rest, config = checkpoint_lib.restore_params(
      workdir, step=step, average_last=average_last, mesh=mesh)
  from flax import nnx
  model = nnx.merge(graphdef, params, jax.tree.map(_concrete, rest))
  vocab_path = (config.data.get('vocab_path') or os.path.join(
      workdir, tokenizer_lib.VOCAB_DIRNAME, tokenizer_lib.VOCAB_FILENAME))
  if not os.path.exists(vocab_path):
    raise FileNotFoundError(f'Vocabulary {vocab_path} not found (training writes it to '
                            f'{workdir}/{tokenizer_lib.VOCAB_DIRNAME}/).')
  tokenizer = tokenizer_lib.Tokenizer(vocab_path)
  if tokenizer.vocab_size != model.cfg.vocab_size:
    raise ValueError(f'{vocab_path} has {tokenizer.vocab_size} pieces but the checkpoint '
                     f'in {workdir} has a {model.cfg.vocab_size}-token embedding.')
  e = config.eval
  decoder = search_lib.Decoder(
      model, beam_size=e.beam_size if beam_size is None else beam_size,
      alpha=e.length_penalty if alpha is None else alpha,
      max_extra_len=e.max_extra_length if max_extra_length is None else max_extra_length,
      mesh=mesh, rules=sharding.rules_from_config(config.mesh) if mesh else None)
  return Translator(model, tokenizer, config, decoder, step)


def bucket_length(length: int, buckets: Sequence[int], max_len: int) -> int:
  """The smallest bucket length that holds ``length`` (<= max_len); past the
  largest bucket, the next power of two, capped at ``max_len``."""
  for b in sorted(buckets):
    if length <= b:
      return min(b, max_len)
  return min(1 << (length - 1).bit_length(), max_len)


def encode_sources(tokenizer: tokenizer_lib.Tokenizer, lines: Sequence[str],
                   max_len: int, *, where: str = 'input') -> list[list[int] | None]:
  """Source ids (pieces + eos) per line; None for an empty line.

  Lines longer than ``max_len`` tokens are cut to ``max_len`` (eos kept) with a
  warning naming the line; unknown characters become the unknown id (a warning
  counts them).
  """
  out, unknown_lines = [], []
  encoded = tokenizer.encode_batch([line.strip() for line in lines])
  for number, (line, ids) in enumerate(zip(lines, encoded), start=1):
    if not line.strip():
      out.append(None)
      continue
    if len(ids) + 1 > max_len:
      logging.warning('%s line %d: %d tokens with eos, more than the model\'s max_len '
                      '%d; translating its first %d tokens.', where, number,
                      len(ids) + 1, max_len, max_len - 1)
      ids = ids[:max_len - 1]
    if tokenizer.unk_id in ids:
      unknown_lines.append(number)
    out.append(list(ids) + [tokenizer.eos_id])
  if unknown_lines:
    shown = ', '.join(map(str, unknown_lines[:10]))
    more = ' ...' if len(unknown_lines) > 10 else ''
    logging.warning('%s: %d lines hold characters the vocabulary lacks (translated as '
                    'the unknown token): lines %s%s.', where, len(unknown_lines), shown, more)
  return out


def translate_ids(decoder: search_lib.Decoder, sources: Sequence[list[int] | None], *,
                  batch_size: int, buckets: Sequence[int], max_len: int,
                  pad_id: int = 0, progress: bool = True) -> list[list[int]]:
  """Best translations (ids, no eos) of ``sources`` in their order; [] for None.

  Sentences are decoded longest first in batches of ``batch_size`` rows padded to a
  bucket length; the last batch is filled with empty rows, so shapes repeat.
  """
  results: list[list[int]] = [[] for _ in sources]
  order = sorted((i for i, s in enumerate(sources) if s), key=lambda i: -len(sources[i]))
  bar = None
  if progress:
    import tqdm
    bar = tqdm.tqdm(total=len(order), unit='sent', file=sys.stderr, desc='translating',
                    dynamic_ncols=True)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    length = bucket_length(max(len(sources[i]) for i in rows), buckets, max_len)
    src = np.full((batch_size, length), pad_id, np.int32)
    for r, i in enumerate(rows):
      src[r, :len(sources[i])] = sources[i]
    for r, hyp in zip(rows, decoder(src)):
      results[r] = hyp
    if bar is not None:
      bar.update(len(rows))
  if bar is not None:
    bar.close()
  return results


def translate_lines(translator: Translator, lines: Sequence[str], *,
                    batch_size: int | None = None, progress: bool = True,
                    where: str = 'input') -> list[str]:
  """Translations of ``lines`` in input order ('' for empty lines)."""
  cfg, data = translator.model.cfg, translator.config.data
  batch_size = batch_size or data.eval_batch_size
  if translator.decoder.mesh is not None:  # Whole rows for every batch shard.
    shards = sharding.batch_divisor(translator.decoder.mesh)
    batch_size = -(-batch_size // shards) * shards
  sources = encode_sources(translator.tokenizer, lines, cfg.max_len, where=where)
  ids = translate_ids(translator.decoder, sources, batch_size=batch_size,
                      buckets=tuple(data.bucket_lengths), max_len=cfg.max_len,
                      pad_id=cfg.pad_id, progress=progress)
  return [translator.tokenizer.decode(h) if s else '' for s, h in zip(sources, ids)]


# ----------------------------------------------------------------------------
# Command line.

def define_flags() -> None:
  """The flags that choose a model and its search (shared with evaluate.py)."""
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json, vocab/, '
                      'checkpoints/).', required=True)
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_integer('average_last', None,
                       'Average the last K checkpoints (Sec 6.1: 5 base, 20 big).')
  flags.DEFINE_integer('beam_size', None, 'Beam size (default config.eval.beam_size); '
                       '1 = greedy search.')
  flags.DEFINE_float('alpha', None, 'Length penalty (default config.eval.length_penalty).')
  flags.DEFINE_integer('max_extra_length', None,
                       'Output limit beyond the input length (default config.eval).')
  flags.DEFINE_integer('batch_size', None, 'Sentences per batch (default '
                       'config.data.eval_batch_size).')


def translator_from_flags() -> Translator:
  f = flags.FLAGS
  return load_translator(f.workdir, step=f.checkpoint_step, average_last=f.average_last,
                         beam_size=f.beam_size, alpha=f.alpha,
                         max_extra_length=f.max_extra_length)


def _read_input(path: str | None) -> list[str]:
  if path is None:
    return sys.stdin.read().splitlines()
  if not os.path.exists(path):
    raise FileNotFoundError(f'Input file {path} not found.')
  with open(path, encoding='utf-8', errors='replace') as f:
    return f.read().splitlines()


def start_cli(argv: Sequence[str]) -> flags.FlagValues:
  """Shared start of the translate, evaluate and explore command lines.

  Rejects stray arguments and, unless ``--verbosity`` is given, hides library INFO
  lines (orbax writes several per restore) that would bury the progress and results.
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  return flags.FLAGS


def main(argv):
  f = start_cli(argv)
  try:
    lines = _read_input(f.input)
    translator = translator_from_flags()
  except (FileNotFoundError, ValueError) as e:
    print(f'translate: {e}', file=sys.stderr)
    sys.exit(1)
  start = time.perf_counter()
  translations = translate_lines(translator, lines, batch_size=f.batch_size,
                                 where=f.input or 'stdin')
  text = ''.join(t + '\n' for t in translations)
  if f.output is None:
    sys.stdout.write(text)
    sys.stdout.flush()
  else:
    tmp = f.output + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as out:
      out.write(text)
    os.replace(tmp, f.output)
  seconds = time.perf_counter() - start
  print(f'translate: {len(lines)} lines in {seconds:.1f} s '
        f'({len(lines) / max(seconds, 1e-9):.1f} lines/s, compile included)',
        file=sys.stderr)


if __name__ == '__main__':
  define_flags()
  flags.DEFINE_string('input', None, 'Source text, one sentence a line (default stdin).')
  flags.DEFINE_string('output', None, 'Translations, one a line (default stdout).')
  app.run(main)
