"""Tests of FAB / FAB-T and the Square Attack on tiny linear and MLP classifiers.

On a linear classifier the minimal perturbations are known in closed form (L-inf:
margin / ||w_y - w_t||_1, L2: margin / ||w_y - w_t||_2 while the box is inactive), so FAB must break
exactly the points whose minimal perturbation is below eps. The hyperplane projections are checked
against an independent bisection, and the Square schedule against the reference's values.
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The package re-exports functions named like the modules, so import the modules by path.
fab_lib = importlib.import_module("gen_jax.attacks.fab")
square_lib = importlib.import_module("gen_jax.attacks.square")

NORMS = ("linf", "l2")


def _linear_problem(seed, shape=(4, 4, 1), num_classes=4, batch=32, lo=0.3, hi=0.7):
  rng = np.random.default_rng(seed)
  n = int(np.prod(shape))
  w = rng.normal(size=(n, num_classes)).astype(np.float32)
  b = (0.1 * rng.normal(size=num_classes)).astype(np.float32)
  x = rng.uniform(lo, hi, size=(batch,) + shape).astype(np.float32)

  def logits_fn(v):
    return v.reshape((v.shape[0], -1)) @ w + b

  y = np.asarray(jnp.argmax(logits_fn(x), axis=1)).astype(np.int32)
  return logits_fn, x, y, w, b


def _mlp(seed, shape=(4, 4, 1), hidden=16, num_classes=4):
  rng = np.random.default_rng(seed)
  n = int(np.prod(shape))
  w1 = (rng.normal(size=(n, hidden)) * 2 / np.sqrt(n)).astype(np.float32)
  w2 = (rng.normal(size=(hidden, num_classes)) * 2 / np.sqrt(hidden)).astype(np.float32)

  def logits_fn(v):
    return jnp.tanh(v.reshape((v.shape[0], -1)) @ w1) @ w2

  return logits_fn


def _norm(d, norm):
  d = np.asarray(d).reshape((d.shape[0], -1))
  return np.abs(d).max(1) if norm == "linf" else np.sqrt((d * d).sum(1))


def _minimal_linear(x, y, w, b, norm):
  """Closed-form minimal perturbation of a linear classifier and whether the box stays inactive."""
  xf = x.reshape((x.shape[0], -1))
  z = xf @ w + b
  best = np.full(x.shape[0], np.inf)
  in_box = np.ones(x.shape[0], bool)
  for i in range(x.shape[0]):
    for t in range(w.shape[1]):
      if t == y[i]:
        continue
      wd = w[:, y[i]] - w[:, t]
      margin = z[i, y[i]] - z[i, t]
      if norm == "linf":
        dist, step = margin / np.abs(wd).sum(), -np.sign(wd)
      else:
        dist, step = margin / np.linalg.norm(wd), -wd / np.linalg.norm(wd)
      if dist < best[i]:
        best[i] = dist
        point = xf[i] + dist * step
        in_box[i] = bool(np.all((point >= 0) & (point <= 1)))
  return best, in_box


def _assert_in_ball_and_box(x_adv, x, eps, norm):
  x_adv = np.asarray(x_adv)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert np.all(_norm(x_adv - x, norm) <= eps * (1 + 1e-5) + 1e-6)


# ----------------------------------------------------------------------------------------------
# Hyperplane projections.


def _bisect_linf(t, w, b):
  """min ||d||_inf s.t. w.(t+d) = b, t+d in [0,1], by bisection on the budget (None: infeasible)."""
  c = w @ t - b
  ws = w * np.sign(c) if c != 0 else w
  c = abs(c)
  room = np.where(ws < 0, 1 - t, t)

  def reach(lam):
    return np.sum(np.abs(ws) * np.minimum(lam, room))

  if reach(1.0) < c:
    return None
  lo, hi = 0.0, 1.0
  for _ in range(80):
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if reach(mid) >= c else (mid, hi)
  return hi


def _bisect_l2(t, w, b):
  """min ||d||_2 with the KKT form d = clip(-a w, -t, 1 - t), by bisection over a."""
  c = w @ t - b
  ws = w * np.sign(c) if c != 0 else w
  c = abs(c)

  def step(a):
    return np.clip(-a * ws, -t, 1 - t)

  if ws @ step(1e9) > -c:
    return None
  lo, hi = 0.0, 1e9
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if ws @ step(mid) <= -c else (mid, hi)
  return np.linalg.norm(step(hi))


@pytest.mark.parametrize("norm,n", [("linf", 12), ("l2", 12), ("linf", 3072)])
def test_hyperplane_projection_is_minimal_and_feasible(norm, n):
  rng = np.random.default_rng(0)
  rows = 64
  t = rng.uniform(0, 1, (rows, n)).astype(np.float32)
  t[:, 0] = rng.integers(0, 2, rows)  # points on the faces of the box
  t[:, 1:n // 4] = np.round(t[:, 1:n // 4] * 4) / 4  # ties among the rooms
  w = rng.normal(size=(rows, n)).astype(np.float32)
  w[rng.uniform(size=(rows, n)) < 0.15] = 0.0
  b = (t * w).sum(1) + rng.normal(size=rows) * rng.choice([0.05, 0.5, 5.0], rows)
  b = b.astype(np.float32)
  project_fn = fab_lib.project_hyperplane_linf if norm == "linf" else fab_lib.project_hyperplane_l2
  d = np.asarray(jax.jit(project_fn)(t, w, b))
  bisect_fn = _bisect_linf if norm == "linf" else _bisect_l2
  n_feasible = 0
  for i in range(rows):
    p = t[i] + d[i]
    assert np.all(p >= -1e-6) and np.all(p <= 1 + 1e-6)
    expected = bisect_fn(t[i].astype(np.float64), w[i].astype(np.float64), float(b[i]))
    if expected is None:  # infeasible: the step goes as far as the box allows
      assert abs(w[i] @ p - b[i]) > 1e-4
      continue
    n_feasible += 1
    np.testing.assert_allclose(w[i] @ p, b[i], atol=2e-4 * (1 + np.abs(w[i]).sum()))
    np.testing.assert_allclose(_norm(d[i:i + 1], norm)[0], expected, rtol=2e-4, atol=1e-5)
  assert n_feasible > rows // 2


# ----------------------------------------------------------------------------------------------
# FAB.


@pytest.mark.parametrize("norm,targeted", [("linf", True), ("l2", True), ("linf", False)])
def test_fab_finds_closed_form_minimal_perturbation_on_linear_model(norm, targeted):
  logits_fn, x, y, w, b = _linear_problem(1)
  y[:3] = (y[:3] + 1) % 4  # misclassified points must keep their clean input
  d_min, in_box = _minimal_linear(x, y, w, b, norm)
  correct = np.arange(len(y)) >= 3
  eps = float(np.median(d_min[correct]))
  key = jax.random.key(0)
  attack_fn = fab_lib.fab_targeted if targeted else fab_lib.fab
  kwargs = dict(key=key, eps=eps, norm=norm, steps=20)
  x_adv = np.asarray(attack_fn(logits_fn, x, y, **kwargs))
  _assert_in_ball_and_box(x_adv, x, eps, norm)
  broken = np.asarray(jnp.argmax(logits_fn(x_adv), axis=1)) != y
  changed = np.any(x_adv != x, axis=(1, 2, 3))
  np.testing.assert_array_equal(changed[:3], False)
  clear = correct & in_box & (np.abs(d_min / eps - 1) > 0.02)
  assert clear.sum() >= 20
  np.testing.assert_array_equal(broken[clear], d_min[clear] < eps)
  np.testing.assert_array_equal(changed & correct, broken & correct)  # failures keep clean input
  # FAB converges to the minimal perturbation, not just any one within eps.
  found = _norm(x_adv - x, norm)
  ok = broken & clear
  assert np.all(found[ok] >= d_min[ok] * (1 - 1e-4))
  assert np.all(found[ok] <= d_min[ok] * 1.02)
  # Same key, same result; eps = 0 and a huge eps reuse the compiled program.
  np.testing.assert_array_equal(np.asarray(attack_fn(logits_fn, x, y, **kwargs)), x_adv)
  x_zero = np.asarray(attack_fn(logits_fn, x, y, **{**kwargs, "eps": 0.0}))
  np.testing.assert_array_equal(x_zero, x)
  x_big = attack_fn(logits_fn, x, y, **{**kwargs, "eps": 100.0})
  assert np.all(np.asarray(jnp.argmax(logits_fn(x_big), axis=1)) != y)


def test_fab_targeted_with_restarts_on_mlp_stays_in_ball():
  norm = "l2"
  logits_fn = _mlp(2)
  x = np.random.default_rng(3).uniform(0, 1, (16, 4, 4, 1)).astype(np.float32)
  y = np.asarray(jnp.argmax(logits_fn(x), axis=1)).astype(np.int32)
  eps = 0.2
  x_adv = fab_lib.fab_targeted(logits_fn,
                               x,
                               y,
                               key=jax.random.key(1),
                               eps=eps,
                               norm=norm,
                               steps=10,
                               restarts=2,
                               n_target_classes=2)
  _assert_in_ball_and_box(x_adv, x, eps, norm)
  pred = np.asarray(jnp.argmax(logits_fn(x_adv), axis=1))
  changed = np.any(np.asarray(x_adv) != x, axis=(1, 2, 3))
  np.testing.assert_array_equal(changed, pred != y)
  assert 0 < (pred != y).sum() < len(y)


def test_attacks_trace_with_traced_eps():
  # Tracing (no compilation) shows that no concrete-value check or Python branch touches eps.
  logits_fn, x, y, _, _ = _linear_problem(4, batch=8)
  key = jax.random.key(0)
  for attack_fn, kwargs in ((fab_lib.fab_targeted, dict(steps=3)), (fab_lib.fab, dict(steps=3)),
                            (square_lib.square, dict(n_queries=3, norm="l2"))):
    jaxpr = jax.make_jaxpr(
        lambda eps, f=attack_fn, kw=kwargs: f(logits_fn, x, y, key=key, eps=eps, **kw))(0.1)
    assert jaxpr.out_avals[0].shape == x.shape


# ----------------------------------------------------------------------------------------------
# Square.


@pytest.mark.parametrize("norm", NORMS)
def test_square_ball_box_failures_and_determinism(norm):
  logits_fn, x, y, w, b = _linear_problem(5, shape=(8, 8, 1), batch=24, lo=0.0, hi=1.0)
  y[:2] = (y[:2] + 1) % 4
  eps = 0.03 if norm == "linf" else 0.3
  kwargs = dict(key=jax.random.key(0), eps=eps, norm=norm, n_queries=100, restarts=2)
  x_adv = np.asarray(square_lib.square(logits_fn, x, y, **kwargs))
  _assert_in_ball_and_box(x_adv, x, eps, norm)
  pred = np.asarray(jnp.argmax(logits_fn(x_adv), axis=1))
  changed = np.any(x_adv != x, axis=(1, 2, 3))
  np.testing.assert_array_equal(changed[:2], False)
  np.testing.assert_array_equal(changed[2:], pred[2:] != y[2:])  # failures keep the clean input
  assert 0 < changed.sum() < len(y) - 2
  # Nothing beyond the closed-form minimal perturbation; everything well within it.
  d_min, _ = _minimal_linear(x, y, w, b, norm)
  assert not np.any(changed[2:] & (d_min[2:] > eps))
  easy = d_min[2:] < eps / 4
  assert easy.sum() >= 3 and np.all(changed[2:][easy])
  np.testing.assert_array_equal(np.asarray(square_lib.square(logits_fn, x, y, **kwargs)), x_adv)
  other = np.asarray(square_lib.square(logits_fn, x, y, **{**kwargs, "key": jax.random.key(1)}))
  assert np.any(other != x_adv)
  np.testing.assert_array_equal(
      np.asarray(square_lib.square(logits_fn, x, y, **{
          **kwargs, "eps": 0.0
      })), x)
  x_big = square_lib.square(logits_fn, x, y, **{**kwargs, "eps": 1.0 if norm == "linf" else 8.0})
  assert np.all(np.asarray(jnp.argmax(logits_fn(x_big), axis=1)) != y)


def test_square_p_schedule_matches_reference_values():
  # AutoAttack (no rescaling): p halves after queries 10, 50, 200, 500, 1000, 2000, 4000.
  expected = {
      0: 0.8,
      10: 0.8,
      11: 0.4,
      50: 0.4,
      51: 0.2,
      200: 0.2,
      201: 0.1,
      501: 0.05,
      1001: 0.025,
      2001: 0.0125,
      4000: 0.0125,
      4001: 0.00625,
      4999: 0.00625
  }
  for it, p in expected.items():
    assert square_lib.p_selection(it, n_queries=5000, p_init=0.8) == pytest.approx(p), it
  # The reference class's default rescales to 10,000 queries: it -> int(it / n * 10000).
  rescaled = {
      1: 0.8,
      2: 0.4,
      5: 0.4,
      6: 0.2,
      20: 0.2,
      21: 0.1,
      400: 0.8 / 64,
      401: 0.8 / 128,
      601: 0.8 / 256,
      800: 0.8 / 256,
      801: 0.8 / 512,
      999: 0.8 / 512
  }
  for it, p in rescaled.items():
    assert square_lib.p_selection(it, n_queries=1000, p_init=0.8, rescale=True) == pytest.approx(p)
  sched = square_lib.p_schedule(300, p_init=0.5)
  assert sched.shape == (300,) and sched[0] == 0.5 and sched[299] == 0.5 / 8
  # Square sides on 32x32 images: round(sqrt(p * 1024)), >= 1 (L-inf) or odd >= 3 (L2).
  linf = square_lib._side_schedule(5000, 0.8, False, 32, 32, "linf")
  l2 = square_lib._side_schedule(5000, 0.8, False, 32, 32, "l2")
  assert (linf[0], linf[20], linf[4999]) == (29, 20, 3)
  assert (l2[0], l2[20], l2[4999]) == (29, 21, 3)


def test_square_l2_pattern_matches_hand_computed_values():
  eta = np.asarray(square_lib._eta_pattern(3, 5))
  np.testing.assert_array_equal(eta[3:], 0.0)
  np.testing.assert_array_equal(eta[:, 3:], 0.0)
  top = np.array([0.25, 1.25, 0.25])
  bottom = np.array([[0.25, 0.25, 0.25], [0.25, 1.25, 0.25]])
  want = np.concatenate([top[None] / np.linalg.norm(top), -bottom / np.linalg.norm(bottom)])
  want /= np.linalg.norm(want)
  np.testing.assert_allclose(eta[:3, :3], want, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Input validation.


@pytest.mark.parametrize("attack", ["fab_targeted", "fab", "square"])
def test_bad_inputs_raise_before_any_work(attack):
  logits_fn, x, y, _, _ = _linear_problem(7, batch=4)
  attack_fn = {
      "fab_targeted": fab_lib.fab_targeted,
      "fab": fab_lib.fab,
      "square": square_lib.square
  }[attack]
  key = jax.random.key(0)
  ok = dict(key=key, eps=0.1)
  with pytest.raises(ValueError, match="eps"):
    attack_fn(logits_fn, x, y, key=key, eps=-0.1)
  with pytest.raises(ValueError, match="norm"):
    attack_fn(logits_fn, x, y, norm="l1", **ok)
  with pytest.raises(ValueError, match="rank 4"):
    attack_fn(logits_fn, x[0], y, **ok)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    attack_fn(logits_fn, x + 1.0, y, **ok)
  with pytest.raises(ValueError, match="labels"):
    attack_fn(logits_fn, x, y + 10, **ok)
  with pytest.raises(ValueError, match="logits_fn"):
    attack_fn(lambda v: logits_fn(v)[:, :, None], x, y, **ok)
  with pytest.raises(ValueError, match="restarts"):
    attack_fn(logits_fn, x, y, restarts=0, **ok)
  if attack == "square":
    with pytest.raises(ValueError, match="n_queries"):
      attack_fn(logits_fn, x, y, n_queries=0, **ok)
    with pytest.raises(ValueError, match="p_init"):
      attack_fn(logits_fn, x, y, p_init=1.5, **ok)
  else:
    with pytest.raises(ValueError, match="steps"):
      attack_fn(logits_fn, x, y, steps=0, **ok)
    with pytest.raises(ValueError, match="beta"):
      attack_fn(logits_fn, x, y, beta=1.5, **ok)
