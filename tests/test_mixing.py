"""Tests of gen_jax.mixing: mix, mix_many, EMA and the β schedule."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gen_jax
from gen_jax import mixing


def _vars(scale):
  return {
      "params": {
          "Conv_0": {
              "kernel": jnp.full((3, 3, 1, 2), scale, jnp.float32)
          },
          "Dense_0": {
              "bias": jnp.arange(3, dtype=jnp.float32) * scale
          }
      },
      "batch_stats": {
          "BatchNorm_0": {
              "mean": jnp.full((2,), 2 * scale, jnp.float32)
          }
      },
  }


def test_mix_matches_hand_computed_values():
  nat, rob = _vars(1.0), _vars(3.0)
  out = gen_jax.mix(nat, rob, beta=0.25)  # 0.25 * 3 + 0.75 * 1 = 1.5
  np.testing.assert_allclose(out["params"]["Conv_0"]["kernel"], 1.5)
  np.testing.assert_allclose(out["params"]["Dense_0"]["bias"], [0.0, 1.5, 3.0])
  np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["mean"], 3.0)


def test_mix_endpoints_and_structure():
  nat, rob = _vars(1.0), _vars(3.0)
  chex.assert_trees_all_close(gen_jax.mix(nat, rob, beta=1.0), rob)
  chex.assert_trees_all_close(gen_jax.mix(nat, rob, beta=0.0), nat)
  chex.assert_trees_all_equal_structs(gen_jax.mix(nat, rob), nat)


def test_mix_keeps_dtype_and_accepts_traced_beta_without_retracing():
  nat = {"w": jnp.ones(4, jnp.bfloat16), "v": jnp.ones(2, jnp.float32)}
  rob = {"w": jnp.zeros(4, jnp.bfloat16), "v": jnp.zeros(2, jnp.float32)}

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(beta):
    return gen_jax.mix(nat, rob, beta)

  for beta in (0.1, 0.5, 0.9):
    out = f(jnp.float32(beta))
    assert out["w"].dtype == jnp.bfloat16 and out["v"].dtype == jnp.float32
    np.testing.assert_allclose(out["v"], 1 - beta, rtol=1e-6)


def test_mix_keeps_sharding():
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  a = jax.device_put(jnp.ones(8), sharding)
  b = jax.device_put(jnp.zeros(8), sharding)
  out = jax.jit(gen_jax.mix)({"w": a}, {"w": b}, 0.5)
  assert out["w"].sharding.is_equivalent_to(sharding, 1)


def test_mix_names_first_differing_leaf():
  nat = {"params": {"Conv_0": {"kernel": jnp.ones(2)}}}
  rob = {"params": {"Conv_1": {"kernel": jnp.ones(2)}}}
  with pytest.raises(ValueError, match="params/Conv_0/kernel"):
    gen_jax.mix(nat, rob)


def test_mix_names_leaf_with_other_shape():
  nat = {"params": {"Conv_0": {"kernel": jnp.ones((3, 3))}}}
  rob = {"params": {"Conv_0": {"kernel": jnp.ones((3, 4))}}}
  with pytest.raises(ValueError, match=r"params/Conv_0/kernel has shape \(3, 3\)"):
    gen_jax.mix(nat, rob)


def test_mix_rejects_integer_leaves_and_bad_beta():
  with pytest.raises(ValueError, match="floating-point"):
    gen_jax.mix({"count": jnp.ones(2, jnp.int32)}, {"count": jnp.ones(2, jnp.int32)})
  for beta in (-0.1, 1.5):
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
      gen_jax.mix(_vars(1.0), _vars(2.0), beta)


def test_mix_refuses_trees_of_different_dtypes():
  nat = {"params": {"a": jnp.ones(2), "b": jnp.ones(2, jnp.float16)}}
  rob = {"params": {"a": jnp.ones(2), "b": jnp.ones(2, jnp.float32)}}
  with pytest.raises(ValueError,
                     match=r"leaf params/b has dtype float16 in params_nat but "
                     r"float32 in params_rob"):
    gen_jax.mix(nat, rob, 0.5)
  with pytest.raises(ValueError, match=r"params/b has dtype float16 in trees\[0\] but float32"):
    gen_jax.mix_many([nat, rob], [0.5, 0.5])
  with pytest.raises(ValueError, match=r"params/b has dtype float16 in average but float32 in new"):
    gen_jax.ema_update(nat, rob, 0.5)


def test_mix_checks_a_concrete_beta_and_leaves_a_traced_one_to_the_caller():
  nat, rob = _vars(1.0), _vars(3.0)
  for beta in (jnp.float32(1.5), np.float64(-0.5), jnp.array(float("nan")), 1.5):
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
      gen_jax.mix(nat, rob, beta)
  # Traced: unknown while tracing, neither checked nor clipped (documented).
  out = jax.jit(gen_jax.mix)(nat, rob, jnp.float32(1.5))
  np.testing.assert_allclose(out["params"]["Conv_0"]["kernel"], 4.0)


def test_mix_accepts_python_floats_as_leaves():
  out = gen_jax.mix({"w": 1.0, "v": [0.0, 2.0]}, {"w": 3.0, "v": [1.0, 4.0]}, 0.25)
  np.testing.assert_allclose(out["w"], 1.5)
  np.testing.assert_allclose(out["v"], [0.25, 2.5])
  out = gen_jax.mix_many([{"w": 0.0}, {"w": 2.0}], [0.5, 0.5])
  np.testing.assert_allclose(out["w"], 1.0)
  np.testing.assert_allclose(gen_jax.ema_update({"w": 1.0}, {"w": 3.0}, 0.75)["w"], 1.5)
  with pytest.raises(ValueError, match="floating-point"):
    gen_jax.mix({"w": 1}, {"w": 2}, 0.5)


def test_ema_decay_refuses_a_negative_step():
  with pytest.raises(ValueError, match=r"step .* must be >= 0, got -5"):
    mixing.ema_decay(-5)
  with pytest.raises(ValueError, match=r"must be >= 0"):
    mixing.ema_decay(np.array([3, -1]))
  # A traced step is not checked (jit): the training step's counter is never negative.
  np.testing.assert_allclose(jax.jit(mixing.ema_decay)(jnp.int32(0)), 0.1, rtol=1e-6)


def test_mix_many_hand_computed_and_validation():
  trees = [_vars(0.0), _vars(1.0), _vars(2.0)]
  out = gen_jax.mix_many(trees, [0.5, 0.25, 0.25])  # 0.25 + 0.5 = 0.75
  np.testing.assert_allclose(out["params"]["Conv_0"]["kernel"], 0.75)
  with pytest.raises(ValueError, match="sum to 1"):
    gen_jax.mix_many(trees, [0.5, 0.5, 0.5])
  with pytest.raises(ValueError, match="one weight per tree"):
    gen_jax.mix_many(trees, [0.5, 0.5])
  with pytest.raises(ValueError, match=r"weights\[1\] must lie in \[0, 1\]"):
    gen_jax.mix_many(trees, [0.5, 1.5, -1.0])
  with pytest.raises(ValueError, match="trees"):
    gen_jax.mix_many(trees[:1] + [{"other": jnp.ones(1)}], [0.5, 0.5])
  with pytest.raises(ValueError, match="at least one"):
    gen_jax.mix_many([], [])


def test_mix_many_of_two_equals_mix():
  a, b = _vars(1.0), _vars(5.0)
  chex.assert_trees_all_close(gen_jax.mix_many([a, b], [0.3, 0.7]), gen_jax.mix(a, b, 0.7))


def test_ema_decay_warmup_and_update():
  np.testing.assert_allclose(mixing.ema_decay(0), 0.1, rtol=1e-6)
  np.testing.assert_allclose(mixing.ema_decay(10), 11 / 20, rtol=1e-6)
  np.testing.assert_allclose(mixing.ema_decay(10_000), 0.999, rtol=1e-6)
  avg = gen_jax.ema_update({"w": jnp.array(1.0)}, {"w": jnp.array(3.0)}, 0.75)
  np.testing.assert_allclose(avg["w"], 1.5)
  with pytest.raises(ValueError, match="decay"):
    gen_jax.ema_update({"w": jnp.array(1.0)}, {"w": jnp.array(3.0)}, 1.5)


def test_beta_schedule_reference_values():
  epochs = 120
  expected = np.interp(np.arange(1, 121), [0, 40, 80, 120], [1.0, 1.0, 1.0, 0.4])
  got = np.array([float(mixing.beta_schedule(e, epochs)) for e in range(1, 121)])
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_import_is_light():
  import subprocess
  import sys
  code = ("import sys, gen_jax; gen_jax.mix; "
          "bad = [m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets', 'orbax')]; "
          "import jax; assert not jax._src.xla_bridge._backends, 'devices touched'; print(bad)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout
