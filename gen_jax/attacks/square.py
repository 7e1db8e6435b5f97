"""Square Attack, the score-based random-search attack of AutoAttack (L-inf and L2), in JAX.

This module owns the Square Attack: the schedule of the square size (`p_selection`,
`p_schedule`), the L-inf vertical-stripe and L2 square-grid initialisations, the L2 "eta" square
pattern, and the query loop, a `lax.while_loop` over queries with per-example state that stops
when every example is broken or the budget is spent. Only the logits are used (no gradients), with
the margin loss z_y - max_{i != y} z_i, and a proposal is kept when it lowers that loss.

Synopsis::

    from gen_jax.attacks.square import square, p_selection
    x_adv = square(logits_fn, x, y, key=key, eps=8 / 255)                  # 5,000 queries
    x_adv = square(logits_fn, x, y, key=key, eps=0.5, norm="l2", n_queries=1000)
    p_selection(100, n_queries=5000, p_init=0.8)   # 0.2: p halved after queries 10 and 50

Differences from the PyTorch reference, which do not change any example's chance of success: the
reference draws one square position (and one sign per channel, one orientation of the L2 pattern)
for the whole batch at each query, here every example draws its own, as in the original Square
Attack; every example runs every query (fixed shapes under `jit`), masked once broken. Images
smaller than 5 pixels get L2 initial squares of side 1 (the reference divides by zero there), and
initial squares that overrun the border are cropped.

References:
  Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box adversarial
  attack via random search", ECCV 2020, https://arxiv.org/abs/1912.00049
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

_SQUARE = DEFAULTS.square
_TINY = 1e-12


def p_selection(it: int,
                n_queries: int = _SQUARE.n_queries,
                p_init: float = _SQUARE.p_init,
                rescale: bool = False,
                schedule: tuple[int, ...] = _SQUARE.p_schedule) -> float:
  """Fraction of pixels changed by the square proposed at query `it` (0-based).

  `p` starts at `p_init` and is halved once `it` exceeds each entry of `schedule` (10, 50, 200,
  500, 1000, 2000, 4000, 6000, 8000). With `rescale`, `it` is first mapped onto a 10,000-query
  budget (`int(it / n_queries * 10000)`); AutoAttack turns this off, so its 5,000 queries never
  reach the last two halvings.

  Args:
    it: query index, 0-based.
    n_queries: the query budget (only used by `rescale`).
    p_init: initial fraction.
    rescale: map `it` onto 10,000 queries first.
    schedule: the query counts after which `p` is halved.

  Returns:
    p as a Python float.

  References:
    Andriushchenko et al., ECCV 2020, https://arxiv.org/abs/1912.00049 (section 3).
  """
  if rescale:
    it = int(it / n_queries * 10000)
  halvings = sum(1 for q in schedule if it > q)
  return p_init / 2**halvings


def p_schedule(n_queries: int, p_init: float = _SQUARE.p_init, rescale: bool = False) -> np.ndarray:
  """`p_selection` for every query 0 .. n_queries - 1, as a float64 array."""
  return np.array([p_selection(i, n_queries, p_init, rescale) for i in range(n_queries)])


def _side_schedule(n_queries: int, p_init: float, rescale: bool, h: int, w: int,
                   norm: str) -> np.ndarray:
  """Side of the square at each query: sqrt(p * H * W) rounded, >= 1 (L-inf) or odd >= 3 (L2)."""
  sides = []
  for p in p_schedule(n_queries, p_init, rescale):
    s = int(round(math.sqrt(p * h * w)))
    if norm == "linf":
      s = max(s, 1)
    else:
      s = max(s, 3)
      s += 1 - s % 2  # odd, so that the pattern has a centre
    sides.append(min(s, min(h, w)))
  return np.asarray(sides, np.int32)


def _inv_square_sums(size: int) -> np.ndarray:
  """h2[k] = sum_{q=1}^{k} 1 / q^2 for k = 0 .. size."""
  return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, size + 1)**2)]).astype(np.float32)


def _eta_pattern(s: Any, size: int) -> jax.Array:
  """The L2 proposal of side `s` (traced or static), in the top-left corner of a [size, size] grid.

  Two stacked rectangles (top s//2 rows positive, the rest negative), each the sum of centred
  concentric rectangles of radius k weighted 1 / (k + 1)^2, each normalised, then the square
  normalised to unit L2 norm (the reference's `eta`).
  """
  h2 = jnp.asarray(_inv_square_sums(size + 2))
  i = jnp.arange(size)[:, None]
  j = jnp.arange(size)[None, :]
  half = s // 2
  top = i < half
  rows = jnp.where(top, half, s - half)
  il = jnp.where(top, i, i - half)
  # Chebyshev distance from the rectangle's centre picks the rings that cover the pixel.
  ring = jnp.maximum(jnp.abs(il - rows // 2), jnp.abs(j - s // 2))
  outer = s // 2 + 1
  inside = (i < s) & (j < s)
  val = jnp.where(inside, h2[outer] - h2[jnp.clip(ring, 0, size + 2)], 0.0)
  n_top = jnp.sqrt(jnp.sum(jnp.where(top, val, 0.0)**2))
  n_bot = jnp.sqrt(jnp.sum(jnp.where(top, 0.0, val)**2))
  val = jnp.where(top, val / jnp.where(n_top > 0, n_top, 1.0),
                  -val / jnp.where(n_bot > 0, n_bot, 1.0))
  return val / jnp.sqrt(jnp.sum(val**2))


def _window(key: jax.Array, bsz: int, h: int, w: int, s: jax.Array):
  """Per-example random top-left corner of an s x s window and its [B, H, W, 1] mask.

  Corners are floor(U * (H - s)), i.e. in [0, H - s - 1] (0 when s == H), as the reference.
  """
  kh, kw = jax.random.split(key)
  vh = jnp.floor(jax.random.uniform(kh, (bsz,)) * (h - s)).astype(jnp.int32)
  vw = jnp.floor(jax.random.uniform(kw, (bsz,)) * (w - s)).astype(jnp.int32)
  ri = jnp.arange(h)[None, :] - vh[:, None]
  ci = jnp.arange(w)[None, :] - vw[:, None]
  in_r = (ri >= 0) & (ri < s)
  in_c = (ci >= 0) & (ci < s)
  mask = (in_r[:, :, None] & in_c[:, None, :])[..., None]
  return ri, ci, mask


def _place(pattern: jax.Array, transpose: jax.Array, ri: jax.Array, ci: jax.Array,
           mask: jax.Array) -> jax.Array:
  """Puts each example's (optionally transposed) pattern at its window: [B, H, W, 1]."""
  size = pattern.shape[0]
  ri = jnp.clip(ri, 0, size - 1)
  ci = jnp.clip(ci, 0, size - 1)

  def one(tr, r, c):
    pat = jnp.where(tr, pattern.T, pattern)
    return pat[r[:, None], c[None, :]]

  placed = jax.vmap(one)(transpose, ri, ci)[..., None]
  return jnp.where(mask, placed, 0.0)


def _margin(logits_fn, x, y):
  """z_y - max_{i != y} z_i per example (> 0 iff correctly classified)."""
  return -core.margin_loss(logits_fn(x).astype(jnp.float32), y)


def _l2_init(key, x, eps4):
  """The reference's L2 start: a grid of eta squares of side H // 5 with random signs."""
  bsz, h, w, ch = x.shape
  s0 = max(h // 5, 1)
  sp = max((h - 5 * s0) // 2, 0)
  nr, nc = h // s0, w // s0
  pattern = _eta_pattern(s0, s0)
  k_sign, k_tr = jax.random.split(key)
  signs = jax.random.rademacher(k_sign, (bsz, nr, nc, ch), jnp.float32)
  trans = jax.random.bernoulli(k_tr, 0.5, (bsz, nr, nc))
  r = np.arange(h) - sp
  c = np.arange(w) - sp
  wr, lr = np.clip(r // s0, 0, nr - 1), np.mod(r, s0)
  wc, lc = np.clip(c // s0, 0, nc - 1), np.mod(c, s0)
  valid = ((r >= 0) & (r // s0 < nr))[:, None] & ((c >= 0) & (c // s0 < nc))[None, :]
  tr = trans[:, wr[:, None], wc[None, :]]  # [B, H, W]
  val = jnp.where(tr, pattern.T[lr[:, None], lc[None, :]], pattern[lr[:, None], lc[None, :]])
  val = jnp.where(valid, val, 0.0)[..., None]
  delta = val * signs[:, wr[:, None], wc[None, :], :]
  return jnp.clip(x + core.normalize(delta, "l2") * eps4, 0.0, 1.0)


def _square_single_run(logits_fn, x, y, mask, key, eps4, *, norm, sides):
  """One Square run on the examples in `mask`; returns the best point found per example."""
  bsz, h, w, ch = x.shape
  n_queries = sides.shape[0]
  sides = jnp.asarray(sides)
  size = min(h, w)
  k_init, k_loop = jax.random.split(key)
  if norm == "linf":
    # Vertical stripes: one sign per column and channel, shared by all rows.
    stripes = jax.random.rademacher(k_init, (bsz, 1, w, ch), jnp.float32)
    x_best = jnp.clip(x + eps4 * stripes, 0.0, 1.0)
  else:
    x_best = _l2_init(k_init, x, eps4)
  margin_min = _margin(logits_fn, x_best, y)
  loss_min = margin_min

  def cond(state):
    i, _, margin_min, _ = state
    return (i < n_queries) & jnp.any(mask & (margin_min > 0))

  def body(state):
    i, x_best, margin_min, loss_min = state
    active = mask & (margin_min > 0)
    s = sides[i]
    k_win, k_win2, k_sign, k_tr = jax.random.split(jax.random.fold_in(k_loop, i), 4)
    ri, ci, m1 = _window(k_win, bsz, h, w, s)
    signs = jax.random.rademacher(k_sign, (bsz, 1, 1, ch), jnp.float32)
    if norm == "linf":
      x_new = x_best + jnp.where(m1, 2.0 * eps4 * signs, 0.0)
      x_new = jnp.clip(jnp.clip(x_new, x - eps4, x + eps4), 0.0, 1.0)
    else:
      _, _, m2 = _window(k_win2, bsz, h, w, s)
      delta = x_best - x
      norm_w1 = jnp.sqrt(jnp.sum(jnp.where(m1, delta, 0.0)**2, axis=(1, 2), keepdims=True))
      norm_img = core.lp_norm(delta, "l2").reshape((bsz, 1, 1, 1))
      norm_ws = jnp.sqrt(jnp.sum(jnp.where(m1 | m2, delta, 0.0)**2, axis=(1, 2), keepdims=True))
      transpose = jax.random.bernoulli(k_tr, 0.5, (bsz,))
      eta = _place(_eta_pattern(s, size), transpose, ri, ci, m1) * signs
      new = eta + jnp.where(m1, delta, 0.0) / (_TINY + norm_w1)
      # Rescale the new square so that it uses the budget the rest of the image leaves free.
      budget = jnp.maximum(eps4**2 - norm_img**2, 0.0) / ch + norm_ws**2
      new = new / (_TINY + jnp.sqrt(jnp.sum(new**2, axis=(1, 2), keepdims=True))) * jnp.sqrt(budget)
      delta = jnp.where(m2, 0.0, delta)
      delta = jnp.where(m1, new, delta)
      x_new = jnp.clip(x + core.normalize(delta, "l2") * eps4, 0.0, 1.0)
    margin = _margin(logits_fn, x_new, y)
    improved = margin < loss_min
    loss_min = jnp.where(active & improved, margin, loss_min)
    accept = active & (improved | (margin <= 0))
    margin_min = jnp.where(accept, margin, margin_min)
    x_best = jnp.where(accept[:, None, None, None], x_new, x_best)
    return i + 1, x_best, margin_min, loss_min

  _, x_best, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), x_best, margin_min, loss_min))
  return x_best


@functools.partial(jax.jit, static_argnames=("norm", "restarts", "sides"))
def _square_attack(logits_fn, x, y, key, eps, *, norm, restarts, sides):
  """Runs `restarts` Square runs, each on the points still robust; `sides` is the side schedule."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  bsz = x.shape[0]
  eps_b = jnp.broadcast_to(jnp.asarray(eps, jnp.float32), (bsz,))
  eps4 = eps_b.reshape((bsz, 1, 1, 1))
  sides = np.asarray(sides, np.int32)
  robust = jnp.argmax(logits_fn(x), axis=1) == y

  def run(r, state):

    def attack(state):
      x_adv, robust = state
      cand = _square_single_run(logits_fn,
                                x,
                                y,
                                robust,
                                jax.random.fold_in(key, r),
                                eps4,
                                norm=norm,
                                sides=sides)
      broken = robust & (jnp.argmax(logits_fn(cand), axis=1) != y)
      return jnp.where(broken[:, None, None, None], cand, x_adv), robust & ~broken

    return jax.lax.cond(jnp.any(state[1]), attack, lambda s: s, state)

  x_adv, _ = jax.lax.fori_loop(0, restarts, run, (x, robust))
  return core.project(x_adv, x, eps_b, norm).astype(dtype)


def square(logits_fn: Callable[[jax.Array], jax.Array],
           x: jax.Array,
           y: jax.Array,
           *,
           key: jax.Array,
           eps: Any,
           norm: str = "linf",
           n_queries: int = _SQUARE.n_queries,
           p_init: float = _SQUARE.p_init,
           restarts: int = _SQUARE.restarts,
           rescale_schedule: bool = False) -> jax.Array:
  """Square Attack: random search over square-shaped updates at the vertices of the eps-ball.

  Starts from vertical stripes of +-eps (L-inf) or a grid of L2 "eta" squares scaled to norm eps
  (L2). At each query every still-correct example proposes a change of a random square window of
  side round(sqrt(p * H * W)): L-inf sets the window to +-eps per channel (a vertex of the ball);
  L2 moves mass between two windows with a centred pattern, keeping the total norm eps. A proposal
  is kept when it lowers the margin z_y - max_{i != y} z_i or misclassifies; `p` follows
  `p_selection` (halved after queries 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000). The loop
  ends when every example is broken. Settings default to `gen_jax.attacks.settings.DEFAULTS.square`.

  Args:
    logits_fn: `x -> logits [B, C]`, jit-able (a `jax.tree_util.Partial` avoids recompiling).
    x: clean images [B, H, W, C] in [0, 1].
    y: integer labels [B].
    key: PRNG key.
    eps: radius of the threat model (scalar or [B]; may be traced).
    norm: "linf" or "l2" (static).
    n_queries: query budget per restart, 5,000 in AutoAttack (static).
    p_init: initial fraction of pixels in the square, 0.8 in AutoAttack (static).
    restarts: runs, each on the examples still robust, 1 in AutoAttack (static).
    rescale_schedule: map the schedule onto `n_queries` as if it were 10,000 (the reference
      class's default; AutoAttack turns it off, and so does this default).

  Returns:
    Adversarial images, same shape and dtype as `x` (clean input where the attack failed).

  Raises:
    ValueError/TypeError: for bad inputs (see `core.validate_attack_inputs`) or settings.

  References:
    Andriushchenko et al., ECCV 2020, https://arxiv.org/abs/1912.00049
  """
  core.check_positive_int("n_queries", n_queries)
  core.check_positive_int("restarts", restarts)
  core.validate_attack_inputs(logits_fn, x, y, eps=eps, norm=norm)
  if not isinstance(p_init, (int, float)) or not 0.0 < p_init <= 1.0:
    raise ValueError(f"p_init must be a Python float in (0, 1] (it is static), got {p_init!r}; "
                     "AutoAttack uses 0.8.")
  _, h, w, _ = jnp.shape(x)
  sides = tuple(
      int(s) for s in _side_schedule(n_queries, float(p_init), bool(rescale_schedule), h, w, norm))
  return _square_attack(core.as_pytree_fn(logits_fn),
                        x,
                        y,
                        key,
                        eps,
                        norm=norm,
                        restarts=restarts,
                        sides=sides)
