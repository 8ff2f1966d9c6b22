"""TransformerConfig: the hyper-parameters of the Transformer (Sec 3, Table 3).

The one place model defaults live: every other module (configs/default.py, the
CLIs, the tests) takes them from here. Built from ``config.model`` by
``TransformerConfig.from_config``; modules never see a ConfigDict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_FAMILIES = ('encoder_decoder', 'decoder_only', 'encoder_only')
_POOLINGS = ('cls', 'mean', 'max')
# The special ids of every vocabulary here (SentencePiece is trained with them; unk = 3
# is the tokenizers' own concern): the one definition the model, the tokenizers and
# the search share.
PAD_ID = 0
EOS_ID = 1
BOS_ID = 2

_LAYER_NORMS = ('post', 'pre')
_POSITIONS = ('sinusoidal', 'learned', 'rope', 'alibi')
_NORMS = ('layernorm', 'rmsnorm')
_FEED_FORWARDS = ('relu', 'swiglu', 'geglu')
_ATTENTION_IMPLS = ('xla', 'einsum', 'cudnn', 'splash', 'auto')
_REMAT = ('none', 'dots', 'full')
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of the encoder-decoder Transformer (Sec 3, Table 3).

  Defaults are the paper's base model; ``from_config`` builds one from
  ``config.model``. The post-2017 options (``positions`` 'rope'/'alibi', ``norm``,
  ``feed_forward``, ``use_bias``) default to the paper's choices.
  """
  vocab_size: int
  # 'encoder_decoder' (the paper), 'decoder_only' (a causal language model of
  # decoder layers without cross-attention) or 'encoder_only' (an encoder with a
  # pooled classification head and a masked-LM head).
  family: str = 'encoder_decoder'
  num_encoder_layers: int = 6  # N
  num_decoder_layers: int = 6  # N
  d_model: int = 512
  num_heads: int = 8  # h
  head_dim: int | None = None  # d_k = d_v; None -> d_model // num_heads.
  key_dim: int | None = None  # d_k alone (Table 3 row B); None -> the head dim.
  d_ff: int = 2048
  dropout_rate: float = 0.1  # P_drop: sub-layer outputs, embeddings + positions.
  attention_dropout_rate: float = 0.0  # tensor2tensor extra: on attention probs.
  relu_dropout_rate: float = 0.0  # tensor2tensor extra: inside the FFN.
  max_len: int = 256  # Rows of the learned position table.
  share_embeddings: bool = True  # Sec 3.4: one matrix for inputs and the softmax.
  layer_norm: str = 'post'  # 'post' (the paper) or 'pre' (Xiong et al. 2020).
  # 'sinusoidal' (Sec 3.5) or 'learned' (Table 3 E), added to the embeddings; 'rope'
  # (rotary queries/keys) or 'alibi' (linear logit biases) in every self-attention.
  positions: str = 'sinusoidal'
  rope_base: float = 10000.0  # RoPE's wavelength base (Su et al. 2021).
  norm: str = 'layernorm'  # 'layernorm' (Sec 3.1, Ba et al.) or 'rmsnorm' (Zhang 2019).
  # 'relu' (Sec 3.3) or a gated unit, 'swiglu' / 'geglu' (Shazeer 2020), whose hidden
  # size is ``ffn_hidden_dim`` (2/3 of d_ff) so the FFN keeps its parameter count.
  feed_forward: str = 'relu'
  use_bias: bool = True  # False: no biases in any linear map (norms keep theirs).
  dtype: Any = jnp.float32  # Compute dtype.
  param_dtype: Any = jnp.float32
  # 'xla', 'einsum', 'cudnn', 'splash' (TPU Pallas) or 'auto' (the backend's fused
  # kernel); see model/attention.py for what each supports.
  attention_impl: str = 'xla'
  # Rematerialisation of each layer in the backward pass: 'none', 'dots' (keep the
  # weight matmuls' outputs, recompute the rest) or 'full' (keep only the inputs).
  remat: str = 'none'
  # True: each stack's N layers are one module with parameters stacked on a leading
  # [N] axis (logical name 'layers') run by one nnx.scan, so the layer body is
  # traced and compiled once however deep the stack (see model/stacking.py).
  scan_layers: bool = False
  pad_id: int = PAD_ID
  bos_id: int = BOS_ID
  num_classes: int = 2  # encoder_only: labels of the classification head.
  pooling: str = 'cls'  # encoder_only: 'cls' (the first token), 'mean' or 'max' (masked).

  def __post_init__(self):
    problems = []
    if self.family not in _FAMILIES:
      problems.append(f'family={self.family!r} (expected one of {_FAMILIES})')
    if self.pooling not in _POOLINGS:
      problems.append(f'pooling={self.pooling!r} (expected one of {_POOLINGS})')
    if self.layer_norm not in _LAYER_NORMS:
      problems.append(f'layer_norm={self.layer_norm!r} (expected one of {_LAYER_NORMS})')
    if self.positions not in _POSITIONS:
      problems.append(f'positions={self.positions!r} (expected one of {_POSITIONS})')
    if self.norm not in _NORMS:
      problems.append(f'norm={self.norm!r} (expected one of {_NORMS})')
    if self.feed_forward not in _FEED_FORWARDS:
      problems.append(f'feed_forward={self.feed_forward!r} '
                      f'(expected one of {_FEED_FORWARDS})')
    if self.positions == 'rope' and self.qk_head_dim % 2:
      problems.append(f'rope rotates pairs of features: the query/key head dim must be '
                      f'even, got {self.qk_head_dim}')
    if self.rope_base <= 1.0:
      problems.append(f'rope_base={self.rope_base} must be > 1')
    if self.attention_impl not in _ATTENTION_IMPLS:
      problems.append(f'attention_impl={self.attention_impl!r} '
                      f'(expected one of {_ATTENTION_IMPLS})')
    if self.remat not in _REMAT:
      problems.append(f'remat={self.remat!r} (expected one of {_REMAT})')
    if self.head_dim is None and self.d_model % self.num_heads:
      problems.append(f'd_model={self.d_model} is not divisible by '
                      f'num_heads={self.num_heads}; set head_dim')
    if self.positions == 'sinusoidal' and self.d_model % 2:
      problems.append(f'sinusoidal positions need an even d_model, got {self.d_model}')
    for name in ('vocab_size', 'num_encoder_layers', 'num_decoder_layers',
                 'd_model', 'num_heads', 'd_ff', 'max_len', 'num_classes'):
      if getattr(self, name) <= 0:
        problems.append(f'{name}={getattr(self, name)} must be positive')
    for name in ('dropout_rate', 'attention_dropout_rate', 'relu_dropout_rate'):
      if not 0.0 <= getattr(self, name) < 1.0:
        problems.append(f'{name}={getattr(self, name)} must be in [0, 1)')
    if problems:
      raise ValueError('Invalid TransformerConfig: ' + '; '.join(problems) + '.')

  @property
  def qkv_head_dim(self) -> int:
    """H: the per-head dimension d_k = d_v (Sec 3.2.2)."""
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def qk_head_dim(self) -> int:
    """d_k of queries and keys: H unless ``key_dim`` sets it apart from d_v."""
    return self.key_dim if self.key_dim is not None else self.qkv_head_dim

  @property
  def ffn_hidden_dim(self) -> int:
    """F, the FFN's hidden width: d_ff for 'relu'; for a gated FFN, 2/3 d_ff
    rounded to a multiple of 8.

    A gated FFN has three [D, F] matrices where ReLU's has two, so 2/3 of d_ff keeps
    the parameter count (3 * D * 2/3 F = 2 * D * F), the rule of Shazeer (2020) and
    LLaMA. Multiples of 8 keep the 'mlp' axis divisible by the mesh's tensor axis.
    """
    if self.feed_forward == 'relu':
      return self.d_ff
    return max(8, 8 * round(2 * self.d_ff / 3 / 8))

  @property
  def additive_positions(self) -> bool:
    """Whether positions are added to the embeddings (sinusoidal, learned) rather
    than applied inside self-attention (rope, alibi)."""
    return self.positions in ('sinusoidal', 'learned')

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> TransformerConfig:
    """Builds the config from ``config.model`` (a ConfigDict or mapping).

    Dtype strings ('float32', 'bfloat16') become jnp dtypes. Unknown keys are an
    error, so a misspelt option is never silently ignored.
    """
    values = dict(model_cfg.items()) if hasattr(model_cfg, 'items') else dict(model_cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f'config.model has unknown keys {unknown}; TransformerConfig '
                       f'accepts {sorted(fields - {"vocab_size"})}.')
    values.pop('vocab_size', None)
    for key in ('dtype', 'param_dtype'):
      if isinstance(values.get(key), str):
        if values[key] not in _DTYPES:
          raise ValueError(f'config.model.{key}={values[key]!r}: expected one of '
                           f'{sorted(_DTYPES)}.')
        values[key] = _DTYPES[values[key]]
    return cls(vocab_size=int(vocab_size), **values)
