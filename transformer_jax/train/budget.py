"""Fitting a cosine schedule to the training time budget (``train.fit_to_budget``).

A run with ``train.max_minutes`` on a machine slower than the one its ``num_steps``
was chosen on is cut by the budget before its cosine decay ends: it stops at a high
learning rate, and its last checkpoints (the ones decoding averages) span more of the
run than intended. With ``train.fit_to_budget`` the loop times the warm-up steps
(whose learning rates do not depend on where the decay ends) and, if the rest of the
budget cannot hold ``num_steps``, moves the end of the cosine, and the checkpoint
interval with it, to the step the budget can reach. A machine fast enough for
``num_steps`` trains exactly as without it.

The fit is written to ``<workdir>/budget_fit.json`` when it is made, and a resumed
run reads it back, so the schedule of a run does not change when it is resumed.
"""

from __future__ import annotations

import dataclasses
import json
import os

FIT_FILE = 'budget_fit.json'

# The timed warm-up steps run no evaluation and save no checkpoint, which the rest of
# the run does; this share of the remaining budget is left for them, so that the
# cosine ends just before the budget would cut the run.
MARGIN = 0.97

# Fewer timed steps than this give too rough a rate to move the schedule on.
MIN_TIMED_STEPS = 10


@dataclasses.dataclass(frozen=True)
class BudgetFit:
  """Where the fitted cosine ends (updates) and how often the run now saves (steps)."""
  num_steps: int
  checkpoint_every_steps: int
  fitted_at_step: int
  seconds_per_step: float
  budget_minutes: float


def fitted_num_steps(step: int, seconds_per_step: float, seconds_left: float,
                     num_steps: int, accum: int = 1) -> int:
  """The updates the budget can hold, at most ``num_steps``.

  Args:
    step: micro-batch steps done so far.
    seconds_per_step: the measured wall time of one micro-batch step.
    seconds_left: what remains of the budget.
    num_steps: the configured updates (where the cosine ends without a fit).
    accum: micro-batches per update (``optim.grad_accum_steps``).

  Returns:
    ``num_steps``, or fewer updates when the remaining budget (less ``MARGIN``)
    at ``seconds_per_step`` does not reach it.
  """
  reachable = step + max(0.0, seconds_left) * MARGIN / max(seconds_per_step, 1e-9)
  return int(min(num_steps, reachable // max(1, accum)))


def fit(config, step: int, seconds_per_step: float, seconds_left: float) -> BudgetFit | None:
  """The fit for ``config`` at ``step``: None when ``num_steps`` fits the budget, or
  when the budget ends within the warm-up (no cosine can start; the budget then
  stops the run as it would without a fit)."""
  accum = max(1, int(config.optim.grad_accum_steps))
  num_steps = int(config.train.num_steps)
  fitted = fitted_num_steps(step, seconds_per_step, seconds_left, num_steps, accum)
  if fitted >= num_steps:
    return None
  if fitted <= int(config.optim.warmup_steps):
    return None
  every = int(config.checkpoint.every_steps or 0)
  if every > 0:
    # The same share of the run between checkpoints, so the last eval.average_last
    # of them span the same part of the decay.
    every = max(1, round(every * fitted / num_steps))
  return BudgetFit(num_steps=fitted, checkpoint_every_steps=every, fitted_at_step=step,
                   seconds_per_step=float(seconds_per_step),
                   budget_minutes=float(config.train.max_minutes))


def applies(config) -> bool:
  """Whether ``config`` asks for a fit that can change anything: a budget, and a
  cosine whose end it can move."""
  return bool(config.train.get('fit_to_budget') and
              float(config.train.get('max_minutes', 0.0) or 0.0) > 0 and
              config.optim.get('decay', 'inverse_sqrt') == 'cosine')


def apply(config, budget_fit: BudgetFit):
  """A copy of ``config`` whose cosine ends and whose checkpoints come as fitted."""
  config = config.copy_and_resolve_references()
  config.train.num_steps = budget_fit.num_steps
  config.checkpoint.every_steps = budget_fit.checkpoint_every_steps
  return config


def read(workdir: str) -> BudgetFit | None:
  """The fit an earlier invocation made in ``workdir``, if any."""
  path = os.path.join(workdir, FIT_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    try:
      return BudgetFit(**json.load(f))
    except (TypeError, ValueError) as e:
      raise ValueError(f'{path} is not a budget fit this version wrote ({e}); delete it '
                       'to train with the configured train.num_steps.') from None


def write(workdir: str, budget_fit: BudgetFit) -> None:
  """Writes the fit whole, then renames it into place."""
  path = os.path.join(workdir, FIT_FILE)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(dataclasses.asdict(budget_fit), f, indent=2)
  os.replace(path + '.tmp', path)
