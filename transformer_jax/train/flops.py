"""Model FLOPs of the Transformer's train step, and device peaks, for MFU.

Model-FLOPs utilisation = (FLOPs the model needs per step / step time) / peak
FLOP/s of the devices. The count is analytic (matmuls only, padded shapes), as in
the PaLM paper's MFU; rematerialisation or XLA's own choices do not change it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

if TYPE_CHECKING:
  from transformer_jax.model import TransformerConfig

# Dense peak throughput per device (bf16, FLOP/s) for the MFU estimate; override
# with config.train.peak_tflops_per_device. CPUs have no fixed figure.
PEAK_FLOPS = {
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12, 'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12, 'NVIDIA A100': 312e12, 'Tesla P100': 9.5e12,
}


def forward_flops(cfg: TransformerConfig, batch: int, src_len: int,
                  tgt_len: int) -> float:
  """Matmul FLOPs of one teacher-forced forward pass over a [B, S] / [B, T] batch.

  Counts 2 FLOPs per multiply-add of every projection, attention product and
  the output softmax layer, on padded shapes (what the hardware computes).
  """
  d, v = cfg.d_model, cfg.vocab_size
  nh = cfg.num_heads * cfg.qkv_head_dim
  s, t = src_len, tgt_len
  # FFN per token: two [D, F] matmuls, three for a gated unit (SwiGLU/GeGLU).
  ffn = (4 if cfg.feed_forward == 'relu' else 6) * d * cfg.ffn_hidden_dim
  enc = cfg.num_encoder_layers * (s * (8 * d * nh + ffn) + 4 * s * s * nh)
  dec = cfg.num_decoder_layers * (
      t * (8 * d * nh + 4 * d * nh + ffn)  # self q,k,v,o; cross q,o; FFN
      + s * 4 * d * nh  # cross-attention keys and values of the encoder output
      + 4 * t * t * nh + 4 * t * s * nh)  # self and cross attention products
  return float(batch * (enc + dec + t * 2 * d * v))


def train_flops(cfg: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> float:
  """Forward + backward (twice the forward) FLOPs of one train step."""
  return 3.0 * forward_flops(cfg, batch, src_len, tgt_len)


def peak_flops_per_device(train_cfg) -> float | None:
  """The MFU denominator: config override, else the device kind's bf16 peak."""
  override = train_cfg.get('peak_tflops_per_device')
  if override:
    return float(override) * 1e12
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if kind.startswith(name):
      return flops
  return None
