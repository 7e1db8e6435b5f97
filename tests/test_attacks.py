"""Tests of gen_jax.attacks core, PGD family, APGD and AutoAttack on tiny models.

Models: linear classifiers on flattened 4x4x1 images, whose minimal L-inf / L2 adversarial
perturbations are known in closed form, and a tiny MLP. Step counts are small wherever the number
of steps does not change what is tested; shapes and static arguments are shared across tests so
that the compiled programs are reused.
"""
import dataclasses
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gen_jax import attacks
from gen_jax.attacks import core
from gen_jax.attacks.settings import APGDSettings, DEFAULTS

B, C = 32, 5
SHAPE = (B, 4, 4, 1)
D = 16


def _linear(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def _mlp(params, x):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def _make_linear(seed: int, num_classes: int = C):
  rng = np.random.default_rng(seed)
  params = {
      "w": jnp.asarray(rng.normal(size=(D, num_classes)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(num_classes,)), jnp.float32)
  }
  return jax.tree_util.Partial(_linear, params), params


def _make_mlp(seed: int):
  rng = np.random.default_rng(seed)
  params = {
      "w1": jnp.asarray(rng.normal(size=(D, 12)), jnp.float32),
      "b1": jnp.zeros((12,), jnp.float32),
      "w2": jnp.asarray(rng.normal(size=(12, C)) * 2, jnp.float32),
      "b2": jnp.zeros((C,), jnp.float32)
  }
  return jax.tree_util.Partial(_mlp, params)


LINEAR, _ = _make_linear(0)
MLP = _make_mlp(1)
X = jax.random.uniform(jax.random.key(2), SHAPE)
# Labels: the MLP's own predictions, with a quarter replaced, so clean accuracy is below 1.
_Y_PRED = np.asarray(jnp.argmax(MLP(X), axis=1))
Y = jnp.asarray(np.where(np.arange(B) % 4 == 0, (_Y_PRED + 1) % C, _Y_PRED), jnp.int32)
KEY = jax.random.key(3)

STEPS = 5
APGD_STEPS = 10

# name -> attack(logits_fn, x, y, key, eps, norm) with small step counts.
ATTACKS = {
    "fgsm":
        lambda f, x, y, k, e, n: attacks.fgsm(f, x, y, key=k, eps=e, norm=n),
    "pgd_ce":
        lambda f, x, y, k, e, n: attacks.pgd(f, x, y, key=k, eps=e, steps=STEPS, norm=n),
    "pgd_cw_restarts":
        lambda f, x, y, k, e, n: attacks.pgd(
            f, x, y, key=k, eps=e, steps=STEPS, norm=n, loss="cw", restarts=2),
    "pgd_dlr":
        lambda f, x, y, k, e, n: attacks.pgd(f, x, y, key=k, eps=e, steps=STEPS, norm=n, loss="dlr"
                                            ),
    "mim":
        lambda f, x, y, k, e, n: attacks.mim(f, x, y, key=k, eps=e, steps=STEPS, norm=n),
    "cw":
        lambda f, x, y, k, e, n: attacks.cw(f, x, y, key=k, eps=e, steps=STEPS, norm=n),
    "apgd_ce":
        lambda f, x, y, k, e, n: attacks.apgd(f, x, y, key=k, eps=e, norm=n, steps=APGD_STEPS),
    "apgd_dlr":
        lambda f, x, y, k, e, n: attacks.apgd(
            f, x, y, key=k, eps=e, norm=n, loss="dlr", steps=APGD_STEPS),
    "apgd_t":
        lambda f, x, y, k, e, n: attacks.apgd_targeted(
            f, x, y, key=k, eps=e, norm=n, steps=APGD_STEPS, n_target_classes=3),
}
EPS = {"linf": 0.1, "l2": 0.5}


def _accuracy(logits_fn, x, y) -> float:
  return float(jnp.mean(jnp.argmax(logits_fn(x), axis=1) == y))


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_ball_box_and_not_stronger_than_clean(name, norm):
  eps = EPS[norm]
  x_adv = ATTACKS[name](MLP, X, Y, KEY, eps, norm)
  assert x_adv.shape == X.shape and x_adv.dtype == X.dtype
  attacks.verify_adversarial(x_adv, X, eps, norm)
  dist = np.asarray(core.lp_norm(x_adv - X, norm))
  assert dist.max() <= eps * (1 + 1e-5) + 1e-6
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  clean = _accuracy(MLP, X, Y)
  robust = _accuracy(MLP, x_adv, Y)
  assert robust <= clean
  # Every attack must do something at this radius on this non-robust model.
  assert robust < clean


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_eps_zero_gives_clean_accuracy(name):
  x_adv = ATTACKS[name](MLP, X, Y, KEY, 0.0, "linf")
  np.testing.assert_allclose(np.asarray(x_adv), np.asarray(X), atol=1e-7)
  assert _accuracy(MLP, x_adv, Y) == _accuracy(MLP, X, Y)


def _pixel_classifier():
  """Class j's logit is pixel j: every class wins somewhere in the box."""
  w = np.zeros((D, C), np.float32)
  w[np.arange(C), np.arange(C)] = 1.0
  return jax.tree_util.Partial(_linear, {"w": jnp.asarray(w), "b": jnp.zeros((C,))})


@pytest.mark.parametrize("norm,eps", [("linf", 1.0), ("l2", 4.0)])
@pytest.mark.parametrize("name", ["pgd_ce", "apgd_t"])
def test_huge_eps_drives_accuracy_to_zero(name, norm, eps):
  f = _pixel_classifier()
  y = jnp.argmax(f(X), axis=1)
  assert _accuracy(f, X, y) == 1.0
  x_adv = ATTACKS[name](f, X, y, KEY, eps, norm)
  assert _accuracy(f, x_adv, y) == 0.0


def _binary_linear_problem(norm: str):
  """A 2-class linear model, points inside [0.3, 0.7]^16 and their exact minimal perturbation."""
  rng = np.random.default_rng(7)
  w = rng.normal(size=(D, 2)).astype(np.float32)
  b = -0.5 * w.sum(0)  # centres the boundary in the box, so the margins are small
  x = rng.uniform(0.3, 0.7, size=(64, D)).astype(np.float32)
  z = x @ w + b
  y = z.argmax(1)
  dw = w[:, 1] - w[:, 0]
  dual = np.abs(dw).sum() if norm == "linf" else np.sqrt((dw**2).sum())
  minimal = np.abs(z[:, 1] - z[:, 0]) / dual
  f = jax.tree_util.Partial(_linear, {"w": jnp.asarray(w), "b": jnp.asarray(b)})
  return f, jnp.asarray(x.reshape(64, 4, 4, 1)), jnp.asarray(y, jnp.int32), minimal


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ["pgd_ce", "pgd_cw_restarts", "mim", "apgd_ce"])
def test_linear_classifier_exact_minimal_perturbation(name, norm):
  f, x, y, minimal = _binary_linear_problem(norm)
  eps = float(np.median(minimal))
  # The box is inactive: every coordinate of the optimal perturbation is at most eps <= 0.3.
  assert eps < 0.3
  step_kw = {}
  if name in ("pgd_ce", "pgd_cw_restarts", "mim"):
    x_adv = {
        "pgd_ce":
            lambda: attacks.pgd(f, x, y, key=KEY, eps=eps, steps=20, norm=norm),
        "pgd_cw_restarts":
            lambda: attacks.pgd(
                f, x, y, key=KEY, eps=eps, steps=20, norm=norm, loss="cw", restarts=2),
        "mim":
            lambda: attacks.mim(f, x, y, key=KEY, eps=eps, steps=20, norm=norm),
    }[name]()
  else:
    x_adv = attacks.apgd(f, x, y, key=KEY, eps=eps, norm=norm, steps=20, **step_kw)
  fooled = np.asarray(jnp.argmax(f(x_adv), axis=1) != y)
  below = minimal < eps * 0.97
  above = minimal > eps * 1.0001
  assert below.sum() >= 20 and above.sum() >= 20
  np.testing.assert_array_equal(fooled[below], True)
  np.testing.assert_array_equal(fooled[above], False)


def test_pgd_raises_the_loss():
  x_adv = attacks.pgd(MLP, X, Y, key=KEY, eps=0.1, steps=STEPS)
  assert float(core.ce_loss(MLP(x_adv), Y).sum()) > float(core.ce_loss(MLP(X), Y).sum())


@pytest.mark.parametrize("name", ["pgd_ce", "mim", "apgd_ce", "apgd_t"])
def test_deterministic_for_a_fixed_key(name):
  a = ATTACKS[name](MLP, X, Y, KEY, 0.1, "linf")
  b = ATTACKS[name](MLP, X, Y, KEY, 0.1, "linf")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_random_start_depends_on_the_key():
  a = attacks.pgd(MLP, X, Y, key=KEY, eps=0.1, steps=1, step_size=0.0)
  b = attacks.pgd(MLP, X, Y, key=jax.random.key(4), eps=0.1, steps=1, step_size=0.0)
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(
      np.asarray(
          attacks.pgd(MLP, X, Y, key=KEY, eps=0.1, steps=1, step_size=0.0, random_start=False)),
      np.asarray(X))


def test_pgd_is_traceable_without_retracing_across_eps():

  @jax.jit
  @chex.assert_max_traces(n=1)
  def attack_step(x, y, key, eps):
    return attacks.pgd(MLP, x, y, key=key, eps=eps, step_size=eps / 4, steps=3)

  for eps in (0.0, 0.05, 0.1, 0.2):
    x_adv = attack_step(X, Y, KEY, eps)
    assert float(jnp.max(jnp.abs(x_adv - X))) <= eps + 1e-6


def test_attacks_inside_jit_closing_over_traced_weights_leak_no_tracer():
  w = jnp.asarray(np.random.default_rng(9).normal(size=(D, C)), jnp.float32)

  @jax.jit
  def attack_step(w, x, y, key, eps):
    logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w  # closes over a tracer, as a train step
    return (attacks.pgd(logits_fn, x, y, key=key, eps=eps,
                        steps=2), attacks.apgd(logits_fn, x, y, key=key, eps=eps, steps=2))

  with jax.checking_leaks():
    for scale in (1.0, 2.0):
      for x_adv in attack_step(w * scale, X, Y, KEY, 0.1):
        attacks.verify_adversarial(x_adv, X, 0.1, "linf")


def test_apgd_is_traceable_with_traced_eps():
  x_adv = jax.jit(lambda eps: attacks.apgd(MLP, X, Y, key=KEY, eps=eps, steps=APGD_STEPS))(0.1)
  np.testing.assert_array_equal(
      np.asarray(x_adv), np.asarray(attacks.apgd(MLP, X, Y, key=KEY, eps=0.1, steps=APGD_STEPS)))


def test_apgd_checkpoints_match_the_reference():
  points = attacks.apgd_checkpoints(100)
  assert points[:8] == [0, 22, 41, 57, 70, 80, 87, 93]
  # The reference also checks after 99 iterations (interval floor 0.06 N).
  assert points == [0, 22, 41, 57, 70, 80, 87, 93, 99]
  assert attacks.apgd_checkpoints(10) == [0, 2, 3, 4, 5, 6, 7, 8, 9]
  assert attacks.apgd_checkpoints(1) == [0]
  with pytest.raises(ValueError, match="steps"):
    attacks.apgd_checkpoints(0)


def test_losses_match_their_formulas():
  z = jnp.asarray([[3.0, 1.0, 2.0, -1.0], [0.0, 4.0, 1.0, 2.0]])
  y = jnp.asarray([0, 2])
  np.testing.assert_allclose(core.margin_loss(z, y), [2.0 - 3.0, 4.0 - 1.0])
  np.testing.assert_allclose(core.dlr_loss(z, y), [-(3 - 2) / (3 - 1), -(1 - 4) / (4 - 1)],
                             rtol=1e-6)
  t = jnp.asarray([1, 3])
  np.testing.assert_allclose(core.dlr_targeted_loss(z, y, t),
                             [-(3 - 1) / (3 - 0.5 * (1 - 1)), -(1 - 2) / (4 - 0.5 * (1 + 0))],
                             rtol=1e-6)
  np.testing.assert_allclose(core.ce_loss(z, y),
                             jax.nn.logsumexp(z, axis=1) - z[[0, 1], y],
                             rtol=1e-6)


def test_projections_and_random_start():
  x = jnp.full((2, 2, 2, 1), 0.5)
  far = x + jnp.asarray([3.0, -3.0]).reshape(2, 1, 1, 1)
  np.testing.assert_allclose(core.project(far, x, 0.1, "linf"),
                             np.asarray(x) + np.asarray([0.1, -0.1]).reshape(2, 1, 1, 1),
                             rtol=1e-6)
  p = core.project(far, x, 0.4, "l2")
  np.testing.assert_allclose(core.lp_norm(p - x, "l2"), [0.4, 0.4], rtol=1e-5)
  for norm, eps in (("linf", 0.3), ("l2", 0.3)):
    s = core.random_start(KEY, X, eps, norm)
    assert float(core.lp_norm(s - X, norm).max()) <= eps + 1e-6
    assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0


def test_attack_in_batches_matches_one_call():
  fgsm = lambda x, y, *, key: attacks.fgsm(MLP, x, y, key=key, eps=0.1)
  batched = attacks.attack_in_batches(fgsm, X, Y, key=KEY, batch_size=12)  # 12 + 12 + 8 (padded)
  np.testing.assert_allclose(batched, np.asarray(fgsm(X, Y, key=KEY)), atol=1e-7)


_SMALL = dataclasses.replace(DEFAULTS,
                             apgd=APGDSettings(steps=APGD_STEPS),
                             apgd_t=APGDSettings(steps=APGD_STEPS, n_target_classes=3))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_autoattack_not_weaker_than_its_components(norm):
  eps = EPS[norm] / 2
  x_adv, report = attacks.autoattack(MLP,
                                     X,
                                     Y,
                                     key=KEY,
                                     eps=eps,
                                     norm=norm,
                                     batch_size=B,
                                     attacks=("apgd-ce", "apgd-t"),
                                     settings=_SMALL)
  attacks.verify_adversarial(x_adv, np.asarray(X), eps, norm)
  clean = _accuracy(MLP, X, Y)
  assert report["clean_accuracy"] == clean
  assert report["robust_accuracy"] == _accuracy(MLP, jnp.asarray(x_adv), Y)
  assert report["flag_mismatches"] == 0
  stage_acc = [s["robust_accuracy"] for s in report["stages"]]
  assert [s["attack"] for s in report["stages"]] == ["apgd-ce", "apgd-t"]
  assert clean >= stage_acc[0] >= stage_acc[1] == report["robust_accuracy"]
  assert all(s["seconds"] >= 0 for s in report["stages"])
  alone = [
      attacks.apgd(MLP, X, Y, key=KEY, eps=eps, norm=norm, steps=APGD_STEPS),
      attacks.apgd_targeted(MLP,
                            X,
                            Y,
                            key=KEY,
                            eps=eps,
                            norm=norm,
                            steps=APGD_STEPS,
                            n_target_classes=3)
  ]
  for x_alone in alone:
    assert report["robust_accuracy"] <= _accuracy(MLP, x_alone, Y)
  # Points that no stage fooled keep their clean image.
  still = np.asarray(jnp.argmax(MLP(jnp.asarray(x_adv)), axis=1) == Y)
  np.testing.assert_array_equal(x_adv[still], np.asarray(X)[still])


@pytest.mark.parametrize("batch_size", [1, 3, 8, 50, 500])
def test_autoattack_pads_remainders_to_few_shapes_and_small_ones_to_powers_of_two(batch_size):
  autoattack_lib = importlib.import_module("gen_jax.attacks.autoattack")  # the padding rule
  sizes = {m: autoattack_lib._padded_size(m, batch_size) for m in range(1, batch_size)}
  quarter = -(-batch_size // 4)
  for m, size in sizes.items():
    assert m <= size <= batch_size
    assert size - m < max(quarter, 1) and (size == m or size - m < m)
  assert len(set(sizes.values())) <= 4 + max(quarter - 1, 0).bit_length()
  if batch_size == 50:  # the 5 points FAB-T and Square met in the plain-CNN benchmark
    assert sizes[5] == 8 and sizes[9] == 13 and sizes[14] == 26


def test_autoattack_rand_version_with_a_randomised_model():

  def noisy(x, key):
    return MLP(jnp.clip(x + 0.01 * jax.random.normal(key, x.shape), 0.0, 1.0))

  small = dataclasses.replace(DEFAULTS, apgd=APGDSettings(steps=APGD_STEPS, eot_iter=2))
  x_adv, report = attacks.autoattack(noisy,
                                     X,
                                     Y,
                                     key=KEY,
                                     eps=0.05,
                                     version="rand",
                                     settings=small,
                                     batch_size=B)
  assert [s["attack"] for s in report["stages"]] == ["apgd-ce", "apgd-dlr"]
  attacks.verify_adversarial(x_adv, np.asarray(X), 0.05, "linf")
  assert report["robust_accuracy"] < report["clean_accuracy"]


def test_verify_adversarial_rejects_points_outside_the_ball_or_box():
  x = np.full((2, 2, 2, 1), 0.5, np.float32)
  with pytest.raises(ValueError, match="ball"):
    attacks.verify_adversarial(x + 0.2, x, 0.1, "linf")
  with pytest.raises(ValueError, match="box"):
    attacks.verify_adversarial(x + 0.6, x, 1.0, "linf")
  attacks.verify_adversarial(x + 0.1, x, 0.1, "linf")


_BAD_INPUTS = {
    "negative eps": (dict(eps=-0.1), "eps"),
    "zero steps": (dict(steps=0), "steps"),
    "x above one": (dict(x=X + 1.5), r"\[0, 1\]"),
    "x below zero": (dict(x=X - 1.5), r"\[0, 1\]"),
    "rank 3": (dict(x=X[..., 0]), "rank 4"),
    "label too large": (dict(y=Y.at[0].set(C)), "labels"),
    "negative label": (dict(y=Y.at[0].set(-1)), "labels"),
    "logits of wrong rank": (dict(f=lambda x: MLP(x)[:, 0]), r"\[B, C\]"),
    "logits of wrong batch": (dict(f=lambda x: MLP(x)[:-1]), r"\[B, C\]"),
    "unknown norm": (dict(norm="l1"), "norm"),
    "y of wrong length": (dict(y=Y[:-1]), "shape"),
}


# autoattack takes its step counts from its settings, so "zero steps" does not apply to it.
@pytest.mark.parametrize("attack,case",
                         [(attack, case)
                          for attack in ("pgd", "mim", "apgd", "apgd_targeted", "autoattack")
                          for case in sorted(_BAD_INPUTS)
                          if not (attack == "autoattack" and case == "zero steps")])
def test_bad_input_raises_a_clear_error(attack, case):
  overrides, pattern = _BAD_INPUTS[case]
  kw = dict(f=MLP, x=X, y=Y, eps=0.1, steps=3, norm="linf")
  kw.update(overrides)
  f, x, y = kw.pop("f"), kw.pop("x"), kw.pop("y")
  steps = kw.pop("steps")
  if attack == "autoattack":
    call = lambda: attacks.autoattack(f, x, y, key=KEY, settings=_SMALL, **kw)
  else:
    fn = getattr(attacks, attack)
    call = lambda: fn(f, x, y, key=KEY, steps=steps, **kw)
  with pytest.raises(ValueError, match=pattern):
    call()


def test_type_errors_and_attack_specific_errors():
  with pytest.raises(TypeError, match="float"):
    attacks.pgd(MLP, (X * 255).astype(jnp.uint8), Y, key=KEY, eps=0.1)
  with pytest.raises(TypeError, match="integer"):
    attacks.pgd(MLP, X, Y.astype(jnp.float32), key=KEY, eps=0.1)
  with pytest.raises(TypeError, match="int"):
    attacks.pgd(MLP, X, Y, key=KEY, eps=0.1, steps=2.5)
  with pytest.raises(ValueError, match="loss"):
    attacks.pgd(MLP, X, Y, key=KEY, eps=0.1, loss="hinge")
  with pytest.raises(ValueError, match="step_size"):
    attacks.pgd(MLP, X, Y, key=KEY, eps=0.1, step_size=-1.0)
  with pytest.raises(ValueError, match="restarts"):
    attacks.pgd(MLP, X, Y, key=KEY, eps=0.1, restarts=0)
  with pytest.raises(ValueError, match="key"):
    attacks.pgd(MLP, X, Y, key=None, eps=0.1)
  with pytest.raises(ValueError, match="loss"):
    attacks.apgd(MLP, X, Y, key=KEY, eps=0.1, loss="cw")
  two_class, _ = _make_linear(5, num_classes=2)
  three_class, _ = _make_linear(5, num_classes=3)
  y2 = jnp.zeros((B,), jnp.int32)
  with pytest.raises(ValueError, match="at least 3 classes"):
    attacks.apgd(two_class, X, y2, key=KEY, eps=0.1, loss="dlr")
  with pytest.raises(ValueError, match="at least 3 classes"):
    attacks.pgd(two_class, X, y2, key=KEY, eps=0.1, loss="dlr")
  with pytest.raises(ValueError, match="at least 4 classes"):
    attacks.apgd_targeted(three_class, X, y2, key=KEY, eps=0.1)
  with pytest.raises(ValueError, match="version"):
    attacks.autoattack(MLP, X, Y, key=KEY, eps=0.1, version="plus-plus")
  with pytest.raises(ValueError, match="attacks"):
    attacks.autoattack(MLP, X, Y, key=KEY, eps=0.1, attacks=("pgd",))
  with pytest.raises(ValueError, match="randomized"):
    attacks.apgd(MLP, X, Y, key=KEY, eps=0.1, eot_iter=5)


def test_apgd_t_uses_c_minus_one_targets_with_few_classes():
  # With 5 classes and 9 requested targets, APGD-T runs 4 targets; on the pixel classifier with a
  # huge eps, every point falls.
  f = _pixel_classifier()
  y = jnp.argmax(f(X), axis=1)
  x_adv = attacks.apgd_targeted(f, X, y, key=KEY, eps=1.0, steps=APGD_STEPS)
  assert _accuracy(f, x_adv, y) == 0.0
