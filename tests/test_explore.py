"""Attention weights of the model, the attention figures, and the explore CLI.

A tiny random Transformer (one compile-free eager pass per fixture) gives weights whose
invariants are checked exactly: rows are distributions over the keys a query may see,
and the weights with the model's own value and output projections reproduce the
model's encoder output and logits.
"""

import gzip
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import jax.numpy as jnp
from flax import nnx

from transformer_jax import model as model_lib
from transformer_jax.inference.translator import Translator
from transformer_jax.run.workdir import Workdir
from transformer_jax.viz import attention_plots

# Recomputing attention from the returned float32 weights differs from the model's own
# jax.nn.dot_product_attention path only by float32 rounding (exactly 0 on this CPU;
# other backends may order the reductions differently): absolute 1e-4 on activations
# and logits of order 1.
RECOMPUTE_ATOL = 1e-4


@pytest.fixture(scope='session')
def tiny_model():
  cfg = model_lib.TransformerConfig(
      vocab_size=40, num_encoder_layers=2, num_decoder_layers=2, d_model=16,
      num_heads=4, d_ff=32, dropout_rate=0.1, max_len=16)
  return model_lib.Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope='session')
def batch():
  """Two sentences; the second has padding on both sides."""
  src = np.array([[5, 6, 7, 8, 9, 1], [10, 11, 1, 0, 0, 0]], np.int32)
  tgt_in = np.array([[2, 12, 13, 14, 15], [2, 16, 17, 0, 0]], np.int32)
  return jnp.asarray(src), jnp.asarray(tgt_in)


@pytest.fixture(scope='session')
def weights(tiny_model, batch):
  src, tgt_in = batch
  return {k: np.asarray(v) for k, v in tiny_model.attention_weights(src, tgt_in).items()}


def test_weights_have_the_documented_shapes(weights):
  assert weights['encoder_self'].shape == (2, 2, 4, 6, 6)  # [L, B, N, S, S]
  assert weights['decoder_self'].shape == (2, 2, 4, 5, 5)  # [L, B, N, T, T]
  assert weights['cross'].shape == (2, 2, 4, 5, 6)  # [L, B, N, T, S]
  for w in weights.values():
    assert w.dtype == np.float32


def test_rows_are_distributions_over_visible_keys(weights, batch):
  src, tgt_in = (np.asarray(x) for x in batch)
  src_visible = (src != 0)[:, None, None, :]  # [B, 1, 1, S]
  tgt_visible = (tgt_in != 0)[:, None, None, :]
  causal = np.tril(np.ones((5, 5), bool))
  visible = {'encoder_self': src_visible, 'cross': src_visible,
             'decoder_self': tgt_visible & causal}
  for kind, w in weights.items():
    mask = np.broadcast_to(visible[kind], w.shape[1:])
    for layer in w:
      np.testing.assert_allclose(layer.sum(-1), 1.0, atol=1e-5, err_msg=kind)
      assert np.all(layer[~mask] == 0.0), f'{kind}: weight on a masked key'
      assert np.all(layer[mask] > 0.0), f'{kind}: zero weight on a visible key'
  # The first decoder position sees only itself (Sec 3.2.3).
  np.testing.assert_array_equal(weights['decoder_self'][:, :, :, 0, 0], 1.0)


def _attend_with(attention: model_lib.MultiHeadAttention, inputs_kv, probs):
  """The attention sub-layer's output from given probabilities [B, N, T, S]."""
  _, value = attention.project_key_value(inputs_kv)  # [B, S, N, H]
  heads = jnp.einsum('bnts,bsnh->btnh', probs, value)  # [B, T, N, H]
  return (jnp.einsum('btnh,nhd->btd', heads, attention.out_kernel[...])
          + attention.out_bias[...])  # [B, T, D]


def test_weights_reproduce_the_model_outputs(tiny_model, batch, weights):
  """Every layer's weights, with the model's value and output projections, give back
  the model's own encoder output and logits (computed by jax.nn.dot_product_attention)."""
  src, tgt_in = batch
  m = tiny_model
  x = m.encoder.embed_tokens(src, None, deterministic=True)
  for layer, probs in zip(m.encoder.layers, weights['encoder_self']):
    x = layer.attention_residual(x, lambda h: _attend_with(layer.self_attention, h, probs))
    x = layer.ffn_residual(x, layer.feed_forward)
  encoded = m.encoder.normalize_output(x)
  np.testing.assert_allclose(encoded, m.encode(src), atol=RECOMPUTE_ATOL)

  y = m.decoder.embed_tokens(tgt_in, None, deterministic=True)
  for layer, self_probs, cross_probs in zip(m.decoder.layers, weights['decoder_self'],
                                            weights['cross']):
    y = layer.self_attention_residual(
        y, lambda h: _attend_with(layer.self_attention, h, self_probs))
    y = layer.cross_attention_residual(
        y, lambda h: _attend_with(layer.cross_attention, encoded, cross_probs))
    y = layer.ffn_residual(y, layer.feed_forward)
  logits = m.decoder.logits(y)
  np.testing.assert_allclose(logits, m(src, tgt_in), atol=RECOMPUTE_ATOL)
  # The check has teeth: another head's weights give a different output.
  swapped = weights['cross'][-1][:, ::-1]
  y_wrong = layer.cross_attention_residual(
      y, lambda h: _attend_with(layer.cross_attention, encoded, swapped))
  assert np.abs(np.asarray(y_wrong - y)).max() > 1e-2


def _softmax_rows(rng, *shape):
  x = np.exp(2 * rng.normal(size=shape))
  return x / x.sum(-1, keepdims=True)


def test_attention_figures_are_pngs_of_the_documented_size(tmp_path):
  rng = np.random.default_rng(0)
  source = ['\u2581A', '\u2581man', '\u2581rides', '.', '</s>']
  target = ['<s>', '\u2581Ein', '\u2581Mann', '.']
  layers, heads = 2, 6
  w = {'encoder_self': _softmax_rows(rng, layers, heads, 5, 5),
       'decoder_self': _softmax_rows(rng, layers, heads, 4, 4),
       'cross': _softmax_rows(rng, layers, heads, 4, 5)}
  paths = attention_plots.write_attention_figures(w, source, target, str(tmp_path))
  names = sorted(p.rsplit('/', 1)[-1] for p in paths)
  assert names == sorted([f'{k}_layer{l}.png' for k in w for l in range(layers)]
                         + ['cross_alignment.png'])
  expected = {'encoder_self': attention_plots.head_grid_size(heads, 5, 5),
              'decoder_self': attention_plots.head_grid_size(heads, 4, 4),
              'cross': attention_plots.head_grid_size(heads, 4, 5)}
  for kind, size in expected.items():
    with Image.open(tmp_path / f'{kind}_layer1.png') as image:
      image.verify()
    with Image.open(tmp_path / f'{kind}_layer1.png') as image:
      assert image.format == 'PNG' and image.size == size
  # Six heads in rows of four: two rows; the grid is wider than tall.
  assert expected['cross'][0] > expected['cross'][1]
  with Image.open(tmp_path / 'cross_alignment.png') as image:
    assert image.size == attention_plots.alignment_size(4, 5)
  with pytest.raises(ValueError, match='4 x 5 but there are 4 query tokens and 3 key'):
    attention_plots.plot_head_grid(w['cross'][0], target, source[:3], str(tmp_path / 'x.png'))


def test_decoder_rows_are_labelled_by_the_token_they_predict(tmp_path, monkeypatch):
  # Position t of the decoder is fed '<s> Ein Mann'[t] and predicts 'Ein Mann </s>'[t]:
  # its attention row belongs to the predicted token.
  source = ['\u2581A', '\u2581man', '</s>']
  target = ['<s>', '\u2581Ein', '\u2581Mann']
  predicted = ['\u2581Ein', '\u2581Mann', '</s>']
  assert attention_plots.predicted_from_target(target) == predicted
  assert attention_plots.axis_tokens('cross', source, target) == (predicted, source)
  assert attention_plots.axis_tokens('decoder_self', source, target) == (predicted, target)
  assert attention_plots.axis_tokens('encoder_self', source, target) == (source, source)
  drawn = {}
  monkeypatch.setattr(attention_plots, 'plot_head_grid',
                      lambda w, rows, cols, path, title: drawn.setdefault(
                          os.path.basename(path), (rows, cols)) and path)
  monkeypatch.setattr(attention_plots, 'plot_alignment',
                      lambda w, rows, cols, path, title: drawn.setdefault(
                          os.path.basename(path), (rows, cols)) and path)
  w = {'encoder_self': np.ones((1, 1, 3, 3)) / 3, 'decoder_self': np.ones((1, 1, 3, 3)) / 3,
       'cross': np.ones((1, 1, 3, 3)) / 3}
  attention_plots.write_attention_figures(w, source, target, str(tmp_path))
  assert drawn['cross_alignment.png'] == (predicted, source)
  assert drawn['cross_layer0.png'] == (predicted, source)
  assert drawn['decoder_self_layer0.png'] == (predicted, target)
  assert drawn['encoder_self_layer0.png'] == (source, source)


def test_importing_the_plots_leaves_matplotlib_alone():
  code = ('import sys, matplotlib; before = matplotlib.rcParams._get_backend_or_none(); '
          'import transformer_jax.viz.attention_plots, transformer_jax.viz.attention_page; '
          'assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"; '
          'assert matplotlib.rcParams._get_backend_or_none() == before, "backend set"')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).resolve().parents[1],
                          env={k: v for k, v in os.environ.items() if k != 'MPLBACKEND'})
  assert result.returncode == 0, result.stderr[-2000:]


def test_positional_encoding_figure(tmp_path):
  table = attention_plots.sinusoid_table(50, 16)
  # Sec 3.5 at known points: PE(pos, 0) = sin(pos), PE(pos, 1) = cos(pos),
  # PE(pos, 2) = sin(pos / 10000^(2/16)).
  np.testing.assert_allclose(table[:, 0], np.sin(np.arange(50)), atol=1e-6)
  np.testing.assert_allclose(table[:, 1], np.cos(np.arange(50)), atol=1e-6)
  np.testing.assert_allclose(table[7, 2], np.sin(7 / 10000 ** (2 / 16)), atol=1e-6)
  # The same table as the model's.
  np.testing.assert_allclose(
      table, model_lib.sinusoidal_positions(jnp.arange(50), 16), atol=1e-5)
  sinusoid_only = attention_plots.plot_positional_encodings(table, str(tmp_path / 'a.png'))
  with Image.open(sinusoid_only) as image:
    assert image.format == 'PNG' and image.size == attention_plots.positional_size(False)
  learned = np.random.default_rng(0).normal(size=(50, 16))
  both = attention_plots.plot_positional_encodings(table, str(tmp_path / 'b.png'),
                                                   learned=learned)
  with Image.open(both) as image:
    assert image.size == attention_plots.positional_size(True)


# ----------------------------------------------------------------------------
# The explore CLI on a checkpoint written the way training writes it.

TEXT = 'A man rides a bike.'


@pytest.fixture(scope='session')
def explore_workdir(shared_data, tmp_path_factory):
  """A workdir with config.json, a SentencePiece vocabulary trained on Multi30k and
  one checkpoint of a random learned-position model (max_len 24)."""
  from configs import tiny
  from transformer_jax.run import checkpoint as checkpoint_lib
  from transformer_jax.data import tokenizer as tokenizer_lib
  from transformer_jax.run.workdir import Workdir
  workdir = str(tmp_path_factory.mktemp('explore_workdir'))
  config = tiny.get_config()
  config.model.positions = 'learned'
  config.model.max_len = 24
  Workdir.create(workdir, config)

  def sentences():
    for lang in ('en', 'de'):
      with gzip.open(shared_data / 'multi30k' / f'train.{lang}.gz', 'rt') as f:
        yield from (line.strip() for line in itertools.islice(f, 1000))

  tokenizer = tokenizer_lib.train_tokenizer(
      sentences(), os.path.join(workdir, 'vocab', 'spm.model'),
      vocab_size=config.data.vocab_size, model_type='unigram')
  cfg = model_lib.TransformerConfig.from_config(config.model, tokenizer.vocab_size)
  params = nnx.state(model_lib.Transformer(cfg, rngs=nnx.Rngs(1)), nnx.Param)
  meta = {'vocab_fingerprint': tokenizer.fingerprint()['sha256'],
          'vocab_size': tokenizer.vocab_size,
          'param_shapes': checkpoint_lib.param_shapes(params)}
  ckpt = checkpoint_lib.TrainCheckpointer(workdir, config.checkpoint)
  ckpt.save(10, params, {'count': np.zeros((), np.int32)}, {}, meta, force=True)
  ckpt.close()
  return workdir


def _run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'transformer_jax.explore', *args],
                        capture_output=True, text=True, timeout=600,
                        cwd=pathlib.Path(__file__).resolve().parents[1])


def _page_data(path):
  page = path.read_text(encoding='utf-8')
  start = page.index('<script type="application/json" id="attention-data">')
  start = page.index('>', start) + 1
  return json.loads(page[start:page.index('</script>', start)])


def test_cli_writes_figures_and_page_for_the_translation(explore_workdir, tmp_path):
  import sentencepiece as spm
  from transformer_jax import explore
  out = tmp_path / 'out'
  result = _run_cli(f'--workdir={explore_workdir}', '--text', TEXT, f'--output={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'source:      {TEXT}' in result.stdout
  assert 'step 10' in result.stdout

  data = _page_data(out / 'attention.html')
  sp = spm.SentencePieceProcessor(model_file=os.path.join(explore_workdir, 'vocab',
                                                          'spm.model'))
  source, target = data['tokens']['source'], data['tokens']['target']
  assert source == sp.encode(TEXT, out_type=str) + ['</s>']
  # Decoder rows are labelled by what they predict: the translation, then '</s>'.
  assert data['tokens']['predicted'] == target[1:] + ['</s>']
  assert data['kinds']['cross']['query'] == 'predicted'
  assert data['kinds']['decoder_self']['key'] == 'target'
  # Output length <= source length + config.eval.max_extra_length (5), after '<s>'.
  assert target[0] == '<s>' and 2 <= len(target) <= 1 + len(source) + 5
  translation_ids = [sp.piece_to_id(p) for p in target[1:]]
  printed = result.stdout.split('translation: ', 1)[1].split('\n', 1)[0]
  assert printed == sp.decode(translation_ids)

  # The page holds the model's attention for exactly this source and translation.
  loaded = Translator.from_workdir(explore_workdir, use_mesh=False)
  expected = explore.explore_ids(loaded.model, sp.encode(TEXT) + [1], translation_ids)
  for kind, w in expected.items():
    np.testing.assert_allclose(np.array(data['kinds'][kind]['weights']), w, atol=1e-4,
                               err_msg=kind)

  s, t, heads = len(source), len(target), loaded.model.cfg.num_heads
  sizes = {'encoder_self_layer0.png': attention_plots.head_grid_size(heads, s, s),
           'decoder_self_layer0.png': attention_plots.head_grid_size(heads, t, t),
           'cross_layer0.png': attention_plots.head_grid_size(heads, t, s),
           'cross_alignment.png': attention_plots.alignment_size(t, s),
           'positional_encoding.png': attention_plots.positional_size(True)}
  assert sorted(p.name for p in out.iterdir()) == sorted([*sizes, 'attention.html'])
  for name, size in sizes.items():
    with Image.open(out / name) as image:
      assert image.format == 'PNG' and image.size == size, name


def test_cli_without_a_checkpoint_is_a_clear_error(explore_workdir, tmp_path):
  shutil.copy(os.path.join(explore_workdir, 'config.json'), tmp_path / 'config.json')
  result = _run_cli(f'--workdir={tmp_path}', '--text', TEXT)
  assert result.returncode == 1
  assert 'explore: No checkpoints in' in result.stderr
  assert 'Traceback' not in result.stderr
  result = _run_cli(f'--workdir={tmp_path / "missing"}', '--text', TEXT)
  assert result.returncode == 1
  assert 'explore: Workdir' in result.stderr and 'does not exist' in result.stderr


def test_sentence_longer_than_the_model_is_a_clear_error(explore_workdir):
  from transformer_jax import explore
  loaded = Translator.from_workdir(explore_workdir, use_mesh=False)
  text = ' '.join(['bicycle'] * 30)
  with pytest.raises(ValueError, match=r"tokens long \(with eos\), more than the "
                                       r"model's maximum length of 24"):
    explore.explore_text(loaded, text)
  with pytest.raises(ValueError, match='empty'):
    explore.explore_text(loaded, '   ')


# --- the other families: self-attention only ------------------------------------


def test_explore_lm_rows_are_the_next_character_predictions(lm_run):
  from transformer_jax import explore
  from transformer_jax.inference import sampling
  loaded = Workdir.open(lm_run.path).load()
  text = 'ROMEO: ab'
  exploration = explore.explore_lm(loaded.model, loaded.vocab, text)
  w = exploration.weights['decoder_self']
  cfg = loaded.model.cfg
  assert set(exploration.weights) == {'decoder_self'}
  assert w.shape == (cfg.num_decoder_layers, cfg.num_heads, len(text), len(text))
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  assert np.all(np.triu(w, k=1) == 0)  # Masked: nothing attends to a later character.
  assert exploration.target_tokens == ['R', 'O', 'M', 'E', 'O', ':', '\u2423', 'a', 'b']
  # Row t is what the model predicts after the first t + 1 characters (greedy): the
  # sampler's greedy continuation of each prefix by one character.
  sampler = sampling.Sampler(loaded.model, loaded.vocab)
  rows = (0, 4, len(text) - 1)
  prefixes = [loaded.vocab.encode(text[:t + 1]) for t in rows]  # One batch, one compile.
  following = sampler.sample_ids(prefixes, max_new_tokens=1, temperature=0)
  assert [exploration.predicted_tokens[t] for t in rows] == [
      explore.char_label(loaded.vocab, ids[-1]) for ids in following]
  page = exploration.page().to_html()
  assert 'text: ROMEO: ab' in page and 'next characters (greedy): ' in page
  assert 'translation:' not in page


def test_explore_classifier_shows_encoder_attention_and_the_label(classifier_run):
  from transformer_jax import classify, explore
  loaded = Workdir.open(classifier_run.path).load()
  text = 'the big dog runs'
  exploration = explore.explore_classifier(loaded.model, loaded.vocab, text,
                                           ('negative', 'positive'), 16)
  assert exploration.source_tokens == ['[CLS]', '▁the', '▁big', '▁dog', '▁runs']
  w = exploration.weights['encoder_self']
  assert set(exploration.weights) == {'encoder_self'}
  assert w.shape == (1, loaded.model.cfg.num_heads, 5, 5)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  probs, _ = classify.Classifier(loaded.model, loaded.vocab, classifier_run.config,
                                 ('negative', 'positive')).predict([text])
  label = ('negative', 'positive')[int(np.argmax(probs[0]))]
  assert exploration.translation == f'{label} (p = {np.max(probs[0]):.3f})'
  with pytest.raises(ValueError, match=r'17 tokens long \(with \[CLS\]\), more than the '
                                       r'model reads \(config.data.max_length=16\)'):
    explore.explore_classifier(loaded.model, loaded.vocab, ' '.join(['cat'] * 16),
                               ('negative', 'positive'), 16)


def test_cli_explores_a_language_model_and_refuses_a_search_for_a_classifier(
    lm_run, classifier_run, tmp_path):
  out = tmp_path / 'lm'
  result = _run_cli(f'--workdir={lm_run.path}', '--text=ROMEO:', '--average_last=2',
                    f'--output={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'text:        ROMEO:' in result.stdout and 'step 6' in result.stdout
  assert sorted(p.name for p in out.iterdir()) == [
      'attention.html', 'decoder_self_layer0.png', 'positional_encoding.png']
  data = _page_data(out / 'attention.html')
  assert list(data['kinds']) == ['decoder_self'] and data['tokens']['source'] == []
  assert data['tokens']['target'] == list('ROMEO:')
  with Image.open(out / 'positional_encoding.png') as image:  # With the learned table.
    assert image.size == attention_plots.positional_size(True)
  result = _run_cli(f'--workdir={classifier_run.path}', '--text=the cat',
                    '--beam_size=2')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f'explore: --beam_size applies to translation models; {classifier_run.path} holds '
      'an encoder_only model, which explore shows without a search.')
