"""Export to CTranslate2 and Hugging Face MarianMT, checked against our own model.

- CTranslate2's teacher-forced log-probabilities equal ours (1e-4) for post-LN with
  shared embeddings and sinusoids, and for pre-LN with separate embeddings, learned
  positions and a head dim apart from d_model / heads: every weight is in its place.
- Our beam search under ``beam_rules='ctranslate2'`` returns CTranslate2's n-best
  lists and scores (1e-4): on random models with peaked distributions where EOS
  competes (many sentences stop at the length limit, many n-best lists mix both), and
  on the trained copy model (conftest's ``copy_run``) through the CLI's export, raw
  text in, ctranslate2 + sentencepiece. The paper's rules give other lists there, so
  a wrong length penalty or stopping rule fails the check. The int8 export still
  copies.
- The MarianMT directory holds the expected files and tensor shapes; where torch and
  transformers are installed (requirements-huggingface.txt, not CI) its logits equal
  ours (1e-3: Marian's LayerNorm epsilon is 1e-5, ours 1e-6).
- Bad input: existing output, no checkpoint, options a format cannot hold.
"""

import json
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx

from transformer_jax import model as model_lib
from transformer_jax.inference import export
from transformer_jax.inference import search as search_lib
from transformer_jax.inference.translator import Translator

from conftest import copy_sentence as _sentence
from test_translate import REPO, workdir  # noqa: F401  (module fixture)

ctranslate2 = pytest.importorskip('ctranslate2')


def _random_params(seed=0, eos_scale=None, **overrides):
  """A random 2+2-layer model and its flat parameters, norms and biases perturbed so
  that a misplaced scale or bias shows. With ``eos_scale`` the (shared) embedding is
  scaled by 3 and its eos row by ``eos_scale`` more: peaked next-token distributions
  in which eos competes with going on, so that the beam's rules decide outputs."""
  cfg = model_lib.TransformerConfig(vocab_size=30, num_encoder_layers=2,
                                    num_decoder_layers=2, d_model=16, num_heads=4,
                                    d_ff=32, max_len=32, **overrides)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(seed))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(seed)
  params = {}
  for path, variable in flat:
    value = np.asarray(variable.get_value(), np.float32)
    if path[-1] in ('bias', 'scale', 'bi', 'bo'):
      value = value + rng.normal(0, 0.2, value.shape).astype(np.float32)
    if eos_scale is not None and path[-1] == 'embedding':
      value = value * 3.0
      value[1] *= eos_scale
    params['/'.join(map(str, path))] = value
    variable.set_value(jnp.asarray(value))
  nnx.update(model, nnx.from_flat_state(flat))
  return model, cfg, params


PIECES = ['<pad>', '</s>', '<s>', '<unk>'] + [f'w{i}' for i in range(26)]


@pytest.mark.parametrize('overrides', [
    {},
    {'layer_norm': 'pre', 'positions': 'learned', 'share_embeddings': False,
     'head_dim': 8},
], ids=['post_shared_sinusoidal', 'pre_separate_learned_headdim8'])
def test_ctranslate2_log_probs_equal_ours(overrides, tmp_path):
  model, cfg, params = _random_params(**overrides)
  spec = export.ctranslate2_spec(params, cfg, PIECES, max_positions=64)

  class Loaded(ctranslate2.converters.Converter):
    def _load(self):
      return spec

  out = Loaded().convert(str(tmp_path / 'ct2'))
  translator = ctranslate2.Translator(out, device='cpu')
  pairs = [([4, 9, 12, 7, 20], [5, 6, 17, 8]), ([11], [29, 28, 27, 26, 25, 24, 23])]
  for source, target in pairs:
    result = translator.score_batch([[PIECES[i] for i in source]],
                                    [[PIECES[i] for i in target]])[0]
    logits = model(jnp.array([source + [1]]),
                   model_lib.shift_right(jnp.array([target + [1]])))
    log_probs = jax.nn.log_softmax(logits[0], axis=-1)
    ours = np.array([log_probs[t, i] for t, i in enumerate(target + [1])])
    np.testing.assert_allclose(result.log_probs, ours, atol=1e-4)


def _ct2_translator(spec, out):
  class Loaded(ctranslate2.converters.Converter):
    def _load(self):
      return spec

  return ctranslate2.Translator(Loaded().convert(out), device='cpu')


def _ct2_n_best(translator, sources, pieces, *, beam_size, alpha, max_extra_length):
  """CTranslate2's ``beam_size`` best (ids without eos or pad, score) per source (ids
  without eos), with our per-sentence output limit (``export.ctranslate2_translate``)."""
  out = []
  for source in sources:
    result = translator.translate_batch(
        [[pieces[i] for i in source]], beam_size=beam_size, length_penalty=alpha,
        max_decoding_length=len(source) + 1 + max_extra_length, max_input_length=0,
        num_hypotheses=beam_size, return_scores=True)[0]
    # A random model may emit <pad>, which our ids drop (search.strip_eos).
    out.append([([pieces.index(p) for p in h if p != '<pad>'], s)
                for h, s in zip(result.hypotheses, result.scores)])
  return out


def _assert_same_n_best(ours, theirs):
  for mine, other in zip(ours, theirs, strict=True):
    assert [ids for ids, _ in mine] == [ids for ids, _ in other]
    np.testing.assert_allclose([s for _, s in mine], [s for _, s in other], atol=1e-4)


def test_ctranslate2_rules_give_ctranslate2s_n_best_on_random_models(tmp_path):
  rng = np.random.default_rng(0)
  at_limit = differ_under_paper = 0
  # Seeds and scales where P(eos) is about 0.3 (median) and 0.1 over random contexts.
  for seed, eos_scale, k, alpha, extra in [(1, -1.0, 4, 0.6, 6), (2, -3.0, 3, 1.0, 4)]:
    model, cfg, params = _random_params(seed, eos_scale)
    translator = _ct2_translator(export.ctranslate2_spec(params, cfg, PIECES, max_positions=64),
                                 str(tmp_path / f'ct2-{seed}'))
    sources = [list(rng.integers(4, 30, rng.integers(1, 6))) for _ in range(12)]
    src = np.zeros((len(sources), 6), np.int32)
    for row, source in enumerate(sources):
      src[row, :len(source) + 1] = source + [1]
    theirs = _ct2_n_best(translator, sources, PIECES, beam_size=k, alpha=alpha,
                         max_extra_length=extra)
    graphdef, state = nnx.split(model)
    ours = {}
    for rules in search_lib.BEAM_RULES:
      tokens, scores = jax.jit(lambda state, src: search_lib.search_model(
          graphdef, state, src, beam_size=k, alpha=alpha, max_extra_len=extra,
          max_decode_len=6 + extra, beam_rules=rules))(state, jnp.asarray(src))
      ours[rules] = [[(search_lib.strip_eos(t), float(s)) for t, s in zip(ts, ss)]
                     for ts, ss in zip(np.asarray(tokens), np.asarray(scores))]
    _assert_same_n_best(ours['ctranslate2'], theirs)
    at_limit += sum(len(ids) == len(s) + 1 + extra for s, row in zip(sources, theirs)
                    for ids, _ in row)
    differ_under_paper += sum([i for i, _ in a] != [i for i, _ in b]
                              for a, b in zip(ours['paper'], theirs))
  assert at_limit >= 10 and differ_under_paper >= 5, (at_limit, differ_under_paper)


@pytest.fixture(scope='module')
def ct2_dir(workdir, tmp_path_factory):  # noqa: F811
  """The CLI's CTranslate2 export of the trained copy model."""
  out = str(tmp_path_factory.mktemp('exports') / 'ct2')
  run = subprocess.run(
      [sys.executable, '-m', 'transformer_jax.export', f'--workdir={workdir.path}',
       '--to=ctranslate2', f'--output={out}'],
      capture_output=True, text=True, timeout=600, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert run.returncode == 0, run.stderr
  return out


def _ct2_lines(model_dir, lines, eval_cfg):
  sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, 'spm.model'))
  translator = ctranslate2.Translator(model_dir, device='cpu')
  pieces = export.ctranslate2_translate(
      translator, [sp.encode(line, out_type=str) for line in lines],
      beam_size=eval_cfg.beam_size, length_penalty=eval_cfg.length_penalty,
      max_extra_length=eval_cfg.max_extra_length)
  return [sp.decode(p) for p in pieces]


def test_ctranslate2_export_translates_raw_text_as_our_beam_search(
    workdir, ct2_dir, tmp_path):  # noqa: F811
  assert {'model.bin', 'config.json', 'spm.model'} <= set(os.listdir(ct2_dir))
  rng = random.Random(1)
  lines = [_sentence(rng) for _ in range(24)]
  eval_cfg = workdir.config.eval
  ours = Translator.from_workdir(workdir.path, use_mesh=False).translate(lines)
  theirs = _ct2_lines(ct2_dir, lines, eval_cfg)
  assert theirs == ours
  assert sum(t == line for t, line in zip(theirs, lines)) >= 20  # It copies.

  # n-best lists and scores under CTranslate2's rules, beam 4: the alternatives to
  # the copy are where the length penalty and the stopping rule decide.
  sp = spm.SentencePieceProcessor(model_file=os.path.join(ct2_dir, 'spm.model'))
  pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  translator = Translator.from_workdir(workdir.path, use_mesh=False, beam_size=4,
                                       beam_rules='ctranslate2')
  ours_n_best = [[(h.ids, h.score) for h in row]
                 for row in translator.translate(lines, n_best=4)]
  theirs_n_best = _ct2_n_best(ctranslate2.Translator(ct2_dir, device='cpu'),
                              [sp.encode(line) for line in lines], pieces, beam_size=4,
                              alpha=eval_cfg.length_penalty,
                              max_extra_length=eval_cfg.max_extra_length)
  _assert_same_n_best(ours_n_best, theirs_n_best)
  paper = translator.with_search(beam_rules='paper').translate(lines, n_best=4)
  assert sum([h.ids for h in a] != [ids for ids, _ in b]
             for a, b in zip(paper, theirs_n_best)) >= 1

  # A short position table, so that the weights dominate the file sizes.
  sizes = {}
  for quantization in ('int8', 'float32'):
    out = export.to_ctranslate2(workdir.path, str(tmp_path / quantization),
                                quantization=quantization, max_positions=20)
    sizes[quantization] = os.path.getsize(os.path.join(out, 'model.bin'))
  assert sizes['int8'] < sizes['float32'] / 2.5, sizes
  int8 = str(tmp_path / 'int8')
  int8_lines = _ct2_lines(int8, lines, eval_cfg)
  assert sum(a == b for a, b in zip(int8_lines, ours)) >= 20


def test_huggingface_export_files_shapes_and_logits(workdir, tmp_path):  # noqa: F811
  out = export.to_huggingface(workdir.path, str(tmp_path / 'hf'))
  assert set(os.listdir(out)) == {'config.json', 'model.safetensors', 'source.spm',
                                  'target.spm', 'vocab.json', 'tokenizer_config.json'}
  restored = export.restore_for_export(workdir.path)
  cfg = restored.cfg
  with open(os.path.join(out, 'config.json')) as f:
    config = json.load(f)
  assert (config['d_model'], config['encoder_layers'], config['decoder_attention_heads'],
          config['decoder_start_token_id'], config['pad_token_id'],
          config['scale_embedding']) == (cfg.d_model, cfg.num_encoder_layers,
                                         cfg.num_heads, 2, 0, True)
  with open(os.path.join(out, 'vocab.json')) as f:
    vocab = json.load(f)
  assert [vocab[p] for p in ('<pad>', '</s>', '<s>', '<unk>')] == [0, 1, 2, 3]
  from safetensors.numpy import load_file
  tensors = load_file(os.path.join(out, 'model.safetensors'))
  d, f_, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  expected = {'model.shared.weight': (v, d), 'lm_head.weight': (v, d),
              'final_logits_bias': (1, v),
              'model.encoder.layers.0.self_attn.q_proj.weight': (d, d),
              'model.decoder.layers.0.encoder_attn.out_proj.bias': (d,),
              'model.decoder.layers.0.fc1.weight': (f_, d),
              'model.decoder.layers.0.final_layer_norm.weight': (d,)}
  assert {k: tensors[k].shape for k in expected} == expected
  assert len(tensors) == 5 + 16 * cfg.num_encoder_layers + 26 * cfg.num_decoder_layers
  # Sec 3.5's interleaved sinusoid, permuted to Marian's [sin | cos] halves.
  perm = export.marian_permutation(d)
  np.testing.assert_allclose(export.sinusoid_table(5, d)[:, perm][:, :d // 2],
                             np.sin(np.arange(5)[:, None] / 10000 ** (
                                 np.arange(0, d, 2) / d)), atol=1e-6)

  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  import torch
  hf = transformers.MarianMTModel.from_pretrained(out).eval()
  tokenizer = transformers.MarianTokenizer.from_pretrained(out)
  lines = ['the cat runs', 'a big red dog sleeps on cat']
  batch = tokenizer(lines, return_tensors='pt', padding=True)
  ours_model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  flat = nnx.to_flat_state(nnx.state(ours_model, nnx.Param))
  for path, variable in flat:
    variable.set_value(jnp.asarray(restored.params['/'.join(map(str, path))]))
  nnx.update(ours_model, nnx.from_flat_state(flat))
  src = batch['input_ids'].numpy().astype(np.int32)
  tgt_in = model_lib.shift_right(jnp.asarray(src))  # Copying: the target is the source.
  with torch.no_grad():
    logits = hf(**batch, decoder_input_ids=torch.from_numpy(np.asarray(tgt_in))).logits
  ours = np.asarray(ours_model(jnp.asarray(src), tgt_in))
  valid = src != 0
  np.testing.assert_allclose(logits.numpy()[valid], ours[valid], atol=1e-3)
  generated = hf.generate(**batch, num_beams=2, max_new_tokens=12)
  assert tokenizer.batch_decode(generated, skip_special_tokens=True) == lines


def test_bad_input_is_a_clear_error(workdir, ct2_dir, tmp_path):  # noqa: F811
  run = subprocess.run(
      [sys.executable, '-m', 'transformer_jax.export', f'--workdir={workdir.path}',
       '--to=ctranslate2', f'--output={ct2_dir}'],
      capture_output=True, text=True, timeout=600, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1] == (
      f'export: Output {ct2_dir} already exists; pass --force to replace it.')
  with pytest.raises(export.ExportError, match='would overwrite the workdir'):
    export.to_huggingface(workdir.path, workdir.path, force=True)

  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'config.json').write_text(open(os.path.join(workdir.path, 'config.json')).read())
  with pytest.raises(export.ExportError, match='No checkpoints'):
    export.to_ctranslate2(str(empty), str(tmp_path / 'out'))
  with pytest.raises(export.ExportError, match='does not exist'):
    export.to_ctranslate2(str(tmp_path / 'missing'), str(tmp_path / 'out'))
  with pytest.raises(export.ExportError, match='quantization'):
    export.to_ctranslate2(workdir.path, str(tmp_path / 'out'), quantization='int4')

  _, pre, params = _random_params(layer_norm='pre')
  with pytest.raises(export.ExportError, match='MarianMT is post-LN'):
    export.marian_state_dict(params, pre)
  _, learned, params = _random_params(positions='learned')
  with pytest.raises(export.ExportError, match='positions=learned'):
    export.marian_state_dict(params, learned)
  _, row_b, params = _random_params(key_dim=2)
  with pytest.raises(export.ExportError, match='key_dim=2'):
    export.ctranslate2_spec(params, row_b, PIECES)
  _, rope, rope_params = _random_params(positions='rope', norm='rmsnorm')
  with pytest.raises(export.ExportError, match="positions='rope', norm='rmsnorm'"):
    export.ctranslate2_spec(rope_params, rope, PIECES)
  scanned = {k.replace('layers/0/', 'layers/stacked/'): v for k, v in params.items()}
  with pytest.raises(export.ExportError, match='scanned'):
    export.ctranslate2_spec(scanned, row_b, PIECES)
