"""Look inside a trained Transformer: translate a sentence and picture its attention.

  python -m transformer_jax.explore --workdir=DIR --text "A man rides a bike." [--out=DIR]

translates the sentence with the checkpoint's beam search (Sec 6.1 settings from the
workdir's config), runs the model once more on the source and the translation to get
every layer's and head's attention probabilities (`Transformer.attention_weights`), and
writes into ``--out`` (default ``DIR/explore``):

  {encoder_self,decoder_self,cross}_layer{l}.png   a heat map per head, token labels
  cross_alignment.png       the last layer's encoder-decoder attention, mean of heads
  positional_encoding.png   Sec 3.5's sinusoids (and the learned table, if any)
  attention.html            the interactive page (`attention_page.AttentionPage`)

In a notebook, ``explore_text(...)`` returns an `Exploration`, which displays as the
interactive page.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from transformer_jax import model as model_lib
from transformer_jax import translate
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.inference import search as search_lib
from transformer_jax.run import checkpoint as checkpoint_lib
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
    weights: kind -> [L, N, Q, K] float32 ('encoder_self' [L,N,S,S], 'decoder_self'
      [L,N,T,T], 'cross' [L,N,T,S]).
  """
  text: str
  translation: str
  source_tokens: list[str]
  target_tokens: list[str]
  weights: dict[str, np.ndarray]

  def page(self, title: str = 'Transformer attention') -> AttentionPage:
    return AttentionPage(self.weights, self.source_tokens, self.target_tokens,
                         title=title, source_text=self.text, target_text=self.translation)

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


def explore_text(translator: translate.Translator, text: str, *,
                 beam_size: int | None = None, alpha: float | None = None,
                 max_extra_len: int | None = None) -> Exploration:
  """Translates ``text`` with the translator's beam search (or one with the given
  settings; the rest from the workdir's config.eval) and returns the attention over
  the source and the translation."""
  model, tokenizer, eval_cfg = translator.model, translator.tokenizer, translator.config.eval
  src = source_ids(tokenizer, text, model.cfg.max_len)
  decoder = translator.decoder
  if (beam_size, alpha, max_extra_len) != (None, None, None):
    decoder = search_lib.Decoder(
        model, beam_size=beam_size or eval_cfg.beam_size,
        alpha=eval_cfg.length_penalty if alpha is None else alpha,
        max_extra_len=eval_cfg.max_extra_length if max_extra_len is None else max_extra_len)
  translation = decoder(np.asarray([src], np.int32))[0]
  # A learned position table ends at max_len; the decoder input is bos + translation.
  translation = translation[:model.cfg.max_len - 1]
  weights = explore_ids(model, src, translation)
  tgt_in = [tokenizer.bos_id] + translation
  return Exploration(
      text=text, translation=tokenizer.decode(translation),
      source_tokens=[tokenizer.id_to_piece(i) for i in src],
      target_tokens=[tokenizer.id_to_piece(i) for i in tgt_in], weights=weights)


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
      exploration.weights, exploration.source_tokens, exploration.target_tokens, out_dir)
  sinusoids, learned = positional_tables(model)
  paths.append(attention_plots.plot_positional_encodings(
      sinusoids, os.path.join(out_dir, 'positional_encoding.png'), learned=learned,
      learned_name='learned encoder positions'))
  paths.append(exploration.page().save(os.path.join(out_dir, 'attention.html')))
  return paths


def main(argv):
  f = translate.start_cli(argv)
  out_dir = f.out or os.path.join(f.workdir, 'explore')
  try:
    translator = translate.load_translator(
        f.workdir, step=f.step, average_last=f.average_last, beam_size=f.beam_size,
        alpha=f.alpha, use_mesh=False)
    exploration = explore_text(translator, f.text)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'explore: {e}')
  paths = write_outputs(exploration, translator.model, out_dir)
  step = translator.step
  if step is None:
    step = checkpoint_lib.TrainCheckpointer(
        f.workdir, translator.config.checkpoint, read_only=True).latest_step()
  print(f'checkpoint: {f.workdir} step {step}')
  print(f'source:      {exploration.text}')
  print(f'translation: {exploration.translation}')
  print(f'wrote {len(paths)} files to {out_dir}; open {paths[-1]}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json, checkpoints/, '
                      'vocab/).', required=True)
  flags.DEFINE_string('text', None, 'Source sentence to translate and explore.',
                      required=True)
  flags.DEFINE_string('out', None, 'Output folder (default WORKDIR/explore).')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default the latest).')
  flags.DEFINE_integer('average_last', None, 'Average the last K checkpoints (Sec 6.1).')
  flags.DEFINE_integer('beam_size', None, 'Beam size (default config.eval.beam_size).')
  flags.DEFINE_float('alpha', None, 'Length penalty (default config.eval.length_penalty).')
  app.run(main)
