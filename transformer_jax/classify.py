"""Command line: classify sentences (one a line) with an encoder-only model.

  echo "a gorgeous , witty , seductive movie ." | \
      python -m transformer_jax.classify --workdir=runs/sst2
  # positive	0.9731	a gorgeous , witty , seductive movie .
  python -m transformer_jax.classify --workdir=runs/sst2 --embeddings < sentences.txt
      [--checkpoint_step=N] [--average_last=K] [--input=in.txt] [--output=out.tsv]

reads ``--input`` (default stdin) and writes to ``--output`` (default stdout) the
label, its probability and the sentence, tab-separated; ``--embeddings`` writes each
sentence's pooled vector (the classifier's input) as space-separated floats instead.
The Python equivalent is ``load_classifier(workdir).predict(sentences)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags

from transformer_jax import cli


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


def load_classifier(workdir: str, *, step: int | None = None,
                    average_last: int | None = 1) -> Classifier:
  """A ``Classifier`` for an encoder-only training workdir (latest checkpoint by
  default; ``average_last=K``: the mean of the last K checkpoints up to ``step``)."""
  from transformer_jax.run import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  wd = workdir_lib.Workdir.open(workdir)
  loaded = wd.load(step, average_last, family='encoder_only', use='classify')
  names = tuple(wd.config.data.get('label_names') or
                [str(i) for i in range(loaded.model.cfg.num_classes)])
  return Classifier(loaded.model, loaded.vocab, wd.config, names)


def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  cli.define_run_flags()
  flags.DEFINE_bool('embeddings', False, 'Write pooled sentence embeddings instead of '
                    'labels.')
  flags.DEFINE_string('input', None, 'Sentences, one a line (default stdin).')
  flags.DEFINE_string('output', None, 'Where to write the results (default stdout).')


def main(f: flags.FlagValues) -> None:
  lines = cli.read_lines(f.input, 'classify')
  classifier = load_classifier(f.workdir, step=f.checkpoint_step,
                               average_last=f.average_last)
  probs, pooled = classifier.predict(lines)
  out = []
  for line, p, e in zip(lines, probs, pooled):
    if f.embeddings:
      out.append(' '.join(f'{x:.6g}' for x in e))
    else:
      label = int(np.argmax(p))
      out.append(f'{classifier.label_names[label]}\t{p[label]:.4f}\t{line}')
  cli.write_output(f.output, ''.join(row + '\n' for row in out))


if __name__ == '__main__':
  define_flags()
  cli.run(main, 'classify')
