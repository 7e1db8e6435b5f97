"""Per-step schedule tables: learning rates, β and the redistribution mask of a run.

The reference code evaluates its schedules once per epoch with the 1-indexed epoch number
(`np.interp(epoch, [0, E//3, 2E//3, E], ...)`) and redistributes "after every step of epochs 75,
80, ..., 120". This module turns that into arrays indexed by the global step, built once on the
host and passed to the jitted train step as *arguments*, so that a schedule value never
recompiles anything and the tables can be compared step by step with a hand-written reference.

Synopsis::

    tables = build_schedules(config, steps_per_epoch=390)
    tables["lr_rob"][t], tables["beta"][t], tables["redistribute"][t]

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

import numpy as np

from gen_jax.config import Config
from gen_jax.mixing import beta_schedule, schedule_knot


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


def build_schedules(config: Config, steps_per_epoch: int) -> dict[str, np.ndarray]:
  """All per-step tables of a run, keyed `lr_nat`, `lr_rob`, `beta`, `redistribute`.

  Args:
    config: the run's configuration.
    steps_per_epoch: optimiser steps per epoch (training images // batch size).

  Returns:
    A dict of numpy arrays of length `epochs * steps_per_epoch`.
  """
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}: the training split "
                     f"is smaller than one batch of {config.batch_size}; lower --batch_size.")
  total = config.epochs * steps_per_epoch
  return {
      "lr_nat": learning_rate_table(config.lr_nat, config, steps_per_epoch),
      "lr_rob": learning_rate_table(config.lr_rob, config, steps_per_epoch),
      "beta": beta_table(config, steps_per_epoch),
      "redistribute": redistribution_table(config, total),
  }
