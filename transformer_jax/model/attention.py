"""Sec 3.2.1's scaled dot-product attention through the kernel the config names.

``model.attention_impl`` picks one:

* ``xla``: ``jax.nn.dot_product_attention(implementation='xla')`` with the dense
  [B, 1, T, S] mask; every backend.
* ``cudnn``: the cuDNN flash-attention kernel of NVIDIA GPUs
  (``jax.nn.dot_product_attention(implementation='cudnn')``). Unpacked rows pass
  their lengths and the causal flag (the kernel's own padding/causal masks);
  packed rows pass the dense mask, which cuDNN applies as a bias. Needs bf16 or
  fp16 compute and a head dim that is a multiple of 8 up to 256; otherwise xla.
* ``splash``: the TPU Pallas splash-attention kernel
  (``jax.experimental.pallas.ops.tpu.splash_attention``): causal mask and segment
  ids for padding and packed rows, under ``shard_map`` over the batch and head
  axes when a mesh is set. Off TPU it runs in Pallas interpret mode (for tests:
  slow). Sequences are padded to its 128-token blocks inside.
* ``auto``: ``splash`` on TPU, ``cudnn`` on GPU, ``xla`` elsewhere.
* ``einsum``: the written-out reference (``einsum_attention`` in the model).

What the fused kernels do not support, and so goes through ``einsum`` in
``MultiHeadAttention.attend``: dropout on the attention probabilities, returning
the probabilities (the attention page), d_k != d_v (Table 3 row B). Decoding with
a cache (``layers.cached_attention``) never uses them: a step's few queries per
row have nothing to tile. A fused kernel's output at *padding queries* differs from
xla's (they attend to the row's first segment instead of nothing); the loss and
every later layer ignore those positions.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array

IMPLS = ('xla', 'einsum', 'cudnn', 'splash', 'auto')
_SPLASH_BLOCK = 128  # The kernel's default tile; sequences are padded to it.


@struct.dataclass
class AttentionMask:
  """Who may attend to whom, both as a dense mask and as the kernels want it.

  A pytree whose arrays are leaves and whose flags are static, so it passes through
  ``jax.jit``, ``nnx.remat`` and ``nnx.scan`` like the dense mask did.

  Attributes:
    dense: [B, 1, T, S] bool, True where query t may attend to key s.
    query_segments: [B, T] int32: the segment of each query, 0 at padding.
    key_segments: [B, S] int32: the segment of each key, 0 at padding.
    causal: Sec 3.2.3: query i sees keys j <= i only (static).
    packed: the segments came from packing several sentences into a row (static).
  """
  dense: Array
  query_segments: Array
  key_segments: Array
  causal: bool = struct.field(pytree_node=False, default=False)
  packed: bool = struct.field(pytree_node=False, default=False)


def make_mask(query_valid: Array, key_valid: Array, *,
              query_segments: Array | None = None, key_segments: Array | None = None,
              causal: bool = False) -> AttentionMask:
  """Who may attend to whom: the dense mask plus the segment ids the fused kernels use.

  Args:
    query_valid: [B, T] bool, False at padding queries.
    key_valid: [B, S] bool, False at padding keys.
    query_segments, key_segments: [B, T], [B, S] segment ids of packed rows.
    causal: Sec 3.2.3 (self-attention of the decoder).
  """
  packed = query_segments is not None and key_segments is not None
  dense = jnp.broadcast_to(key_valid[:, None, :], (key_valid.shape[0],
                                                   query_valid.shape[1],
                                                   key_valid.shape[1]))
  if packed:
    dense &= query_segments[:, :, None] == key_segments[:, None, :]
    dense &= query_valid[:, :, None]
    q_seg = jnp.where(query_valid, query_segments, 0).astype(jnp.int32)
    k_seg = jnp.where(key_valid, key_segments, 0).astype(jnp.int32)
  else:
    q_seg, k_seg = query_valid.astype(jnp.int32), key_valid.astype(jnp.int32)
  if causal:
    tq, tk = query_valid.shape[1], key_valid.shape[1]
    dense &= jnp.arange(tq)[:, None] >= jnp.arange(tk)[None, :]
  return AttentionMask(dense[:, None], q_seg, k_seg, causal=causal, packed=packed)


def dense(mask: AttentionMask | Array) -> Array:
  """The [B, 1, T, S] bool mask of either form."""
  return mask.dense if isinstance(mask, AttentionMask) else mask


def _platform() -> str:
  """The platform being compiled for: the mesh's devices, else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = getattr(mesh, 'abstract_device', None)
  return device.platform if device is not None else jax.default_backend()


def resolve(impl: str, dtype, head_dim: int, platform: str | None = None) -> str:
  """The kernel ``impl`` runs as on ``platform``, after the fallbacks above."""
  platform = platform or _platform()
  if impl == 'auto':
    impl = {'tpu': 'splash', 'gpu': 'cudnn'}.get(platform, 'xla')
  if impl == 'cudnn' and not (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                              and head_dim % 8 == 0 and head_dim <= 256):
    return 'xla'
  return impl


def dot_product_attention(query: Array, key: Array, value: Array,
                          mask: AttentionMask | Array, *, impl: str) -> Array:
  """softmax(Q K^T / sqrt(d_k)) V with the kernel ``impl`` (see the module doc).

  Args:
    query: [B, T, N, H]; key, value: [B, S, N, H] (same H).
    mask: an AttentionMask, or a dense [B, 1, T, S] bool array (then ``xla``).
    impl: one of IMPLS except ``einsum``.

  Returns:
    [B, T, N, H] in the query's dtype.
  """
  if not isinstance(mask, AttentionMask):
    return jax.nn.dot_product_attention(query, key, value, mask=mask,
                                        implementation='xla')
  impl = resolve(impl, query.dtype, query.shape[-1])
  if impl == 'splash':
    return splash_attention(query, key, value, mask,
                            interpret=_platform() != 'tpu')
  return jax.nn.dot_product_attention(query, key, value,
                                      implementation='cudnn' if impl == 'cudnn' else 'xla',
                                      **cudnn_arguments(mask) if impl == 'cudnn' else
                                      {'mask': mask.dense})


def cudnn_arguments(mask: AttentionMask) -> dict:
  """How the mask reaches cuDNN: lengths and the causal flag for right-padded rows
  (its fast masks), the dense mask (as a bias) for packed rows."""
  if mask.packed:
    return {'mask': mask.dense}
  return {'query_seq_lengths': jnp.sum(mask.query_segments, axis=1, dtype=jnp.int32),
          'key_value_seq_lengths': jnp.sum(mask.key_segments, axis=1, dtype=jnp.int32),
          'is_causal': mask.causal}


# -----------------------------------------------------------------------------
# TPU: Pallas splash attention.


def _pad_to(x: Array, axis: int, multiple: int, value=0) -> Array:
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, extra)
  return jnp.pad(x, pad, constant_values=value)


def _splash_kernel(num_heads: int, q_len: int, kv_len: int, causal: bool,
                   interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  block = splash.BlockSizes(
      block_q=_SPLASH_BLOCK, block_kv=_SPLASH_BLOCK, block_kv_compute=_SPLASH_BLOCK,
      block_q_dkv=_SPLASH_BLOCK, block_kv_dkv=_SPLASH_BLOCK,
      block_kv_dkv_compute=_SPLASH_BLOCK, block_q_dq=_SPLASH_BLOCK,
      block_kv_dq=_SPLASH_BLOCK)
  # Built inside each trace: the kernel holds its mask tables as jnp arrays.
  one = (splash.CausalMask((q_len, kv_len)) if causal
         else splash.FullMask((q_len, kv_len)))
  return splash.make_splash_mha(splash.MultiHeadMask([one] * num_heads),
                                head_shards=1, q_seq_shards=1, block_sizes=block,
                                interpret=interpret)


def _splash_local(query, key, value, q_seg, k_seg, *, causal: bool, interpret: bool):
  """One device's rows and heads: [b, T, n, H] -> [b, T, n, H]."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  t = query.shape[1]
  # The kernel needs every query row to see at least one key, or its softmax
  # divides by zero: padding queries join the row's first key's segment (their
  # output is ignored), and keys added to fill the last block join none (-1).
  q_seg = jnp.where(q_seg == 0, k_seg[:, :1], q_seg)
  query = _pad_to(query * (1.0 / math.sqrt(query.shape[-1])), 1, _SPLASH_BLOCK)
  key = _pad_to(key, 1, _SPLASH_BLOCK)
  value = _pad_to(value, 1, _SPLASH_BLOCK)
  q_seg = _pad_to(q_seg, 1, _SPLASH_BLOCK, value=0)
  q_seg = jnp.where(jnp.arange(q_seg.shape[1]) < t, q_seg, k_seg[:, :1])
  k_seg = _pad_to(k_seg, 1, _SPLASH_BLOCK, value=-1)
  kernel = _splash_kernel(query.shape[2], query.shape[1], key.shape[1], causal,
                          interpret)
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [b, n, T, H]

  def one_row(q, k, v, qs, ks):
    return kernel(q, k, v, segment_ids=splash.SegmentIds(q=qs, kv=ks))

  out = jax.vmap(one_row)(heads_major(query), heads_major(key), heads_major(value),
                          q_seg, k_seg)  # [b, n, T', H]
  return heads_major(out)[:, :t].astype(query.dtype)


def splash_attention(query: Array, key: Array, value: Array, mask: AttentionMask, *,
                     interpret: bool = False) -> Array:
  """The splash kernel over [B, T, N, H] heads; ``shard_map`` over a set mesh.

  Under ``jax.set_mesh`` with logical rules active the kernel (a custom call the
  SPMD partitioner cannot split) runs per device on its rows (``act_batch``) and
  heads (``act_heads``), as MaxText does.
  """
  from transformer_jax import sharding
  local = functools.partial(_splash_local, causal=mask.causal, interpret=interpret)
  args = (query, key, value, mask.query_segments, mask.key_segments)
  spec = sharding.active_spec(('act_batch', 'act_length', 'act_heads', None))
  if spec is None:
    return local(*args)
  P = jax.sharding.PartitionSpec
  heads = P(spec[0], None, spec[2], None)
  rows = P(spec[0], None)
  return jax.shard_map(local, in_specs=(heads, heads, heads, rows, rows),
                       out_specs=heads, check_vma=False)(*args)
