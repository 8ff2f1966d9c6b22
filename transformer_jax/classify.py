"""Command line: classify sentences (one per stdin line) with an encoder-only model.

  echo "a gorgeous , witty , seductive movie ." | \
      python -m transformer_jax.classify --workdir=runs/sst2
  # positive	0.9731	a gorgeous , witty , seductive movie .
  python -m transformer_jax.classify --workdir=runs/sst2 --embeddings < sentences.txt

Prints the label, its probability and the sentence, tab-separated; ``--embeddings``
prints each sentence's pooled vector (the classifier's input) as space-separated
floats instead. The Python equivalent is ``load_classifier(workdir)``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags


@dataclasses.dataclass
class Classifier:
  """A restored ``EncoderClassifier`` with its vocabulary; numpy in, numpy out."""
  model: object
  vocab: object  # sentences.SentenceVocabulary
  config: object
  label_names: tuple[str, ...]

  def __post_init__(self):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    graphdef, self._state = nnx.split(self.model)

    def run(state, ids):
      model = nnx.merge(graphdef, state)
      pooled = model.sentence_embedding(ids)
      return jax.nn.softmax(model(ids), axis=-1), pooled

    self._run = jax.jit(run)

  @functools.cached_property
  def _buckets(self) -> tuple[int, ...]:
    d = self.config.data
    return tuple(sorted({int(b) for b in d.bucket_lengths if b < d.max_length})) + (
        int(d.max_length),)

  def predict(self, sentences: Sequence[str], batch_size: int = 128
              ) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities [B, C], pooled sentence embeddings [B, D])."""
    from transformer_jax.data import sentences as sentences_lib  # pylint: disable=g-import-not-at-top
    ids = self.vocab.encode_batch(list(sentences), int(self.config.data.max_length))
    probs, pooled = [], []
    for start in range(0, len(ids), batch_size):
      chunk = ids[start:start + batch_size]
      length = sentences_lib.bucket_for(max(len(x) for x in chunk), self._buckets)
      rows = -(-len(chunk) // 8) * 8  # Few distinct shapes, few compiles.
      p, e = self._run(self._state, sentences_lib.pad_rows(chunk, rows, length))
      probs.append(np.asarray(p)[:len(chunk)])
      pooled.append(np.asarray(e)[:len(chunk)])
    if not probs:
      return np.zeros((0, self.model.cfg.num_classes)), np.zeros((0, self.model.cfg.d_model))
    return np.concatenate(probs), np.concatenate(pooled)


def load_classifier(workdir: str, *, step: int | None = None) -> Classifier:
  """A ``Classifier`` for an encoder-only training workdir (latest checkpoint)."""
  from transformer_jax.data import sentences as sentences_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.run import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  wd = workdir_lib.Workdir.open(workdir)
  config = wd.config
  family = config.model.get('family', 'encoder_decoder')
  if family != 'encoder_only':
    raise ValueError(f'{workdir} holds a {family} model; classify needs an encoder_only '
                     'one (configs/sst2.py).')
  model = wd.model(wd.restore(step))
  path = sentences_lib.vocab_path(config, workdir)
  vocab = sentences_lib.SentenceVocabulary(tokenizer_lib.Tokenizer(path))
  if vocab.vocab_size != model.cfg.vocab_size:
    raise ValueError(f'{path} has {vocab.vocab_size - 1} pieces (+[MASK]) but the '
                     f'checkpoint has a {model.cfg.vocab_size}-token embedding.')
  names = tuple(config.data.get('label_names') or
                [str(i) for i in range(model.cfg.num_classes)])
  return Classifier(model, vocab, config, names)


def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_string('workdir', None, 'Training workdir of an encoder_only model.',
                      required=True)
  flags.DEFINE_bool('embeddings', False, 'Print pooled sentence embeddings instead of '
                    'labels.')
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step (default: the latest).')


def main(argv):
  from transformer_jax import translate  # pylint: disable=g-import-not-at-top
  f = translate.start_cli(argv)
  lines = sys.stdin.read().splitlines()
  try:
    classifier = load_classifier(f.workdir, step=f.checkpoint_step)
  except (FileNotFoundError, ValueError) as e:
    print(f'classify: {e}', file=sys.stderr)
    sys.exit(1)
  probs, pooled = classifier.predict(lines)
  for line, p, e in zip(lines, probs, pooled):
    if f.embeddings:
      print(' '.join(f'{x:.6g}' for x in e))
    else:
      label = int(np.argmax(p))
      print(f'{classifier.label_names[label]}\t{p[label]:.4f}\t{line}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
