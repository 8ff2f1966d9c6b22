"""benchmarks/train_profile.py's attribution of compiled kernels to parts of the model."""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / 'benchmarks'))
import train_profile  # noqa: E402


def _matmul(a, b):
  """A helper whose own name marks no part: only its callers' frames can."""
  return jnp.tanh(a @ b)


class FeedForward:

  def __call__(self, x, w):
    return _matmul(x, w)


class Embedding:

  def attend(self, x, w):
    return _matmul(x, w.T)


def test_kernels_are_attributed_through_the_whole_call_stack():
  def f(x, w1, w2):
    return FeedForward()(x, w1), Embedding().attend(x, w2)

  x, w1, w2 = (jnp.asarray(np.ones(s, np.float32)) for s in ((8, 16), (16, 32), (64, 16)))
  text = jax.jit(f).lower(x, w1, w2).compile().as_text()
  parts = train_profile.instruction_parts(text)
  # The FFN matmul's [8, 32] result and the output projection's [8, 64] one are each
  # found from a caller two frames up, past _matmul.
  by_shape = {}
  for line in text.splitlines():
    for name, part in parts.items():
      if f'%{name} = f32[8,32]' in line or f'%{name} = f32[8,64]' in line:
        by_shape.setdefault(line.split(' = ')[1].split('{')[0], set()).add(part)
  assert by_shape == {'f32[8,32]': {'FFN'}, 'f32[8,64]': {'output projection'}}
