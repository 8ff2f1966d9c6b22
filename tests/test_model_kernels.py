"""model.attention_impl and model.remat in the full Transformer.

Every attention kernel gives the reference's logits (the TPU splash kernel in Pallas
interpret mode on CPU, on padded and on packed batches), and each remat policy gives
the same loss and gradients as none, dropout included.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer_jax import model as model_lib

TINY = model_lib.TransformerConfig(
    vocab_size=50, num_encoder_layers=2, num_decoder_layers=2, d_model=32,
    num_heads=4, d_ff=64, dropout_rate=0.1, max_len=32)
SRC = np.array([[5, 6, 7, 8, 1, 0, 0], [9, 10, 11, 1, 0, 0, 0]], np.int32)
TGT = np.array([[20, 21, 22, 1, 0, 0], [23, 24, 25, 26, 27, 1]], np.int32)
# One packed row each side: two sentences (segments 1, 2), then padding.
P_SRC = np.array([[5, 6, 7, 8, 1, 9, 10, 11, 1, 0]], np.int32)
P_SRC_SEG = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0]], np.int32)
P_TGT = np.array([[20, 21, 22, 1, 23, 24, 25, 26, 27, 1, 0, 0]], np.int32)
P_TGT_SEG = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0]], np.int32)
P_TGT_POS = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 0]], np.int32)
P_SRC_POS = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0]], np.int32)


def _model(**changes):
  return model_lib.Transformer(dataclasses.replace(TINY, **changes),
                               rngs=nnx.Rngs(params=0, dropout=1))


def _logits(model, packed: bool):
  if packed:
    tgt_in = model_lib.shift_right(jnp.asarray(P_TGT), jnp.asarray(P_TGT_POS))
    return model(P_SRC, tgt_in, src_segments=P_SRC_SEG, tgt_segments=P_TGT_SEG,
                 src_positions=P_SRC_POS, tgt_positions=P_TGT_POS), P_TGT_SEG > 0
  return model(SRC, model_lib.shift_right(jnp.asarray(TGT))), TGT > 0


# splash on a packed batch (segments and trailing padding); auto (xla on CPU) padded.
@pytest.mark.parametrize('impl,packed', [('splash', True), ('auto', False)])
def test_attention_impls_match_xla(impl, packed):
  want, valid = _logits(_model(attention_impl='xla'), packed)
  got, _ = jax.jit(lambda m: _logits(m, packed))(_model(attention_impl=impl))
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid],
                             atol=1e-4, rtol=1e-4)


def test_unknown_attention_impl_and_remat_are_named():
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    dataclasses.replace(TINY, attention_impl='flash')
  with pytest.raises(ValueError, match="remat='some'"):
    dataclasses.replace(TINY, remat='some')


def _loss_and_grads(remat):
  model = _model(remat=remat)
  tgt_in = model_lib.shift_right(jnp.asarray(TGT))

  def loss(model):
    logits = model(SRC, tgt_in, deterministic=False)  # Dropout on: replayed exactly.
    return jnp.sum(jnp.where(TGT[..., None] > 0, jax.nn.log_softmax(logits), 0.0))

  return nnx.value_and_grad(loss)(model)


@pytest.mark.parametrize('remat', ['dots', 'full'])
def test_remat_gives_the_same_loss_and_gradients(remat):
  want_loss, want = _loss_and_grads('none')
  got_loss, got = _loss_and_grads(remat)
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
  # Recomputation fuses differently: float32 rounding, not a different gradient
  # (a dropout mask not replayed exactly would change entries by O(1)).
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5, rtol=1e-4)
