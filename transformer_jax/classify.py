"""Command line: classify sentences (one a line) with an encoder-only model.

  echo "a gorgeous , witty , seductive movie ." | \
      python -m transformer_jax.classify --workdir=runs/sst2
  # positive	0.9731	a gorgeous , witty , seductive movie .
  python -m transformer_jax.classify --workdir=runs/sst2 --embeddings < sentences.txt
      [--checkpoint_step=N] [--average_last=K] [--input=in.txt] [--output=out.tsv]
  python -m transformer_jax.classify --workdir=runs/a,runs/b,runs/c \
      --labelled=../shared/data/sst2/dev.tsv.gz

reads ``--input`` (default stdin) and writes to ``--output`` (default stdout) the
label, its probability and the sentence, tab-separated; ``--embeddings`` writes each
sentence's pooled vector (the classifier's input) as space-separated floats instead.
``--labelled`` scores a ``sentence<TAB>label`` file (GLUE's TSV) and prints the
accuracy instead. Several comma-separated workdirs are an ensemble: the mean of their
class probabilities, and their pooled vectors side by side. The Python equivalent is
``load_classifier(workdir).predict(sentences)`` (``load_ensemble(workdirs)``).
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


@dataclasses.dataclass
class Ensemble:
  """Classifiers of the same labels, each trained on its own (another seed, say),
  read as one: the mean of their class probabilities."""
  members: Sequence[Classifier]

  def __post_init__(self):
    names = {tuple(m.label_names) for m in self.members}
    if len(names) != 1:
      raise ValueError(f'An ensemble needs members with one set of labels, got {sorted(names)}.')

  @property
  def label_names(self) -> tuple[str, ...]:
    return self.members[0].label_names

  def predict(self, sentences: Sequence[str], batch_size: int = 128
              ) -> tuple[np.ndarray, np.ndarray]:
    """(mean class probabilities [B, C], the members' pooled embeddings side by side
    [B, M * D] for M members of width D)."""
    outputs = [member.predict(sentences, batch_size) for member in self.members]
    return (np.mean([probs for probs, _ in outputs], axis=0),
            np.concatenate([pooled for _, pooled in outputs], axis=-1))


def accuracy(classifier: Classifier | Ensemble, sentences: Sequence[str],
             labels: np.ndarray) -> float:
  """The fraction of ``sentences`` whose most probable class is their label [B]."""
  probs, _ = classifier.predict(sentences)
  return float(np.mean(np.argmax(probs, axis=-1) == np.asarray(labels)))


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


def load_ensemble(workdirs: Sequence[str], *, step: int | None = None,
                  average_last: int | None = 1) -> Classifier | Ensemble:
  """The classifier of one workdir, or the ``Ensemble`` of several (each restored as
  ``load_classifier`` does, with the same ``step`` and ``average_last``)."""
  if not workdirs:
    raise ValueError('No workdir to classify with.')
  members = [load_classifier(w, step=step, average_last=average_last) for w in workdirs]
  return members[0] if len(members) == 1 else Ensemble(members)


def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  cli.define_run_flags()
  flags.DEFINE_bool('embeddings', False, 'Write pooled sentence embeddings instead of '
                    'labels.')
  flags.DEFINE_string('labelled', None, 'A sentence<TAB>label TSV with a header '
                      '(GLUE\'s): print the accuracy on it instead of classifying --input.')
  flags.DEFINE_string('input', None, 'Sentences, one a line (default stdin).')
  flags.DEFINE_string('output', None, 'Where to write the results (default stdout).')


def main(f: flags.FlagValues) -> None:
  workdirs = [w for w in f.workdir.split(',') if w]
  if f.labelled:
    if f.input or f.embeddings:
      raise ValueError('--labelled scores a labelled file; it takes no --input or --embeddings.')
    from transformer_jax.data import sentences as sentences_lib  # pylint: disable=g-import-not-at-top
    lines, labels = sentences_lib.read_labelled_tsv(f.labelled)
    if not lines:
      raise ValueError(f'{f.labelled} holds no labelled sentences to score.')
  else:
    lines = cli.read_lines(f.input, 'classify')
  classifier = load_ensemble(workdirs, step=f.checkpoint_step, average_last=f.average_last)
  if f.labelled:
    right = accuracy(classifier, lines, labels)
    cli.write_output(f.output, f'accuracy {100 * right:.2f}% ({round(right * len(lines))} of '
                     f'{len(lines)} sentences of {f.labelled})\n')
    return
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
