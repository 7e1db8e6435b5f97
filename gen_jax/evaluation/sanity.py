"""Gradient-masking sanity checks: five signs that a robustness figure can be trusted.

A model that hides its gradients (step functions, saturated softmax, shattered or randomised
gradients) looks robust to gradient attacks without being robust. Carlini et al. (2019) list
behaviours every honest evaluation shows; this module measures five of them on the same points as
the robustness report and says, per check, passed or failed with the figures:

1. `eps_curve`: PGD-20 accuracy at eps x (0, 0.25, 0.5, 1, 2, 4) (0 = clean) never rises by more
   than the tolerance above any earlier point and ends below clean (unless clean is already ~0).
2. `iterative_vs_fgsm`: PGD-20 is at least as strong as FGSM: acc_pgd20 <= acc_fgsm + tol.
3. `black_box_vs_white_box`: the black-box Square Attack (default 1,000 queries) is not much
   stronger than the best white-box attack: acc_square >= min(white-box) - tol_square.
4. `unbounded_eps`: PGD-50 with eps = 1 (the whole [0, 1] box, step 0.1) leaves accuracy <= tol.
5. `more_steps`: more PGD steps never help the model: acc_pgd20 <= acc_pgd10 + tol and
   acc_pgd100 <= min(acc_pgd10, acc_pgd20) + tol.

Synopsis::

    from gen_jax.evaluation import sanity
    logits_fn = jax.tree_util.Partial(lambda v, z: model.apply(v, z, train=False), variables)
    result = sanity.sanity_checks(logits_fn, images, labels, key=key, eps=8 / 255,
                                  step_size=2 / 255, known={"clean": 0.91, "pgd20": 0.52})
    result["passed"], result["checks"]["unbounded_eps"]["detail"]
    print(sanity.to_markdown({"global": result}))

Tolerances are absolute accuracy differences. Random starts (and the Square Attack's random
search) make each figure noisy by a few images, so the default is `max(0.01, 3 / n)` for n points.
Square is compared with a wider margin, `max(0.03, 2 * tol)`: with a reduced query budget it is
usually weaker than white-box attacks, but on a few points it may legitimately beat the white-box
attacks at hand (on CIFAR-10, 5,000-query Square beats PGD-20 by about 1 point); only a clear lead
points at masked gradients. Figures the report already computed (`known`, same points) are reused;
only the missing ones are run, in batches through jitted functions in which eps and the step size
are traced, so the five points of the eps curve share one compiled PGD-20.

References:
  Carlini, Athalye, Papernot, Brendel, Rauber, Tsipras, Goodfellow, Madry & Kurakin, "On
  Evaluating Adversarial Robustness", 2019, https://arxiv.org/abs/1902.06705 (section 5)
  Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML 2018,
  https://arxiv.org/abs/1802.00420
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from gen_jax.attacks import core
from gen_jax.data import to_float
from gen_jax.evaluation import catalogue
from gen_jax.evaluation.accuracy import accuracy
from gen_jax.evaluation.modelset import ModelSet

CHECKS: tuple[str, ...] = ("eps_curve", "iterative_vs_fgsm", "black_box_vs_white_box",
                           "unbounded_eps", "more_steps")

# Multiples of eps on the eps curve (0 is the clean accuracy, 1 is PGD-20 itself).
EPS_MULTIPLIERS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)

# The unbounded attack: eps = 1 covers the whole [0, 1] box; 50 steps of 0.1 cross it five times.
UNBOUNDED_STEPS = catalogue.ATTACKS["pgd50"].steps
UNBOUNDED_STEP_SIZE = 0.1


def _curve_name(multiplier: float) -> str:
  return {0.0: "clean", 1.0: "pgd20"}.get(multiplier, f"pgd20@{multiplier:g}x")


# Every figure the checks use, in a fixed order: figure i runs with `fold_in(key, i)`, so a figure
# does not change when others are taken from `known`.
FIGURES: tuple[str, ...] = ("clean", "pgd20@0.25x", "pgd20@0.5x", "pgd20", "pgd20@2x", "pgd20@4x",
                            "fgsm", "pgd10", "pgd100", "pgd-unbounded", "square")

# White-box attacks whose figures (when known) count for the Square check. AutoAttack ("aa") is
# not one: it ends with Square, so it would hide the very lead of Square that this checks.
_WHITE_BOX = tuple(name for name, spec in catalogue.ATTACKS.items() if spec.white_box)


def known_names() -> tuple[str, ...]:
  """Names accepted in `known`: the report's attacks (`catalogue.REPORT_ATTACKS`) and `FIGURES`."""
  return tuple(dict.fromkeys(catalogue.REPORT_ATTACKS + FIGURES))


def default_tolerance(n: int) -> float:
  """The default absolute tolerance for n points: max(0.01, 3 / n), about three images' noise."""
  return max(0.01, 3.0 / n)


def default_square_tolerance(tolerance: float) -> float:
  """The default margin of the Square check: max(0.03, 2 * tolerance) (see the module docstring)."""
  return max(0.03, 2.0 * tolerance)


def _figure_settings(name: str, eps: float, step_size: float) -> tuple[str, float, float]:
  """(catalogue attack, eps, step size) of a figure; eps above 1 is the whole box anyway."""
  if name == "fgsm":
    return "fgsm", eps, eps
  if name == "square":
    return "square1000", eps, step_size
  if name == "pgd-unbounded":
    return "pgd50", 1.0, UNBOUNDED_STEP_SIZE
  if name in ("pgd10", "pgd100"):
    return name, eps, step_size
  multiplier = 1.0 if name == "pgd20" else float(name[len("pgd20@"):-1])
  # The step scales with eps, so every point of the curve is the same attack geometrically.
  return "pgd20", min(1.0, multiplier * eps), multiplier * step_size


def _measure(name, fn, x, y, *, key, eps, step_size, square_queries, batch_size) -> float:
  """Accuracy under the attack of figure `name`, on verified adversarial images."""
  if name == "clean":
    return accuracy(fn, x, y, batch_size)
  attack, eps_used, step_used = _figure_settings(name, eps, step_size)
  value, _ = catalogue.robust_accuracy(attack,
                                       fn,
                                       x,
                                       y,
                                       key=key,
                                       eps=eps_used,
                                       step_size=step_used,
                                       batch_size=batch_size,
                                       steps=square_queries if name == "square" else None)
  return value


def _pct(value: float) -> str:
  return f"{100 * value:.1f}"


def _check_eps_curve(acc: Mapping[str, float], tol: float) -> dict[str, Any]:
  names = [_curve_name(m) for m in EPS_MULTIPLIERS]
  values = [acc[n] for n in names]
  problems = []
  for i in range(1, len(values)):
    floor = min(values[:i])
    if values[i] > floor + tol:
      problems.append(f"rises to {_pct(values[i])} at eps x{EPS_MULTIPLIERS[i]:g} "
                      f"(from {_pct(floor)})")
  clean, last = values[0], values[-1]
  if clean > tol and not last < clean - tol:
    problems.append(f"ends at {_pct(last)}, not below clean {_pct(clean)}")
  curve = "/".join(_pct(v) for v in values)
  multipliers = "/".join(f"{m:g}" for m in EPS_MULTIPLIERS)
  detail = f"PGD-20 accuracy at eps x {multipliers}: {curve} %"
  detail += f"; {'; '.join(problems)}" if problems else "; never rises, ends below clean"
  return dict(passed=not problems, detail=detail, figures=dict(zip(names, values)))


def _check_iterative_vs_fgsm(acc: Mapping[str, float], tol: float) -> dict[str, Any]:
  pgd, fgsm = acc["pgd20"], acc["fgsm"]
  passed = pgd <= fgsm + tol
  relation = "<=" if passed else ">"
  detail = f"PGD-20 {_pct(pgd)} % {relation} FGSM {_pct(fgsm)} % + {_pct(tol)}"
  return dict(passed=passed, detail=detail, figures={"pgd20": pgd, "fgsm": fgsm})


def _check_black_box(acc: Mapping[str, float], tol_square: float, square_queries: int,
                     square_known: bool) -> dict[str, Any]:
  white = {n: acc[n] for n in _WHITE_BOX if n in acc}
  best_name = min(white, key=white.get)
  best, sq = white[best_name], acc["square"]
  passed = sq >= best - tol_square
  relation = ">=" if passed else "<"
  queries = "report's" if square_known else f"{square_queries}-query"
  detail = (f"Square ({queries}) {_pct(sq)} % {relation} best white-box ({best_name}) "
            f"{_pct(best)} % - {_pct(tol_square)}")
  return dict(passed=passed, detail=detail, figures={"square": sq, "best_white_box": best, **white})


def _check_unbounded(acc: Mapping[str, float], tol: float) -> dict[str, Any]:
  value = acc["pgd-unbounded"]
  passed = value <= tol
  detail = (f"PGD-{UNBOUNDED_STEPS} with eps = 1 (the whole box): {_pct(value)} % "
            f"{'<=' if passed else '>'} {_pct(tol)}")
  return dict(passed=passed, detail=detail, figures={"pgd-unbounded": value})


def _check_more_steps(acc: Mapping[str, float], tol: float) -> dict[str, Any]:
  names = ("pgd10", "pgd20", "pgd100")
  values = [acc[n] for n in names]
  problems = []
  for i in range(1, len(values)):
    floor = min(values[:i])
    if values[i] > floor + tol:
      problems.append(f"{names[i]} {_pct(values[i])} > {_pct(floor)} + {_pct(tol)}")
  detail = f"PGD-10/20/100: {'/'.join(_pct(v) for v in values)} %"
  detail += f"; {'; '.join(problems)}" if problems else "; never rises with more steps"
  return dict(passed=not problems, detail=detail, figures=dict(zip(names, values)))


def _validate(images, labels, eps, step_size, known, tolerance, square_tolerance, square_queries,
              batch_size, progress) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
  """Checks every argument before any attack runs; returns float images, int labels, known."""
  for name, value in (("eps", eps), ("step_size", step_size)):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
      raise TypeError(f"{name} must be a Python float, got {type(value).__name__}.")
    if not math.isfinite(value) or value <= 0:
      raise ValueError(f"{name} must be a finite number > 0, got {value}; e.g. eps=8 / 255, "
                       "step_size=2 / 255 (eps 0 is the clean accuracy, already on the curve).")
  if eps > 1:
    raise ValueError(f"eps must be <= 1 (images lie in [0, 1]), got {eps}.")
  core.check_positive_int("square_queries", square_queries)
  core.check_positive_int("batch_size", batch_size)
  if progress is not None and not callable(progress):
    raise TypeError(f"progress must be a callable taking a string or None, got {progress!r}.")
  for name, value in (("tolerance", tolerance), ("square_tolerance", square_tolerance)):
    if value is not None and (isinstance(value, bool) or
                              not isinstance(value,
                                             (int, float, np.floating)) or not 0.0 <= value < 1.0):
      raise ValueError(f"{name} must be None (the default) or an accuracy difference in [0, 1), "
                       f"got {value!r}.")
  known = {} if known is None else known
  if not isinstance(known, Mapping):
    raise TypeError(f"known must be a dict of attack name -> accuracy, got {type(known).__name__}.")
  names = known_names()
  unknown = [k for k in known if k not in names]
  if unknown:
    raise ValueError(f"unknown name(s) {unknown} in known; use names from {', '.join(names)}.")
  checked = {}
  for name, value in known.items():
    try:
      value = float(value)
    except (TypeError, ValueError):
      raise ValueError(f"known[{name!r}] must be an accuracy in [0, 1], got {value!r}.") from None
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"known[{name!r}] must be an accuracy in [0, 1] (a fraction, not %), got "
                       f"{value}.")
    checked[name] = value
  x = to_float(np.asarray(images))
  y = np.asarray(labels)
  if x.ndim != 4 or x.shape[0] == 0:
    raise ValueError(f"images must be a non-empty NHWC batch [N, H, W, C], got shape {x.shape}.")
  if not np.issubdtype(y.dtype, np.integer):
    raise TypeError(f"labels must be integer class labels, got dtype {y.dtype}.")
  return x, y.astype(np.int32), checked


# The black-box check's query budget: the Square Attack of the standard AutoAttack.
SQUARE_QUERIES = 1000


def sanity_checks(logits_fn: Callable[[jax.Array], jax.Array],
                  images: Any,
                  labels: Any,
                  *,
                  key: jax.Array,
                  eps: float,
                  step_size: float,
                  known: Mapping[str, float] | None = None,
                  tolerance: float | None = None,
                  square_tolerance: float | None = None,
                  square_queries: int = SQUARE_QUERIES,
                  batch_size: int = 250,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Runs the five gradient-masking checks (`CHECKS`) on one model (L-inf).

  Args:
    logits_fn: `x -> logits [B, C]` for float NHWC images in [0, 1] (a `jax.tree_util.Partial`
      over the variables avoids recompiling for each model).
    images: the points, NHWC, uint8 or floats in [0, 1] (the report's points, for `known`).
    labels: int labels [N].
    key: PRNG key; figure i of `FIGURES` uses `fold_in(key, i)`.
    eps: L-inf radius of the evaluation (> 0; a concrete float).
    step_size: step of PGD at `eps` (scaled with eps along the curve).
    known: attack name -> accuracy already measured on the same points (names of
      `catalogue.REPORT_ATTACKS` such as "clean", "pgd20", "pgd100", "square", or of `FIGURES`);
      these are used as given and not recomputed.
    tolerance: absolute accuracy tolerance of the checks; default `max(0.01, 3 / n)`.
    square_tolerance: margin by which Square may beat the best white-box attack; default
      `max(0.03, 2 * tolerance)`.
    square_queries: query budget of the Square Attack when "square" is not known.
    batch_size: points per compiled attack call.
    progress: optional callback told the figure's name before each attack.

  Returns:
    {"passed": all checks passed, "n", "eps", "tolerance", "square_tolerance",
     "accuracies": figure -> accuracy (known and computed), "computed": names run here,
     "seconds": wall time, "checks": {name: {"passed", "detail" (one line, figures in %),
     "figures": {name: accuracy}}}}.

  Raises:
    ValueError, TypeError: eps or step_size <= 0 (or eps > 1), unknown names or values outside
      [0, 1] in `known`, a bad tolerance, images that are not an NHWC batch in [0, 1], labels that
      do not match, a logits_fn that does not return [B, C].
  """
  started = time.time()
  x, y, known = _validate(images, labels, eps, step_size, known, tolerance, square_tolerance,
                          square_queries, batch_size, progress)
  fn = core.as_pytree_fn(logits_fn)
  # Shapes, value ranges and the logits' shape, on the host before any attack runs.
  core.validate_attack_inputs(fn, x, y, eps=eps)
  n = int(y.shape[0])
  tol = default_tolerance(n) if tolerance is None else float(tolerance)
  tol_square = (default_square_tolerance(tol)
                if square_tolerance is None else float(square_tolerance))
  acc = dict(known)
  computed = []
  for i, name in enumerate(FIGURES):
    if name in acc:
      continue
    if progress is not None:
      progress(name)
    acc[name] = _measure(name,
                         fn,
                         x,
                         y,
                         key=jax.random.fold_in(key, i),
                         eps=float(eps),
                         step_size=float(step_size),
                         square_queries=square_queries,
                         batch_size=batch_size)
    computed.append(name)
  checks = {
      "eps_curve":
          _check_eps_curve(acc, tol),
      "iterative_vs_fgsm":
          _check_iterative_vs_fgsm(acc, tol),
      "black_box_vs_white_box":
          _check_black_box(acc, tol_square, square_queries, "square" in known),
      "unbounded_eps":
          _check_unbounded(acc, tol),
      "more_steps":
          _check_more_steps(acc, tol),
  }
  return {
      "passed": all(c["passed"] for c in checks.values()),
      "n": n,
      "eps": float(eps),
      "tolerance": tol,
      "square_tolerance": tol_square,
      "accuracies": acc,
      "computed": computed,
      "seconds": round(time.time() - started, 2),
      "checks": checks,
  }


def run(models: ModelSet,
        images: Any,
        labels: Any,
        *,
        key: jax.Array,
        eps: float,
        step_size: float,
        batch_size: int = 250,
        progress: Callable[[str], None] | None = None,
        known: Mapping[str, Mapping[str, float]] | None = None,
        **options: Any) -> dict[str, Any]:
  """The sanity checks of `gen_jax.evaluation.report`: `sanity_checks` of every model.

  Args:
    models: the models.
    images, labels: the points (float images in [0, 1] or uint8).
    key: PRNG key (the same for every model).
    eps, step_size: the evaluation's L-inf radius and PGD step.
    batch_size: points per compiled attack call.
    progress: optional callback told the figure's name before each attack.
    known: name -> figures already measured on the same points (e.g. the attack table's).
    **options: further arguments of `sanity_checks` (tolerances, square_queries).

  Returns:
    {"n": number of points, "models": {name: the result of `sanity_checks`}}.
  """
  known = known or {}
  return {
      "n": int(np.shape(labels)[0]),
      "models": {
          name:
              sanity_checks(fn,
                            images,
                            labels,
                            key=key,
                            eps=eps,
                            step_size=step_size,
                            known=known.get(name),
                            batch_size=batch_size,
                            progress=progress,
                            **options) for name, fn in models.logits_fns().items()
      }
  }


def _cell(name: str, check: Mapping[str, Any]) -> str:
  """"pass"/"FAIL" and the key figures (%) of one check, short enough for a table cell."""
  f = {k: _pct(v) for k, v in check["figures"].items()}
  if name == "eps_curve":
    figures = "/".join(f[_curve_name(m)] for m in EPS_MULTIPLIERS)
  elif name == "iterative_vs_fgsm":
    figures = f"PGD-20 {f['pgd20']}, FGSM {f['fgsm']}"
  elif name == "black_box_vs_white_box":
    figures = f"Square {f['square']}, white-box {f['best_white_box']}"
  elif name == "unbounded_eps":
    figures = f["pgd-unbounded"]
  else:
    figures = "/".join(f[k] for k in ("pgd10", "pgd20", "pgd100"))
  return f"{'pass' if check['passed'] else 'FAIL'} ({figures})"


def to_markdown(result: Mapping[str, Any]) -> str:
  """A markdown table of the checks of several models.

  Args:
    result: the output of `run`: {"n", "models": {name: the output of `sanity_checks`}}.

  Returns:
    A caption line, then `| model | <one column per check> | overall |`, each cell "pass" or
    "FAIL" with the check's key figures (accuracies in %); the overall cell gives n and the
    tolerances.

  Raises:
    ValueError: if a result lacks a check (not an output of `sanity_checks`).
  """
  multipliers = "/".join(f"{m:g}" for m in EPS_MULTIPLIERS)
  lines = [
      f"Gradient-masking sanity checks (accuracy in %; eps_curve at eps x {multipliers}, "
      "more_steps PGD-10/20/100).", "", "| model | " + " | ".join(CHECKS) + " | overall |",
      "|---|" + "---|" * (len(CHECKS) + 1)
  ]
  for role, checks in result["models"].items():
    missing = [c for c in CHECKS if c not in checks.get("checks", {})]
    if missing:
      raise ValueError(f"result['models'][{role!r}] lacks check(s) {missing}; pass run's output.")
    cells = [_cell(c, checks["checks"][c]) for c in CHECKS]
    overall = (f"{'pass' if checks['passed'] else 'FAIL'} (n {checks['n']}, tol "
               f"{_pct(checks['tolerance'])}, Square tol {_pct(checks['square_tolerance'])})")
    lines.append(f"| {role} | " + " | ".join(cells) + f" | {overall} |")
  return "\n".join(lines) + "\n"
