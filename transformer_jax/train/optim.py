"""The paper's optimiser, learning-rate schedule and label-smoothed loss (Sec 5.3, 5.4).

* ``learning_rate_schedule``: lrate = scale * d_model^-0.5 * min(step^-0.5,
  step * warmup_steps^-1.5), with ``step`` counted from 1 as in the paper.
* ``schedule_from_config``: that schedule, or (``optim.decay='cosine'``) the same
  warm-up followed by a cosine decay to ``final_lr_fraction`` of the peak at
  ``train.num_steps``, for runs whose length is fixed in advance.
* ``make_optimizer``: Adam(beta1=0.9, beta2=0.98, eps=1e-9) on that schedule, with
  optional global-norm clipping and decoupled weight decay, wrapped in
  ``optax.MultiSteps`` when gradients are accumulated over several micro-batches
  (how one machine reaches the paper's ~25k-token batches).
* ``label_smoothed_loss``: cross-entropy against smoothed one-hot targets, summed
  over non-pad target tokens; the caller divides by the token count, so the loss is
  normalised per non-pad target token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(d_model: int, warmup_steps: int,
                           scale: float = 1.0) -> optax.Schedule:
  """Sec 5.3: linear warm-up for ``warmup_steps``, then decay with 1/sqrt(step).

  optax has no inverse-square-root schedule, hence this closed form. optax
  counts updates from 0, the paper from 1; ``count + 1`` makes the first update
  use the paper's step 1 (and never divides by zero).

  Args:
    d_model: model width D.
    warmup_steps: steps of linear warm-up (4000 in the paper).
    scale: multiplies the paper's formula (1.0 reproduces it).

  Returns:
    A schedule ``count -> learning rate`` (float32 scalar).
  """
  warmup = float(warmup_steps)

  def schedule(count):
    step = jnp.asarray(count, jnp.float32) + 1.0
    return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup**-1.5)

  return schedule


def schedule_from_config(optim_cfg, d_model: int, num_steps: int) -> optax.Schedule:
  """The learning-rate schedule ``config.optim`` asks for.

  ``decay='inverse_sqrt'`` (default) is the paper's. ``decay='cosine'`` warms up
  exactly as the paper does to the same peak, scale * d_model^-0.5 *
  warmup_steps^-0.5, then follows a half cosine from that peak to
  ``final_lr_fraction`` of it at update ``num_steps`` and stays there.

  Args:
    optim_cfg: ``config.optim`` (warmup_steps, learning_rate_scale, decay,
      final_lr_fraction).
    d_model: model width D.
    num_steps: updates in the run (``train.num_steps``), where the cosine ends.

  Returns:
    A schedule ``count -> learning rate`` (float32 scalar), count from 0.
  """
  paper = learning_rate_schedule(d_model, optim_cfg.warmup_steps,
                                 optim_cfg.learning_rate_scale)
  decay = optim_cfg.get('decay', 'inverse_sqrt')
  if decay == 'inverse_sqrt':
    return paper
  if decay != 'cosine':
    raise ValueError(f"config.optim.decay must be 'inverse_sqrt' or 'cosine', "
                     f'not {decay!r}.')
  warmup = int(optim_cfg.warmup_steps)
  if num_steps <= warmup:
    raise ValueError(f'config.optim.decay=cosine needs train.num_steps ({num_steps}) '
                     f'above optim.warmup_steps ({warmup}).')
  final = float(optim_cfg.get('final_lr_fraction', 0.1))
  peak = optim_cfg.learning_rate_scale * d_model**-0.5 * warmup**-0.5
  cosine = optax.cosine_decay_schedule(peak, num_steps - warmup, alpha=final)

  def schedule(count):
    # Update ``warmup - 1`` (0-based) is the paper's step ``warmup``: the peak.
    return jnp.where(count < warmup, paper(count), cosine(count + 1 - warmup))

  return schedule


def make_optimizer(optim_cfg, d_model: int,
                   num_steps: int = 0) -> optax.GradientTransformation:
  """Adam with the paper's schedule; clipping, weight decay, accumulation optional.

  Args:
    optim_cfg: ``config.optim`` (b1, b2, eps, warmup_steps, learning_rate_scale,
      clip_grad_norm, weight_decay, grad_accum_steps, skip_nonfinite_updates).
    d_model: model width D (the schedule depends on it).
    num_steps: updates in the run; where ``decay='cosine'`` ends.

  Returns:
    The optax transformation. With ``grad_accum_steps > 1`` it is an
    ``optax.MultiSteps`` whose inner schedule advances once per real update.
  """
  schedule = schedule_from_config(optim_cfg, d_model, num_steps)
  parts = []
  if optim_cfg.clip_grad_norm and optim_cfg.clip_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.clip_grad_norm))
  if optim_cfg.weight_decay and optim_cfg.weight_decay > 0:
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                             eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay))
  else:
    parts.append(optax.adam(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                            eps=optim_cfg.eps))
  tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
  if optim_cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim_cfg.grad_accum_steps)
  skip = optim_cfg.get('skip_nonfinite_updates', 0)
  if skip and skip > 0:
    # Outermost, so a non-finite micro-batch gradient is not even accumulated.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=int(skip))
  return tx


def smoothed_label_entropy(vocab_size: int, label_smoothing: float) -> float:
  """Entropy of ``optax.smooth_labels(one_hot, label_smoothing)``: the loss floor.

  The smoothed cross-entropy can never go below this constant; subtracting it
  (as flax's WMT example does) makes a perfect model score 0.
  """
  if label_smoothing <= 0:
    return 0.0
  on = 1.0 - label_smoothing + label_smoothing / vocab_size
  off = label_smoothing / vocab_size
  return float(-(on * jnp.log(on) + (vocab_size - 1) * off * jnp.log(off)))


def label_smoothed_loss(logits: jax.Array, targets: jax.Array,
                        label_smoothing: float, pad_id: int = 0):
  """Sums of the smoothed and plain cross-entropy over non-pad target tokens.

  Args:
    logits: [B, T, V] float32 decoder outputs.
    targets: [B, T] int32 gold token ids; ``pad_id`` marks padding.
    label_smoothing: eps_ls (Sec 5.4); 0 gives plain cross-entropy.
    pad_id: id of padding positions, which get no loss.

  Returns:
    ``(loss_sum, nll_sum, num_tokens)``: smoothed cross-entropy summed over real
    tokens (what is minimised after dividing by ``num_tokens``), the plain
    negative log-likelihood summed likewise (for perplexity), and the number of
    non-pad target tokens (float32 scalars).
  """
  vocab_size = logits.shape[-1]
  weights = (targets != pad_id).astype(jnp.float32)  # [B, T]
  logits = logits.astype(jnp.float32)
  # Both losses from one logsumexp over V, without a [B, T, V] one-hot: with
  # soft = (1 - eps) * one_hot + eps / V (optax.smooth_labels),
  #   -sum_v soft_v * log_softmax(z)_v = lse - (1 - eps) * z_target - eps / V * sum_v z_v
  # and nll = lse - z_target. Equal to optax's softmax_cross_entropy up to float
  # rounding; the [B, T, V] passes (one-hot, two log-softmaxes and their
  # gradients) were most of the loss's cost on CPU.
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = lse - target_logit  # [B, T]
  if label_smoothing > 0:
    mean_logit = jnp.mean(logits, axis=-1)  # [B, T]
    loss = lse - (1.0 - label_smoothing) * target_logit - label_smoothing * mean_logit
  else:
    loss = nll
  return (jnp.sum(loss * weights), jnp.sum(nll * weights), jnp.sum(weights))
