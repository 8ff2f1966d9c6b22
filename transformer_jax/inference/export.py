"""Export a trained workdir to CTranslate2 and to a Hugging Face MarianMT directory.

  to_ctranslate2(workdir, output, quantization='int8')   # ctranslate2.Translator(output)
  to_huggingface(workdir, output)                        # MarianMTModel.from_pretrained(output)

Both restore the checkpoint (one step, or the mean of the last K) through
``restore_for_export`` and map our parameter tree onto the target's layout; the
CLI is ``python -m transformer_jax.export``.

CTranslate2: the spec is ctranslate2's own ``TransformerSpec``, filled as its
OpenNMT-py and Marian converters fill it, and written by its ``Converter`` (validation,
quantization, model.bin). Our positional encodings (sinusoidal with sines and cosines
interleaved, Sec 3.5, or a learned table) are written as an explicit position table, so
the engine adds exactly our vectors. The SentencePiece model is copied beside model.bin.

Hugging Face: MarianMT is a post-LN Transformer with sqrt(d_model)-scaled embeddings
and sinusoidal positions, but its sinusoids are laid out [sin | cos] (first half sines,
second half cosines) where the paper and we interleave them. Permuting the model
dimension D of every weight by the same permutation changes nothing else (layer norm,
attention and the FFN are equivariant to it), so the export permutes D into Marian's
order instead of approximating. Differences that remain: Marian's LayerNorm epsilon is
fixed at 1e-5 (ours 1e-6; logits differ by ~1e-4, see benchmarks/verify_export.py),
and it cannot hold pre-LN layers or learned positions (clear errors).

Shapes: V vocabulary, D d_model, N heads, H head dim, F d_ff, P positions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping

import numpy as np

from transformer_jax import model as model_lib
from transformer_jax.data import tokenizer as tokenizer_lib

Params = Mapping[str, np.ndarray]  # 'encoder/layers/0/self_attention/query_kernel' -> array

QUANTIZATIONS = ('int8', 'int8_float32', 'int16', 'float16', 'bfloat16', 'float32')
# Rows of the exported sinusoidal table: the longest sequence the engine can run
# (Marian's converter in ctranslate2 writes 2048; transformers' Marian default is 512).
DEFAULT_MAX_POSITIONS = 1024


class ExportError(ValueError):
  """The workdir cannot be exported (missing checkpoint, unsupported option, bad output)."""


@dataclasses.dataclass
class Restored:
  """What an exporter needs from a workdir."""
  params: dict[str, np.ndarray]  # Flat parameter tree, '/'-joined paths, float32.
  cfg: model_lib.TransformerConfig
  vocab_path: str  # The SentencePiece model.
  step: int  # The (last averaged) checkpoint step.
  config: object  # The workdir's ConfigDict.


def restore_for_export(workdir: str, *, step: int | None = None,
                       average_last: int | None = None) -> Restored:
  """Restores a workdir's parameters on the host through ``run.workdir.Workdir``.

  Raises:
    ExportError: no workdir, config, checkpoint or vocabulary; too few checkpoints
      to average.
  """
  from flax import nnx
  from transformer_jax.run import workdir as workdir_lib
  try:
    wd = workdir_lib.Workdir.open(workdir)
    restored = wd.restore(step, average_last)
    vocab_path = wd.tokenizer().path
  except (FileNotFoundError, ValueError) as e:
    raise ExportError(str(e)) from e
  state = restored.params
  if wd.config.model.get('scan_layers'):
    # The exporters name one parameter set per layer: unstack the scanned layers.
    from transformer_jax.model import stacking
    state = stacking.unstack_params(state)
  params = {'/'.join(map(str, path)): np.array(v.get_value(), np.float32)
            for path, v in nnx.to_flat_state(state)}
  cfg = model_lib.TransformerConfig.from_config(wd.config.model,
                                                int(restored.meta['vocab_size']))
  return Restored(params, cfg, vocab_path, restored.step, wd.config)


def vocabulary(vocab_path: str, vocab_size: int) -> list[str]:
  """The SentencePiece pieces by id (pad 0, eos 1, bos 2, unk 3), checked against V."""
  tokenizer = tokenizer_lib.Tokenizer(vocab_path)
  if tokenizer.vocab_size != vocab_size:
    raise ExportError(f'{vocab_path} has {tokenizer.vocab_size} pieces but the checkpoint '
                      f'has a {vocab_size}-token embedding.')
  return [tokenizer.id_to_piece(i) for i in range(vocab_size)]


def check_supported(cfg: model_lib.TransformerConfig, params: Params, target: str) -> None:
  """Raises ExportError naming the first option ``target`` cannot express."""
  if any(key.startswith(('encoder/layers/', 'decoder/layers/'))
         and not key.split('/')[2].isdigit() for key in params):
    raise ExportError(f'{target} export needs one parameter set per layer; this checkpoint '
                      'stacks the layers (scanned layout).')
  modern = [f'{name}={getattr(cfg, name)!r}' for name, paper in (
      ('positions', ('sinusoidal', 'learned')), ('norm', ('layernorm',)),
      ('feed_forward', ('relu',)), ('use_bias', (True,))) if getattr(cfg, name) not in paper]
  if modern:
    raise ExportError(f'{target} export writes the paper\'s layers only; this model has '
                      f'{", ".join(modern)} (RoPE/ALiBi, RMSNorm, gated FFNs and bias-free '
                      'linears are not mapped).')
  if cfg.key_dim is not None and cfg.key_dim != cfg.qkv_head_dim:
    raise ExportError(f'{target} cannot hold key_dim={cfg.key_dim} != head dim '
                      f'{cfg.qkv_head_dim} (Table 3 row B): queries/keys and values must '
                      'share the head dimension.')
  if target == 'huggingface':
    if cfg.layer_norm != 'post':
      raise ExportError('MarianMT is post-LN; layer_norm=pre cannot be exported to it '
                        '(use --to=ctranslate2).')
    if cfg.positions != 'sinusoidal':
      raise ExportError('MarianMT positions are fixed sinusoids; positions=learned cannot '
                        'be exported to it (use --to=ctranslate2).')
    if cfg.qkv_head_dim * cfg.num_heads != cfg.d_model:
      raise ExportError(f'MarianMT needs num_heads * head_dim == d_model; got '
                        f'{cfg.num_heads} * {cfg.qkv_head_dim} != {cfg.d_model}.')


def sinusoid_table(num_positions: int, d_model: int) -> np.ndarray:
  """[P, D] float32: Sec 3.5's encodings (sin at even, cos at odd features), as ours."""
  positions = np.arange(num_positions)
  return np.asarray(model_lib.sinusoidal_positions(positions, d_model), np.float32)


def position_table(params: Params, cfg: model_lib.TransformerConfig, stack: str,
                   max_positions: int) -> np.ndarray:
  if cfg.positions == 'learned':
    return params[f'{stack}/positions/table']
  return sinusoid_table(max_positions, cfg.d_model)


# ----------------------------------------------------------------------------
# Our layout as [out, in] matrices (the layout of torch.nn.Linear, CTranslate2 and
# transformers).


def _embeddings(params: Params) -> tuple[np.ndarray, np.ndarray]:
  """Source and target embeddings [V, D] (the same array when shared, Sec 3.4)."""
  target = params['decoder/embed/embedding']
  return params.get('encoder/embed/embedding', target), target


def _output_projection(params: Params) -> tuple[np.ndarray, np.ndarray | None]:
  """The pre-softmax weights [V, D] and bias [V] (None when tied to the embedding)."""
  if 'decoder/output_projection/kernel' in params:
    return (params['decoder/output_projection/kernel'].T,
            params['decoder/output_projection/bias'])
  return params['decoder/embed/embedding'], None


def _projection(params: Params, scope: str, name: str) -> tuple[np.ndarray, np.ndarray]:
  """W^Q, W^K or W^V [D, N, H] as weight [N * H, D], bias [N * H]."""
  kernel = params[f'{scope}/{name}_kernel']
  return kernel.reshape(kernel.shape[0], -1).T, params[f'{scope}/{name}_bias'].reshape(-1)


def _attention_output(params: Params, scope: str) -> tuple[np.ndarray, np.ndarray]:
  """W^O [N, H, D] as weight [D, N * H], bias [D]."""
  kernel = params[f'{scope}/out_kernel']
  return kernel.reshape(-1, kernel.shape[-1]).T, params[f'{scope}/out_bias']


def _ffn(params: Params, scope: str):
  """Sec 3.3's W1 [F, D], b1, W2 [D, F], b2."""
  return (params[f'{scope}/wi'].T, params[f'{scope}/bi'],
          params[f'{scope}/wo'].T, params[f'{scope}/bo'])


def _norm(params: Params, scope: str) -> tuple[np.ndarray, np.ndarray]:
  return params[f'{scope}/norm/scale'], params[f'{scope}/norm/bias']


# ----------------------------------------------------------------------------
# CTranslate2.


def ctranslate2_spec(params: Params, cfg: model_lib.TransformerConfig, pieces: list[str],
                     *, max_positions: int = DEFAULT_MAX_POSITIONS):
  """A filled ``ctranslate2.specs.TransformerSpec`` (not yet validated or quantized).

  Args:
    params: the flat parameter tree (``Restored.params``).
    cfg: the model's config.
    pieces: the vocabulary, piece of each id.
    max_positions: rows of the sinusoidal position table (learned tables keep theirs).
  """
  from ctranslate2.specs import transformer_spec
  check_supported(cfg, params, 'ctranslate2')
  pre_norm = cfg.layer_norm == 'pre'
  # Only pass head_dim when it is not d_model / num_heads (the spec's default).
  head_dim = (cfg.qkv_head_dim if cfg.qkv_head_dim * cfg.num_heads != cfg.d_model
              else None)
  encoder = transformer_spec.TransformerEncoderSpec(
      cfg.num_encoder_layers, cfg.num_heads, pre_norm=pre_norm, head_dim=head_dim)
  decoder = transformer_spec.TransformerDecoderSpec(
      cfg.num_decoder_layers, cfg.num_heads, pre_norm=pre_norm, head_dim=head_dim)
  spec = transformer_spec.TransformerSpec(encoder, decoder)

  def linear(linear_spec, weight, bias):
    linear_spec.weight = np.ascontiguousarray(weight)
    linear_spec.bias = bias

  def fused(linear_spec, parts):  # Q, K, V (or K, V) stacked on the output axis.
    linear(linear_spec, np.concatenate([w for w, _ in parts]),
           np.concatenate([b for _, b in parts]))

  def norm(norm_spec, scope):
    norm_spec.gamma, norm_spec.beta = _norm(params, scope)

  def ffn(ffn_spec, scope):
    w1, b1, w2, b2 = _ffn(params, f'{scope}/feed_forward')
    linear(ffn_spec.linear_0, w1, b1)
    linear(ffn_spec.linear_1, w2, b2)
    norm(ffn_spec.layer_norm, f'{scope}/ffn_residual')

  source_embedding, target_embedding = _embeddings(params)
  for stack, stack_spec, embedding in (('encoder', encoder, source_embedding),
                                       ('decoder', decoder, target_embedding)):
    (stack_spec.embeddings[0] if stack == 'encoder' else stack_spec.embeddings).weight = (
        embedding)
    stack_spec.scale_embeddings = True  # Sec 3.4: x sqrt(d_model).
    stack_spec.position_encodings.encodings = position_table(params, cfg, stack,
                                                             max_positions)
    if pre_norm:  # The last LayerNorm of a pre-LN stack.
      stack_spec.layer_norm.gamma = params[f'{stack}/final_norm/scale']
      stack_spec.layer_norm.beta = params[f'{stack}/final_norm/bias']

  for i, layer in enumerate(encoder.layer):
    scope = f'encoder/layers/{i}'
    attention = f'{scope}/self_attention'
    fused(layer.self_attention.linear[0],
          [_projection(params, attention, n) for n in ('query', 'key', 'value')])
    linear(layer.self_attention.linear[1], *_attention_output(params, attention))
    norm(layer.self_attention.layer_norm, f'{scope}/attention_residual')
    ffn(layer.ffn, scope)

  for i, layer in enumerate(decoder.layer):
    scope = f'decoder/layers/{i}'
    attention = f'{scope}/self_attention'
    fused(layer.self_attention.linear[0],
          [_projection(params, attention, n) for n in ('query', 'key', 'value')])
    linear(layer.self_attention.linear[1], *_attention_output(params, attention))
    norm(layer.self_attention.layer_norm, f'{scope}/self_attention_residual')
    cross = f'{scope}/cross_attention'
    linear(layer.attention.linear[0], *_projection(params, cross, 'query'))
    fused(layer.attention.linear[1], [_projection(params, cross, n) for n in ('key', 'value')])
    linear(layer.attention.linear[2], *_attention_output(params, cross))
    norm(layer.attention.layer_norm, f'{scope}/cross_attention_residual')
    ffn(layer.ffn, scope)

  weight, bias = _output_projection(params)
  decoder.projection.weight = weight
  if bias is not None:
    decoder.projection.bias = bias

  spec.register_source_vocabulary(pieces)
  spec.register_target_vocabulary(pieces)
  c = spec.config
  c.unk_token = pieces[tokenizer_lib.UNK_ID]
  c.bos_token = c.decoder_start_token = pieces[tokenizer_lib.BOS_ID]
  c.eos_token = pieces[tokenizer_lib.EOS_ID]
  c.add_source_eos = True  # Our sources end in eos.
  c.layer_norm_epsilon = 1e-6  # As model._layer_norm.
  return spec


def _check_output(output: str, workdir: str, force: bool) -> None:
  out, work = os.path.realpath(output), os.path.realpath(workdir)
  if out == work or work.startswith(out + os.sep):
    raise ExportError(f'Output {output} would overwrite the workdir {workdir}.')
  if os.path.exists(output) and not force:
    raise ExportError(f'Output {output} already exists; pass --force to replace it.')


def to_ctranslate2(workdir: str, output: str, *, step: int | None = None,
                   average_last: int | None = None, quantization: str | None = None,
                   max_positions: int = DEFAULT_MAX_POSITIONS, force: bool = False) -> str:
  """Writes a CTranslate2 model directory: model.bin, config.json, the vocabulary, spm.model.

  Translate with ``ctranslate2.Translator(output)``, giving it SentencePiece pieces
  (no eos: the model config appends it) and decoding the output pieces with spm.model.

  Args:
    workdir: a training workdir.
    output: the directory to write.
    step, average_last: which checkpoint, or the mean of the last K up to ``step``.
    quantization: weight type (int8, int16, float16, bfloat16, float32); None keeps
      float32.
    max_positions: longest sequence the exported sinusoidal table covers.
    force: replace ``output`` if it exists.

  Returns:
    ``output``.
  """
  from ctranslate2 import converters
  if quantization is not None and quantization not in QUANTIZATIONS:
    raise ExportError(f'quantization={quantization!r}: expected one of {QUANTIZATIONS}.')
  _check_output(output, workdir, force)
  restored = restore_for_export(workdir, step=step, average_last=average_last)
  spec = ctranslate2_spec(restored.params, restored.cfg,
                          vocabulary(restored.vocab_path, restored.cfg.vocab_size),
                          max_positions=max_positions)
  spec.register_file(restored.vocab_path, tokenizer_lib.VOCAB_FILENAME)

  class _Loaded(converters.Converter):
    """ctranslate2's Converter (validate, quantize, save) around our filled spec."""

    def _load(self):
      return spec

  return _Loaded().convert(output, quantization=quantization, force=force)


# ----------------------------------------------------------------------------
# Hugging Face MarianMT.


def marian_permutation(d_model: int) -> np.ndarray:
  """[D] indices: Marian feature j holds our feature perm[j] ([sin | cos] order)."""
  return np.concatenate([np.arange(0, d_model, 2), np.arange(1, d_model, 2)])


def marian_state_dict(params: Params, cfg: model_lib.TransformerConfig) -> dict[str, np.ndarray]:
  """MarianMTModel's state dict (torch names, [out, in] weights), D permuted to [sin | cos]."""
  check_supported(cfg, params, 'huggingface')
  perm = marian_permutation(cfg.d_model)
  out: dict[str, np.ndarray] = {}

  def put(name, weight, bias, *, rows=False, cols=False):
    # ``rows``/``cols``: the weight's output/input axis is the model dimension D.
    if rows:
      weight, bias = weight[perm], bias[perm]
    if cols:
      weight = weight[:, perm]
    out[f'{name}.weight'] = np.ascontiguousarray(weight, np.float32)
    out[f'{name}.bias'] = np.ascontiguousarray(bias, np.float32)

  def layer_norm(name, scope):
    scale, bias = _norm(params, scope)
    out[f'{name}.weight'] = np.ascontiguousarray(scale[perm])
    out[f'{name}.bias'] = np.ascontiguousarray(bias[perm])

  def attention(name, scope):
    for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
      put(f'{name}.{theirs}', *_projection(params, scope, ours), cols=True)
    put(f'{name}.out_proj', *_attention_output(params, scope), rows=True)

  def ffn(name, scope):
    w1, b1, w2, b2 = _ffn(params, f'{scope}/feed_forward')
    put(f'{name}.fc1', w1, b1, cols=True)
    put(f'{name}.fc2', w2, b2, rows=True)
    layer_norm(f'{name}.final_layer_norm', f'{scope}/ffn_residual')

  source_embedding, target_embedding = _embeddings(params)
  out['model.encoder.embed_tokens.weight'] = np.ascontiguousarray(source_embedding[:, perm])
  out['model.decoder.embed_tokens.weight'] = np.ascontiguousarray(target_embedding[:, perm])
  if cfg.share_embeddings:
    out['model.shared.weight'] = out['model.decoder.embed_tokens.weight']
  weight, bias = _output_projection(params)
  out['lm_head.weight'] = np.ascontiguousarray(weight[:, perm])
  out['final_logits_bias'] = (np.zeros((1, cfg.vocab_size), np.float32) if bias is None
                              else bias.reshape(1, -1).astype(np.float32))
  for i in range(cfg.num_encoder_layers):
    name, scope = f'model.encoder.layers.{i}', f'encoder/layers/{i}'
    attention(f'{name}.self_attn', f'{scope}/self_attention')
    layer_norm(f'{name}.self_attn_layer_norm', f'{scope}/attention_residual')
    ffn(name, scope)
  for i in range(cfg.num_decoder_layers):
    name, scope = f'model.decoder.layers.{i}', f'decoder/layers/{i}'
    attention(f'{name}.self_attn', f'{scope}/self_attention')
    layer_norm(f'{name}.self_attn_layer_norm', f'{scope}/self_attention_residual')
    attention(f'{name}.encoder_attn', f'{scope}/cross_attention')
    layer_norm(f'{name}.encoder_attn_layer_norm', f'{scope}/cross_attention_residual')
    ffn(name, scope)
  return out


def marian_config(cfg: model_lib.TransformerConfig, *, max_positions: int,
                  beam_size: int, max_length: int) -> dict:
  """config.json of a MarianMTModel with our sizes and special ids."""
  return {
      'architectures': ['MarianMTModel'],
      'model_type': 'marian',
      'vocab_size': cfg.vocab_size,
      'decoder_vocab_size': cfg.vocab_size,
      'd_model': cfg.d_model,
      'encoder_layers': cfg.num_encoder_layers,
      'decoder_layers': cfg.num_decoder_layers,
      'encoder_attention_heads': cfg.num_heads,
      'decoder_attention_heads': cfg.num_heads,
      'encoder_ffn_dim': cfg.d_ff,
      'decoder_ffn_dim': cfg.d_ff,
      'activation_function': 'relu',
      'max_position_embeddings': max_positions,
      'scale_embedding': True,  # Sec 3.4.
      'share_encoder_decoder_embeddings': cfg.share_embeddings,
      'tie_word_embeddings': cfg.share_embeddings,
      'dropout': cfg.dropout_rate,
      'attention_dropout': cfg.attention_dropout_rate,
      'activation_dropout': cfg.relu_dropout_rate,
      'encoder_layerdrop': 0.0,
      'decoder_layerdrop': 0.0,
      'init_std': 0.02,
      'is_encoder_decoder': True,
      'use_cache': True,
      'pad_token_id': tokenizer_lib.PAD_ID,
      'eos_token_id': tokenizer_lib.EOS_ID,
      'bos_token_id': tokenizer_lib.BOS_ID,
      # We start decoding from bos; Marian's own models start from pad.
      'decoder_start_token_id': tokenizer_lib.BOS_ID,
      'forced_eos_token_id': tokenizer_lib.EOS_ID,
      'num_beams': beam_size,
      'max_length': max_length,
      'torch_dtype': 'float32',
  }


def to_huggingface(workdir: str, output: str, *, step: int | None = None,
                   average_last: int | None = None,
                   max_positions: int = DEFAULT_MAX_POSITIONS, force: bool = False) -> str:
  """Writes a MarianMTModel directory: config.json, model.safetensors, tokenizer files.

  Load with ``MarianMTModel.from_pretrained(output)`` and ``MarianTokenizer``
  (source.spm / target.spm are our SentencePiece model, vocab.json its pieces).
  Needs only numpy and safetensors to write; torch and transformers to use.

  Returns:
    ``output``.
  """
  from safetensors.numpy import save_file
  _check_output(output, workdir, force)
  restored = restore_for_export(workdir, step=step, average_last=average_last)
  cfg = restored.cfg
  pieces = vocabulary(restored.vocab_path, cfg.vocab_size)
  tensors = marian_state_dict(restored.params, cfg)
  e = restored.config.eval
  parent = os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix='.export-')
  try:
    save_file(tensors, os.path.join(staging, 'model.safetensors'),
              metadata={'format': 'pt'})
    with open(os.path.join(staging, 'config.json'), 'w') as f:
      json.dump(marian_config(cfg, max_positions=max_positions, beam_size=e.beam_size,
                              max_length=cfg.max_len + e.max_extra_length), f, indent=2)
    for name in ('source.spm', 'target.spm'):
      shutil.copy(restored.vocab_path, os.path.join(staging, name))
    with open(os.path.join(staging, 'vocab.json'), 'w', encoding='utf-8') as f:
      json.dump({piece: i for i, piece in enumerate(pieces)}, f, ensure_ascii=False,
                indent=0)
    with open(os.path.join(staging, 'tokenizer_config.json'), 'w') as f:
      json.dump({'tokenizer_class': 'MarianTokenizer', 'separate_vocabs': False,
                 'unk_token': pieces[tokenizer_lib.UNK_ID],
                 'eos_token': pieces[tokenizer_lib.EOS_ID],
                 'pad_token': pieces[tokenizer_lib.PAD_ID],
                 'model_max_length': cfg.max_len}, f, indent=2)
    if os.path.exists(output):
      shutil.rmtree(output)
    os.replace(staging, output)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)
  return output


# ----------------------------------------------------------------------------
# Decoding with the exported CTranslate2 model under our search settings.


def ctranslate2_translate(translator, sources: list[list[str]], *, beam_size: int,
                          length_penalty: float, max_extra_length: int,
                          batch_size: int = 32) -> list[list[str]]:
  """Best translations (pieces, no eos) of ``sources`` (pieces, no eos), in order.

  Sec 6.1's output limit is per sentence (source tokens with eos + ``max_extra_length``,
  eos included, as ``search.output_limits``) while CTranslate2 takes one limit per
  call, so sentences are batched by equal source length. CTranslate2 scores and stops
  by its own rules (log P / |Y|^alpha, not GNMT's ((5 + |Y|) / 6)^alpha; stop after
  ``beam_size`` finished hypotheses): our search reproduces them under
  ``beam_rules='ctranslate2'`` (``search.beam_search``), which assumes the defaults
  pinned here (patience 1, ``min_decoding_length=1``).
  """
  by_length: dict[int, list[int]] = {}
  for i, source in enumerate(sources):
    by_length.setdefault(len(source), []).append(i)
  results: list[list[str]] = [[] for _ in sources]
  for length, rows in sorted(by_length.items()):
    if length == 0:
      continue
    for start in range(0, len(rows), batch_size):
      chunk = rows[start:start + batch_size]
      outputs = translator.translate_batch(
          [sources[i] for i in chunk], beam_size=beam_size, length_penalty=length_penalty,
          max_decoding_length=length + 1 + max_extra_length, max_input_length=0,
          min_decoding_length=1, patience=1)
      for i, output in zip(chunk, outputs):
        results[i] = output.hypotheses[0]
  return results
