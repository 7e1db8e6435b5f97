"""Training methods, the experts they train, and the one role vocabulary of the project.

A run trains one or more *experts*, named by their role: `natural` (clean data) and `robust`
(adversarial data) for the classic Generalist, plus any experts a run lists in its config's
`experts_spec` (Generalist++: e.g. `robust_linf` and `robust_l2`, one per perturbation norm). Each
expert has an EMA *teacher* of the same name, and the run deploys one *global* model. The same
names key the training state, the metrics, `summary.json` and the evaluation reports, so no
caller translates between vocabularies.

The module sits at the bottom of the package (it imports only `attacks.core`), so that `config`,
`runs`, `training` and `evaluation` all speak this vocabulary without importing one another.

Each expert is described by an `ExpertSpec`: its task (clean cross-entropy, Madry's PGD
adversarial training or TRADES, with the attack's norm, radius, steps and step size) and its
optimiser (base learning rate and weight decay; every expert follows the run's learning-rate
schedule shape `lr_knots` / `lr_factors`, as both experts do in the reference code). A config
either names no spec (the method's classic experts, described by the flat fields `lr_nat`,
`norm`, `eps`, ...) or lists one compact string per expert (`parse_expert`):

    spec    := [ROLE "="] TASK (":" OPTION)*
    TASK    := "natural"                              clean images          role natural
             | "robust"                               the flat fields' robust expert (norm,
                                                      eps, step_size, pgd_steps, robust_loss,
                                                      lr_rob, weight_decay_rob)  role robust
             | ("pgd" | "trades") ":" NORM ":" EPS ":" STEPS
                                                      adversarial training  role robust_NORM
    OPTION  := "step=" NUMBER                         attack step (default 2.5 * EPS / STEPS)
             | "lr=" NUMBER | "wd=" NUMBER            base learning rate, weight decay (default
                                                      lr_nat / weight_decay_nat for natural,
                                                      lr_rob / weight_decay_rob otherwise)
    NUMBER  := a decimal ("0.5", "3.5e-3") or a fraction ("8/255")

Synopsis::

    experts("generalist")       # ("natural", "robust")
    evaluated_roles("pgd_at")   # ("robust", "global")
    spec = parse_expert("pgd:l2:0.5:10", defaults=classic_experts(config))
    spec.role, spec.norm, spec.eps, spec.step_size   # "robust_l2", "l2", 0.5, 0.125
    expert_specs(config)        # one ExpertSpec per expert the run trains, in mixing order

References:
  Wang & Wang, "Generalist: Decoupling Natural and Robust Generalization", CVPR 2023.
  Wang, Mo, Wang, Li & Lin, "Generalist++: A Meta-learning Framework for Mitigating Trade-off in
  Adversarial Training", arXiv 2510.13361 (several base learners, e.g. one per norm).
  Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018 (the
  default step 2.5 * eps / steps).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from gen_jax.attacks.core import NORMS

NATURAL, ROBUST, GLOBAL = "natural", "robust", "global"
ROLES: tuple[str, ...] = (NATURAL, ROBUST, GLOBAL)

# Method -> the experts it trains. For a single-expert method the global model is its teacher.
_EXPERTS: dict[str, tuple[str, ...]] = {
    "generalist": (NATURAL, ROBUST),
    "pgd_at": (ROBUST,),
    "trades": (ROBUST,),
    "natural": (NATURAL,),
}
METHODS: tuple[str, ...] = tuple(_EXPERTS)
# The method that collects several experts into one global model (and may list them).
MULTI_EXPERT_METHOD = "generalist"

# Loss of the robust expert under `generalist`: Madry's PGD cross-entropy or TRADES.
ROBUST_LOSSES: tuple[str, ...] = ("pgd", "trades")

# What an expert trains on: clean images, or adversarial ones (PGD-AT or TRADES).
OBJECTIVES: tuple[str, ...] = ("clean", "pgd", "trades")
_OPTIONS = {"step": "step_size", "lr": "lr", "wd": "weight_decay"}
_ROLE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
  """One expert of a run: its role, its task and its optimiser (hashable: a static jit argument).

  Attributes:
    role: its name in the state, metrics and reports ("natural", "robust", "robust_l2", ...).
    objective: "clean" (cross-entropy on clean images), "pgd" (Madry's adversarial training) or
      "trades" (the TRADES objective, with the run's `trades_beta`).
    lr: base learning rate (scaled by the run's schedule shape `lr_factors`).
    weight_decay: SGD weight decay (PyTorch semantics: added to the gradient).
    norm: "linf" or "l2" for an adversarial objective; None for "clean".
    eps: radius of the training attack (pixels in [0, 1]).
    steps: PGD iterations of the training attack.
    step_size: PGD step of the training attack.
  """
  role: str
  objective: str
  lr: float
  weight_decay: float
  norm: str | None = None
  eps: float = 0.0
  steps: int = 0
  step_size: float = 0.0

  @property
  def adversarial(self) -> bool:
    """Whether it trains on adversarial images (PGD-AT or TRADES)."""
    return self.objective != "clean"


def experts(method: str) -> tuple[str, ...]:
  """The roles of the experts that `method` trains; ValueError for an unknown method."""
  if method not in _EXPERTS:
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
  return _EXPERTS[method]


def evaluated_roles(method: str, roles: Sequence[str] | None = None) -> tuple[str, ...]:
  """The models a run evaluates: its experts' teachers, then the global model.

  Args:
    method: the run's method.
    roles: the run's expert roles (`Config.experts`); default the method's classic experts.
  """
  return tuple(roles if roles is not None else experts(method)) + (GLOBAL,)


def uses_trades(method: str, robust_loss: str) -> bool:
  """Whether the robust expert of `method` trains with the TRADES objective."""
  return method == "trades" or (method == "generalist" and robust_loss == "trades")


def classic_experts(config: Any) -> dict[str, ExpertSpec]:
  """The two experts the flat config fields describe, by role (whatever the method trains).

  `config` is a `gen_jax.config.Config` (read by attribute: this module may not import it).
  """
  return {
      NATURAL:
          ExpertSpec(NATURAL, "clean", lr=config.lr_nat, weight_decay=config.weight_decay_nat),
      ROBUST:
          ExpertSpec(ROBUST,
                     "trades" if uses_trades(config.method, config.robust_loss) else "pgd",
                     lr=config.lr_rob,
                     weight_decay=config.weight_decay_rob,
                     norm=config.norm,
                     eps=config.eps,
                     steps=config.pgd_steps,
                     step_size=config.step_size),
  }


def expert_specs(config: Any) -> tuple[ExpertSpec, ...]:
  """The experts a run trains, in the order in which their teachers are mixed.

  Without `config.experts_spec`: the method's classic experts (natural, robust or both). With
  it: one expert per entry (`parse_expert`). Raises ValueError naming the bad entry.
  """
  classic = classic_experts(config)
  if not config.experts_spec:
    return tuple(classic[role] for role in experts(config.method))
  return tuple(parse_expert(text, defaults=classic) for text in config.experts_spec)


def _number(text: str, what: str, entry: str) -> float:
  try:
    value = float(Fraction(text.strip())) if "/" in text else float(text)
  except (ValueError, ZeroDivisionError):
    raise ValueError(f"{entry!r}: {what} {text!r} is not a number (write 0.5, 3.5e-3 or "
                     "8/255).") from None
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"{entry!r}: {what} must be a finite number >= 0, got {text!r}.")
  return value


def parse_expert(text: str, *, defaults: Mapping[str, ExpertSpec]) -> ExpertSpec:
  """One expert from its compact description (the grammar of the module docstring).

  >>> base = {"natural": ExpertSpec("natural", "clean", 0.01, 5e-4),
  ...         "robust": ExpertSpec("robust", "pgd", 0.01, 3.5e-3, "linf", 8 / 255, 10, 2 / 255)}
  >>> spec = parse_expert("pgd:l2:0.5:10", defaults=base)
  >>> spec.role, spec.eps, spec.step_size, spec.weight_decay
  ('robust_l2', 0.5, 0.125, 0.0035)
  >>> parse_expert("wide=pgd:linf:8/255:7:step=0.01:lr=0.05", defaults=base).lr
  0.05

  Args:
    text: the description, e.g. "natural", "robust", "pgd:linf:8/255:10", "pgd:l2:0.5:10:wd=5e-4",
      "trades:linf:8/255:10", "robust_big=pgd:linf:16/255:10".
    defaults: the flat fields' experts by role (`classic_experts`): "robust" copies defaults
      ["robust"]; learning rate and weight decay default to those of defaults["natural"] for a
      clean expert, of defaults["robust"] for an adversarial one.

  Raises:
    ValueError: the text does not follow the grammar (the message names the entry, the part
      and what is accepted).
  """
  entry = str(text)
  parts = [p.strip() for p in entry.split(":")]
  role = None
  if "=" in parts[0]:
    role, parts[0] = (s.strip() for s in parts[0].split("=", 1))
  task = parts[0]
  if task in (NATURAL, ROBUST):
    spec, rest = defaults[task], parts[1:]
  elif task in ("pgd", "trades"):
    if len(parts) < 4:
      raise ValueError(f"{entry!r}: an adversarial expert needs {task}:NORM:EPS:STEPS (e.g. "
                       f"'{task}:linf:8/255:10' or '{task}:l2:0.5:10').")
    norm, eps_text, steps_text = parts[1:4]
    if norm not in NORMS:
      raise ValueError(f"{entry!r}: norm {norm!r} is not one of {', '.join(NORMS)}.")
    eps = _number(eps_text, "eps", entry)
    if norm == "linf" and eps > 1.0:
      raise ValueError(f"{entry!r}: eps {eps} exceeds the [0, 1] pixel range of an L-inf ball "
                       "(8/255 is the usual value).")
    if not steps_text.isdigit() or int(steps_text) < 1:
      raise ValueError(f"{entry!r}: STEPS must be an integer >= 1, got {steps_text!r}.")
    steps = int(steps_text)
    base = defaults[ROBUST]
    spec = ExpertSpec(f"{ROBUST}_{norm}",
                      task,
                      lr=base.lr,
                      weight_decay=base.weight_decay,
                      norm=norm,
                      eps=eps,
                      steps=steps,
                      step_size=2.5 * eps / steps)
    rest = parts[4:]
  else:
    raise ValueError(f"{entry!r}: the task {task!r} is not natural, robust, pgd:... or "
                     "trades:... (e.g. 'natural', 'pgd:linf:8/255:10', 'pgd:l2:0.5:10').")
  changes = {}
  for option in rest:
    key, sep, value = option.partition("=")
    if not sep or key not in _OPTIONS:
      raise ValueError(f"{entry!r}: option {option!r} is not one of step=, lr=, wd= "
                       "(e.g. 'pgd:l2:0.5:10:step=0.1:lr=0.01:wd=5e-4').")
    if key == "step" and not spec.adversarial:
      raise ValueError(f"{entry!r}: step= applies to adversarial experts only.")
    changes[_OPTIONS[key]] = _number(value, key, entry)
  if role is not None:
    if not _ROLE.match(role) or role == GLOBAL:
      raise ValueError(f"{entry!r}: role {role!r} must be lower-case letters, digits and _ "
                       f"(starting with a letter) and not {GLOBAL!r}.")
    changes["role"] = role
  return dataclasses.replace(spec, **changes)


def _task_text(spec: ExpertSpec) -> str:
  """A description of `spec`'s task that `parse_expert` reads back (without options)."""
  if not spec.adversarial:
    return NATURAL
  return f"{spec.objective}:{spec.norm}:{spec.eps:g}:{spec.steps}"


def check_expert_specs(specs: Sequence[ExpertSpec], texts: Sequence[str] | None = None) -> None:
  """ValueError unless the roles are distinct (two experts of one norm need `ROLE=` names).

  The message suggests a renamed entry that `parse_expert` accepts: the entry as written in
  `texts` (the descriptions the specs were parsed from, same order) with a free role in front,
  e.g. 'natural_2=natural'; without `texts`, a description rebuilt from the spec.
  """
  roles = [spec.role for spec in specs]
  seen = set()
  for i, spec in enumerate(specs):
    if spec.role in seen:
      free = (f"{spec.role}_{k}" for k in range(2, len(specs) + 2))
      role = next(r for r in free if r not in roles)
      task = _task_text(spec)
      if texts is not None:
        written = str(texts[i]).strip()
        head, sep, tail = written.partition("=")
        # "ROLE=TASK...": keep TASK... ("=" may also appear in options such as step=0.1).
        task = tail.strip() if sep and ":" not in head else written
      raise ValueError(f"two experts have the role {spec.role!r}; name one of them with a "
                       f"ROLE= prefix (e.g. '{role}={task}').")
    seen.add(spec.role)
