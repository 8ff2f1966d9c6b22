"""Look inside a trained Transformer: translate a sentence and picture its attention.

  python -m transformer_jax.explore --workdir=DIR --text "A man rides a bike."
      [--checkpoint_step=N] [--average_last=K] [--beam_size=4] [--output=FOLDER]

translates the sentence with the checkpoint's beam search (Sec 6.1 settings from the
workdir's config), runs the model once more on the source and the translation to get
every layer's and head's attention probabilities (`Transformer.attention_weights`), and
writes into ``--output`` (default ``DIR/explore``):

  {encoder_self,decoder_self,cross}_layer{l}.png   a heat map per head, token labels
  cross_alignment.png       the last layer's encoder-decoder attention, mean of heads
  positional_encoding.png   Sec 3.5's sinusoids (and the learned table, if any)
  attention.html            the interactive page (`attention_page.AttentionPage`)

Decoder positions are labelled by the token they predict (position t is fed the
translation's token t - 1, or '<s>', and predicts token t, or '</s>'), so a row shows
what the model looked at to produce that word; the page shows the fed token beside it.

In a notebook, ``explore_text(Translator.from_workdir(...), text)`` returns an
`Exploration`, which displays as the interactive page.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from absl import flags

from transformer_jax import cli
from transformer_jax import model as model_lib
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.inference.translator import Translator
from transformer_jax.viz import attention_plots
from transformer_jax.viz.attention_page import AttentionPage


@dataclasses.dataclass
class Exploration:
  """One sentence, its translation and the model's attention over both.

  Attributes:
    text: the source sentence.
    translation: the model's translation.
    source_tokens: S source pieces, ending with '</s>' (the encoder input).
    target_tokens: T decoder-input pieces: '<s>' then the translation's pieces.
    predicted_tokens: T pieces the decoder positions predict: the translation's
      pieces then '</s>' (the rows of decoder attention).
    weights: kind -> [L, N, Q, K] float32 ('encoder_self' [L,N,S,S], 'decoder_self'
      [L,N,T,T], 'cross' [L,N,T,S]).
  """
  text: str
  translation: str
  source_tokens: list[str]
  target_tokens: list[str]
  predicted_tokens: list[str]
  weights: dict[str, np.ndarray]

  def page(self, title: str = 'Transformer attention') -> AttentionPage:
    return AttentionPage(self.weights, self.source_tokens, self.target_tokens,
                         predicted_tokens=self.predicted_tokens, title=title,
                         source_text=self.text, target_text=self.translation)

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


def positional_tables(model: model_lib.Transformer,
                      length: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
  """The sinusoids the model would add [P, D] (Sec 3.5), and its encoder's learned
  position table [max_len, D] when it has one (Table 3 row E), else None."""
  cfg = model.cfg
  length = length or min(cfg.max_len, 256)
  sinusoids = np.asarray(model_lib.sinusoidal_positions(jnp.arange(length), cfg.d_model))
  learned = None
  if cfg.positions == 'learned':
    learned = np.asarray(model.encoder.positions.table[...], np.float32)
  return sinusoids, learned


def write_outputs(exploration: Exploration, model: model_lib.Transformer,
                  out_dir: str) -> list[str]:
  """Writes the PNG figures and attention.html into ``out_dir``; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = attention_plots.write_attention_figures(
      exploration.weights, exploration.source_tokens, exploration.target_tokens, out_dir,
      predicted_tokens=exploration.predicted_tokens)
  sinusoids, learned = positional_tables(model)
  paths.append(attention_plots.plot_positional_encodings(
      sinusoids, os.path.join(out_dir, 'positional_encoding.png'), learned=learned,
      learned_name='learned encoder positions'))
  paths.append(exploration.page().save(os.path.join(out_dir, 'attention.html')))
  return paths


def main(f: flags.FlagValues) -> None:
  out_dir = f.output or os.path.join(f.workdir, 'explore')
  translator = Translator.from_workdir(
      f.workdir, f.checkpoint_step, f.average_last, beam_size=f.beam_size, alpha=f.alpha,
      max_extra_length=f.max_extra_length, use_mesh=False)
  exploration = explore_text(translator, f.text)
  paths = write_outputs(exploration, translator.model, out_dir)
  print(f'checkpoint: {f.workdir} step {translator.step}')
  print(f'source:      {exploration.text}')
  print(f'translation: {exploration.translation}')
  print(f'wrote {len(paths)} files to {out_dir}; open {paths[-1]}')


if __name__ == '__main__':
  cli.define_run_flags()
  cli.define_search_flags(batch_size=False)
  flags.DEFINE_string('text', None, 'Source sentence to translate and explore.',
                      required=True)
  flags.DEFINE_string('output', None, 'Output folder (default WORKDIR/explore).')
  cli.run(main, 'explore')
