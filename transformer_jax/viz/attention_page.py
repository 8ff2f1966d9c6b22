"""One self-contained HTML page for looking at a Transformer's attention interactively.

The page needs no network: the weights travel inside it as JSON, and the CSS and
JavaScript (the asset files ``viz/assets/attention_page.{html,css,js}``, read at run
time) are inlined. A reader picks the attention kind (encoder self-attention, decoder
masked self-attention, encoder-decoder attention), the layer and the head (or the mean
of the heads); hovering a query token draws what it attends to, with the weights as
numbers, and highlights its row in the heat map below. Decoder positions are labelled
by the token they predict, with the token they were fed beside it.

`AttentionPage` writes the file (`save`) and shows itself inline in Jupyter and Colab
(`_repr_html_`, inside an <iframe srcdoc> so that its script and styles stay apart from
the notebook's).
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import json
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from transformer_jax.viz.attention_plots import ATTENTION_KINDS, predicted_from_target

ASSETS = ('attention_page.html', 'attention_page.css', 'attention_page.js')


@functools.cache
def asset(name: str) -> str:
  """The text of a packaged asset file (``viz/assets/<name>``)."""
  return (importlib.resources.files(__package__) / 'assets' / name).read_text('utf-8')


def _fill(template: str, values: Mapping[str, str]) -> str:
  """Replaces each ``{{ key }}`` of ``template`` in one pass, so text inserted for
  one key (the JSON data, the script) is never searched for another."""
  return re.sub(r'\{\{ (\w+) \}\}', lambda m: values[m.group(1)], template)


class AttentionPage:
  """An interactive attention viewer for one sentence pair.

  Attributes:
    weights: kind -> [L, N, Q, K] float32 attention probabilities (no batch axis).
      Kinds are those of `attention_plots.ATTENTION_KINDS`: 'encoder_self' (Q = K = S),
      'decoder_self' (Q = K = T) and 'cross' (Q = T, K = S); any subset.
    source_tokens: S source token labels (e.g. SentencePiece pieces and '</s>').
    target_tokens: T decoder-input token labels (e.g. '<s>' and the translation).
    predicted_tokens: T labels of what each decoder position predicts (the
      translation and '</s>'), the rows of decoder attention; by default
      ``target_tokens`` shifted left with '</s>' last.
    source_text, target_text: shown above the controls, as ``source_label: ...``
      and ``target_label: ...`` (e.g. 'sentence' and 'prediction' for a classifier).
  """

  def __init__(self, weights: Mapping[str, np.ndarray], source_tokens: Sequence[str],
               target_tokens: Sequence[str], *,
               predicted_tokens: Sequence[str] | None = None, title: str = 'Attention',
               source_text: str | None = None, target_text: str | None = None,
               source_label: str = 'source', target_label: str = 'translation',
               decimals: int = 4):
    self.source_tokens = [str(t) for t in source_tokens]
    self.target_tokens = [str(t) for t in target_tokens]
    if predicted_tokens is None:
      predicted_tokens = predicted_from_target(self.target_tokens)
    self.predicted_tokens = [str(t) for t in predicted_tokens]
    if len(self.predicted_tokens) != len(self.target_tokens):
      raise ValueError(f'{len(self.predicted_tokens)} predicted tokens for '
                       f'{len(self.target_tokens)} decoder positions')
    sizes = {'source': len(self.source_tokens), 'target': len(self.target_tokens),
             'predicted': len(self.predicted_tokens)}
    self.weights = {}
    for kind, array in weights.items():
      if kind not in ATTENTION_KINDS:
        raise ValueError(f'unknown attention kind {kind!r}; '
                         f'expected one of {sorted(ATTENTION_KINDS)}')
      array = np.asarray(array, np.float32)
      query_side, key_side, _ = ATTENTION_KINDS[kind]
      expected = (sizes[query_side], sizes[key_side])
      if array.ndim != 4 or array.shape[2:] != expected:
        raise ValueError(
            f'{kind}: weights must be [L, N, {query_side} length {expected[0]}, '
            f'{key_side} length {expected[1]}], got shape {array.shape}')
      self.weights[kind] = array
    if not self.weights:
      raise ValueError('AttentionPage needs the weights of at least one attention kind')
    self.title = title
    self.source_text, self.source_label = source_text, source_label
    self.target_text, self.target_label = target_text, target_label
    self.decimals = decimals

  def _data(self) -> dict:
    kinds = {}
    for kind, array in self.weights.items():
      query_side, key_side, name = ATTENTION_KINDS[kind]
      kinds[kind] = {'name': name, 'query': query_side, 'key': key_side,
                     'weights': np.round(array, self.decimals).tolist()}
    return {'tokens': {'source': self.source_tokens, 'target': self.target_tokens,
                       'predicted': self.predicted_tokens},
            'kinds': kinds}

  def to_html(self) -> str:
    """The whole page as one HTML string (no external resources)."""
    # '<' escaped inside the JSON so that no token can close the <script> element.
    data = json.dumps(self._data(), ensure_ascii=False, separators=(',', ':'))
    data = data.replace('<', '\\u003c')
    sentences = []
    if self.source_text is not None:
      sentences.append(f'{html.escape(self.source_label)}: '
                       f'{html.escape(self.source_text)}')
    if self.target_text is not None:
      sentences.append(f'{html.escape(self.target_label)}: '
                       f'{html.escape(self.target_text)}')
    return _fill(asset('attention_page.html'), {
        'title': html.escape(self.title), 'style': asset('attention_page.css'),
        'sentences': '<br>'.join(sentences), 'data': data,
        'script': asset('attention_page.js')})

  def save(self, path: str) -> str:
    """Writes the page to `path` (UTF-8) and returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
      f.write(self.to_html())
    return path

  def _repr_html_(self) -> str:
    """Inline display in Jupyter/Colab: the page inside a sandboxed <iframe srcdoc>."""
    longest = max(len(self.source_tokens), len(self.target_tokens))
    height = 320 + 42 * longest  # Token columns and heat map rows.
    return (f'<iframe srcdoc="{html.escape(self.to_html(), quote=True)}" '
            f'style="width: 100%; height: {height}px; border: 0" '
            'sandbox="allow-scripts"></iframe>')
