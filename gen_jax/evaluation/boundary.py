"""Boundary analysis: how far each test point lies from a model's decision boundary (L-inf).

This module owns the per-point signed distances to the decision boundary, the summary of their
distribution per model (median radius, accuracy on the points closest to the boundary, a hard set
shared by all models), the histogram plot and the markdown table.

Definitions:
  * Radius r(x) of a correctly classified point: the smallest L-inf eps at which an attack finds an
    adversarial example in the eps-ball (and the [0, 1] box). Attacks give upper bounds, so r(x)
    is an upper bound of the true minimal perturbation.
  * Misclassified point: the smallest eps at which the point can be moved back to its true class
    (steps that descend the cross-entropy of the true label), reported as a NEGATIVE signed
    distance. The signed distance is therefore > 0 exactly for the correctly classified points.
  * Points the attack cannot flip within `eps_max` get the signed distance +inf (correct) or -inf
    (misclassified) from `boundary_distances`; the JSON-safe report caps them at +-eps_max and
    lists their indices under "beyond_eps_max".
  * "Closest fraction": the round(fraction * n) points (at least one) with the smallest unsigned
    distance |d|, ties broken by index; its accuracy is the share of them with d > 0.
  * Shared hard set: the same number of points with the smallest mean over all models of the
    unsigned distance capped at eps_max; each model's clean accuracy on it is comparable across
    models (the same points for all of them).

Methods:
  * "bisection" (default): per example, one PGD run at eps_max (is the point flippable at all?),
    then `bisection_steps` rounds, each one PGD run (`pgd_steps` sign steps of 2.5 * eps / steps
    from a random start, CE loss ascended for correct points and descended for misclassified ones)
    at the per-example midpoint of [lo, hi]; success (the prediction's correctness flips at any
    iterate) sets hi, failure sets lo. The result is hi, within eps_max / 2**bisection_steps of
    the smallest eps at which the attack succeeds. All rounds of a batch are one jitted
    `lax.fori_loop` with a traced [B] eps, so one compile serves every round and every eps_max.
    A point that resists the run at eps_max is retried at eps_max in the following rounds (extra
    restarts); once one succeeds, its bisection starts from [0, eps_max] with the rounds left.
  * "fab": untargeted FAB (`gen_jax.attacks.fab.fab`, 100 steps, 1 restart) with eps = eps_max;
    the radius is the L-inf norm of the returned perturbation where it is adversarial. FAB does not
    move misclassified points, so those get the bisection's distance towards their true class.

Synopsis::

    from gen_jax.evaluation import boundary
    d = boundary.boundary_distances(logits_fn, x, y, key=key, eps_max=32 / 255)  # signed, [n]
    report = boundary.boundary_report({"natural": f_nat, "robust": f_rob, "global": f_mix}, x, y,
                                      key=key, eps=8 / 255)
    boundary.plot_boundary(report, "runs/c10/eval/boundary.png")
    print(boundary.to_markdown(report))

References:
  Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018,
  https://arxiv.org/abs/1706.06083
  Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary attack",
  ICML 2020, https://arxiv.org/abs/1907.02044
"""
from __future__ import annotations

import functools
import math
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gen_jax.attacks import core
from gen_jax.attacks.fab import fab as fab_attack
from gen_jax.data import to_float
from gen_jax.data.batching import map_batches
from gen_jax.evaluation import outputs
from gen_jax.evaluation.accuracy import correct_predictions
from gen_jax.evaluation.modelset import ModelSet

METHODS = ("bisection", "fab")

LogitsFn = Callable[[jax.Array], jax.Array]


def _check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")


def _check_eps_max(eps_max: Any) -> float:
  try:
    value = float(eps_max)
  except (TypeError, ValueError):
    raise ValueError(
        f"eps_max must be a positive number (e.g. 32 / 255), got {eps_max!r}.") from None
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"eps_max must be finite and > 0 (the largest radius searched, e.g. "
                     f"32 / 255), got {eps_max!r}.")
  return value


def _check_fraction(fraction: Any) -> float:
  try:
    value = float(fraction)
  except (TypeError, ValueError):
    raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}.") from None
  if not 0.0 < value <= 1.0:
    raise ValueError(f"fraction must lie in (0, 1] (0.1 = the closest 10% of the points), got "
                     f"{fraction!r}.")
  return value


def _as_float_images(images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images become floats in [0, 1]; labels keep their dtype for the checks."""
  x = to_float(np.asarray(images))
  if x.shape[:1] == (0,):
    raise ValueError("images is empty; pass at least one test image.")
  return x, np.asarray(labels)


def _flip_found(logits_fn, x, y, correct, key, eps, *, steps):
  """One PGD run at the per-example radius `eps` [B]; whether some iterate flips correctness.

  Correct points ascend CE(y) (untargeted attack), misclassified ones descend it (a targeted step
  towards y); a flip at any iterate, the random start included, counts.
  """
  direction = jnp.where(correct, 1.0, -1.0).astype(x.dtype)
  step = core._per_example(2.5 * eps / steps, x)  # pylint: disable=protected-access

  def loss_fn(xa):
    logits = logits_fn(xa)
    return jnp.sum(direction * core.ce_loss(logits, y)), logits

  def flipped(logits):
    return (jnp.argmax(logits, axis=1) == y) != correct

  def body(_, carry):
    xa, found = carry
    (_, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(xa)
    xa = core.project_linf(xa + step * jnp.sign(g), x, eps)
    return xa, found | flipped(logits)

  x0 = core.random_start(key, x, eps, "linf")
  xa, found = jax.lax.fori_loop(0, steps, body, (x0, jnp.zeros(x.shape[:1], bool)))
  return found | flipped(logits_fn(xa))


@functools.partial(jax.jit, static_argnames=("bisection_steps", "pgd_steps"))
def _bisection_batch(logits_fn, x, y, key, eps_max, *, bisection_steps, pgd_steps):
  """Signed distances [B] of one batch by PGD bisection (see the module docstring)."""
  eps_max = jnp.asarray(eps_max, x.dtype)
  correct = jnp.argmax(logits_fn(x), axis=1) == y
  bsz = x.shape[0]

  def round_body(i, carry):
    lo, hi = carry
    # Points not yet flipped (hi = inf) are (re)tried at eps_max; the others bisect [lo, hi].
    mid = jnp.where(jnp.isinf(hi), eps_max, 0.5 * (lo + hi))
    found = _flip_found(logits_fn, x, y, correct, jax.random.fold_in(key, i), mid, steps=pgd_steps)
    hi = jnp.where(found, mid, hi)
    # A failure at eps_max says nothing about smaller radii once a later retry succeeds.
    lo = jnp.where(found | jnp.isinf(hi), lo, mid)
    return lo, hi

  init = (jnp.zeros((bsz,), x.dtype), jnp.full((bsz,), jnp.inf, x.dtype))
  _, hi = jax.lax.fori_loop(0, bisection_steps + 1, round_body, init)
  return jnp.where(correct, hi, -hi)


@jax.jit
def _fab_radius(logits_fn, x, y, x_adv):
  """L-inf norm of the FAB perturbation where it is adversarial, else +inf."""
  wrong = jnp.argmax(logits_fn(x_adv), axis=1) != y
  return jnp.where(wrong, core.lp_norm(x_adv - x, "linf"), jnp.inf)


def boundary_distances(logits_fn: LogitsFn,
                       images: Any,
                       labels: Any,
                       *,
                       key: jax.Array,
                       eps_max: float,
                       method: str = "bisection",
                       bisection_steps: int = 10,
                       pgd_steps: int = 20,
                       batch_size: int = 250) -> np.ndarray:
  """Signed L-inf distance of each point to the decision boundary of `logits_fn`.

  Positive for correctly classified points (their radius r(x)), negative for misclassified ones
  (the distance back to the true class), +-inf where nothing was found within `eps_max`.

  Args:
    logits_fn: `x -> logits [B, C]`, jit-able (a `jax.tree_util.Partial` of the variables avoids
      recompiling for new weights).
    images: NHWC images, uint8 or floats in [0, 1], [n, H, W, C].
    labels: integer labels [n].
    key: PRNG key (batch i uses fold_in(key, i), round r of its bisection fold_in(., r)).
    eps_max: largest radius searched (> 0).
    method: "bisection" or "fab" (see the module docstring).
    bisection_steps: bisection rounds after the run at eps_max (resolution eps_max / 2**steps).
    pgd_steps: PGD iterations per round (step size 2.5 * eps / pgd_steps).
    batch_size: examples per jitted call; the last batch is padded.

  Returns:
    float32 numpy array [n] of signed distances.

  Raises:
    ValueError, TypeError: an unknown method, eps_max <= 0, bad step counts or batch size, or bad
      images / labels / logits (see `gen_jax.attacks.core.validate_attack_inputs`).
  """
  _check_method(method)
  eps_max = _check_eps_max(eps_max)
  core.check_positive_int("bisection_steps", bisection_steps)
  core.check_positive_int("pgd_steps", pgd_steps)
  core.check_positive_int("batch_size", batch_size)
  x, y = _as_float_images(images, labels)
  core.validate_attack_inputs(logits_fn, x, y, eps=eps_max, steps=pgd_steps, norm="linf")
  x, y = x.astype(np.float32), y.astype(np.int32)
  fn = core.as_pytree_fn(logits_fn)
  eps_arr = jnp.float32(eps_max)

  def bisect(xb, yb, kb):
    return _bisection_batch(fn,
                            xb,
                            yb,
                            kb,
                            eps_arr,
                            bisection_steps=bisection_steps,
                            pgd_steps=pgd_steps)

  if method == "bisection":
    return map_batches(bisect, (x, y), batch_size=min(batch_size, len(y)),
                       key=key).astype(np.float32)

  fab_key, back_key = jax.random.split(key)

  def fab_radius(xb, yb, kb):
    x_adv = fab_attack(fn, xb, yb, key=kb, eps=eps_arr, norm="linf")
    return _fab_radius(fn, xb, yb, x_adv)

  correct = correct_predictions(fn, x, y, batch_size)
  dist = map_batches(fab_radius, (x, y), batch_size=min(batch_size, len(y)),
                     key=fab_key).astype(np.float32)
  wrong = np.flatnonzero(~correct)
  if wrong.size:
    dist[wrong] = map_batches(bisect, (x[wrong], y[wrong]),
                              batch_size=min(batch_size, wrong.size),
                              key=back_key)
  return dist


def closest_indices(unsigned: Any, fraction: float) -> np.ndarray:
  """Indices of the round(fraction * n) points (at least 1) with the smallest `unsigned` value.

  Ties are broken by index (stable sort), so the selection is deterministic.

  >>> closest_indices([0.3, 0.1, 0.2, 0.1], 0.5)
  array([1, 3])
  """
  fraction = _check_fraction(fraction)
  unsigned = np.asarray(unsigned, dtype=np.float64)
  if unsigned.ndim != 1 or unsigned.size == 0:
    raise ValueError(f"distances must be a non-empty [n] vector, got shape {unsigned.shape}.")
  k = min(unsigned.size, max(1, int(round(fraction * unsigned.size))))
  return np.argsort(unsigned, kind="stable")[:k]


def closest_accuracy(signed: Any, fraction: float) -> tuple[float, int]:
  """Accuracy (share with signed distance > 0) on the `fraction` of points closest to the boundary.

  Returns:
    (accuracy, number of points in the closest set).
  """
  signed = np.asarray(signed, dtype=np.float64)
  idx = closest_indices(np.abs(signed), fraction)
  return float(np.mean(signed[idx] > 0)), int(idx.size)


def shared_hard_set(distances: Mapping[str, Any],
                    fraction: float,
                    cap: float = np.inf) -> tuple[np.ndarray, dict[str, float]]:
  """The points closest to the boundary on average over models, and each model's accuracy there.

  The rank is the mean over models of min(|d|, cap); capping keeps one model's "beyond eps_max"
  (inf) from swamping the others.

  >>> idx, acc = shared_hard_set({"a": [0.1, -0.2, 0.5], "b": [-0.1, 0.1, 0.6]}, 0.3)
  >>> idx, acc
  (array([0]), {'a': 1.0, 'b': 0.0})

  Args:
    distances: role -> signed distances [n] (all of the same n).
    fraction: share of the points in the set, in (0, 1].
    cap: cap of the unsigned distances before averaging (eps_max in the report).

  Returns:
    (indices of the set, {role: share of the set with signed distance > 0}).

  Raises:
    ValueError: no models, vectors of different lengths, or a bad `fraction`.
  """
  if not distances:
    raise ValueError("distances must hold at least one model (role -> signed distances).")
  signed = {role: np.asarray(d, dtype=np.float64) for role, d in distances.items()}
  shapes = {role: d.shape for role, d in signed.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"every model needs distances for the same points, got shapes {shapes}.")
  mean_unsigned = np.mean([np.minimum(np.abs(d), cap) for d in signed.values()], axis=0)
  idx = closest_indices(mean_unsigned, fraction)
  return idx, {role: float(np.mean(d[idx] > 0)) for role, d in signed.items()}


def _summary(signed: np.ndarray, *, eps: float, eps_max: float, fraction: float) -> dict[str, Any]:
  """The per-model entry of the report (JSON-safe)."""
  signed = np.asarray(signed, np.float64)  # clip against the float64 eps_max exactly
  correct = signed > 0
  radii = np.minimum(signed[correct], eps_max)
  closest_acc, closest_n = closest_accuracy(signed, fraction)
  beyond = np.flatnonzero(np.isinf(signed))
  return {
      "clean": float(np.mean(correct)),
      "median_radius": float(np.median(radii)) if radii.size else None,
      "mean_radius": float(np.mean(radii)) if radii.size else None,
      "robust_at_eps": float(np.mean(signed > eps)),
      "closest_accuracy": closest_acc,
      "closest_n": closest_n,
      "beyond_eps_max": [int(i) for i in beyond],
      "distances": [float(v) for v in np.clip(signed, -eps_max, eps_max)],
  }


def boundary_report(logits_fns: Mapping[str, LogitsFn],
                    images: Any,
                    labels: Any,
                    *,
                    key: jax.Array,
                    eps: float,
                    eps_max: float | None = None,
                    method: str = "bisection",
                    fraction: float = 0.1,
                    batch_size: int = 250,
                    bisection_steps: int = 10,
                    pgd_steps: int = 20,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Boundary distances of several models on the same points, summarised (JSON-safe).

  Every model is attacked with the same key. Signed distances beyond eps_max are stored capped at
  +-eps_max and their indices listed under "beyond_eps_max".

  Args:
    logits_fns: role -> `x -> logits [B, C]` (e.g. `jax.tree_util.Partial(apply, variables)`).
    images: NHWC images, uint8 or floats in [0, 1].
    labels: integer labels.
    key: PRNG key.
    eps: the threat model's radius (for "robust_at_eps"; 8 / 255).
    eps_max: largest radius searched (default 4 * eps); must be >= eps.
    method: "bisection" or "fab".
    fraction: share of the points closest to the boundary, in (0, 1].
    batch_size: examples per jitted call.
    bisection_steps: bisection rounds (method "bisection", and misclassified points under "fab").
    pgd_steps: PGD iterations per round.
    progress: optional callback told the role before each model.

  Returns:
    {"method", "eps", "eps_max", "fraction", "n", "models": {role: {"clean", "median_radius",
    "mean_radius" (over the correctly classified points, capped at eps_max; None if there are
    none), "robust_at_eps" (share with signed distance > eps), "closest_accuracy", "closest_n",
    "beyond_eps_max", "distances", "seconds"}}, "shared_hard_set": {"n", "indices", "accuracy":
    {role: acc}}}.

  Raises:
    ValueError, TypeError: no models, a non-callable model, eps < 0, eps_max <= 0 or < eps, a
      fraction outside (0, 1], an unknown method, or bad images / labels.
  """
  _check_method(method)
  fraction = _check_fraction(fraction)
  core.check_eps("eps", eps)
  eps = float(eps)
  eps_max = _check_eps_max(4 * eps if eps_max is None else eps_max)
  if eps_max < eps:
    raise ValueError(f"eps_max ({eps_max}) must be >= eps ({eps}): points beyond eps_max are only "
                     "known to be robust up to eps_max.")
  if not logits_fns:
    raise ValueError("logits_fns must map at least one role to a logits function.")
  for role, fn in logits_fns.items():
    if not callable(fn):
      raise TypeError(f"logits_fns[{role!r}] must be callable (x -> logits [B, C]), got "
                      f"{type(fn).__name__}.")
  x, y = _as_float_images(images, labels)
  first = next(iter(logits_fns.values()))
  core.validate_attack_inputs(first, x, y, eps=eps_max, steps=pgd_steps, norm="linf")

  models, signed = {}, {}
  for role, fn in logits_fns.items():
    if progress:
      progress(role)
    started = time.time()
    signed[role] = boundary_distances(fn,
                                      x,
                                      y,
                                      key=key,
                                      eps_max=eps_max,
                                      method=method,
                                      bisection_steps=bisection_steps,
                                      pgd_steps=pgd_steps,
                                      batch_size=batch_size)
    models[role] = _summary(signed[role], eps=eps, eps_max=eps_max, fraction=fraction)
    models[role]["seconds"] = round(time.time() - started, 2)
  idx, acc = shared_hard_set(signed, fraction, cap=eps_max)
  return {
      "method": method,
      "eps": eps,
      "eps_max": eps_max,
      "fraction": fraction,
      "n": int(len(y)),
      "models": models,
      "shared_hard_set": {
          "n": int(idx.size),
          "indices": [int(i) for i in idx],
          "accuracy": acc
      },
  }


def run(models: ModelSet,
        images: Any,
        labels: Any,
        *,
        key: jax.Array,
        eps: float,
        batch_size: int = 250,
        progress: Callable[[str], None] | None = None,
        **options: Any) -> dict[str, Any]:
  """The boundary analysis of `gen_jax.evaluation.report`: `boundary_report` of every model.

  `options` are those of `boundary_report` (eps_max, method, fraction, bisection_steps, ...).
  """
  return boundary_report(models.logits_fns(),
                         images,
                         labels,
                         key=key,
                         eps=eps,
                         batch_size=batch_size,
                         progress=progress,
                         **options)


def plot_boundary(report: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
  """One histogram per model of the signed distances (x 255), saved as a PNG.

  Misclassified points lie left of 0; a dashed line marks eps. Uses matplotlib's object API with
  the Agg canvas (no pyplot, no display, no global backend change).

  Returns:
    The path of the PNG.
  """
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  roles = list(report["models"])
  scale = 255.0
  # One range for all panels (comparable), fitted to the data rather than to +-eps_max.
  everything = np.concatenate(
      [np.asarray(r["distances"], np.float64)
       for r in report["models"].values()] + [[0.0, report["eps"]]]) * scale
  lo, hi = float(everything.min()), float(everything.max())
  pad = 0.05 * (hi - lo) or 1.0
  bins = np.linspace(lo - pad, hi + pad, 41)
  fig = Figure(figsize=(4.5 * len(roles), 3.6), layout="constrained")
  axes = fig.subplots(1, len(roles), squeeze=False, sharey=True)[0]
  for ax, role in zip(axes, roles):
    row = report["models"][role]
    d = np.asarray(row["distances"], dtype=np.float64) * scale
    ax.hist(d[d > 0], bins=bins, color="tab:blue", label="correct")
    ax.hist(d[d <= 0], bins=bins, color="tab:red", label="misclassified")
    ax.axvline(report["eps"] * scale, color="black", linestyle="--", label="eps")
    ax.axvline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("signed L-inf distance to the decision boundary (x 1/255)")
    ax.set_title(f"{role}: acc. on closest {100 * report['fraction']:g}% = "
                 f"{100 * row['closest_accuracy']:.1f}% (n={row['closest_n']})")
    ax.legend(fontsize="small",
              title=f"beyond eps_max: {len(row['beyond_eps_max'])}",
              title_fontsize="small")
  axes[0].set_ylabel("test points")
  return outputs.save_figure(fig, path, dpi=100)


def to_markdown(report: dict[str, Any]) -> str:
  """The report as a markdown table (accuracies in %, radii in units of 1/255)."""
  pct = f"{100 * report['fraction']:g}%"
  lines = [
      f"Boundary analysis ({report['method']}), L-inf eps = {report['eps'] * 255:.2f}/255, "
      f"eps_max = {report['eps_max'] * 255:.2f}/255, {report['n']} test images; shared hard set: "
      f"{report['shared_hard_set']['n']} points.", "",
      f"| model | clean | median radius (x255) | robust at eps | acc. on closest {pct} | "
      "acc. on shared hard set |", "|---|---|---|---|---|---|"
  ]
  for role, row in report["models"].items():
    median = "n/a" if row["median_radius"] is None else f"{255 * row['median_radius']:.2f}"
    shared = report["shared_hard_set"]["accuracy"][role]
    lines.append(f"| {role} | {100 * row['clean']:.2f} | {median} | "
                 f"{100 * row['robust_at_eps']:.2f} | {100 * row['closest_accuracy']:.2f} | "
                 f"{100 * shared:.2f} |")
  return "\n".join(lines) + "\n"
