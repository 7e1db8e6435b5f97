"""Tests of the gradient-masking sanity checks on a tiny MLP trained on the 8x8 digits.

The normally trained MLP must pass all five checks; the same MLP behind an input step function
(`round(4 x) / 4`, zero gradient almost everywhere) hides its gradients, so white-box attacks stall
while the black-box Square Attack and the eps = 1 attack expose it. Known figures must be reused
unchanged (and an inconsistent one must fail its check), and bad input must fail before any work.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from gen_jax.evaluation import engine, sanity

EPS = 0.1
STEP = 0.025
N = 200


def _mlp(params, x):
  h = jnp.tanh(x.reshape((x.shape[0], -1)) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def _masked_mlp(params, x):
  # A step function on the input: the gradient is zero almost everywhere, the function is not.
  return _mlp(params, jnp.round(x * 4) / 4)


@pytest.fixture(scope="module")
def digits():
  """(params of a trained 2-layer MLP, 200 held-out images, their labels)."""
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  train, test = order[:1500], order[1500:1500 + N]
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {
      "w1": jax.random.normal(k1, (64, 32)) / 8,
      "b1": jnp.zeros(32),
      "w2": jax.random.normal(k2, (32, 10)) / 6,
      "b2": jnp.zeros(10)
  }
  x_train, y_train = jnp.asarray(x[train]), jnp.asarray(y[train])

  def loss_fn(p):
    logp = jax.nn.log_softmax(_mlp(p, x_train))
    return -jnp.mean(jnp.take_along_axis(logp, y_train[:, None], axis=1))

  @jax.jit
  def train_step(p):
    return jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(loss_fn)(p))

  for _ in range(300):
    params = train_step(params)
  return params, x[test], y[test]


def _checks(logits_fn, params, x, y, known=None):
  return sanity.sanity_checks(jax.tree_util.Partial(logits_fn, params),
                              x,
                              y,
                              key=jax.random.key(1),
                              eps=EPS,
                              step_size=STEP,
                              known=known)


@pytest.fixture(scope="module")
def natural_result(digits):
  return _checks(_mlp, *digits)


@pytest.fixture(scope="module")
def masked_result(digits):
  return _checks(_masked_mlp, *digits)


def _assert_well_formed(result, n):
  assert set(result) >= {
      "passed", "n", "eps", "tolerance", "square_tolerance", "accuracies", "computed", "seconds",
      "checks"
  }
  assert result["n"] == n
  assert tuple(result["checks"]) == sanity.CHECKS
  for name, check in result["checks"].items():
    assert set(check) == {"passed", "detail", "figures"}, name
    assert isinstance(check["passed"], bool), name
    assert isinstance(check["detail"],
                      str) and "\n" not in check["detail"] and "%" in check["detail"]
    assert check["figures"] and all(isinstance(v, float) for v in check["figures"].values())
    assert all(0.0 <= v <= 1.0 for v in check["figures"].values()), name
  assert result["passed"] == all(c["passed"] for c in result["checks"].values())
  assert set(result["accuracies"]) >= set(sanity.FIGURES)


def test_normal_model_passes_every_check(natural_result):
  _assert_well_formed(natural_result, N)
  failed = {k: c["detail"] for k, c in natural_result["checks"].items() if not c["passed"]}
  assert natural_result["passed"], failed
  acc = natural_result["accuracies"]
  # The figures are those of a working attack on a non-robust model, not vacuous passes.
  assert acc["clean"] > 0.9 and acc["pgd20"] < acc["clean"] - 0.2
  assert acc["pgd-unbounded"] == 0.0 and acc["pgd20@4x"] < 0.05
  assert natural_result["tolerance"] == pytest.approx(max(0.01, 3 / N))
  assert natural_result["square_tolerance"] == pytest.approx(max(0.03, 2 * 3 / N))
  assert natural_result["computed"] == list(sanity.FIGURES)


def test_masked_model_fails(masked_result, natural_result):
  _assert_well_formed(masked_result, N)
  checks = masked_result["checks"]
  assert not masked_result["passed"]
  assert not checks["black_box_vs_white_box"]["passed"], checks["black_box_vs_white_box"]
  assert not checks["unbounded_eps"]["passed"], checks["unbounded_eps"]
  # Masking fools PGD: it reports far more robustness than the unmasked model has.
  assert masked_result["accuracies"]["pgd20"] > natural_result["accuracies"]["pgd20"] + 0.2


def test_known_figures_are_reused(digits, natural_result):
  params, x, y = digits
  known = {"clean": 0.5, "pgd100": 0.3, "mim": 0.2}
  result = _checks(_mlp, params, x, y, known=known)
  _assert_well_formed(result, N)
  assert "clean" not in result["computed"] and "pgd100" not in result["computed"]
  assert result["checks"]["eps_curve"]["figures"]["clean"] == 0.5
  assert result["checks"]["more_steps"]["figures"]["pgd100"] == 0.3
  # A known white-box figure counts for the Square check.
  assert result["checks"]["black_box_vs_white_box"]["figures"]["mim"] == 0.2
  assert result["checks"]["black_box_vs_white_box"]["figures"]["best_white_box"] == 0.2
  # Figures not given are computed with the same per-figure keys as before.
  assert result["accuracies"]["pgd20"] == natural_result["accuracies"]["pgd20"]


def test_inconsistent_known_fails_more_steps(digits, natural_result):
  params, x, y = digits
  known = dict(natural_result["accuracies"])
  known["pgd100"] = min(1.0, known["pgd20"] + 0.2)
  result = _checks(_mlp, params, x, y, known=known)
  assert result["computed"] == []
  assert not result["checks"]["more_steps"]["passed"]
  assert "pgd100" in result["checks"]["more_steps"]["detail"]
  assert result["checks"]["more_steps"]["figures"]["pgd100"] == known["pgd100"]
  assert not result["passed"]
  # The rest is unaffected; a tolerance above the gap lets it pass again.
  assert all(c["passed"] for k, c in result["checks"].items() if k != "more_steps")
  loose = sanity.sanity_checks(jax.tree_util.Partial(_mlp, params),
                               x,
                               y,
                               key=jax.random.key(1),
                               eps=EPS,
                               step_size=STEP,
                               known=known,
                               tolerance=0.25)
  assert loose["tolerance"] == 0.25 and loose["checks"]["more_steps"]["passed"]


def test_eps_curve_compiles_once(digits):
  params, x, y = digits
  # A fresh function object, so nothing is cached for it yet.
  fn = jax.tree_util.Partial(lambda p, z: _mlp(p, z), params)
  before = engine._batch_correct._cache_size()  # pylint: disable=protected-access
  known = {k: 0.0 for k in sanity.FIGURES if not k.startswith("pgd20")}
  result = sanity.sanity_checks(fn,
                                x[:20],
                                y[:20],
                                key=jax.random.key(2),
                                eps=EPS,
                                step_size=STEP,
                                known=known)
  assert result["computed"] == ["pgd20@0.25x", "pgd20@0.5x", "pgd20", "pgd20@2x", "pgd20@4x"]
  assert engine._batch_correct._cache_size() - before == 1  # pylint: disable=protected-access


def test_markdown_table(natural_result, masked_result):
  table = sanity.to_markdown({
      "n": 100,
      "models": {
          "natural": natural_result,
          "masked": masked_result
      }
  })
  lines = table.strip().splitlines()
  header = [c.strip() for c in lines[2].strip("|").split("|")]
  assert header == ["model", *sanity.CHECKS, "overall"]
  rows = {
      line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
      for line in lines[4:]
  }
  assert set(rows) == {"natural", "masked"}
  assert all(c.startswith("pass") for c in rows["natural"])
  masked = dict(zip([*sanity.CHECKS, "overall"], rows["masked"]))
  assert masked["unbounded_eps"].startswith("FAIL") and masked["overall"].startswith("FAIL")
  assert f"{100 * masked_result['accuracies']['square']:.1f}" in masked["black_box_vs_white_box"]
  with pytest.raises(ValueError, match="lacks check"):
    sanity.to_markdown({"n": 1, "models": {"bad": {"checks": {}}}})


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.0), "eps must be a finite number > 0"),
    (dict(eps=-0.1), "eps must be a finite number > 0"),
    (dict(eps=1.5), "eps must be <= 1"),
    (dict(step_size=0.0), "step_size must be a finite number > 0"),
    (dict(known={"pgd-20": 0.5}), r"unknown name\(s\) \['pgd-20'\] in known"),
    (dict(known={"pgd20": 55.0}), "fraction, not %"),
    (dict(tolerance=-0.01), "tolerance must be None"),
    (dict(square_tolerance=1.0), "square_tolerance must be None"),
])
def test_bad_input_raises_before_work(digits, kwargs, match):
  _, x, y = digits

  def must_not_run(z):
    raise AssertionError("logits_fn was called before the input was checked")

  args = dict(key=jax.random.key(0), eps=EPS, step_size=STEP)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    sanity.sanity_checks(must_not_run, x, y, **args)


def test_bad_images_raise(digits):
  params, x, y = digits
  fn = jax.tree_util.Partial(_mlp, params)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    sanity.sanity_checks(fn, x * 2, y, key=jax.random.key(0), eps=EPS, step_size=STEP)
  with pytest.raises(ValueError, match="NHWC"):
    sanity.sanity_checks(fn, x[..., 0], y, key=jax.random.key(0), eps=EPS, step_size=STEP)
  with pytest.raises(ValueError, match="y must have shape"):
    sanity.sanity_checks(fn, x, y[:-1], key=jax.random.key(0), eps=EPS, step_size=STEP)


@pytest.mark.parametrize(
    "name, base, delta, check",
    [
        ("pgd20@2x", "pgd20", +0.2, "eps_curve"),  # rises with eps
        ("fgsm", "pgd20", -0.2, "iterative_vs_fgsm"),  # one step beats twenty
        ("square", "pgd20", -0.2, "black_box_vs_white_box"),  # black box beats white box
        ("pgd-unbounded", None, +0.1, "unbounded_eps"),  # survives eps = 1
    ])
def test_each_check_fails_on_inconsistent_figures(digits, natural_result, name, base, delta, check):
  params, x, y = digits
  known = dict(natural_result["accuracies"])
  known[name] = (known[base] if base else 0.0) + delta
  result = _checks(_mlp, params, x, y, known=known)
  assert result["computed"] == []
  failed = [k for k, c in result["checks"].items() if not c["passed"]]
  assert failed == [check], result["checks"][check]["detail"]
  assert f"{100 * known[name]:.1f}" in result["checks"][check]["detail"]


def test_eps_curve_end_is_waived_when_clean_is_zero(digits):
  params, x, y = digits
  known = {name: 0.0 for name in sanity.FIGURES}
  result = _checks(_mlp, params, x, y, known=known)
  assert result["passed"], {k: c["detail"] for k, c in result["checks"].items()}
