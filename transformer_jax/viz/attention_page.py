"""One self-contained HTML page for looking at a Transformer's attention interactively.

The page needs no network: the weights travel inside it as JSON, and the CSS and
JavaScript are inline. A reader picks the attention kind (encoder self-attention, decoder
masked self-attention, encoder-decoder attention), the layer and the head (or the mean of
the heads); hovering a query token draws what it attends to, with the weights as numbers,
and highlights its row in the heat map below.

`AttentionPage` writes the file (`save`) and shows itself inline in Jupyter and Colab
(`_repr_html_`, inside an <iframe srcdoc> so that its script and styles stay apart from
the notebook's).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from transformer_jax.viz.attention_plots import ATTENTION_KINDS

_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 16px;
       color: #222; }
h1 { font-size: 18px; margin: 0 0 4px 0; }
.sentences { font-size: 13px; color: #555; margin-bottom: 10px; }
.controls { display: flex; gap: 16px; align-items: center; margin-bottom: 12px;
            font-size: 14px; }
.controls select { font-size: 14px; }
#tokens { display: flex; align-items: flex-start; position: relative; }
.column { display: flex; flex-direction: column; }
.column-title { font-size: 12px; color: #777; height: 18px; }
.token { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 14px;
         padding: 1px 6px; height: 20px; line-height: 20px; white-space: pre;
         border-radius: 3px; cursor: default; }
#queries .token { text-align: right; }
#queries .token.active { background: #f4a261; }
#keys .token { display: flex; gap: 8px; }
.weight { color: #1d3557; font-size: 12px; min-width: 40px; }
#links { flex: none; }
#readout { font-size: 13px; min-height: 20px; margin: 10px 0; }
#matrix { border-collapse: collapse; font-family: ui-monospace, Menlo, Consolas, monospace;
          font-size: 11px; margin-top: 8px; }
#matrix td { width: 22px; height: 18px; border: 1px solid #fff; }
#matrix th { font-weight: normal; padding: 0 4px; white-space: pre; }
#matrix thead th { writing-mode: vertical-rl; transform: rotate(180deg);
                   text-align: left; vertical-align: bottom; }
#matrix tbody th { text-align: right; }
#matrix tr.active th { background: #f4a261; }
#matrix tr.active td { outline: 2px solid #f4a261; }
"""

# Tokens are put into the page with textContent (never innerHTML), so a token such as
# "<b>" shows as itself.
_SCRIPT = r"""
(function () {
  'use strict';
  const data = JSON.parse(document.getElementById('attention-data').textContent);
  const kindSelect = document.getElementById('kind');
  const layerSelect = document.getElementById('layer');
  const headSelect = document.getElementById('head');
  const queriesDiv = document.getElementById('queries');
  const keysDiv = document.getElementById('keys');
  const links = document.getElementById('links');
  const readout = document.getElementById('readout');
  const matrix = document.getElementById('matrix');
  const SVG = 'http://www.w3.org/2000/svg';
  let active = null;  // Index of the hovered query token, or null.

  function option(select, value, text) {
    const o = document.createElement('option');
    o.value = value;
    o.textContent = text;
    select.appendChild(o);
  }
  function fill(select, values, texts) {
    const previous = select.value;
    select.textContent = '';
    values.forEach((v, i) => option(select, v, texts[i]));
    if (values.map(String).includes(previous)) select.value = previous;
  }
  function range(n) { return Array.from({length: n}, (_, i) => i); }
  function kind() { return data.kinds[kindSelect.value]; }

  // [Q][K] weights of the chosen kind, layer and head (or the mean over heads).
  function currentWeights() {
    const heads = kind().weights[Number(layerSelect.value)];
    if (headSelect.value !== 'mean') return heads[Number(headSelect.value)];
    return heads[0].map((row, q) => row.map((_, k) =>
        heads.reduce((sum, head) => sum + head[q][k], 0) / heads.length));
  }

  function tokenColumn(div, title, tokens, cls) {
    div.textContent = '';
    const t = document.createElement('div');
    t.className = 'column-title';
    t.textContent = title;
    div.appendChild(t);
    tokens.forEach((token, i) => {
      const el = document.createElement('div');
      el.className = 'token ' + cls;
      el.dataset.index = i;
      if (cls === 'key') {
        const text = document.createElement('span');
        text.className = 'text';
        text.textContent = token;
        const w = document.createElement('span');
        w.className = 'weight';
        el.appendChild(text);
        el.appendChild(w);
      } else {
        el.textContent = token;
        el.addEventListener('mouseenter', () => setActive(i));
      }
      div.appendChild(el);
    });
  }

  function colour(w) { return 'rgba(29, 53, 87, ' + w.toFixed(4) + ')'; }

  function buildMatrix(weights, queryTokens, keyTokens) {
    matrix.textContent = '';
    const head = matrix.createTHead().insertRow();
    head.appendChild(document.createElement('th'));
    keyTokens.forEach(token => {
      const th = document.createElement('th');
      th.textContent = token;
      head.appendChild(th);
    });
    const body = matrix.createTBody();
    weights.forEach((row, q) => {
      const tr = body.insertRow();
      tr.dataset.index = q;
      const th = document.createElement('th');
      th.textContent = queryTokens[q];
      tr.appendChild(th);
      row.forEach((w, k) => {
        const td = tr.insertCell();
        td.dataset.weight = w.toFixed(4);
        td.title = queryTokens[q] + ' \u2192 ' + keyTokens[k] + ': ' + w.toFixed(4);
        td.style.background = colour(w);
      });
      tr.addEventListener('mouseenter', () => setActive(q));
    });
  }

  function drawLinks(weights) {
    const box = document.getElementById('tokens').getBoundingClientRect();
    const queryEls = queriesDiv.querySelectorAll('.token');
    const keyEls = keysDiv.querySelectorAll('.token');
    links.textContent = '';
    const height = Math.max(queriesDiv.offsetHeight, keysDiv.offsetHeight);
    links.setAttribute('height', height);
    links.style.height = height + 'px';
    const middle = el => {
      const r = el.getBoundingClientRect();
      return r.top + r.height / 2 - box.top;
    };
    weights.forEach((row, q) => {
      if (active !== null && q !== active) return;
      row.forEach((w, k) => {
        if (w < 0.005) return;
        const line = document.createElementNS(SVG, 'line');
        line.setAttribute('x1', 2);
        line.setAttribute('x2', 158);
        line.setAttribute('y1', middle(queryEls[q]));
        line.setAttribute('y2', middle(keyEls[k]));
        line.setAttribute('stroke', '#1d3557');
        line.setAttribute('stroke-width', active === null ? 1 : 1 + 4 * w);
        line.setAttribute('stroke-opacity', active === null ? 0.6 * w : w);
        links.appendChild(line);
      });
    });
  }

  function showActive() {
    const weights = currentWeights();
    const k = kind();
    queriesDiv.querySelectorAll('.token').forEach(el =>
        el.classList.toggle('active', Number(el.dataset.index) === active));
    matrix.querySelectorAll('tbody tr').forEach(tr =>
        tr.classList.toggle('active', Number(tr.dataset.index) === active));
    keysDiv.querySelectorAll('.token').forEach(el => {
      const w = active === null ? null : weights[active][Number(el.dataset.index)];
      el.querySelector('.weight').textContent = w === null ? '' : w.toFixed(2);
      el.dataset.weight = w === null ? '' : w.toFixed(4);
      el.style.background = w === null ? '' : 'rgba(244, 162, 97, ' + w.toFixed(4) + ')';
    });
    if (active === null) {
      readout.textContent = 'Hover a ' + k.query + ' token to see what it attends to.';
    } else {
      const keyTokens = data.tokens[k.key];
      const top = weights[active].map((w, i) => [w, i]).sort((a, b) => b[0] - a[0])
          .slice(0, 3).map(([w, i]) => keyTokens[i] + ' ' + w.toFixed(2));
      readout.textContent = data.tokens[k.query][active] + ' attends most to: ' +
          top.join(', ');
    }
    drawLinks(weights);
  }

  function setActive(q) { active = q; showActive(); }

  function render() {
    const k = kind();
    const queryTokens = data.tokens[k.query];
    const keyTokens = data.tokens[k.key];
    if (active !== null && active >= queryTokens.length) active = null;
    tokenColumn(queriesDiv, k.query + ' (queries)', queryTokens, 'query');
    tokenColumn(keysDiv, k.key + ' (keys)', keyTokens, 'key');
    buildMatrix(currentWeights(), queryTokens, keyTokens);
    showActive();
  }

  function changeKind() {
    const k = kind();
    fill(layerSelect, range(k.weights.length), range(k.weights.length).map(String));
    const numHeads = k.weights[0].length;
    fill(headSelect, ['mean'].concat(range(numHeads)),
         ['mean of ' + numHeads].concat(range(numHeads).map(String)));
    render();
  }

  Object.keys(data.kinds).forEach(id => option(kindSelect, id, data.kinds[id].name));
  kindSelect.addEventListener('change', changeKind);
  layerSelect.addEventListener('change', render);
  headSelect.addEventListener('change', render);
  document.getElementById('tokens').addEventListener('mouseleave', () => setActive(null));
  changeKind();
})();
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>{style}</style>
</head>
<body>
<h1>{title}</h1>
<div class="sentences">{sentences}</div>
<div class="controls">
  <label>attention <select id="kind"></select></label>
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
</div>
<div id="tokens">
  <div class="column" id="queries"></div>
  <svg id="links" width="160" xmlns="http://www.w3.org/2000/svg"></svg>
  <div class="column" id="keys"></div>
</div>
<div id="readout"></div>
<table id="matrix"></table>
<script type="application/json" id="attention-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""


class AttentionPage:
  """An interactive attention viewer for one sentence pair.

  Attributes:
    weights: kind -> [L, N, Q, K] float32 attention probabilities (no batch axis).
      Kinds are those of `attention_plots.ATTENTION_KINDS`: 'encoder_self' (Q = K = S),
      'decoder_self' (Q = K = T) and 'cross' (Q = T, K = S); any subset.
    source_tokens: S source token labels (e.g. SentencePiece pieces and '</s>').
    target_tokens: T decoder-input token labels (e.g. '<s>' and the translation).
  """

  def __init__(self, weights: Mapping[str, np.ndarray], source_tokens: Sequence[str],
               target_tokens: Sequence[str], *, title: str = 'Attention',
               source_text: str | None = None, target_text: str | None = None,
               decimals: int = 4):
    self.source_tokens = [str(t) for t in source_tokens]
    self.target_tokens = [str(t) for t in target_tokens]
    sizes = {'source': len(self.source_tokens), 'target': len(self.target_tokens)}
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
    self.source_text = source_text
    self.target_text = target_text
    self.decimals = decimals

  def _data(self) -> dict:
    kinds = {}
    for kind, array in self.weights.items():
      query_side, key_side, name = ATTENTION_KINDS[kind]
      kinds[kind] = {'name': name, 'query': query_side, 'key': key_side,
                     'weights': np.round(array, self.decimals).tolist()}
    return {'tokens': {'source': self.source_tokens, 'target': self.target_tokens},
            'kinds': kinds}

  def to_html(self) -> str:
    """The whole page as one HTML string (no external resources)."""
    # '<' escaped inside the JSON so that no token can close the <script> element.
    data = json.dumps(self._data(), ensure_ascii=False, separators=(',', ':'))
    data = data.replace('<', '\\u003c')
    sentences = []
    if self.source_text is not None:
      sentences.append(f'source: {html.escape(self.source_text)}')
    if self.target_text is not None:
      sentences.append(f'translation: {html.escape(self.target_text)}')
    return _TEMPLATE.format(title=html.escape(self.title), style=_STYLE,
                            sentences='<br>'.join(sentences), data=data, script=_SCRIPT)

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
