"""Tests of the boundary analysis (gen_jax.evaluation.boundary).

On a 2-class linear model z1 - z0 = w.x + b the minimal L-inf perturbation is |w.x + b| / ||w||_1
(while the box does not bind, which the data guarantee: pixels in [0.2, 0.8], radii < 0.2), so
the bisection must recover it within its resolution, FAB must agree, and a model with the same
predictions but a smaller ||w||_1 must have larger radii. The ranking helpers are checked on
hand-made distances; a small MLP on the 8x8 digits checks "robust at eps" against PGD.
"""
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from gen_jax import attacks

boundary = importlib.import_module("gen_jax.evaluation.boundary")

EPS_MAX = 0.05
BISECTION_STEPS = 10
RESOLUTION = EPS_MAX / 2**BISECTION_STEPS
TOL = 1e-4


def _linear_apply(w, b, x):
  z = x.reshape((x.shape[0], -1)) @ w + b
  return jnp.stack([jnp.zeros_like(z), z], axis=1)


def _linear_fn(w, b):
  return jax.tree_util.Partial(_linear_apply, jnp.asarray(w), jnp.asarray(b))


@pytest.fixture(scope="module")
def linear():
  """64 points, 8 informative pixels and 8 constant ones; a model A that also weighs the constant
  pixels (same predictions, larger ||w||_1) and a larger-margin model B that does not."""
  rng = np.random.default_rng(0)
  n = 64
  x = np.full((n, 16), 0.5, np.float32)
  x[:, :8] = rng.uniform(0.2, 0.8, size=(n, 8))
  u = np.zeros(16, np.float32)
  u[:8] = rng.normal(size=8)
  v = np.zeros(16, np.float32)
  v[8:] = rng.normal(size=8)
  w_a, w_b = u + v, u
  b_b = np.float32(-0.5 * u.sum())
  b_a = np.float32(b_b - 0.5 * v.sum())  # the constant pixels add v.x = 0.5 sum(v): cancelled
  z = x @ w_b + b_b
  y = (z > 0).astype(np.int32)
  y[::4] = 1 - y[::4]  # a quarter misclassified, to have negative distances
  return {
      "x": x.reshape((n, 4, 4, 1)),
      "y": y,
      "z": z,
      "fn_a": _linear_fn(w_a, b_a),
      "fn_b": _linear_fn(w_b, b_b),
      "r_a": np.abs(z) / np.abs(w_a).sum(),
      "r_b": np.abs(z) / np.abs(w_b).sum(),
      "correct": (z > 0) == (y == 1),
  }


@pytest.fixture(scope="module")
def distances_a(linear):
  # batch_size 40 over 64 points: a padded second batch.
  return boundary.boundary_distances(linear["fn_a"],
                                     linear["x"],
                                     linear["y"],
                                     key=jax.random.key(1),
                                     eps_max=EPS_MAX,
                                     bisection_steps=BISECTION_STEPS,
                                     batch_size=40)


@pytest.fixture(scope="module")
def report(linear):
  return boundary.boundary_report({
      "wide_w": linear["fn_a"],
      "large_margin": linear["fn_b"]
  },
                                  linear["x"],
                                  linear["y"],
                                  key=jax.random.key(2),
                                  eps=0.01,
                                  eps_max=EPS_MAX,
                                  fraction=0.25)


def test_bisection_recovers_the_closed_form_radius(linear, distances_a):
  d, r = distances_a, linear["r_a"]
  assert d.shape == (64,) and d.dtype == np.float32
  # The data must exercise both sides of eps_max and the box must not bind.
  inside, beyond = r < EPS_MAX - RESOLUTION - TOL, r > EPS_MAX + TOL
  assert inside.sum() >= 40 and beyond.sum() >= 3 and r.max() < 0.2
  # The attack cannot succeed below the true radius; the bisection stops within its resolution.
  assert np.all(np.abs(d[inside]) >= r[inside] - TOL)
  assert np.all(np.abs(d[inside]) <= r[inside] + RESOLUTION + TOL)
  assert np.all(np.isinf(d[beyond]))


def test_signed_distance_is_negative_exactly_for_misclassified(linear, distances_a):
  assert not linear["correct"].all() and linear["correct"].any()
  np.testing.assert_array_equal(distances_a < 0, ~linear["correct"])
  assert np.all(distances_a != 0)


def test_fab_agrees_with_bisection(linear, distances_a):
  d_fab = boundary.boundary_distances(linear["fn_a"],
                                      linear["x"],
                                      linear["y"],
                                      key=jax.random.key(3),
                                      eps_max=EPS_MAX,
                                      method="fab",
                                      batch_size=40)
  r = linear["r_a"]
  np.testing.assert_array_equal(d_fab < 0, ~linear["correct"])
  clear = (r < 0.9 * EPS_MAX) | (r > 1.1 * EPS_MAX)  # away from the eps_max threshold
  assert np.array_equal(np.isinf(d_fab[clear]), np.isinf(distances_a[clear]))
  finite = clear & np.isfinite(distances_a)
  # FAB is a minimum-norm attack: an upper bound, close to the exact radius on a linear model.
  assert np.all(np.abs(d_fab[finite]) >= r[finite] - TOL)
  np.testing.assert_allclose(d_fab[finite], distances_a[finite], rtol=0.05, atol=RESOLUTION + TOL)


def test_one_compile_across_eps_max_and_weights(linear):
  kwargs = dict(key=jax.random.key(4), bisection_steps=BISECTION_STEPS, batch_size=16)
  x, y = linear["x"][:16], linear["y"][:16]
  boundary.boundary_distances(linear["fn_a"], x, y, eps_max=0.05, **kwargs)
  size = boundary._bisection_batch._cache_size()
  boundary.boundary_distances(linear["fn_b"], x, y, eps_max=0.03, **kwargs)
  assert boundary._bisection_batch._cache_size() == size


def test_report_summaries_follow_from_the_distances(linear, report):
  json.dumps(report, allow_nan=False)  # JSON-safe: no inf / nan
  assert report["n"] == 64 and report["method"] == "bisection"
  assert report["eps_max"] == EPS_MAX and report["fraction"] == 0.25
  for row in report["models"].values():
    d = np.asarray(row["distances"])
    assert d.shape == (64,) and np.all(np.abs(d) <= EPS_MAX)
    np.testing.assert_array_equal(d < 0, ~linear["correct"])
    assert row["clean"] == pytest.approx(linear["correct"].mean())
    assert row["robust_at_eps"] == pytest.approx(np.mean(d > report["eps"]))
    order = np.argsort(np.abs(d), kind="stable")[:16]  # 25% of 64
    assert row["closest_n"] == 16
    assert row["closest_accuracy"] == pytest.approx(np.mean(d[order] > 0))
    radii = d[d > 0]
    assert row["median_radius"] == pytest.approx(np.median(radii))
    assert row["mean_radius"] == pytest.approx(np.mean(radii))
    # Every listed "beyond" point is stored capped at +-eps_max.
    beyond = np.flatnonzero(np.abs(d) == EPS_MAX)
    assert set(row["beyond_eps_max"]) <= set(beyond.tolist())
    assert row["seconds"] >= 0
  # The shared hard set is the ranking helper applied to the stored (capped) distances.
  idx, acc = boundary.shared_hard_set(
      {
          role: row["distances"] for role, row in report["models"].items()
      }, 0.25, cap=EPS_MAX)
  assert report["shared_hard_set"] == {"n": 16, "indices": idx.tolist(), "accuracy": acc}


def test_larger_margin_model_has_larger_radii(linear, report):
  a, b = report["models"]["wide_w"], report["models"]["large_margin"]
  assert a["clean"] == b["clean"]  # the same predictions ...
  assert b["median_radius"] > 1.5 * a["median_radius"]  # ... further from the boundary
  assert b["robust_at_eps"] > a["robust_at_eps"]
  assert len(b["beyond_eps_max"]) > len(a["beyond_eps_max"]) > 0
  # Same predictions, the closed form ranks B's radii above A's point by point.
  d_a = np.abs(np.asarray(a["distances"]))
  d_b = np.abs(np.asarray(b["distances"]))
  assert np.all(d_b >= d_a - RESOLUTION - TOL)


def test_plot_and_markdown(report, tmp_path):
  path = boundary.plot_boundary(report, tmp_path / "sub" / "boundary.png")
  data = path.read_bytes()
  assert path.exists() and len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
  table = boundary.to_markdown(report)
  lines = table.strip().splitlines()
  assert lines[2] == ("| model | clean | median radius (x255) | robust at eps | "
                      "acc. on closest 25% | acc. on shared hard set |")
  row = report["models"]["large_margin"]
  shared = report["shared_hard_set"]["accuracy"]["large_margin"]
  assert (f"| large_margin | {100 * row['clean']:.2f} | {255 * row['median_radius']:.2f} | "
          f"{100 * row['robust_at_eps']:.2f} | {100 * row['closest_accuracy']:.2f} | "
          f"{100 * shared:.2f} |") in lines


def test_ranking_helpers_on_hand_made_distances():
  d = {
      "m1": np.array([0.5, -0.1, 0.2, np.inf, 0.05, -0.3, 0.4, 0.02, -0.6, 0.7]),
      "m2": np.array([0.1, 0.3, -0.2, 0.1, -0.05, 0.3, -np.inf, 0.02, 0.6, 0.1]),
  }
  # Mean of min(|d|, 1): [0.3, 0.2, 0.2, 0.55, 0.05, 0.3, 0.7, 0.02, 0.6, 0.4].
  idx, acc = boundary.shared_hard_set(d, 0.3, cap=1.0)
  np.testing.assert_array_equal(idx, [7, 4, 1])  # 0.02, 0.05, then 0.2 (index 1 before 2)
  assert acc == {"m1": pytest.approx(2 / 3), "m2": pytest.approx(2 / 3)}
  # Without the cap, one inf decides; the smallest still win.
  idx, _ = boundary.shared_hard_set(d, 0.2)
  np.testing.assert_array_equal(idx, [7, 4])
  # Per model: the closest 20% of m1 are 0.02 and 0.05 (both correct); of m2: 0.02, -0.05.
  assert boundary.closest_accuracy(d["m1"], 0.2) == (1.0, 2)
  assert boundary.closest_accuracy(d["m2"], 0.2) == (0.5, 2)
  np.testing.assert_array_equal(boundary.closest_indices([0.3, 0.1, 0.2, 0.1], 0.5), [1, 3])
  assert boundary.closest_indices([0.3, 0.1], 0.01).tolist() == [1]  # at least one point
  assert boundary.closest_indices([0.3, 0.1], 1.0).tolist() == [1, 0]


def _never_called(x):
  raise AssertionError("the logits function must not run for bad settings")


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps_max=0.0), "eps_max"),
    (dict(eps_max=-0.1), "eps_max"),
    (dict(eps_max=float("nan")), "eps_max"),
    (dict(eps_max=0.1, method="deepfool"), "method"),
])
def test_boundary_distances_rejects_bad_settings(kwargs, match):
  x = np.full((4, 2, 2, 1), 0.5, np.float32)
  with pytest.raises(ValueError, match=match):
    boundary.boundary_distances(_never_called,
                                x,
                                np.zeros(4, np.int32),
                                key=jax.random.key(0),
                                **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.01, fraction=0.0), "fraction"),
    (dict(eps=0.01, fraction=1.5), "fraction"),
    (dict(eps=0.01, method="pgd"), "method"),
    (dict(eps=0.01, eps_max=0.0), "eps_max"),
    (dict(eps=0.1, eps_max=0.05), "eps_max"),
    (dict(eps=-0.1), "eps"),
])
def test_boundary_report_rejects_bad_settings(kwargs, match):
  x = np.full((4, 2, 2, 1), 0.5, np.float32)
  with pytest.raises(ValueError, match=match):
    boundary.boundary_report({"m": _never_called},
                             x,
                             np.zeros(4, np.int32),
                             key=jax.random.key(0),
                             **kwargs)


def test_boundary_report_rejects_bad_data(linear):
  with pytest.raises(ValueError, match="at least one"):
    boundary.boundary_report({}, linear["x"], linear["y"], key=jax.random.key(0), eps=0.01)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    boundary.boundary_report({"a": linear["fn_a"]},
                             linear["x"] * 3,
                             linear["y"],
                             key=jax.random.key(0),
                             eps=0.01)
  with pytest.raises(ValueError, match="same points"):
    boundary.shared_hard_set({"a": [0.1, 0.2], "b": [0.1]}, 0.5)


def _mlp_apply(params, x):
  h = jnp.tanh(x.reshape((x.shape[0], -1)) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


@pytest.fixture(scope="module")
def digits_mlp():
  """A 64-32-10 MLP on the 8x8 digits, 300 full-batch gradient-descent steps (~1 s)."""
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  rng = np.random.default_rng(0)
  params = {
      "w1": jnp.asarray(rng.normal(size=(64, 32)) / 8, jnp.float32),
      "b1": jnp.zeros(32),
      "w2": jnp.asarray(rng.normal(size=(32, 10)) / np.sqrt(32), jnp.float32),
      "b2": jnp.zeros(10),
  }
  x_train, y_train = jnp.asarray(x[:1500]), jnp.asarray(y[:1500])

  def loss(p):
    return jnp.mean(attacks.ce_loss(_mlp_apply(p, x_train), y_train))

  @jax.jit
  def train(p):
    step = lambda _, q: jax.tree_util.tree_map(lambda a, g: a - 0.5 * g, q, jax.grad(loss)(q))
    return jax.lax.fori_loop(0, 300, step, p)

  return jax.tree_util.Partial(_mlp_apply, train(params)), x[1500:1600], y[1500:1600]


def test_robust_at_eps_matches_pgd_on_digits(digits_mlp):
  fn, x, y = digits_mlp
  eps = 0.04
  d = boundary.boundary_distances(fn, x, y, key=jax.random.key(5), eps_max=4 * eps)
  correct = np.asarray(jnp.argmax(fn(x), 1) == y)
  assert correct.mean() > 0.85
  np.testing.assert_array_equal(d > 0, correct)
  x_adv = attacks.pgd(fn, x, y, key=jax.random.key(6), eps=eps, step_size=2.5 * eps / 20, steps=20)
  pgd_robust = np.asarray(jnp.argmax(fn(x_adv), 1) == y)
  # A point PGD breaks at eps has a radius <= eps up to the bisection's resolution and luck.
  assert 0.2 < pgd_robust.mean() < correct.mean()  # the check is not vacuous
  assert abs(np.mean(d > eps) - pgd_robust.mean()) <= 0.05
