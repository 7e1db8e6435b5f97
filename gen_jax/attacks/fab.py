"""FAB, the Fast Adaptive Boundary attack (untargeted and targeted, L-inf and L2), in JAX.

This module owns FAB: the exact projections of a point onto a hyperplane intersected with the
[0, 1] box (`project_hyperplane_linf`, `project_hyperplane_l2`), the iteration that walks along the
linearised decision boundary towards the minimal adversarial perturbation, and the two public
attacks, `fab_targeted` (FAB-T, the third stage of AutoAttack 'standard') and `fab` (untargeted).

FAB minimises the perturbation norm; as in AutoAttack a point counts as broken only when the
perturbation it found has norm <= `eps`, and every other point keeps its clean input.

Synopsis::

    from gen_jax.attacks import fab
    x_adv = fab.fab_targeted(logits_fn, x, y, key=key, eps=8 / 255)        # 9 targets x 100 steps
    x_adv = fab.fab(logits_fn, x, y, key=key, eps=0.5, norm="l2", restarts=5)
    d = fab.project_hyperplane_linf(t, w, b)  # min ||d||_inf: w.(t + d) = b, t + d in [0, 1]

Differences from the PyTorch reference (documented, not weaker): every example of the batch runs
every iteration (fixed shapes under `jit`) and is masked out once broken; a target class or restart
is skipped as a whole (`lax.cond`) when no example is left to attack.

References:
  Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary attack",
  ICML 2020, https://arxiv.org/abs/1907.02044
  Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690
"""
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gen_jax.attacks import core
from gen_jax.attacks.settings import DEFAULTS

_FAB = DEFAULTS.fab_t

# The reference marks "no adversarial example found yet" with a norm of 1e10.
_NOT_FOUND = 1e10
# Largest finite value of the L2 projection's breakpoints (the reference clamps at +-1e12).
_BIG = 1e12
# Halvings of the L-inf projection's budget interval [0, max room] (room <= 1). A coordinate whose
# room lies within 2^-32 below the solution may be counted as free and then clipped, which misses
# the hyperplane by at most 2^-32 * sum_i |w_i|: below float32 rounding of w.z itself.
_LINF_HALVINGS = 32


def _take(a: jax.Array, idx: jax.Array) -> jax.Array:
  """Row-wise gather: `a[i, idx[i]]` for a [N, n] array and a [N] (or [N, k]) index."""
  if idx.ndim == 1:
    return jnp.take_along_axis(a, idx[:, None], axis=1)[:, 0]
  return jnp.take_along_axis(a, idx, axis=1)


def _binary_search(cond_fn: Callable[[jax.Array], jax.Array], n_rows: int, n: int) -> jax.Array:
  """Largest index k in [0, n - 1] found by bisection with `cond_fn(k)` true, per row.

  The same bisection as the reference (lower bound kept where the condition holds, ceil(log2 n)
  halvings), so that both agree even where rounding makes the condition non-monotone.
  """
  lb = jnp.zeros((n_rows,), jnp.int32)
  ub = jnp.full((n_rows,), n - 1, jnp.int32)
  for _ in range(math.ceil(math.log2(n)) if n > 1 else 0):
    mid = (lb + ub) // 2
    c = cond_fn(mid)
    lb = jnp.where(c, mid, lb)
    ub = jnp.where(c, ub, mid)
  return lb


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 where den == 0 (branches the reference never selects there)."""
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def project_hyperplane_linf(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """Minimal L-inf step from each row of `t` onto {z: w.z = b} within the [0, 1] box.

  Solves min ||d||_inf s.t. w.(t + d) = b, 0 <= t + d <= 1, exactly: with budget l, coordinate i
  moves by min(l, p_i) towards the side that brings w.z to b (p_i: room to the box in that
  direction), so w.z changes by F(l) = sum_i |w_i| min(l, p_i), a nondecreasing piecewise-linear
  function of l. A bisection over l (`_LINF_HALVINGS` halvings of [0, max p_i], float32
  resolution) finds the coordinates that saturate below the solution, and l follows from them in
  closed form: (c - sum_saturated |w_i| p_i) / sum_free |w_i|, the reference's formula for the
  same segment. When even the box corner cannot reach the hyperplane, the step to that corner is
  returned.

  The reference finds the segment by sorting the p_i and bisecting over the sorted indices; the
  result is the same up to float rounding (the sums run in another order). XLA's CPU sort of the
  rows took longer than the network's forward and backward pass in FAB-T's iteration; each
  halving here is one fused elementwise pass and sum (figures: docs/results.md, Performance).

  Args:
    t: points [N, n].
    w: hyperplane normals [N, n].
    b: offsets [N].

  Returns:
    The steps d [N, n].

  References:
    Croce & Hein, ICML 2020, https://arxiv.org/abs/1907.02044 (section 3.1 and appendix).
  """
  # Orient each hyperplane so that the point lies on its positive side: w.t - b = c >= 0 must
  # shrink by exactly c.
  c = jnp.sum(w * t, axis=1) - b
  w = w * jnp.where(c >= 0, 1.0, -1.0).astype(t.dtype)[:, None]
  c = jnp.abs(c)
  neg = w < 0
  nonzero = w != 0
  d_box = jnp.where(nonzero, neg.astype(t.dtype) - t, 0.0)  # the corner that shrinks w.z most
  room = jnp.where(nonzero, jnp.where(neg, 1.0 - t, t), 0.0)  # how far each coordinate can move
  weight = jnp.abs(w)
  corner = jnp.sum(weight * room, axis=1)  # F(max room): the most the box allows

  def halve(_, bounds):
    lo, hi = bounds  # invariant: F(lo) < c <= F(hi), unless c == 0 or c >= corner
    mid = 0.5 * (lo + hi)
    enough = jnp.sum(weight * jnp.minimum(mid[:, None], room), axis=1) >= c
    return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

  lo, _ = jax.lax.fori_loop(0, _LINF_HALVINGS, halve, (jnp.zeros_like(c), jnp.max(room, axis=1)))
  # Every coordinate with room <= lo < l saturates; the rest move by l (a coordinate whose room
  # lies in (lo, l], within float resolution of l, is clipped to its box side below).
  saturated = room <= lo[:, None]
  free = jnp.sum(jnp.where(saturated, 0.0, weight), axis=1)
  moved = jnp.sum(jnp.where(saturated, weight * room, 0.0), axis=1)
  lmbd = jnp.maximum(_safe_div(c - moved, free), 0.0)[:, None]
  d_seg = jnp.where(neg, jnp.minimum(lmbd, d_box), jnp.maximum(-lmbd, d_box))
  d = jnp.where((c < corner)[:, None], d_seg, d_box)
  return jnp.where(nonzero, d, 0.0)


def project_hyperplane_l2(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """Minimal L2 step from each row of `t` onto {z: w.z = b} within the [0, 1] box.

  Solves min ||d||_2 s.t. w.(t + d) = b, 0 <= t + d <= 1, exactly: by the KKT conditions
  d_i = clip(-a w_i, -t_i, 1 - t_i) for one a >= 0; w.d is piecewise linear in a with breakpoints
  where coordinates saturate, so sorting them and bisecting gives the segment and a in closed form.
  When even full saturation cannot reach the hyperplane, the saturated step is returned.

  Args:
    t: points [N, n].
    w: hyperplane normals [N, n].
    b: offsets [N].

  Returns:
    The steps d [N, n].

  References:
    Croce & Hein, ICML 2020, https://arxiv.org/abs/1907.02044 (section 3.1 and appendix).
  """
  n_rows, n = t.shape
  c = jnp.sum(w * t, axis=1) - b
  sign = jnp.where(c >= 0, 1.0, -1.0).astype(t.dtype)
  w = w * sign[:, None]
  c = c * sign
  active = jnp.abs(w) >= 1e-8
  w_safe = jnp.where(active, w, 1.0)
  # Breakpoint of each coordinate: the a at which -a w_i reaches the box.
  r = jnp.clip(jnp.maximum(t / w_safe, (t - 1.0) / w_safe), -_BIG, _BIG)
  r = jnp.where(active, r, _BIG)
  r = jnp.where(r == -_BIG, _BIG, r)
  order = jnp.argsort(r, axis=1)
  rs = _take(r, order)
  rs2 = jnp.concatenate([rs[:, 1:], jnp.zeros_like(rs[:, :1])], axis=1)
  # Coordinates that never saturate sit at the end with breakpoint 0 (they add nothing there).
  rs = jnp.where(rs == _BIG, 0.0, rs)
  rs2 = jnp.where(rs2 == _BIG, 0.0, rs2)
  w2_sorted = _take(w * w, order)
  w2_total = jnp.sum(w2_sorted, axis=1, keepdims=True)
  w2_free = w2_total - jnp.cumsum(w2_sorted, axis=1)  # weight still unsaturated after k
  d_sat = jnp.where(active, -(r * w), 0.0)
  # s[k] = w.d at a = rs[k]: piecewise-linear accumulation over the segments.
  s0 = -w2_total * rs[:, :1]
  s = jnp.concatenate([s0, jnp.cumsum((rs - rs2) * w2_free, axis=1) + s0], axis=1)
  before_any = s[:, 0] + c < 0  # reached before any coordinate saturates
  unreachable = jnp.sum(d_sat * w, axis=1) + c > 0
  middle = ~(before_any | unreachable)
  lb = _binary_search(lambda k: _take(s, k) + c > 0, n_rows, n)
  a_first = _safe_div(c, w2_total[:, 0])[:, None]
  d_first = -a_first * w
  w2_lb = _take(w2_free, lb)
  a_mid = jnp.where(w2_lb == 0, 0.0, _safe_div(_take(s, lb) + c, w2_lb) + _take(rs, lb))[:, None]
  d_mid = jnp.where(a_mid > r, d_sat, -a_mid * w)
  d = jnp.where(before_any[:, None], d_first, jnp.where(middle[:, None], d_mid, d_sat))
  return jnp.where(active, d, 0.0)


def _flat_norm(d: jax.Array, norm: str) -> jax.Array:
  """Per-row norm of a [N, n] array."""
  if norm == "linf":
    return jnp.max(jnp.abs(d), axis=1)
  return jnp.sqrt(jnp.sum(d * d, axis=1))


def _dual_norm(g: jax.Array, norm: str) -> jax.Array:
  """Dual norm over the last axis (L1 for L-inf, L2 for L2): the distance denominator of FAB."""
  if norm == "linf":
    return jnp.sum(jnp.abs(g), axis=-1)
  return jnp.sqrt(jnp.sum(g * g, axis=-1))


def _boundary_linearisation(logits_fn, x1, y, target, num_classes, norm):
  """Value f [B] and gradient g [B, n] of the closest linearised decision boundary.

  Targeted: f = z_t - z_y (one backward pass of the summed differences). Untargeted: f_c = z_c - z_y
  for every class (one backward pass per class), keeping the class whose linearised boundary is
  nearest in the attack's norm.
  """
  b = x1.shape[0]
  if target is not None:

    def diff_fn(xb):
      z = logits_fn(xb)
      return _take(z, target) - _take(z, y)

    f, vjp_fn = jax.vjp(diff_fn, x1)
    (g,) = vjp_fn(jnp.ones_like(f))
    return f, g.reshape((b, -1))
  z, vjp_fn = jax.vjp(logits_fn, x1)
  cot = jnp.broadcast_to(jnp.eye(num_classes, dtype=z.dtype)[:, None, :], (num_classes,) + z.shape)
  (jac,) = jax.vmap(vjp_fn)(cot)  # [C, B, H, W, Ch]
  jac = jnp.moveaxis(jac.reshape((num_classes, b, -1)), 0, 1)  # [B, C, n]
  df = z - _take(z, y)[:, None]
  dg = jac - jnp.take_along_axis(jac, y[:, None, None], axis=1)
  is_y = jax.nn.one_hot(y, num_classes, dtype=bool)
  df = jnp.where(is_y, _NOT_FOUND, df)  # the true class is never the boundary to cross
  dist = jnp.abs(df) / (1e-12 + _dual_norm(dg, norm))
  ind = jnp.argmin(dist, axis=1)
  f = _take(df, ind)
  g = jnp.take_along_axis(dg, ind[:, None, None], axis=1)[:, 0]
  return f, g


def _fab_single_run(logits_fn, x0, y, target, x_start, alpha_max, eta, beta, *, norm, steps,
                    num_classes):
  """One FAB run from `x_start`; returns the best adversarial point found (or x0) and its norm."""
  shape = x0.shape
  bsz = shape[0]
  x0f = x0.reshape((bsz, -1))
  project_fn = project_hyperplane_linf if norm == "linf" else project_hyperplane_l2

  def body(_, state):
    x1, adv, best = state
    f, w = _boundary_linearisation(logits_fn, x1, y, target, num_classes, norm)
    x1f = x1.reshape((bsz, -1))
    b = -f + jnp.sum(w * x1f, axis=1)
    # Project both the current iterate and the clean point onto the linearised boundary.
    d3 = project_fn(jnp.concatenate([x1f, x0f]), jnp.concatenate([w, w]), jnp.concatenate([b, b]))
    a0 = jnp.maximum(_flat_norm(d3, norm), 1e-8)
    d1, d2 = d3[:bsz], d3[bsz:]
    a1, a2 = a0[:bsz, None], a0[bsz:, None]
    # Bias towards the clean point in proportion to how far the iterate already is.
    alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)
    x1f = jnp.clip((x1f + eta * d1) * (1 - alpha) + (x0f + eta * d2) * alpha, 0.0, 1.0)
    is_adv = jnp.argmax(logits_fn(x1f.reshape(shape)), axis=1) != y
    dist = _flat_norm(x1f - x0f, norm)
    better = is_adv & (dist < best)
    adv = jnp.where(better[:, None], x1f, adv)
    best = jnp.where(better, dist, best)
    # Backward step towards the clean point after every success, to look for a smaller one.
    x1f = jnp.where(is_adv[:, None], x0f + (x1f - x0f) * beta, x1f)
    return x1f.reshape(shape), adv, best

  init = (x_start, x0f, jnp.full((bsz,), _NOT_FOUND, x0.dtype))
  _, adv, best = jax.lax.fori_loop(0, steps, body, init)
  found = best < _NOT_FOUND
  return jnp.where(found[:, None], adv, x0f).reshape(shape)


def _fab_random_start(key, x, eps, norm):
  """The reference's restart point: half the eps radius in a random direction, clipped."""
  bsz = x.shape[0]
  if norm == "linf":
    t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
  else:
    t = jax.random.normal(key, x.shape, x.dtype)
  scale = _flat_norm(t.reshape((bsz, -1)), norm).reshape((bsz, 1, 1, 1))
  return jnp.clip(x + eps * t / scale * 0.5, 0.0, 1.0)


@functools.partial(jax.jit,
                   static_argnames=("norm", "steps", "restarts", "n_targets", "num_classes"))
def _fab_attack(logits_fn, x, y, key, eps, alpha_max, eta, beta, *, norm, steps, restarts,
                n_targets, num_classes):
  """Runs FAB over target classes (n_targets > 0) or untargeted (n_targets == 0) and restarts."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  bsz = x.shape[0]
  eps = jnp.asarray(eps, jnp.float32)
  eps_b = jnp.broadcast_to(eps, (bsz,))
  eps4 = eps_b.reshape((bsz, 1, 1, 1))
  logits = logits_fn(x)
  robust = jnp.argmax(logits, axis=1) == y  # only correctly classified points are attacked
  ranked = jnp.argsort(logits, axis=1)  # ascending: the t-th highest logit is ranked[:, -t]
  n_outer = max(n_targets, 1)

  def run(i, state):
    x_adv, robust = state
    target_idx, restart = i // restarts, i % restarts
    target = None
    if n_targets > 0:
      # Targets are the 2nd, 3rd, ... highest clean logits, as the reference.
      target = _take(ranked, jnp.full((bsz,), num_classes - 2, jnp.int32) - target_idx)
    run_key = jax.random.fold_in(key, i)

    def attack(state):
      x_adv, robust = state
      start = jnp.where(restart > 0, _fab_random_start(run_key, x, eps4, norm), x)
      cand = _fab_single_run(logits_fn,
                             x,
                             y,
                             target,
                             start,
                             alpha_max,
                             eta,
                             beta,
                             norm=norm,
                             steps=steps,
                             num_classes=num_classes)
      wrong = jnp.argmax(logits_fn(cand), axis=1) != y
      within = core.lp_norm(cand - x, norm) <= eps_b
      broken = robust & wrong & within
      return jnp.where(broken[:, None, None, None], cand, x_adv), robust & ~broken

    return jax.lax.cond(jnp.any(robust), attack, lambda s: s, (x_adv, robust))

  x_adv, _ = jax.lax.fori_loop(0, n_outer * restarts, run, (x, robust))
  # Broken points already lie in the ball; the projection makes the guarantee unconditional.
  return core.project(x_adv, x, eps_b, norm).astype(dtype)


def _check_fab_args(restarts, alpha_max, eta, beta, n_target_classes=None):
  """Raises TypeError/ValueError for FAB settings outside their meaningful ranges."""
  core.check_positive_int("restarts", restarts)
  if n_target_classes is not None:
    core.check_positive_int("n_target_classes", n_target_classes)
  for name, value, lo, hi in (("alpha_max", alpha_max, 0.0, 1.0), ("eta", eta, 1.0, np.inf),
                              ("beta", beta, 0.0, 1.0)):
    if core.is_concrete(value):
      v = float(np.asarray(value))
      if not lo <= v <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {v} (reference: alpha_max 0.1, "
                         "eta 1.05, beta 0.9).")


def fab_targeted(logits_fn: Callable[[jax.Array], jax.Array],
                 x: jax.Array,
                 y: jax.Array,
                 *,
                 key: jax.Array,
                 eps: Any,
                 norm: str = "linf",
                 n_target_classes: int = _FAB.n_target_classes,
                 steps: int = _FAB.steps,
                 restarts: int = _FAB.restarts,
                 alpha_max: Any = _FAB.alpha_max,
                 eta: Any = _FAB.eta,
                 beta: Any = _FAB.beta) -> jax.Array:
  """FAB-T: targeted Fast Adaptive Boundary attack over the top non-true classes (AutoAttack).

  For each of the `n_target_classes` highest-scoring non-true classes of the clean logits (capped
  at C - 1), in turn and only on the points still robust, FAB searches for the minimal perturbation
  that crosses the boundary between the true and the target class: each step linearises
  z_t - z_y, projects the current iterate and the clean point onto that hyperplane within the box
  (exactly, in the attack's norm), moves to a convex combination of both projections with
  overshoot `eta` and weight at most `alpha_max` on the clean side, and after every success steps
  back towards the clean point by the factor `beta`. A point counts as broken when its smallest
  adversarial perturbation has norm <= `eps`. Restarts after the first begin at a random point at
  distance eps / 2. Settings default to `gen_jax.attacks.settings.DEFAULTS.fab_t`.

  Args:
    logits_fn: `x -> logits [B, C]`, jit-able (a `jax.tree_util.Partial` avoids recompiling).
    x: clean images [B, H, W, C] in [0, 1].
    y: integer labels [B].
    key: PRNG key (used by restarts after the first).
    eps: radius of the threat model (scalar or [B]; may be traced).
    norm: "linf" or "l2" (static).
    n_target_classes: number of target classes, 9 in AutoAttack (static).
    steps: FAB iterations per target and restart, 100 in AutoAttack (static).
    restarts: runs per target class, 1 in AutoAttack (static).
    alpha_max: largest weight of the step from the clean point (0.1).
    eta: overshoot of the projection step (1.05).
    beta: backward-step factor after a success (0.9).

  Returns:
    Adversarial images, same shape and dtype as `x`: the smallest adversarial point found for the
    broken examples, the clean input for all others (including misclassified ones).

  Raises:
    ValueError/TypeError: for bad inputs (see `core.validate_attack_inputs`) or settings.

  References:
    Croce & Hein, ICML 2020, https://arxiv.org/abs/1907.02044;
    Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690 (FAB-T in AutoAttack).
  """
  num_classes = core.validate_attack_inputs(logits_fn, x, y, eps=eps, steps=steps, norm=norm)
  _check_fab_args(restarts, alpha_max, eta, beta, n_target_classes)
  n_targets = min(n_target_classes, num_classes - 1)
  return _fab_attack(core.as_pytree_fn(logits_fn),
                     x,
                     y,
                     key,
                     eps,
                     alpha_max,
                     eta,
                     beta,
                     norm=norm,
                     steps=steps,
                     restarts=restarts,
                     n_targets=n_targets,
                     num_classes=num_classes)


def fab(logits_fn: Callable[[jax.Array], jax.Array],
        x: jax.Array,
        y: jax.Array,
        *,
        key: jax.Array,
        eps: Any,
        norm: str = "linf",
        steps: int = _FAB.steps,
        restarts: int = _FAB.restarts,
        alpha_max: Any = _FAB.alpha_max,
        eta: Any = _FAB.eta,
        beta: Any = _FAB.beta) -> jax.Array:
  """Untargeted FAB: at each step crosses the nearest linearised boundary among all classes.

  As `fab_targeted`, but each step takes the full Jacobian of the logits (one backward pass per
  class) and projects onto the boundary z_c = z_y whose linearisation is closest in the attack's
  norm. AutoAttack's 'plus' version runs it with 5 restarts.

  Args:
    logits_fn: `x -> logits [B, C]`, jit-able.
    x: clean images [B, H, W, C] in [0, 1].
    y: integer labels [B].
    key: PRNG key (used by restarts after the first).
    eps: radius of the threat model (scalar or [B]; may be traced).
    norm: "linf" or "l2" (static).
    steps: FAB iterations per restart (static).
    restarts: runs, each on the points still robust (static).
    alpha_max: largest weight of the step from the clean point (0.1).
    eta: overshoot of the projection step (1.05).
    beta: backward-step factor after a success (0.9).

  Returns:
    Adversarial images, same shape and dtype as `x` (clean input where the attack failed).

  Raises:
    ValueError/TypeError: for bad inputs or settings.

  References:
    Croce & Hein, ICML 2020, https://arxiv.org/abs/1907.02044
  """
  num_classes = core.validate_attack_inputs(logits_fn, x, y, eps=eps, steps=steps, norm=norm)
  _check_fab_args(restarts, alpha_max, eta, beta)
  return _fab_attack(core.as_pytree_fn(logits_fn),
                     x,
                     y,
                     key,
                     eps,
                     alpha_max,
                     eta,
                     beta,
                     norm=norm,
                     steps=steps,
                     restarts=restarts,
                     n_targets=0,
                     num_classes=num_classes)
