"""The threat model of an evaluation, derived once from a run's config.

A figure called "PGD-20" must be one measurement wherever it is printed: the same norm, radius,
step size and number of steps. `Threat.of(config)` is the one place that turns a config (and an
optional other radius or norm) into those numbers; the training loop's test figures, the
report, the sweeps, the study and the mechanism diagnostic all take it from here.

The evaluation step scales with the radius, as the run's own does: a run evaluated at eps with
step s attacks radius r with step s * r / eps (PGD-20 at 8/255 with step 2/255 becomes step
0.125 at L2 radius 0.5 when the run's L2 expert is at 0.5, and step 4/255 at 16/255).

Synopsis::

    threat = Threat.of(config)                      # the run's own: linf, 8/255, 2/255, 20 steps
    threat.eps, threat.step_size, threat.steps, threat.norm
    Threat.of(config, eps=16 / 255)                 # another radius, the step scaled alike
    Threat.of(config, norm="l2")                    # at the run's L2 expert's radius (or None)
    threat.at(0.5, norm="l2")                       # any radius and norm, the step scaled alike
    str(threat)                                     # "PGD-20 linf eps 0.03137 (8.00/255), step ..."
    threat.id                                       # stable 31-bit integer: its attack keys' salt

`Threat.id` names a threat across processes and programs (a CRC-32 of its fields written out, not
Python's `hash`, which is salted per process for strings): the evaluation engine folds it into
its key, so each threat has its own random starts and every program that evaluates the same
threat draws the same ones.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any

from gen_jax.attacks.core import NORMS

# The attacks a threat may name: the PGD family (`gen_jax.attacks.pgd`), each with one key per
# example in the evaluation engine. "pgd" and "cw" start at a random point of the ball; "mim" and
# "fgsm" start at the clean image (deterministic).
ATTACKS = ("pgd", "mim", "cw", "fgsm")


@dataclasses.dataclass(frozen=True)
class Threat:
  """One evaluation attack of the PGD family (hashable: a key of results).

  Attributes:
    norm: "linf" or "l2".
    eps: the radius.
    step_size: the step ("fgsm" ignores it: its one step is eps).
    steps: iterations.
    attack: one of `ATTACKS` ("pgd": cross-entropy PGD with a random start).
    restarts: independent runs of "pgd" or "cw" (an example counts as fooled if one run fools it).
  """
  norm: str
  eps: float
  step_size: float
  steps: int
  attack: str = "pgd"
  restarts: int = 1

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}.")
    if self.attack not in ATTACKS:
      raise ValueError(f"attack must be one of {ATTACKS}, got {self.attack!r}.")
    if self.restarts > 1 and self.attack not in ("pgd", "cw"):
      raise ValueError(f"only pgd and cw take restarts; got {self}.")
    if not self.eps > 0 or not self.step_size > 0 or self.steps < 0 or self.restarts < 1:
      raise ValueError(f"a threat needs eps > 0, step_size > 0, steps >= 0 and restarts >= 1; "
                       f"got {self}.")

  @classmethod
  def of(cls, config: Any, *, eps: float | None = None, norm: str | None = None) -> Threat | None:
    """The threat of a run's evaluation (`config.eval_pgd_steps` steps), at `config.eps` or
    another radius `eps`; with `norm="l2"` for an L-inf run, at its L2 expert's radius (None when
    it has no L2 expert). The step is `config.eval_step_size` scaled by radius / `config.eps`."""
    norm = norm or config.norm
    if eps is None:
      eps = config.eps if norm == config.norm else l2_radius(config)
      if eps is None:
        return None
    own = cls(norm=config.norm,
              eps=float(config.eps),
              step_size=float(config.eval_step_size),
              steps=int(config.eval_pgd_steps))
    return own.at(eps, norm=norm)

  def at(self, eps: float, *, norm: str | None = None) -> Threat:
    """This threat at radius `eps` (and `norm`, default its own), the step scaled alike:
    `step_size * eps / self.eps`, the rule of every rescaled evaluation (the module docstring).

    >>> Threat("linf", 8 / 255, 2 / 255, 20).at(0.5, norm="l2").step_size
    0.125
    """
    # At its own radius exactly its step (no rounding through the ratio), so that every program
    # reproduces the training loop's figures bit for bit.
    step = self.step_size if eps == self.eps else self.step_size * eps / self.eps
    return dataclasses.replace(self, norm=norm or self.norm, eps=float(eps), step_size=float(step))

  @property
  def id(self) -> int:
    """A stable integer in [0, 2**31) naming this threat: the CRC-32 of its fields written out
    (floats by `repr`, exact), the same in every process and program. Two threats differing in
    any field (even eps by one ulp) get different ids, barring a CRC collision."""
    text = (f"{self.attack}|{self.norm}|{float(self.eps)!r}|{float(self.step_size)!r}|"
            f"{int(self.steps)}|{int(self.restarts)}")
    return zlib.crc32(text.encode()) & 0x7FFFFFFF

  def record(self) -> dict[str, Any]:
    """Its fields and its printed name: how `report.json`, `sweep.json` and `compare.json`
    record the threat they ran."""
    return {**dataclasses.asdict(self), "name": str(self)}

  def __str__(self) -> str:
    radius = f" ({255 * self.eps:.2f}/255)" if self.norm == "linf" else ""
    return (f"{self.attack.upper()}-{self.steps} {self.norm} eps {self.eps:.5g}{radius}, step "
            f"{self.step_size:.5g}" + (f", {self.restarts} restarts" if self.restarts > 1 else ""))


def l2_radius(config: Any) -> float | None:
  """The L2 radius a run was trained for: its first L2 expert's eps (None without one)."""
  for spec in config.expert_specs:
    if spec.adversarial and spec.norm == "l2":
      return float(spec.eps)
  return None
