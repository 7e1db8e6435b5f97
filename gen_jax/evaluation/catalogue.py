"""The attack catalogue: every named attack of the evaluation, its settings, one way to run it.

The robustness report and the sanity checks both name their attacks from here, so an attack is
added in one place: an entry of `ATTACKS` (its kind, norm and settings). `run_attack` runs any
entry on a set of images in batches and returns adversarial images verified to lie in the eps-ball
and the [0, 1] box; `robust_correct` says which images the model still classifies right on them,
and `robust_accuracy` is its mean. The "clean" and "pgd" entries are threats of the correctness
engine (`threat_of` gives the `Threat`; `evaluation.engine`): their answers and images use its
per-example keys, so they equal the training loop's and the sweeps' for the same key.

Every attack is L-inf except those named for another norm ("pgd20-l2"), which run at the L2
radius the caller gives. `NORM_ATTACKS` names the PGD-20 attack of each norm: the per-norm
columns of the union (multi-norm) robustness of `evaluation.report`.

Kinds:
  "clean"       no attack.
  "pgd"         the PGD family (`attacks.pgd`, `mim`, `cw`, `fgsm`) through the correctness engine:
                one compiled batch function per (network, attack, steps); eps and the step size
                are traced, so every eps reuses it.
  "square"      `attacks.square` alone, with a query budget (the sanity checks' black-box probe).
  "autoattack"  stages of `attacks.autoattack` (APGD-CE/DLR/T, FAB-T, Square, or all of
                AutoAttack 'standard'), which attack only the points still robust.

Synopsis::

    from gen_jax.evaluation import catalogue
    acc = catalogue.robust_accuracy("pgd20", logits_fn, x, y, key=key, eps=8 / 255,
                                    step_size=2 / 255)
    report_names = catalogue.REPORT_ATTACKS   # clean, pgd20, ..., aa
    correct = catalogue.robust_correct("pgd20-l2", logits_fn, x, y, key=key, eps=0.5,
                                       step_size=0.125)[0]   # bool [N]
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gen_jax import attacks
from gen_jax.attacks.threat import Threat
from gen_jax.evaluation import engine
from gen_jax.evaluation.accuracy import correct_predictions


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One named attack.

  Attributes:
    kind: "clean", "pgd", "square" or "autoattack" (see the module docstring).
    steps: iterations of a "pgd" attack; queries of a "square" attack.
    variant: for "pgd": "pgd", "mim", "cw" or "fgsm".
    stages: for "autoattack": the stages to run (None: all of AutoAttack 'standard').
    white_box: whether it uses gradients (the sanity checks compare Square against these).
    norm: the threat model, "linf" or "l2" (the caller gives each norm's radius).
  """
  kind: str
  steps: int = 0
  variant: str = "pgd"
  stages: tuple[str, ...] | None = None
  white_box: bool = True
  norm: str = "linf"


ATTACKS: dict[str, AttackSpec] = {
    "clean": AttackSpec("clean", white_box=False),
    "fgsm": AttackSpec("pgd", steps=1, variant="fgsm"),
    "pgd10": AttackSpec("pgd", steps=10),
    "pgd20": AttackSpec("pgd", steps=20),
    "pgd50": AttackSpec("pgd", steps=50),
    "pgd100": AttackSpec("pgd", steps=100),
    "mim": AttackSpec("pgd", steps=20, variant="mim"),
    "cw": AttackSpec("pgd", steps=20, variant="cw"),
    "apgd-ce": AttackSpec("autoattack", stages=("apgd-ce",)),
    "apgd-dlr": AttackSpec("autoattack", stages=("apgd-dlr",)),
    "apgd-t": AttackSpec("autoattack", stages=("apgd-t",)),
    "fab-t": AttackSpec("autoattack", stages=("fab-t",)),
    "square": AttackSpec("autoattack", stages=("square",), white_box=False),
    "square1000": AttackSpec("square", steps=1000, white_box=False),
    # AutoAttack ends with Square, so it counts as neither white- nor black-box.
    "aa": AttackSpec("autoattack", stages=None, white_box=False),
    "pgd20-l2": AttackSpec("pgd", steps=20, norm="l2"),
}

# The paper's evaluation table, in its order: the default of the robustness report.
REPORT_ATTACKS: tuple[str, ...] = ("clean", "pgd20", "pgd100", "mim", "cw", "apgd-ce", "apgd-dlr",
                                   "apgd-t", "fab-t", "square", "aa")

# The PGD-20 attack of each norm: the columns of the union robustness (multi-norm runs).
NORM_ATTACKS: dict[str, str] = {"linf": "pgd20", "l2": "pgd20-l2"}
# Every attack an attack table may hold: the paper's, then the other norms'.
TABLE_ATTACKS: tuple[str, ...] = REPORT_ATTACKS + tuple(
    n for n in NORM_ATTACKS.values() if n not in REPORT_ATTACKS)


def check_names(names: Sequence[str], allowed: Sequence[str] = REPORT_ATTACKS) -> tuple[str, ...]:
  """Validates attack names before any work; ValueError listing the allowed ones."""
  unknown = [n for n in names if n not in allowed]
  if unknown or not names:
    raise ValueError(f"unknown attack(s) {unknown or list(names)}; choose from "
                     f"{', '.join(allowed)}.")
  return tuple(names)


def threat_of(name: str,
              *,
              eps: float,
              step_size: float,
              norm: str | None = None,
              steps: int | None = None) -> Threat | None:
  """The engine's `Threat` of a "pgd"-kind entry at radius `eps` (None for any other kind).

  FGSM's one step is eps whatever `step_size` says, so its threat records eps as its step: the
  same FGSM is then one threat (one key) whatever step the caller passed.
  """
  spec = ATTACKS[name]
  if spec.kind != "pgd":
    return None
  step = eps if spec.variant == "fgsm" else step_size
  return Threat(norm or spec.norm,
                float(eps),
                float(step),
                int(spec.steps if steps is None else steps),
                attack=spec.variant)


@functools.partial(jax.jit, static_argnames=("queries", "norm"))
def _square_batch(logits_fn, x, y, key, eps, *, queries, norm):
  return attacks.square(logits_fn, x, y, key=key, eps=eps, n_queries=queries, norm=norm)


def run_attack(name: str,
               logits_fn: Any,
               x: np.ndarray,
               y: np.ndarray,
               *,
               key: jax.Array,
               eps: float,
               step_size: float,
               batch_size: int = 250,
               norm: str | None = None,
               steps: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
  """Adversarial images of the named attack, verified to lie in the ball and the box.

  Args:
    name: a key of `ATTACKS`.
    logits_fn: `x -> logits [B, C]` over float images in [0, 1] (a `jax.tree_util.Partial` over
      the variables avoids recompiling for each model).
    x: float32 images in [0, 1], NHWC; y: int32 labels.
    key: PRNG key: "pgd" kinds attack example i from `fold_in(fold_in(key, threat.id), i)` (the
      engine's keys, `engine.adversarial`); the others use `fold_in(key, b)` for batch b.
    eps: the radius; step_size: the step of "pgd" attacks.
    batch_size: images per compiled call.
    norm: "linf" or "l2", instead of the entry's (`AttackSpec.norm`).
    steps: iterations of a "pgd" attack or queries of a "square" one, instead of the entry's.

  Returns:
    `(x_adv, extra)`: host images and, for "autoattack" attacks, `{"stages": ...}`.
  """
  spec = ATTACKS[name]
  if steps is not None:
    spec = dataclasses.replace(spec, steps=steps)
  norm = norm or spec.norm
  if spec.kind == "clean":
    return x, {}
  extra = {}
  if spec.kind == "autoattack":
    x_adv, report = attacks.autoattack(logits_fn,
                                       x,
                                       y,
                                       key=key,
                                       eps=eps,
                                       norm=norm,
                                       attacks=None if spec.stages is None else list(spec.stages),
                                       batch_size=batch_size)
    extra = {"stages": report["stages"]}
  elif spec.kind == "pgd":
    x_adv = engine.adversarial(logits_fn,
                               x,
                               y,
                               threat=threat_of(name,
                                                eps=eps,
                                                step_size=step_size,
                                                norm=norm,
                                                steps=spec.steps),
                               key=key,
                               batch_size=batch_size)
  else:
    batch = functools.partial(_square_batch,
                              logits_fn,
                              eps=jnp.float32(eps),
                              queries=spec.steps,
                              norm=norm)
    x_adv = attacks.attack_in_batches(lambda xb, yb, key: batch(xb, yb, key),
                                      x,
                                      y,
                                      key=key,
                                      batch_size=batch_size)
  attacks.verify_adversarial(x_adv, x, eps, norm)
  return x_adv, extra


def robust_correct(name: str,
                   logits_fn: Any,
                   x: np.ndarray,
                   y: np.ndarray,
                   *,
                   key: jax.Array,
                   eps: float,
                   step_size: float,
                   batch_size: int = 250,
                   norm: str | None = None,
                   steps: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
  """Per image, whether the model classifies it right under the named attack (host bool [N]),
  and the attack's extra report (see `run_attack`).

  "clean" and "pgd" kinds are answered by the correctness engine (`engine.correctness`, its
  per-example keys and on-device ball and box check); the others classify the verified images
  of `run_attack`.
  """
  spec = ATTACKS[name]
  if spec.kind in ("clean", "pgd"):
    threat = threat_of(name, eps=eps, step_size=step_size, norm=norm, steps=steps)
    threats = [threat] if threat is not None else []
    correct = engine.correctness({"m": logits_fn},
                                 x,
                                 y,
                                 threats=threats,
                                 key=key,
                                 batch_size=batch_size)["m"]
    return correct[threat if threat is not None else engine.CLEAN], {}
  x_adv, extra = run_attack(name,
                            logits_fn,
                            x,
                            y,
                            key=key,
                            eps=eps,
                            step_size=step_size,
                            batch_size=batch_size,
                            norm=norm,
                            steps=steps)
  return correct_predictions(logits_fn, x_adv, y, batch_size), extra


def robust_accuracy(name: str,
                    logits_fn: Any,
                    x: np.ndarray,
                    y: np.ndarray,
                    *,
                    key: jax.Array,
                    eps: float,
                    step_size: float,
                    batch_size: int = 250,
                    norm: str | None = None,
                    steps: int | None = None) -> tuple[float, dict[str, Any]]:
  """Exact accuracy under the named attack (see `run_attack`), and the attack's extra report."""
  correct, extra = robust_correct(name,
                                  logits_fn,
                                  x,
                                  y,
                                  key=key,
                                  eps=eps,
                                  step_size=step_size,
                                  batch_size=batch_size,
                                  norm=norm,
                                  steps=steps)
  return float(np.mean(correct)), extra
