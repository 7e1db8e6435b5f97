"""The settings that define each attack of AutoAttack, written in one place.

This module owns the numbers of the reference AutoAttack (Croce & Hein, fra31/auto-attack on
GitHub): iterations, restarts, step-size rules, number of target classes, FAB and Square
parameters. The attack functions take their keyword defaults from here, and their docstrings name
these fields.

Synopsis::

    from gen_jax.attacks.settings import DEFAULTS, RAND
    DEFAULTS.apgd.steps               # 100 iterations of APGD-CE
    DEFAULTS.apgd_t.n_target_classes  # 9 target classes for APGD-T
    DEFAULTS.square.n_queries         # 5000 queries
    RAND.apgd.eot_iter                # 20 EOT samples in the 'rand' version

The reference uses the same values for the L-inf and the L2 threat models (the step sizes scale with
`eps` in both), so one set of settings serves both norms.

References:
  Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690
  Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary attack",
  ICML 2020, https://arxiv.org/abs/1907.02044
  Andriushchenko et al., "Square Attack: a query-efficient black-box adversarial attack via random
  search", ECCV 2020, https://arxiv.org/abs/1912.00049
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class APGDSettings:
  """APGD (untargeted CE/DLR or targeted DLR) settings.

  Attributes:
    steps: iterations per run (reference `n_iter`).
    restarts: random restarts per run (reference `n_restarts`; per target class for APGD-T).
    rho: a checkpoint halves the step size when the loss rose in at most this fraction of the
      steps since the previous checkpoint (reference `rho`, `thr_decr`).
    momentum: weight of the new step after the first iteration; `1 - momentum` weights the
      previous displacement (reference `alpha` = 0.75 in the update).
    step_size_factor: the initial step size is `step_size_factor * eps` (2 for L-inf and L2).
    first_checkpoint: first checkpoint at `int(first_checkpoint * steps)` iterations.
    checkpoint_decrease: later intervals shrink by `int(checkpoint_decrease * steps)` ...
    min_checkpoint_interval: ... down to `int(min_checkpoint_interval * steps)`.
    n_target_classes: target classes of APGD-T (2nd..(n+1)th highest clean logit); capped at C - 1.
    eot_iter: gradient samples averaged per iteration (Expectation over Transformation).
  """
  steps: int = 100
  restarts: int = 1
  rho: float = 0.75
  momentum: float = 0.75
  step_size_factor: float = 2.0
  first_checkpoint: float = 0.22
  checkpoint_decrease: float = 0.03
  min_checkpoint_interval: float = 0.06
  n_target_classes: int = 9
  eot_iter: int = 1


@dataclasses.dataclass(frozen=True)
class FABSettings:
  """FAB (targeted in the standard version) settings.

  Attributes:
    steps: iterations per target class (reference `n_iter`).
    restarts: random restarts (reference `n_restarts`).
    n_target_classes: target classes (capped at C - 1).
    alpha_max: largest weight of the step towards the original point.
    eta: overshoot factor of the projection step.
    beta: weight of the backward step.
  """
  steps: int = 100
  restarts: int = 1
  n_target_classes: int = 9
  alpha_max: float = 0.1
  eta: float = 1.05
  beta: float = 0.9


@dataclasses.dataclass(frozen=True)
class SquareSettings:
  """Square Attack settings.

  Attributes:
    n_queries: query budget per example.
    p_init: initial fraction of pixels changed by a square.
    restarts: random restarts (reference `n_restarts`).
    p_schedule: query counts (rescaled to 10,000 queries in the reference when `resc_schedule`,
      which AutoAttack turns off) at which `p` is halved.
  """
  n_queries: int = 5000
  p_init: float = 0.8
  restarts: int = 1
  p_schedule: tuple[int, ...] = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


@dataclasses.dataclass(frozen=True)
class AutoAttackSettings:
  """One version of AutoAttack: the attacks it runs, in order, and their settings.

  Attributes:
    attacks: stage names, run in this order, each on the points still robust.
    apgd: APGD-CE / APGD-DLR settings.
    apgd_t: APGD-T settings.
    fab_t: FAB-T settings.
    square: Square settings.
  """
  attacks: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
  apgd: APGDSettings = APGDSettings()
  apgd_t: APGDSettings = APGDSettings()
  fab_t: FABSettings = FABSettings()
  square: SquareSettings = SquareSettings()


# AutoAttack 'standard': APGD-CE (1 restart x 100 iterations), APGD-T (9 targets x 1 restart x 100),
# FAB-T (9 targets x 100 iterations), Square (5,000 queries, p_init 0.8).
DEFAULTS = AutoAttackSettings()

# AutoAttack 'rand', for randomised defences: APGD-CE and APGD-DLR with EOT over 20 samples.
RAND = AutoAttackSettings(attacks=("apgd-ce", "apgd-dlr"), apgd=APGDSettings(eot_iter=20))

VERSIONS = {"standard": DEFAULTS, "rand": RAND}
