"""Tests for gen_jax.ops.conv: the custom VJP against XLA's own, FastConv against nn.Conv."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gen_jax.ops import conv as conv_lib
from gen_jax.ops.conv import FastConv, conv2d, conv2d_xla, normalize_padding

# (kernel_size, strides, padding, H): 3x3 and 1x1, strides 1 and 2, odd/even sizes, asymmetric pads.
CASES = [
    ((3, 3), (1, 1), "SAME", 8),
    ((3, 3), (2, 2), "SAME", 8),
    ((3, 3), (1, 1), "VALID", 7),
    ((3, 3), (2, 2), "VALID", 9),
    ((3, 3), (2, 2), ((1, 1), (1, 1)), 8),
    ((3, 3), (1, 1), ((0, 2), (1, 0)), 6),
    ((1, 1), (1, 1), "VALID", 8),
    ((1, 1), (2, 2), "VALID", 8),
    ((1, 1), (2, 2), "SAME", 7),
    ((2, 3), (1, 2), "SAME", 7),
]


def _inputs(key, h, c_in, c_out, kernel_size, dtype=jnp.float32):
  kx, kk, kg = jax.random.split(key, 3)
  x = jax.random.normal(kx, (2, h, h + 1, c_in), dtype)
  kernel = (jax.random.normal(kk, kernel_size + (c_in, c_out)) * 0.3).astype(dtype)
  return x, kernel, kg


def _grads(conv_fn, x, kernel, g):
  # A non-linear loss so that the cotangent reaching the conv is not constant.
  def loss_fn(x, kernel):
    y = conv_fn(x, kernel)
    return jnp.sum(jnp.tanh(y.astype(jnp.float32)) * g)

  return jax.grad(loss_fn, argnums=(0, 1))(x, kernel)


@pytest.mark.parametrize("kernel_size,strides,padding,h", CASES)
def test_forward_and_gradients_match_xla_float32(kernel_size, strides, padding, h):
  x, kernel, kg = _inputs(jax.random.key(0), h, 3, 4, kernel_size)
  pads = normalize_padding(padding, x.shape[1:3], kernel_size, strides)
  y_ref = conv2d_xla(x, kernel, strides, pads)
  y = conv2d(x, kernel, strides, padding)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  g = jax.random.normal(kg, y_ref.shape)
  dx_ref, dk_ref = _grads(lambda a, b: conv2d_xla(a, b, strides, pads), x, kernel, g)
  dx, dk = _grads(lambda a, b: conv2d(a, b, strides, padding), x, kernel, g)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size,strides,padding,h", [CASES[0], CASES[1], CASES[7]])
def test_gradients_match_xla_bfloat16(kernel_size, strides, padding, h):
  x, kernel, kg = _inputs(jax.random.key(1), h, 8, 4, kernel_size, jnp.bfloat16)
  pads = normalize_padding(padding, x.shape[1:3], kernel_size, strides)
  g = jax.random.normal(kg, conv2d_xla(x, kernel, strides, pads).shape)
  dx_ref, dk_ref = _grads(lambda a, b: conv2d_xla(a, b, strides, pads), x, kernel, g)
  dx, dk = _grads(lambda a, b: conv2d(a, b, strides, padding), x, kernel, g)
  assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
  # bfloat16 keeps 8 bits of mantissa; XLA and the custom path round the sums differently.
  scale = float(jnp.max(jnp.abs(dk_ref.astype(jnp.float32))))
  np.testing.assert_allclose(dk.astype(jnp.float32),
                             dk_ref.astype(jnp.float32),
                             atol=3e-2 * scale,
                             rtol=0)
  np.testing.assert_allclose(dx.astype(jnp.float32),
                             dx_ref.astype(jnp.float32),
                             atol=5e-2,
                             rtol=2e-2)


def test_custom_kernel_gradient_is_actually_used():
  # Guards against a refactor that silently routes conv2d back through XLA's transpose rule.
  x, kernel, _ = _inputs(jax.random.key(2), 8, 3, 4, (3, 3))
  # The custom kernel gradient is a dot_general of slices; XLA's own is a second convolution.
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda k: jnp.sum(conv2d(x, k, 1, "SAME"))))(kernel))
  assert "dot_general" in jaxpr


def test_data_parallel_kernel_gradient_sums_devices_after_the_tap_loop_not_inside_it():
  # An all-reduce inside the tap loop deadlocked the CPU backend: the loops of independent layers
  # run concurrently, and two devices entered their per-tap all-reduces in different orders.
  from gen_jax import parallel  # pylint: disable=import-outside-toplevel
  mesh = parallel.make_mesh()
  assert mesh.size == 2  # tests/conftest.py: two CPU devices
  x, kernel, kg = _inputs(jax.random.key(4), 8, 3, 4, (3, 3))
  x = jnp.concatenate([x, 2 * x])  # 4 examples, 2 per device
  g = jax.random.normal(kg, conv2d_xla(x, kernel, (1, 1), ((1, 1), (1, 1))).shape)
  grad_fn = jax.jit(lambda a, b: _grads(lambda u, v: conv2d(u, v, 1, "SAME"), a, b, g)[1])
  sharded = jax.device_put(x, parallel.data_sharding(mesh))
  hlo = grad_fn.lower(sharded, kernel).compile().as_text()
  loop_bodies = set(re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo))
  assert loop_bodies, "the kernel gradient's tap loop is gone; this test guards it"
  computations = dict(re.findall(r"^(?:ENTRY )?%?([\w.\-]+) .*?\{\n(.*?)\n\}", hlo, re.S | re.M))
  assert "all-reduce(" in hlo  # the devices' partial gradients are summed, once
  assert not any("all-reduce(" in computations[body] for body in loop_bodies)
  dk_ref = _grads(lambda u, v: conv2d_xla(u, v, (1, 1), ((1, 1), (1, 1))), x, kernel, g)[1]
  np.testing.assert_allclose(grad_fn(sharded, kernel), dk_ref, rtol=1e-5, atol=1e-5)


def test_jit_and_vmap():
  x, kernel, kg = _inputs(jax.random.key(3), 6, 3, 5, (3, 3))
  fn = lambda a, b: conv2d(a, b, (2, 2), "SAME")
  ref_fn = lambda a, b: conv2d_xla(a, b, (2, 2), ((0, 1), (1, 1)))
  g = jax.random.normal(kg, ref_fn(x, kernel).shape)
  dx_ref, dk_ref = _grads(ref_fn, x, kernel, g)
  grad_fn = jax.jit(lambda a, b: _grads(fn, a, b, g))
  for _ in range(2):  # second use of the compiled function
    dx, dk = grad_fn(x, kernel)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-5)
  # vmap over a stack of kernels (e.g. several experts): per-kernel gradients must match.
  kernels = jnp.stack([kernel, 2.0 * kernel])
  dks = jax.vmap(lambda k: _grads(fn, x, k, g)[1])(kernels)
  dks_ref = jax.vmap(lambda k: _grads(ref_fn, x, k, g)[1])(kernels)
  np.testing.assert_allclose(dks, dks_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["fast", "xla", "auto"])
@pytest.mark.parametrize("kernel_size,strides,padding,use_bias", [
    ((3, 3), 1, "SAME", False),
    ((3, 3), 2, ((1, 1), (1, 1)), True),
    ((1, 1), 2, "VALID", False),
    (3, (1, 1), 1, True),
])
def test_fastconv_interchangeable_with_nn_conv(impl, kernel_size, strides, padding, use_bias):
  x = jax.random.uniform(jax.random.key(4), (2, 8, 8, 3))
  fast = FastConv(6, kernel_size, strides=strides, padding=padding, use_bias=use_bias, impl=impl)
  ref = nn.Conv(6,
                kernel_size if not isinstance(kernel_size, int) else (kernel_size,) * 2,
                strides=strides,
                padding=padding,
                use_bias=use_bias)
  v_fast = fast.init(jax.random.key(5), x)
  v_ref = ref.init(jax.random.key(5), x)
  # Same names, shapes, dtypes and (same key) the same default initial values.
  assert jax.tree.structure(v_fast) == jax.tree.structure(v_ref)
  for a, b in zip(jax.tree.leaves(v_fast), jax.tree.leaves(v_ref)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b)
  if use_bias:  # make the bias matter in the comparison below
    v_ref = jax.tree.map(lambda a: a + 0.1, v_ref)
  np.testing.assert_allclose(fast.apply(v_ref, x), ref.apply(v_ref, x), rtol=1e-5, atol=1e-6)

  def loss_fn(module, v):
    return jnp.sum(jnp.sin(module.apply(v, x)))

  g_fast = jax.grad(lambda v: loss_fn(fast, v))(v_ref)
  g_ref = jax.grad(lambda v: loss_fn(ref, v))(v_ref)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fastconv_dtype_promotion_matches_nn_conv():
  x = jax.random.uniform(jax.random.key(6), (2, 6, 6, 3))
  fast = FastConv(4, (3, 3), dtype=jnp.bfloat16)
  ref = nn.Conv(4, (3, 3), dtype=jnp.bfloat16)
  v = ref.init(jax.random.key(7), x)
  assert jax.tree.leaves(v)[0].dtype == jnp.float32  # parameters stay float32
  y_fast, y_ref = fast.apply(v, x), ref.apply(v, x)
  assert y_fast.dtype == y_ref.dtype == jnp.bfloat16
  np.testing.assert_allclose(y_fast.astype(jnp.float32),
                             y_ref.astype(jnp.float32),
                             rtol=2e-2,
                             atol=2e-2)
  g = jax.grad(lambda v: jnp.sum(fast.apply(v, x).astype(jnp.float32)))(v)
  assert jax.tree.leaves(g)[0].dtype == jnp.float32


def test_auto_selects_custom_path_by_backend(monkeypatch):
  assert conv_lib.use_custom_vjp("auto") == (jax.default_backend() == "cpu")
  assert conv_lib.use_custom_vjp("fast") and not conv_lib.use_custom_vjp("xla")
  monkeypatch.setattr(conv_lib.jax, "default_backend", lambda: "gpu")
  assert not conv_lib.use_custom_vjp("auto")
  x = jnp.ones((1, 4, 4, 2))
  layer = FastConv(3, (3, 3))
  v = layer.init(jax.random.key(0), x)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(layer.apply(v, x))))(v))
  assert "dot_general" not in jaxpr
  monkeypatch.setattr(conv_lib.jax, "default_backend", lambda: "cpu")
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(layer.apply(v, x))))(v))
  assert "dot_general" in jaxpr


def test_bad_inputs_raise_clear_errors():
  x = jnp.ones((1, 4, 4, 2))
  k = jnp.ones((3, 3, 2, 3))
  with pytest.raises(ValueError, match="padding"):
    conv2d(x, k, 1, "CIRCULAR")
  with pytest.raises(ValueError, match="negative"):
    conv2d(x, k, 1, ((-1, 0), (0, 0)))
  with pytest.raises(ValueError, match="channels"):
    conv2d(x, jnp.ones((3, 3, 5, 3)), 1, "SAME")
  with pytest.raises(ValueError, match="dtype"):
    conv2d(x, k.astype(jnp.bfloat16), 1, "SAME")
  with pytest.raises(ValueError, match="strides"):
    conv2d(x, k, 0, "SAME")
  with pytest.raises(ValueError, match="rank 4"):
    FastConv(3, (3, 3)).init(jax.random.key(0), jnp.ones((4, 4, 2)))
  with pytest.raises(ValueError, match="impl"):
    FastConv(3, (3, 3), impl="cudnn").init(jax.random.key(0), x)


def test_input_gradient_keeps_hwio_kernel_inside_loops():
  # XLA's own transpose rule leaves a flipped "01oi" kernel, which the CPU backend runs on a slow
  # generic path inside while loops (PGD); the custom rule must hand it an HWIO ("01io") kernel.
  x, kernel, _ = _inputs(jax.random.key(8), 6, 3, 4, (3, 3))

  def attack_like(x, kernel):
    step = lambda _, z: z + 0.1 * jnp.sign(jax.grad(lambda z: jnp.sum(conv2d(z, kernel, 2)**2))(z))
    return jax.lax.fori_loop(0, 2, step, x)

  hlo = jax.jit(attack_like).lower(x, kernel).compile().as_text()
  assert "01io" in hlo and "01oi" not in hlo
  ref = jax.lax.fori_loop(
      0, 2, lambda _, z: z + 0.1 * jnp.sign(
          jax.grad(lambda z: jnp.sum(conv2d_xla(z, kernel, (2, 2), ((0, 1), (1, 1)))**2))(z)), x)
  np.testing.assert_allclose(attack_like(x, kernel), ref, atol=1e-6)
