"""Look inside a trained Transformer: run it on a sentence and picture its attention.

  python -m transformer_jax.explore --workdir=DIR --text "A man rides a bike."
      [--checkpoint_step=N] [--average_last=K] [--beam_size=4] [--output=FOLDER]

For a translation run it translates the sentence with the checkpoint's beam search
(Sec 6.1 settings from the workdir's config) and runs the model once more on the
source and the translation to get every layer's and head's attention probabilities
(`Transformer.attention_weights`). The other families have self-attention only: a
decoder-only language model reads the text and shows its masked self-attention, each
row labelled by the character it predicts next (greedy); an encoder-only classifier
reads [CLS] + the sentence and shows its encoder self-attention beside the predicted
label. The search flags apply to translation only (anything else is a one-line error).
It writes into ``--output`` (default ``DIR/explore``):

  {encoder_self,decoder_self,cross}_layer{l}.png   a heat map per head, token labels
  cross_alignment.png       the last layer's encoder-decoder attention, mean of heads
  positional_encoding.png   Sec 3.5's sinusoids (and the learned table, if any)
  attention.html            the interactive page (`attention_page.AttentionPage`)

Decoder positions are labelled by the token they predict (position t is fed the
translation's token t - 1, or '<s>', and predicts token t, or '</s>'), so a row shows
what the model looked at to produce that word; the page shows the fed token beside it.

In a notebook, ``explore_text(Translator.from_workdir(...), text)`` (or
``explore_lm`` / ``explore_classifier`` with a ``Workdir.load()``-ed model) returns an
`Exploration`, which displays as the interactive page.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from transformer_jax import cli
from transformer_jax import model as model_lib
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.inference.translator import Translator
from transformer_jax.run.workdir import Workdir, a_family
from transformer_jax.viz import attention_plots
from transformer_jax.viz.attention_page import AttentionPage


@dataclasses.dataclass
class Exploration:
  """One sentence, its translation and the model's attention over both.

  Attributes:
    text: the source sentence (the language model's text, the classified sentence).
    translation: the model's translation (or the classifier's label and probability,
      the language model's greedy continuation by one token per position).
    source_tokens: S source pieces, ending with '</s>' (the encoder input); [] for a
      decoder-only model.
    target_tokens: T decoder-input pieces: '<s>' then the translation's pieces (the
      language model's input characters); [] for an encoder-only model.
    predicted_tokens: T pieces the decoder positions predict: the translation's
      pieces then '</s>' (the rows of decoder attention).
    weights: kind -> [L, N, Q, K] float32 ('encoder_self' [L,N,S,S], 'decoder_self'
      [L,N,T,T], 'cross' [L,N,T,S]); the kinds the model has.
    text_label, result_label: what the page calls ``text`` and ``translation``.
  """
  text: str
  translation: str
  source_tokens: list[str]
  target_tokens: list[str]
  predicted_tokens: list[str]
  weights: dict[str, np.ndarray]
  text_label: str = 'source'
  result_label: str = 'translation'

  def page(self, title: str = 'Transformer attention') -> AttentionPage:
    return AttentionPage(self.weights, self.source_tokens, self.target_tokens,
                         predicted_tokens=self.predicted_tokens, title=title,
                         source_text=self.text, target_text=self.translation,
                         source_label=self.text_label, target_label=self.result_label)

  def _repr_html_(self) -> str:
    return self.page()._repr_html_()


def source_ids(tokenizer: tokenizer_lib.Tokenizer, text: str, max_len: int) -> list[int]:
  """The encoder input for ``text``: its pieces and eos.

  Raises:
    ValueError: empty text, or more than ``max_len`` tokens with eos.
  """
  if not text.strip():
    raise ValueError('The text to explore is empty.')
  ids = tokenizer.encode(text) + [tokenizer.eos_id]
  if len(ids) > max_len:
    raise ValueError(f'The sentence is {len(ids)} tokens long (with eos), more than the '
                     f"model's maximum length of {max_len} (config.model.max_len).")
  return ids


def explore_ids(model: model_lib.Transformer, src: Sequence[int],
                translation: Sequence[int]) -> dict[str, np.ndarray]:
  """Attention weights of one source and its translation (token ids, no eos on the
  translation): kind -> [L, N, Q, K] numpy arrays, the batch axis dropped."""
  tgt_in = [model.cfg.bos_id] + list(translation)  # shift_right of translation + eos.
  weights = model.attention_weights(jnp.asarray([src], jnp.int32),
                                    jnp.asarray([tgt_in], jnp.int32))
  return {kind: np.asarray(w[:, 0]) for kind, w in weights.items()}


def explore_text(translator: Translator, text: str, *,
                 beam_size: int | None = None, alpha: float | None = None,
                 max_extra_length: int | None = None) -> Exploration:
  """Translates ``text`` with the translator's search (or one with the given
  settings) and returns the attention over the source and the translation."""
  if (beam_size, alpha, max_extra_length) != (None, None, None):
    translator = translator.with_search(beam_size=beam_size, alpha=alpha,
                                        max_extra_length=max_extra_length)
  model, tokenizer = translator.model, translator.tokenizer
  src = source_ids(tokenizer, text, model.cfg.max_len)
  translation = translator.translate_ids([src])[0][0][0]
  # A learned position table ends at max_len; the decoder input is bos + translation.
  translation = translation[:model.cfg.max_len - 1]
  weights = explore_ids(model, src, translation)
  tgt_in = [tokenizer.bos_id] + translation
  predicted = translation + [tokenizer.eos_id]
  return Exploration(
      text=text, translation=tokenizer.decode(translation),
      source_tokens=[tokenizer.id_to_piece(i) for i in src],
      target_tokens=[tokenizer.id_to_piece(i) for i in tgt_in],
      predicted_tokens=[tokenizer.id_to_piece(i) for i in predicted], weights=weights)


def char_label(vocab, token: int) -> str:
  """A character id as a readable label: white space made visible, a special or
  unused id as ``<id N>``."""
  char = vocab.decode([token]) or f'<id {token}>'
  return {' ': '\u2423', '\n': '\u23ce', '\t': '\u21e5'}.get(char, char)


def explore_lm(model, vocab, text: str) -> Exploration:
  """A decoder-only language model's masked self-attention over ``text``.

  Row t is labelled by the token the model predicts after the first t + 1 characters
  (greedy), with the character it was fed beside it.

  Raises:
    ValueError: empty text, or longer than a learned position table.
  """
  if not text:
    raise ValueError('The text to explore is empty.')
  ids = vocab.encode(text)
  if model.cfg.positions == 'learned' and len(ids) > model.cfg.max_len:
    raise ValueError(f'The text is {len(ids)} characters long, more than the model\'s '
                     f'maximum length of {model.cfg.max_len} (config.model.max_len).')
  tokens = jnp.asarray([ids], jnp.int32)
  weights = {kind: np.asarray(w[:, 0]) for kind, w in model.attention_weights(tokens).items()}
  predicted = np.asarray(jnp.argmax(model(tokens), axis=-1))[0].tolist()  # [T]
  return Exploration(
      text=text, translation=vocab.decode(predicted), source_tokens=[],
      target_tokens=[char_label(vocab, i) for i in ids],
      predicted_tokens=[char_label(vocab, i) for i in predicted],
      weights=weights, text_label='text', result_label='next characters (greedy)')


def explore_classifier(model, vocab, text: str, label_names: Sequence[str],
                       max_length: int) -> Exploration:
  """An encoder-only classifier's self-attention over [CLS] + ``text`` and its label.

  Raises:
    ValueError: empty text, or more than ``max_length`` tokens with [CLS].
  """
  if not text.strip():
    raise ValueError('The text to explore is empty.')
  pieces = vocab.tokenizer.encode(text)
  if len(pieces) + 1 > max_length:
    raise ValueError(f'The sentence is {len(pieces) + 1} tokens long (with [CLS]), more '
                     f'than the model reads (config.data.max_length={max_length}).')
  ids = jnp.asarray(vocab.encode_batch([text], max_length), jnp.int32)  # [1, S]
  weights = {kind: np.asarray(w[:, 0]) for kind, w in model.attention_weights(ids).items()}
  probs = np.asarray(jax.nn.softmax(model(ids), axis=-1))[0]  # [C]
  label = int(np.argmax(probs))
  name = label_names[label] if label < len(label_names) else str(label)
  return Exploration(
      text=text, translation=f'{name} (p = {probs[label]:.3f})',
      source_tokens=['[CLS]'] + [vocab.tokenizer.id_to_piece(i) for i in pieces],
      target_tokens=[], predicted_tokens=[], weights=weights, text_label='sentence',
      result_label='prediction')


def _position_stack(model):
  """The stack whose embedding adds positions: the encoder, or an LM's decoder."""
  encoder = getattr(model, 'encoder', None)
  return (encoder, 'encoder') if encoder is not None else (model.decoder, 'decoder')


def positional_tables(model, length: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray | None]:
  """The sinusoids the model would add [P, D] (Sec 3.5), and its learned position
  table [max_len, D] when it has one (Table 3 row E; the encoder's, or a language
  model's decoder's), else None."""
  cfg = model.cfg
  length = length or min(cfg.max_len, 256)
  sinusoids = np.asarray(model_lib.sinusoidal_positions(jnp.arange(length), cfg.d_model))
  learned = None
  if cfg.positions == 'learned':
    learned = np.asarray(_position_stack(model)[0].positions.table[...], np.float32)
  return sinusoids, learned


def write_outputs(exploration: Exploration, model, out_dir: str) -> list[str]:
  """Writes the PNG figures and attention.html into ``out_dir``; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = attention_plots.write_attention_figures(
      exploration.weights, exploration.source_tokens, exploration.target_tokens, out_dir,
      predicted_tokens=exploration.predicted_tokens)
  sinusoids, learned = positional_tables(model)
  paths.append(attention_plots.plot_positional_encodings(
      sinusoids, os.path.join(out_dir, 'positional_encoding.png'), learned=learned,
      learned_name=f'learned {_position_stack(model)[1]} positions'))
  paths.append(exploration.page().save(os.path.join(out_dir, 'attention.html')))
  return paths


def _explore_workdir(f: flags.FlagValues, workdir: Workdir):
  """(exploration, model, step) of the run's family."""
  if workdir.family == 'encoder_decoder':
    translator = Translator.from_workdir(
        f.workdir, f.checkpoint_step, f.average_last, beam_size=f.beam_size,
        alpha=f.alpha, max_extra_length=f.max_extra_length, use_mesh=False,
        beam_rules=f.beam_rules)
    return explore_text(translator, f.text), translator.model, translator.step
  search = [name for name in ('beam_size', 'alpha', 'max_extra_length', 'beam_rules')
            if f[name].present]
  if search:
    raise ValueError(f'--{search[0]} applies to translation models; {f.workdir} holds '
                     f'{a_family(workdir.family)} model, which explore shows without a '
                     'search.')
  loaded = workdir.load(f.checkpoint_step, f.average_last)
  if workdir.family == 'decoder_only':
    exploration = explore_lm(loaded.model, loaded.vocab, f.text)
  else:
    data = workdir.config.data
    exploration = explore_classifier(
        loaded.model, loaded.vocab, f.text, tuple(data.get('label_names') or ()),
        int(data.max_length))
  return exploration, loaded.model, loaded.restored.step


def main(f: flags.FlagValues) -> None:
  workdir = Workdir.open(f.workdir)
  out_dir = f.output or workdir.explore_dir
  exploration, model, step = _explore_workdir(f, workdir)
  paths = write_outputs(exploration, model, out_dir)
  print(f'checkpoint: {f.workdir} step {step}')
  print(f'{exploration.text_label + ":":12} {exploration.text}')
  print(f'{exploration.result_label + ":":12} {exploration.translation}')
  print(f'wrote {len(paths)} files to {out_dir}; open {paths[-1]}')


if __name__ == '__main__':
  cli.define_run_flags()
  cli.define_search_flags(batch_size=False)
  flags.DEFINE_string('text', None, 'Sentence to explore: the source to translate, the '
                      "language model's text or the sentence to classify.", required=True)
  flags.DEFINE_string('output', None, 'Output folder (default WORKDIR/explore).')
  cli.run(main, 'explore')
