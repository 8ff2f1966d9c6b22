"""Tests for transformer_jax.train.optim: the paper's schedule, Adam, accumulation, loss."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default
from transformer_jax.train import optim


def _paper_lrate(step, d_model=512, warmup=4000):
  return d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


@pytest.mark.parametrize('step', [1, 2, 100, 3999, 4000, 4001, 10_000, 100_000])
def test_schedule_is_the_papers_formula(step):
  schedule = optim.learning_rate_schedule(512, 4000)
  # optax counts updates from 0; the paper's step 1 is the first update.
  assert float(schedule(step - 1)) == pytest.approx(_paper_lrate(step), rel=1e-6)


def test_schedule_peaks_at_warmup_and_scales():
  schedule = optim.learning_rate_schedule(1024, 4000, scale=2.0)
  peak = 2.0 * 1024**-0.5 * 4000**-0.5  # ~9.9e-4 for the big model.
  values = np.array([float(schedule(c)) for c in (3998, 3999, 4000)])
  assert values[1] == pytest.approx(peak, rel=1e-6)
  assert values[0] < values[1] and values[2] < values[1]


def _optim_cfg(**overrides):
  cfg = ml_collections.ConfigDict(default.get_config().optim.to_dict())
  cfg.update(overrides)
  return cfg


def test_cosine_decay_warms_up_as_the_paper_then_follows_a_half_cosine():
  cfg = _optim_cfg(warmup_steps=100, learning_rate_scale=0.5, decay='cosine',
                   final_lr_fraction=0.1)
  schedule = optim.schedule_from_config(cfg, 256, num_steps=1100)
  paper = optim.learning_rate_schedule(256, 100, scale=0.5)
  peak = 0.5 * 256**-0.5 * 100**-0.5
  for count in (0, 50, 99):  # Warm-up: the paper's values, peak at update 99.
    assert float(schedule(count)) == pytest.approx(float(paper(count)), rel=1e-6)
  assert float(schedule(99)) == pytest.approx(peak, rel=1e-6)
  # Halfway through the 1,000 decay updates: the mean of peak and floor.
  assert float(schedule(99 + 500)) == pytest.approx(peak * (0.1 + 0.9 * 0.5), rel=1e-5)
  assert float(schedule(99 + 1000)) == pytest.approx(0.1 * peak, rel=1e-5)
  assert float(schedule(5000)) == pytest.approx(0.1 * peak, rel=1e-5)
  values = [float(schedule(c)) for c in range(99, 1100, 50)]
  assert all(a > b for a, b in zip(values, values[1:]))


def test_decay_option_defaults_to_the_paper_and_rejects_unknown_names():
  cfg = _optim_cfg(warmup_steps=100)
  assert float(optim.schedule_from_config(cfg, 256, 1000)(3000)) == pytest.approx(
      float(optim.learning_rate_schedule(256, 100)(3000)), rel=1e-6)
  with pytest.raises(ValueError, match='decay must be'):
    optim.schedule_from_config(_optim_cfg(decay='linear'), 256, 1000)
  with pytest.raises(ValueError, match='above optim.warmup_steps'):
    optim.schedule_from_config(_optim_cfg(decay='cosine', warmup_steps=100), 256, 100)


def test_adam_first_update_is_lr_times_sign():
  # Adam's first bias-corrected step is g / (|g| + eps): -lrate(1) * sign(g).
  tx = optim.make_optimizer(_optim_cfg(), d_model=512)
  params = {'w': jnp.zeros((3,))}
  grads = {'w': jnp.array([0.5, -2.0, 1e-3])}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -_paper_lrate(1) * np.sign(grads['w']),
                             rtol=1e-5)


def test_adam_uses_the_papers_betas():
  tx = optim.make_optimizer(_optim_cfg(), d_model=512)
  params = {'w': jnp.zeros(())}
  state = tx.init(params)
  g1, g2 = jnp.array(1.0), jnp.array(3.0)
  _, state = tx.update({'w': g1}, state, params)
  updates, _ = tx.update({'w': g2}, state, params)
  m = 0.9 * 0.1 * 1.0 + 0.1 * 3.0
  v = 0.98 * 0.02 * 1.0 + 0.02 * 9.0
  m_hat, v_hat = m / (1 - 0.9**2), v / (1 - 0.98**2)
  expected = -_paper_lrate(2) * m_hat / (np.sqrt(v_hat) + 1e-9)
  assert float(updates['w']) == pytest.approx(expected, rel=1e-5)


def test_multisteps_accumulates_then_applies_the_mean_gradient():
  accum = optim.make_optimizer(_optim_cfg(grad_accum_steps=2), d_model=512)
  single = optim.make_optimizer(_optim_cfg(), d_model=512)
  params = {'w': jnp.array([1.0, 2.0])}
  g_a, g_b = {'w': jnp.array([0.2, -1.0])}, {'w': jnp.array([0.6, 0.4])}
  state = accum.init(params)
  u1, state = accum.update(g_a, state, params)
  np.testing.assert_array_equal(u1['w'], 0.0)  # First micro-batch: no update.
  u2, _ = accum.update(g_b, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g_a, g_b)
  expected, _ = single.update(mean, single.init(params), params)
  np.testing.assert_allclose(u2['w'], expected['w'], rtol=1e-6)


def test_weight_decay_and_clipping_are_applied():
  params = {'w': jnp.array([2.0])}
  zero = {'w': jnp.array([0.0])}
  tx = optim.make_optimizer(_optim_cfg(weight_decay=0.1), d_model=512)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -_paper_lrate(1) * 0.1 * 2.0, rtol=1e-5)
  # Clipping rescales the gradient before Adam: visible in Adam's second moment.
  tx = optim.make_optimizer(_optim_cfg(clip_grad_norm=1.0), d_model=512)
  _, state = tx.update({'w': jnp.array([10.0])}, tx.init(params), params)
  adam_state = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(
      s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0]
  assert float(adam_state.nu['w'][0]) == pytest.approx(0.02 * 1.0**2, rel=1e-5)


def test_label_smoothed_loss_equals_hand_computation():
  logits = jnp.array([[[2.0, 0.5, -1.0, 0.0], [0.0, 1.0, 3.0, -2.0],
                       [9.0, 9.0, 9.0, 9.0]]])  # [B=1, T=3, V=4]
  targets = jnp.array([[1, 2, 0]])  # Last position is padding.
  loss_sum, nll_sum, ntok = optim.label_smoothed_loss(logits, targets, 0.1)
  expected_loss, expected_nll = 0.0, 0.0
  for t in range(2):
    z = np.asarray(logits[0, t], np.float64)
    logp = z - np.log(np.exp(z).sum())
    q = np.full(4, 0.1 / 4)
    q[int(targets[0, t])] += 0.9  # optax.smooth_labels: (1-a) one_hot + a/V.
    expected_loss += -(q * logp).sum()
    expected_nll += -logp[int(targets[0, t])]
  assert float(ntok) == 2.0
  assert float(loss_sum) == pytest.approx(expected_loss, rel=1e-6)
  assert float(nll_sum) == pytest.approx(expected_nll, rel=1e-6)
  # Without smoothing the loss is the plain negative log-likelihood.
  plain, _, _ = optim.label_smoothed_loss(logits, targets, 0.0)
  assert float(plain) == pytest.approx(expected_nll, rel=1e-6)


def test_label_smoothed_loss_and_gradient_equal_optax_one_hot_form():
  # The one-pass form against optax's smoothed one-hot cross-entropy, values and
  # gradients, on logits large enough that a naive exp would overflow.
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(3, 5, 50) * 30, jnp.float32)  # [B, T, V]
  targets = jnp.asarray(rng.randint(1, 50, (3, 5)), jnp.int32).at[:, 3:].set(0)

  def reference(z):
    weights = (targets != 0).astype(jnp.float32)
    soft = optax.smooth_labels(jax.nn.one_hot(targets, 50), 0.1)
    loss = optax.softmax_cross_entropy(z, soft)
    nll = optax.softmax_cross_entropy_with_integer_labels(z, targets)
    return jnp.sum(loss * weights), jnp.sum(nll * weights)

  loss_sum, nll_sum, _ = optim.label_smoothed_loss(logits, targets, 0.1)
  expected_loss, expected_nll = reference(logits)
  assert float(loss_sum) == pytest.approx(float(expected_loss), rel=1e-6)
  assert float(nll_sum) == pytest.approx(float(expected_nll), rel=1e-6)
  grad = jax.grad(lambda z: optim.label_smoothed_loss(z, targets, 0.1)[0])(logits)
  expected_grad = jax.grad(lambda z: reference(z)[0])(logits)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(grad[:, 3:]).max()) == 0.0  # Padding gets no gradient.


def test_entropy_constant_is_the_loss_floor():
  vocab, eps = 7, 0.1
  q = np.full(vocab, eps / vocab)
  q[3] += 1 - eps
  logits = jnp.log(jnp.asarray(q, jnp.float32))[None, None]  # The target itself.
  loss_sum, _, _ = optim.label_smoothed_loss(logits, jnp.array([[3]]), eps)
  assert float(loss_sum) == pytest.approx(optim.smoothed_label_entropy(vocab, eps),
                                          rel=1e-5)
  assert optim.smoothed_label_entropy(vocab, 0.0) == 0.0
