"""Tests for gen_jax.ops.intercept (fast_cpu_ops) and gen_jax.ops.pool (max_pool).

Every case compares a user-style linen network applied inside `fast_cpu_ops(impl="fast")` with
the same network and variables applied stock: logits, the input gradient of a scalar loss (what
the attacks use) and the parameter gradients, to float tolerance; and it checks from the jaxpr
that the fast path is really taken (or, for the fallbacks, really not).
"""
import functools
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gen_jax import models
from gen_jax.evaluation.modelset import ModelSet
from gen_jax.ops import pool as pool_lib
from gen_jax.ops.intercept import fast_cpu_ops

TOL = dict(rtol=1e-5, atol=1e-5)
CONV_MARK = "name=_conv2d_custom"
POOL_MARK = "name=_reduce_window_max_custom"


class BranchNet(nn.Module):
  """One branch per convolution setting, each conv -> tanh -> linear; the logits are their sum.

  Many settings in one network keep the number of compilations (most of this file's time) low;
  the parameter gradients still tell the settings apart (Conv_0, Conv_1, ...).
  """
  convs: tuple[dict, ...]
  nchw: bool = False

  @nn.compact
  def __call__(self, x):
    if self.nchw:  # a model fed NCHW images moves channels last for flax's convolutions
      x = jnp.moveaxis(x, -3, -1)
    logits = 0.0
    for conv in self.convs:
      y = jnp.tanh(nn.Conv(4, **conv)(x))
      logits += nn.Dense(3)(y.reshape(*y.shape[:-3], -1))
    return logits


class SmallCNN(nn.Module):
  """The shape of AutoAttack's plain CNN: 4 convolutions, 2 max pools, BatchNorm, a head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    for features in (4, 8):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.Conv(features, (3, 3), padding="VALID", use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class TinyCNN(nn.Module):
  """One convolution, one max pool, a head: the cheapest network with both fast ops."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.max_pool(nn.relu(nn.Conv(4, (3, 3))(x)), (2, 2), strides=(2, 2))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _loss(model, variables, x):
  logits = model.apply(variables, x)
  return jnp.sum(jax.nn.log_softmax(logits)[..., 0]), logits


def _run(model, variables, x, fast: bool, grads: bool):
  """(logits, d loss / d x, d loss / d params, the loss's jaxpr, a thunk: the gradient's jaxpr).

  The custom VJPs show by name (`custom_vjp_call[name=...]`) in the loss's jaxpr only: in the
  gradient's, JAX has already replaced them by their forward and backward functions. Without
  `grads`, the gradients are None.
  """

  def fn(params, x):
    with fast_cpu_ops(fast, impl="fast"):
      return _loss(model, {**variables, "params": params}, x)

  grad_fn = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)
  if grads:
    (_, logits), (dparams, dx) = jax.jit(grad_fn)(variables["params"], x)
  else:
    (_, logits), dparams, dx = jax.jit(fn)(variables["params"], x), None, None
  jaxpr = str(jax.make_jaxpr(fn)(variables["params"], x))
  return logits, dx, dparams, jaxpr, lambda: str(jax.make_jaxpr(grad_fn)(variables["params"], x))


def _assert_same(model, x, *, conv_calls=0, pool_calls=0, tol=None, grads=True):
  """Fast vs stock: logits, input and parameter gradients; the number of fast calls traced."""
  tol = tol or TOL
  variables = model.init(jax.random.key(1), x)
  logits, dx, dparams, jaxpr, grad_jaxpr = _run(model, variables, x, True, grads)
  logits_ref, dx_ref, dparams_ref, jaxpr_ref, grad_jaxpr_ref = _run(model, variables, x, False,
                                                                    grads)
  np.testing.assert_allclose(logits, logits_ref, **tol)
  if grads:
    np.testing.assert_allclose(dx, dx_ref, **tol)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), dparams, dparams_ref)
  assert jaxpr.count(CONV_MARK) == conv_calls
  assert jaxpr.count(POOL_MARK) == pool_calls
  assert CONV_MARK not in jaxpr_ref and POOL_MARK not in jaxpr_ref
  if pool_calls:
    assert "select_and_scatter_add" in grad_jaxpr_ref()
    assert "select_and_scatter_add" not in grad_jaxpr()


def _image(shape, key=0):
  return jax.random.uniform(jax.random.key(key), shape)


CONVS = (
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 3), strides=2, use_bias=False),
    dict(kernel_size=(5, 5), padding="VALID"),
    dict(kernel_size=(1, 1), strides=(2, 2), padding="VALID"),
    dict(kernel_size=(3, 3), strides=2, padding=1),
    dict(kernel_size=(3, 3), padding=((1, 0), (2, 1))),
    dict(kernel_size=(3, 3), strides=(1, 2), padding=(1, 2)),
    dict(kernel_size=(2, 3), padding="SAME"),
    dict(kernel_size=[5, 5], strides=[2, 1], padding="SAME"),
    dict(kernel_size=(3, 3), padding="CIRCULAR"),
    dict(kernel_size=(3, 3), strides=2, padding="REFLECT"),
    dict(kernel_size=(3, 3), mask=jnp.tril(jnp.ones((3, 3, 3, 4)))),
)


def test_conv_matches_stock():
  _assert_same(BranchNet(CONVS), _image((2, 10, 11, 3)), conv_calls=len(CONVS))


@pytest.mark.parametrize("shape", [(8, 9, 3), (2, 3, 8, 9, 3)], ids=["no_batch", "two_batch_dims"])
def test_conv_batch_dims(shape):
  _assert_same(BranchNet(CONVS[:2]), _image(shape), conv_calls=2)


def test_conv_nchw_model():
  _assert_same(BranchNet(CONVS[:2], nchw=True), _image((2, 3, 8, 8)), conv_calls=2)


def test_conv_bfloat16_computation():
  convs = (
      dict(kernel_size=(3, 3), dtype=jnp.bfloat16),  # float32 parameters, bfloat16 computation
      dict(kernel_size=(3, 3), strides=2, param_dtype=jnp.bfloat16),  # promoted to float32
  )
  _assert_same(BranchNet(convs), _image((2, 8, 8, 3)), conv_calls=2, tol=dict(rtol=2e-2, atol=2e-2))


def test_conv_fallbacks_are_stock():

  class Others(nn.Module):

    @nn.compact
    def __call__(self, x):
      convs = (
          dict(kernel_size=(3, 3), kernel_dilation=2),
          dict(kernel_size=(3, 3), input_dilation=(2, 1), padding=1),
          dict(kernel_size=(3, 3), precision=jax.lax.Precision.HIGHEST),
          dict(kernel_size=(3, 3), padding="SAME_LOWER"),
          dict(kernel_size=(3, 3), feature_group_count=3),  # grouped (depthwise)
      )
      outs = [nn.Conv(3, **conv)(x).mean((1, 2)) for conv in convs]
      outs.append(nn.ConvTranspose(4, (3, 3), strides=(2, 2))(x).mean((1, 2)))
      outs.append(nn.ConvLocal(2, (3, 3))(x).mean((1, 2)))
      outs.append(nn.Conv(2, 3)(x.reshape(x.shape[0], -1, x.shape[-1])).mean(1))  # int size: 1-D
      outs.append(nn.Conv(2, (2, 2, 2))(x[:, None]).mean((1, 2, 3)))  # 3-D
      return jnp.concatenate(outs, -1)

  x = jax.ShapeDtypeStruct((2, 6, 6, 3), jnp.float32)
  model = Others()
  variables = jax.eval_shape(model.init, jax.random.key(1), x)  # tracing only: nothing compiles

  def jaxpr(fast):
    with fast_cpu_ops(fast, impl="fast"):
      return str(jax.make_jaxpr(model.apply)(variables, x))

  # Each fallback runs nn.Conv's (or the other module's) own method: the very same program.
  assert jaxpr(True) == jaxpr(False)


def test_subclass_overriding_call_is_stock():

  class ScaledConv(nn.Conv):

    @nn.compact
    def __call__(self, inputs):
      return 2.0 * super().__call__(inputs)

  class NotOverridden(nn.Conv):
    pass

  model = nn.Sequential([ScaledConv(4, (3, 3)), NotOverridden(4, (3, 3))])
  _assert_same(model, _image((2, 6, 6, 3)), conv_calls=1)


POOLS = [
    ((2, 2), (2, 2), "VALID"),
    ((2, 2), (1, 1), "VALID"),
    ((3, 3), (2, 2), "SAME"),
    ((3, 3), (1, 1), "SAME"),
    ((2, 2), (2, 2), "SAME"),
    ((3, 3), (3, 3), "VALID"),
    ((2, 3), (1, 2), ((1, 0), (0, 2))),
]


def _stock_max_pool(x, window_shape, strides, padding):
  return nn.pooling.pool(x, -jnp.inf, jax.lax.max, window_shape, strides, padding)


def _pools_and_vjps(pool_fn):
  """A jitted (x, cotangents) -> [(pool(x), its vjp of the cotangent)] for every POOLS setting."""

  def fn(x, cotangents):
    results = []
    for (window, strides, padding), g in zip(POOLS, cotangents):
      y, vjp = jax.vjp(
          functools.partial(pool_fn, window_shape=window, strides=strides, padding=padding), x)
      results.append((y, vjp(g)[0]))
    return results

  return jax.jit(fn)


def test_max_pool_matches_flax_including_ties():
  shape = (2, 7, 8, 3)
  stock_fn, fast_fn = _pools_and_vjps(_stock_max_pool), _pools_and_vjps(pool_lib.max_pool)
  keys = jax.random.split(jax.random.key(2), len(POOLS))
  cotangents = [
      jax.random.normal(key,
                        _stock_max_pool(jnp.zeros(shape), *pool).shape)
      for key, pool in zip(keys, POOLS)
  ]
  for x in (
      jax.random.normal(jax.random.key(0), shape),
      jnp.ones(shape),  # every window is one tie: XLA gives the first element the cotangent
      jnp.floor(3 * jax.random.uniform(jax.random.key(0), shape)),  # ties, anywhere in windows
  ):
    for pool, (y, dx), (y_ref, dx_ref) in zip(POOLS, fast_fn(x, cotangents),
                                              stock_fn(x, cotangents)):
      np.testing.assert_array_equal(y, y_ref, err_msg=str(pool))
      # Only the order of summing overlapping windows' cotangents differs (float rounding).
      np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6, err_msg=str(pool))
  # The vjps are in the jaxprs: XLA's select-and-scatter in the stock one only.
  assert "select_and_scatter_add" in str(jax.make_jaxpr(stock_fn)(x, cotangents))
  assert "select_and_scatter_add" not in str(jax.make_jaxpr(fast_fn)(x, cotangents))


def test_max_pool_forward_alone_is_xlas_reduce_window():
  """A forward pass that is not differentiated (Square's queries, predictions) runs XLA's own
  reduce-window; only the VJP's forward records the argmax from tap slices. The tap slices in a
  forward-only program made Square on a plain CNN about twice as slow as the stock layers."""
  x = _image((4, 8, 8, 3))
  pool = functools.partial(pool_lib.max_pool, window_shape=(2, 2), strides=(2, 2))
  forward = jax.jit(pool).lower(x).compile().as_text()
  assert "reduce-window" in forward and "slice(" not in forward
  backward = jax.jit(jax.grad(lambda x: pool(x).sum())).lower(x).compile().as_text()
  assert "select-and-scatter" not in backward


@pytest.mark.parametrize("shape", [(7, 8, 3), (2, 2, 7, 8, 3)], ids=["no_batch", "two_batch_dims"])
def test_max_pool_batch_dims(shape):
  x = jnp.floor(3 * _image(shape))
  window, strides, padding = (3, 3), (2, 2), "SAME"
  value_and_grad = lambda f: jax.jit(
      jax.value_and_grad(lambda x: jnp.sum(jnp.sin(f(x, window, strides, padding)))))
  value, grad = value_and_grad(pool_lib.max_pool)(x)
  value_ref, grad_ref = value_and_grad(nn.max_pool)(x)
  np.testing.assert_allclose(value, value_ref, rtol=1e-6)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-6, atol=1e-6)


def test_small_cnn_with_pools_matches_stock():
  _assert_same(SmallCNN(), _image((2, 12, 12, 3)), conv_calls=4, pool_calls=2)


def test_context_off_or_xla_is_stock_and_patch_is_scoped():
  stock_max_pool = nn.max_pool
  x = _image((2, 8, 8, 3))
  model = TinyCNN()
  variables = model.init(jax.random.key(0), x)

  def counts():
    # A new function each time: jax caches the trace of a function it has seen, whatever the
    # context (the reason ModelSet opens the context inside the function it traces).
    jaxpr = str(jax.make_jaxpr(lambda x: model.apply(variables, x))(x))
    return jaxpr.count(CONV_MARK), jaxpr.count(POOL_MARK)

  for options in (dict(enabled=False), dict(impl="xla")):
    with fast_cpu_ops(**options) as on:
      assert not on and nn.max_pool is stock_max_pool
      assert counts() == (0, 0)
  with fast_cpu_ops(impl="fast") as on:
    with fast_cpu_ops(impl="fast"):
      pass  # a nested context closing must not take the patch away from the outer one
    assert on and nn.max_pool is not stock_max_pool
    assert counts() == (1, 1)
    with fast_cpu_ops(False):  # the innermost context decides
      assert counts() == (0, 0)
    assert counts() == (1, 1)
    # Initialising through the fast path creates the same parameters (names, shapes, values).
    jax.tree.map(np.testing.assert_array_equal, model.init(jax.random.key(0), x), variables)
    # Another thread sees the patched name but its own (off) setting: the stock ops.
    seen = []
    thread = threading.Thread(target=lambda: seen.append(counts()))
    thread.start()
    thread.join()
    assert seen == [(0, 0)]
  assert nn.max_pool is stock_max_pool and nn.pooling.max_pool is stock_max_pool
  assert counts() == (0, 0)
  with pytest.raises(ValueError, match="impl"):
    with fast_cpu_ops(impl="fastest"):
      pass


def test_auto_follows_the_backend():
  x = _image((1, 6, 6, 3))
  model = nn.Conv(2, (3, 3))
  variables = model.init(jax.random.key(0), x)
  with fast_cpu_ops() as on:
    jaxpr = str(jax.make_jaxpr(lambda x: model.apply(variables, x))(x))
  assert on == (jax.default_backend() == "cpu")
  assert (CONV_MARK in jaxpr) == on


def test_modelset_uses_fast_ops_by_default():
  x = _image((2, 8, 8, 3))
  model = TinyCNN()
  variables = model.init(jax.random.key(0), x)

  def value_grad_jaxpr(fast):
    models = ModelSet(model, {"a": variables, "b": variables}, fast_ops=fast).subset(["a"])
    assert models.fast_ops == fast
    logits_fn = models.logits_fns()["a"]
    loss = lambda x: jnp.sum(jax.nn.log_softmax(logits_fn(x))[:, 0])
    return jax.jit(jax.value_and_grad(loss))(x), str(jax.make_jaxpr(loss)(x))

  (value, dx), jaxpr = value_grad_jaxpr(True)
  (value_ref, dx_ref), jaxpr_ref = value_grad_jaxpr(False)
  np.testing.assert_allclose(value, value_ref, **TOL)
  np.testing.assert_allclose(dx, dx_ref, **TOL)
  on_cpu = jax.default_backend() == "cpu"
  assert (jaxpr.count(CONV_MARK), jaxpr.count(POOL_MARK)) == ((1, 1) if on_cpu else (0, 0))
  assert CONV_MARK not in jaxpr_ref and POOL_MARK not in jaxpr_ref


def test_modelset_leaves_gen_jax_models_as_built():
  model = models.create_model("smallcnn", 10)  # conv_impl="xla": plain nn.Conv, by choice
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  variables = jax.eval_shape(lambda k: models.init_variables(model, k, (8, 8, 3)),
                             jax.random.key(0))
  logits = lambda variables, x: ModelSet(model, {"a": variables}).logits_fns()["a"](x)
  assert CONV_MARK not in str(jax.make_jaxpr(logits)(variables, x))
