"""Per-step schedule tables: learning rates, the experts' mixing weights, redistribution.

The reference code evaluates its schedules once per epoch with the 1-indexed epoch number
(`np.interp(epoch, [0, E//3, 2E//3, E], ...)`) and redistributes "after every step of epochs 75,
80, ..., 120". This module turns that into arrays indexed by the global step, built once on the
host and passed to the jitted train step as *arguments*, so that a schedule value never
recompiles anything and the tables can be compared step by step with a hand-written reference.

Synopsis::

    tables = build_schedules(config, steps_per_epoch=390)
    tables["experts"]["robust"]["lr"][t], tables["beta"][t], tables["redistribute"][t]
    tables["weights"][t]                 # [N]: each expert's weight in the global model's target
    tables["experts"]["robust_l2"]["lr"][t]   # any expert's learning rate, by role

The mixing weights generalise β to N experts (`mixing.weight_schedule`): until `beta_start` the
natural expert(s) weigh 0 and the adversarial ones share 1 in the proportions of their final
weights; then every weight moves linearly to `expert_weights_final` (by default 1 - beta_final
for the natural expert(s), beta_final shared equally by the others). With the classic two
experts the robust column is the reference β table bit for bit and the natural one is 1 - β.

Redistribution is defined in fractions of the run, so that short runs keep the reference's phase
and duty cycle: with T steps, redistribution runs in periods of `period * T` steps starting at
`start * T`, during the first `duty` of each period (at least one step). With the defaults
(start 74/120, period 5/120, duty 1/5) and E = 120 epochs this is exactly every step of epochs
75, 80, ..., 120. The naive alternative, "every 5th epoch" rounded to a short run, makes every
late epoch a redistribution epoch and pins both experts to the global model: a degenerate run.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np

from gen_jax.config import Config
from gen_jax.mixing import beta_schedule, schedule_knot, weight_schedule
from gen_jax import experts


def epoch_of_step(step: np.ndarray, steps_per_epoch: int) -> np.ndarray:
  """1-indexed epoch of each 0-indexed global step (the reference's `epoch` variable)."""
  return np.asarray(step) // steps_per_epoch + 1


def learning_rate_table(base_lr: float, config: Config, steps_per_epoch: int) -> np.ndarray:
  """Piecewise-linear learning rate, constant within an epoch (reference `adjust_learning_rate`)."""
  total = config.epochs * steps_per_epoch
  epoch = epoch_of_step(np.arange(total), steps_per_epoch)
  knots = [schedule_knot(f, config.epochs) for f in config.lr_knots]
  factors = np.interp(epoch, knots, np.asarray(config.lr_factors, np.float64))
  return (base_lr * factors).astype(np.float32)


def beta_table(config: Config, steps_per_epoch: int) -> np.ndarray:
  """Robust weight β of the global model's target at each step (`mixing.beta_schedule`)."""
  total = config.epochs * steps_per_epoch
  epoch = epoch_of_step(np.arange(total), steps_per_epoch)
  return np.asarray(beta_schedule(epoch,
                                  config.epochs,
                                  final_beta=config.beta_final,
                                  start_fraction=config.beta_start),
                    dtype=np.float32)


def mixing_weights(config: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(start, final) weight of each expert of `config.experts` in the global model's target.

  Final: `expert_weights_final`, or 1 - beta_final shared by the natural (clean) experts and
  beta_final by the adversarial ones (all of it to one kind when the other is absent). Start: the
  natural experts 0, the adversarial ones 1 in proportion to their final weights (equal shares if
  those are all 0), so that the global model follows the robust experts first, as with β = 1.
  """
  specs = config.expert_specs
  adversarial = [s.adversarial for s in specs]
  kinds = {True: adversarial.count(True), False: adversarial.count(False)}
  if config.expert_weights_final:
    final = tuple(float(w) for w in config.expert_weights_final)
  elif not kinds[True] or not kinds[False]:
    final = tuple(1.0 / len(specs) for _ in specs)
  else:
    share = {True: config.beta_final, False: 1.0 - config.beta_final}
    final = tuple(share[a] / kinds[a] for a in adversarial)
  if not kinds[True]:
    return final, final
  robust_total = sum(w for w, a in zip(final, adversarial) if a)
  start = tuple((w / robust_total if robust_total > 0 else 1.0 / kinds[True]) if a else 0.0
                for w, a in zip(final, adversarial))
  return start, final


def weights_table(config: Config, steps_per_epoch: int) -> np.ndarray:
  """[T, N] weight of each expert (columns in `config.experts` order) per step; rows sum to 1."""
  total = config.epochs * steps_per_epoch
  epoch = epoch_of_step(np.arange(total), steps_per_epoch)
  start, final = mixing_weights(config)
  return np.asarray(weight_schedule(epoch,
                                    config.epochs,
                                    start=start,
                                    final=final,
                                    start_fraction=config.beta_start),
                    dtype=np.float32)


def _rational(value: float) -> Fraction:
  return Fraction(value).limit_denominator(100_000)


def redistribution_table(config: Config, total_steps: int) -> np.ndarray:
  """Boolean mask of the steps after which the global model is copied into both experts.

  Period k starts at step ceil((start + k * period) * T) and lasts max(1, round(duty * period *
  T)) steps, computed in exact rational arithmetic so that boundaries never drift by float
  rounding; every period redistributes at least once, however short the run.
  """
  mask = np.zeros(total_steps, dtype=bool)
  if not config.redistribute or config.method != "generalist":
    return mask
  start, period = _rational(config.redistribute_start), _rational(config.redistribute_period)
  length = max(1, round(_rational(config.redistribute_duty) * period * total_steps))
  k = 0
  while (first := math.ceil((start + k * period) * total_steps)) < total_steps:
    mask[first:first + length] = True
    k += 1
  return mask


def build_schedules(config: Config, steps_per_epoch: int) -> dict[str, Any]:
  """All per-step tables of a run.

  Args:
    config: the run's configuration.
    steps_per_epoch: optimiser steps per epoch (training images // batch size).

  Returns:
    A dict of numpy arrays of length T = `epochs * steps_per_epoch`: `beta` (the robust share
    of the global model's target: β for the classic two experts, the adversarial experts' total
    weight for more, the reference β table for a single-expert method), `weights` ([T, N], per
    expert in `config.experts` order), `redistribute` (bool), and `experts`: role -> {"lr": that
    expert's learning rate}.
  """
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}: the training split "
                     f"is smaller than one batch of {config.batch_size}; lower --batch_size.")
  total = config.epochs * steps_per_epoch
  specs = config.expert_specs
  weights = weights_table(config, steps_per_epoch)
  if config.method == experts.MULTI_EXPERT_METHOD:
    adversarial = np.asarray([s.adversarial for s in specs])
    beta = weights[:, adversarial].sum(axis=1, dtype=np.float32)
  else:
    beta = beta_table(config, steps_per_epoch)
  return {
      "beta": beta,
      "weights": weights,
      "redistribute": redistribution_table(config, total),
      "experts": {
          s.role: {
              "lr": learning_rate_table(s.lr, config, steps_per_epoch)
          } for s in specs
      },
  }
