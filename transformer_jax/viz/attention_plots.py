"""Matplotlib figures of what a Transformer attends to, and of its positional encodings.

Works on plain numpy arrays and token strings, so the figures can be drawn for any
model: `explore.py` feeds it `Transformer.attention_weights` of one sentence pair.

- `plot_head_grid`: one layer of one attention kind, a heat map per head [N, Q, K].
- `plot_alignment`: encoder-decoder attention averaged over heads [T, S], the
  source-target alignment of Sec 3.2.3 / Fig. 3-5 of the paper.
- `plot_positional_encodings`: the sinusoid table of Sec 3.5 as a heat map, a few of its
  dimensions as curves, and a learned position table beside it when there is one.
- `write_attention_figures`: all of the above for one sentence pair, into a folder.

Every figure has a fixed size in pixels (`figure_size_px` / the `*_size` functions), so
callers and tests know exactly what they get; `bbox_inches='tight'` is avoided because it
makes the size depend on the text.

Decoder positions (the rows of decoder self-attention and encoder-decoder attention)
are labelled by the token they predict, not the token they are fed: position t sees
'<s> y1 .. y(t-1)' and predicts y(t), so the row of 'Mädchen' shows what the model
looked at to produce 'Mädchen'.

Figures are drawn on `matplotlib.figure.Figure` objects and saved with the Agg
renderer, without pyplot: importing this module neither selects a backend nor keeps
figures in pyplot's global registry.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

DPI = 100
HEADS_PER_ROW = 4
# Inches per token in a heat-map cell, and room for the rotated token labels.
_CELL_IN = 0.32
_LABEL_MARGIN_IN = 1.3

# What each attention kind relates: (query side, key side) and a readable name. Sides:
# 'source' the encoder input, 'target' the decoder input ('<s>' then the translation),
# 'predicted' what each decoder position predicts (the translation then '</s>').
ATTENTION_KINDS = {
    'encoder_self': ('source', 'source', 'Encoder self-attention'),
    'decoder_self': ('predicted', 'target', 'Decoder masked self-attention'),
    'cross': ('predicted', 'source', 'Encoder-decoder attention'),
}


def predicted_from_target(target_tokens: Sequence[str], eos: str = '</s>') -> list[str]:
  """The tokens decoder positions predict, from the decoder input (shifted left,
  '</s>' last): ['<s>', 'Ein', 'Mann'] -> ['Ein', 'Mann', '</s>']."""
  return list(target_tokens[1:]) + [eos]


def axis_tokens(kind: str, source_tokens: Sequence[str], target_tokens: Sequence[str],
                predicted_tokens: Sequence[str] | None = None
                ) -> tuple[list[str], list[str]]:
  """(row labels, column labels) of an attention kind's [Q, K] heat maps."""
  tokens = {'source': list(source_tokens), 'target': list(target_tokens),
            'predicted': list(predicted_tokens if predicted_tokens is not None
                              else predicted_from_target(target_tokens))}
  query_side, key_side, _ = ATTENTION_KINDS[kind]
  return tokens[query_side], tokens[key_side]


def _clamped(length: int) -> float:
  """Inches for `length` tokens, kept between readable and printable."""
  return min(max(length * _CELL_IN, 1.6), 9.0)


def head_grid_size(num_heads: int, query_len: int, key_len: int) -> tuple[int, int]:
  """(width, height) in pixels of `plot_head_grid` for these sizes."""
  cols = min(num_heads, HEADS_PER_ROW)
  rows = math.ceil(num_heads / cols)
  width = cols * (_clamped(key_len) + _LABEL_MARGIN_IN) + 0.4
  height = rows * (_clamped(query_len) + _LABEL_MARGIN_IN) + 0.6
  return round(width * DPI), round(height * DPI)


def alignment_size(query_len: int, key_len: int) -> tuple[int, int]:
  """(width, height) in pixels of `plot_alignment` for these sizes."""
  width = 2 * _clamped(key_len) + _LABEL_MARGIN_IN + 1.2
  height = 2 * _clamped(query_len) + _LABEL_MARGIN_IN + 0.6
  return round(width * DPI), round(height * DPI)


def positional_size(has_learned: bool) -> tuple[int, int]:
  """(width, height) in pixels of `plot_positional_encodings`."""
  return (1800 if has_learned else 1200), 500


def _heat_map(ax, weights: np.ndarray, query_tokens: Sequence[str],
              key_tokens: Sequence[str], *, labels: bool = True):
  """Draws weights [Q, K] on ax with queries as rows and keys as columns."""
  image = ax.imshow(weights, cmap='viridis', vmin=0.0, vmax=1.0, aspect='auto',
                    interpolation='nearest')
  if labels:
    ax.set_xticks(range(len(key_tokens)), labels=key_tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(len(query_tokens)), labels=query_tokens, fontsize=7)
  else:
    ax.set_xticks([])
    ax.set_yticks([])
  ax.tick_params(length=0)
  return image


def _check_shape(weights: np.ndarray, query_tokens, key_tokens, what: str):
  q, k = weights.shape[-2:]
  if (q, k) != (len(query_tokens), len(key_tokens)):
    raise ValueError(
        f'{what}: weights have query x key = {q} x {k} but there are '
        f'{len(query_tokens)} query tokens and {len(key_tokens)} key tokens')


def _save(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=DPI)
  return path


def plot_head_grid(weights: np.ndarray, query_tokens: Sequence[str],
                   key_tokens: Sequence[str], path: str, *, title: str = '') -> str:
  """Writes a PNG with one heat map per head of one attention layer.

  Args:
    weights: [N, Q, K] attention probabilities of one layer (rows sum to 1).
    query_tokens: Q labels for the rows (the tokens doing the attending).
    key_tokens: K labels for the columns (the tokens attended to).
    path: the .png file to write.
    title: figure title.

  Returns:
    path. The image is `head_grid_size(N, Q, K)` pixels.
  """
  weights = np.asarray(weights, np.float32)
  if weights.ndim != 3:
    raise ValueError(f'plot_head_grid wants weights [N, Q, K], got shape {weights.shape}')
  _check_shape(weights, query_tokens, key_tokens, title or 'plot_head_grid')
  num_heads = weights.shape[0]
  cols = min(num_heads, HEADS_PER_ROW)
  rows = math.ceil(num_heads / cols)
  width, height = head_grid_size(num_heads, *weights.shape[1:])
  fig = Figure(figsize=(width / DPI, height / DPI), layout='constrained')
  axes = fig.subplots(rows, cols, squeeze=False)
  for head, ax in enumerate(axes.flat):
    if head >= num_heads:
      ax.axis('off')
      continue
    _heat_map(ax, weights[head], query_tokens, key_tokens)
    ax.set_title(f'head {head}', fontsize=9)
  fig.suptitle(title, fontsize=11)
  return _save(fig, path)


def plot_alignment(weights: np.ndarray, query_tokens: Sequence[str],
                   key_tokens: Sequence[str], path: str, *, title: str = '') -> str:
  """Writes a PNG of one [Q, K] alignment (e.g. cross-attention averaged over heads).

  Args:
    weights: [Q, K], or [N, Q, K] which is averaged over the heads N.
    query_tokens: Q row labels (predicted target tokens for cross-attention).
    key_tokens: K column labels (source tokens for cross-attention).
    path: the .png file to write.
    title: figure title.

  Returns:
    path. The image is `alignment_size(Q, K)` pixels.
  """
  weights = np.asarray(weights, np.float32)
  if weights.ndim == 3:
    weights = weights.mean(axis=0)
  if weights.ndim != 2:
    raise ValueError(f'plot_alignment wants weights [Q, K] or [N, Q, K], got {weights.shape}')
  _check_shape(weights, query_tokens, key_tokens, title or 'plot_alignment')
  width, height = alignment_size(*weights.shape)
  fig = Figure(figsize=(width / DPI, height / DPI), layout='constrained')
  ax = fig.subplots()
  image = _heat_map(ax, weights, query_tokens, key_tokens)
  ax.tick_params(labelsize=9)
  ax.set_xlabel('source (keys)')
  ax.set_ylabel('predicted target token (queries)')
  fig.colorbar(image, ax=ax, shrink=0.8)
  fig.suptitle(title, fontsize=11)
  return _save(fig, path)


def sinusoid_table(length: int, d_model: int) -> np.ndarray:
  """Sec 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(same).

  Returns:
    [length, d_model] float32, even columns sines, odd columns cosines.
  """
  positions = np.arange(length, dtype=np.float64)[:, None]
  two_i = np.arange(0, d_model, 2, dtype=np.float64)[None, :]
  angles = positions / np.power(10000.0, two_i / d_model)
  table = np.zeros((length, d_model), np.float64)
  table[:, 0::2] = np.sin(angles)
  table[:, 1::2] = np.cos(angles[:, :d_model // 2])
  return table.astype(np.float32)


def plot_positional_encodings(table: np.ndarray, path: str, *,
                              learned: np.ndarray | None = None,
                              learned_name: str = 'learned positions',
                              dims: Sequence[int] | None = None) -> str:
  """Writes the positional-encoding figure of Sec 3.5.

  Args:
    table: [P, D] sinusoidal encodings (see `sinusoid_table`).
    path: the .png file to write.
    learned: optional [P', D] learned position embeddings (Table 3 row E), drawn
      beside the sinusoids.
    learned_name: the learned table's title.
    dims: the dimensions drawn as curves; by default four sines whose wavelengths,
      2*pi*10000^(dim/D), grow from about 12 to about 400 positions.

  Returns:
    path. The image is `positional_size(learned is not None)` pixels.
  """
  table = np.asarray(table, np.float32)
  length, d_model = table.shape
  if dims is None:
    dims = sorted({(d_model * k // 16) & ~1 for k in (1, 3, 5, 7)})
  panels = 3 if learned is not None else 2
  width, height = positional_size(learned is not None)
  fig = Figure(figsize=(width / DPI, height / DPI), layout='constrained')
  axes = fig.subplots(1, panels)
  # 'antialiased' averages columns when a wide table has more dims than pixels.
  image = axes[0].imshow(table, cmap='RdBu', vmin=-1, vmax=1, aspect='auto',
                         interpolation='antialiased')
  axes[0].set_title(f'sinusoids, {length} positions x {d_model} dims')
  axes[0].set_xlabel('dimension')
  axes[0].set_ylabel('position')
  fig.colorbar(image, ax=axes[0], shrink=0.8)
  for d in dims:
    kind = 'sin' if d % 2 == 0 else 'cos'
    wavelength = 2 * np.pi * 10000.0 ** ((d - d % 2) / d_model)
    axes[1].plot(np.arange(length), table[:, d],
                 label=f'dim {d} ({kind}, wavelength {wavelength:.0f})')
  axes[1].set_title('a few dimensions (Sec 3.5)')
  axes[1].set_xlabel('position')
  axes[1].set_ylim(-1.1, 1.8)  # Room above the curves for the legend.
  axes[1].legend(fontsize=8, loc='upper center', ncol=2)
  if learned is not None:
    learned = np.asarray(learned, np.float32)
    bound = float(np.abs(learned).max()) or 1.0
    image = axes[2].imshow(learned, cmap='RdBu', vmin=-bound, vmax=bound, aspect='auto',
                           interpolation='antialiased')
    axes[2].set_title(f'{learned_name}, {learned.shape[0]} x {learned.shape[1]}')
    axes[2].set_xlabel('dimension')
    axes[2].set_ylabel('position')
    fig.colorbar(image, ax=axes[2], shrink=0.8)
  return _save(fig, path)


def write_attention_figures(weights: Mapping[str, np.ndarray], source_tokens: Sequence[str],
                            target_tokens: Sequence[str], out_dir: str, *,
                            predicted_tokens: Sequence[str] | None = None) -> list[str]:
  """Writes a head grid per layer and kind, and the last layer's cross-attention alignment.

  Args:
    weights: kind -> [L, N, Q, K] for one sentence pair (no batch axis); kinds are
      'encoder_self' (Q = K = S), 'decoder_self' (Q = K = T) and 'cross' (Q = T, K = S).
      Missing kinds are skipped.
    source_tokens: S source token labels.
    target_tokens: T decoder-input token labels ('<s>' first).
    out_dir: the folder for the PNG files.
    predicted_tokens: T labels of what each decoder position predicts, the rows of
      decoder attention; default ``target_tokens`` shifted left with '</s>' last.

  Returns:
    The paths written: `{kind}_layer{l}.png` and `cross_alignment.png`.
  """
  paths = []
  for kind, (_, _, name) in ATTENTION_KINDS.items():
    if kind not in weights:
      continue
    layers = np.asarray(weights[kind])
    if layers.ndim != 4:
      raise ValueError(f'{kind}: wants weights [L, N, Q, K], got shape {layers.shape}')
    rows, columns = axis_tokens(kind, source_tokens, target_tokens, predicted_tokens)
    for layer in range(layers.shape[0]):
      paths.append(plot_head_grid(
          layers[layer], rows, columns,
          os.path.join(out_dir, f'{kind}_layer{layer}.png'),
          title=f'{name}, layer {layer}'))
  if 'cross' in weights:
    cross = np.asarray(weights['cross'])
    rows, columns = axis_tokens('cross', source_tokens, target_tokens, predicted_tokens)
    paths.append(plot_alignment(
        cross[-1], rows, columns,
        os.path.join(out_dir, 'cross_alignment.png'),
        title=f'Encoder-decoder attention, layer {cross.shape[0] - 1}, mean of '
              f'{cross.shape[1]} heads'))
  return paths
