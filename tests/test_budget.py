"""Tests for transformer_jax.train.budget: the fitted end of the cosine.

* ``fitted_num_steps`` on known rates and budgets (micro-batches, the margin, the cap).
* ``fit`` spaces the checkpoints by the same share of the run, and leaves a schedule
  that fits, or a budget that ends within the warm-up, alone.
* ``read``/``write`` round trip; a damaged file is a one-line error.
(The loop's use of it, fit, save and resume, is in test_train.py.)
"""

import pytest

from configs import multi30k
from transformer_jax.train import budget


def test_fitted_num_steps_on_known_values():
  # 300 steps done, 1,000 s left at 0.5 s/step: 300 + 1000 * 0.97 / 0.5 = 2,240.
  assert budget.fitted_num_steps(300, 0.5, 1000.0, 7600) == 2240
  # Micro-batches: 2,240 of them are 1,120 updates of 2.
  assert budget.fitted_num_steps(300, 0.5, 1000.0, 7600, accum=2) == 1120
  assert budget.fitted_num_steps(300, 0.5, 1e6, 7600) == 7600  # Capped at num_steps.
  assert budget.fitted_num_steps(300, 0.5, -5.0, 7600) == 300  # Budget already spent.


def test_fit_moves_the_cosine_end_and_the_checkpoints_with_it():
  config = multi30k.get_config()
  assert budget.applies(config)
  config.train.num_steps, config.checkpoint.every_steps = 7600, 400
  # 0.8 s/step, 3,000 s left at step 300: 300 + 3000 * 0.97 / 0.8 = 3,937 updates.
  fit = budget.fit(config, 300, 0.8, 3000.0)
  assert fit.num_steps == 3937
  assert fit.checkpoint_every_steps == round(400 * 3937 / 7600) == 207
  fitted = budget.apply(config, fit)
  assert (fitted.train.num_steps, fitted.checkpoint.every_steps) == (3937, 207)
  assert config.train.num_steps == 7600  # apply copies.
  # The measured machine (0.42 s/step, most of the hour left) holds all 7,600.
  assert budget.fit(config, 300, 0.42, 3400.0) is None
  # A budget spent by the end of the warm-up leaves no room for a cosine: no fit.
  assert budget.fit(config, 300, 0.8, 0.0) is None


def test_applies_only_to_a_cosine_under_a_budget():
  config = multi30k.get_config()
  config.train.max_minutes = 0.0
  assert not budget.applies(config)
  config = multi30k.get_config()
  config.optim.decay = 'inverse_sqrt'
  assert not budget.applies(config)
  config = multi30k.get_config()
  config.train.fit_to_budget = False
  assert not budget.applies(config)


def test_fit_file_round_trip_and_damaged_file(tmp_path):
  assert budget.read(str(tmp_path)) is None
  fit = budget.BudgetFit(num_steps=3937, checkpoint_every_steps=207, fitted_at_step=300,
                         seconds_per_step=0.8, budget_minutes=60.0)
  budget.write(str(tmp_path), fit)
  assert budget.read(str(tmp_path)) == fit
  (tmp_path / budget.FIT_FILE).write_text('{"num_steps": 5}', encoding='utf-8')
  with pytest.raises(ValueError, match='is not a budget fit this version wrote'):
    budget.read(str(tmp_path))
