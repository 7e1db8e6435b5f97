"""Fast CPU convolutions and max pooling for ANY flax.linen model, without changing its code.

This module owns `fast_cpu_ops`, a context manager that, while a linen model is applied (traced)
inside it on the CPU backend, computes
  - every 2-D `nn.Conv` with `gen_jax.ops.conv.conv2d` (XLA's forward, a custom VJP whose input
    and kernel gradients avoid XLA's slow CPU paths), and
  - every `nn.max_pool` with `gen_jax.ops.pool.max_pool` (a custom VJP instead of XLA's
    select-and-scatter),
with the same values and gradients as the stock layers (float rounding aside: the kernel
gradient sums the same products in another order). gen_jax's own models already use `FastConv`;
this is for a researcher's own network, e.g. through `gen_jax.evaluation.ModelSet`.

How each layer is reached:
  - `nn.Conv.__call__` through `flax.linen.intercept_methods` (scoped and thread-local by flax's
    design). The interceptor re-runs `nn.Conv`'s own steps (flax 0.12: batch-dimension folding,
    padding canonicalisation including CIRCULAR/REFLECT, `self.param` for `kernel`/`bias`, mask,
    `promote_dtype`, bias broadcast) and swaps only the `lax.conv_general_dilated` call. It hands
    the call to the stock method, untouched, for anything `conv2d` does not cover: not 2-D,
    input or kernel dilation, `feature_group_count > 1`, an explicit `precision`, padding strings
    other than SAME/VALID/CIRCULAR/REFLECT, negative pads, non-float inputs, a subclass that
    overrides `__call__`, the deprecated `conv_general_dilated(_cls)` fields, or an `nn.Conv`
    with fields this code does not know (a newer flax). `nn.ConvTranspose`, `nn.ConvLocal` and
    1-D/3-D convolutions stay stock.
  - `nn.max_pool` is a plain function, which no interceptor sees. While at least one
    `fast_cpu_ops` context is open (in any thread) the names `flax.linen.max_pool` and
    `flax.linen.pooling.max_pool` point to a dispatcher that calls gen_jax's `max_pool` when the
    CURRENT thread/context has the fast path on (a `contextvars.ContextVar`) and flax's own
    function otherwise; the last context to close puts flax's function back. So the patch is
    global state, but scoped, reference-counted under a lock, and invisible to other threads
    (they get flax's function through the dispatcher). It reaches calls written `nn.max_pool(...)`
    or `flax.linen.pooling.max_pool(...)`, looked up at call time; a name bound earlier (`from
    flax.linen import max_pool`) or a direct `lax.reduce_window` stays stock. A jaxpr rewrite
    (replace `reduce_window_max` equations) would catch those too, but it must re-interpret
    every higher-order primitive (pjit, custom_jvp/vjp, scan, while, cond, remat) through JAX
    internals, which change between releases; call `gen_jax.ops.pool.max_pool` directly there.

Trace-time semantics: the choice is made while JAX TRACES the model, so open the context inside
the function that jit traces (as `ModelSet` does), or around its first call. A function already
traced and cached by `jax.jit` keeps the implementation it was traced with. On a non-CPU backend
(`use_custom_vjp("auto")` is False) the context changes nothing. The fast ops are `jax.custom_vjp`
functions: reverse mode (`jax.grad`, `jax.vjp`, what the attacks use) and `vmap` work, forward
mode (`jax.jvp`, `jax.jacfwd`) does not; trace such code outside the context.

Synopsis::

    from gen_jax.ops.intercept import fast_cpu_ops

    def logits_fn(x):
      with fast_cpu_ops():                       # fast on CPU, stock elsewhere
        return model.apply(variables, x)
    grad = jax.jit(jax.grad(lambda x: loss(logits_fn(x))))(x)
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import threading
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import flax.linen.linear as flax_linear
import flax.linen.pooling as flax_pooling
import jax
import jax.numpy as jnp
import numpy as np

from gen_jax.ops import pool as pool_lib
from gen_jax.ops.conv import conv2d, use_custom_vjp

__all__ = ["fast_cpu_ops"]

# nn.Conv's dataclass fields in flax 0.12.8, all of which `_fast_conv_call` honours. An nn.Conv
# with any other field (a newer flax) may mean something this code ignores, so it stays stock.
_KNOWN_CONV_FIELDS = frozenset({
    "features", "kernel_size", "strides", "padding", "input_dilation", "kernel_dilation",
    "feature_group_count", "use_bias", "mask", "dtype", "param_dtype", "precision", "kernel_init",
    "bias_init", "promote_dtype", "conv_general_dilated", "conv_general_dilated_cls", "parent",
    "name"
})
_PAD_MODES = {"CIRCULAR": "wrap", "REFLECT": "reflect"}


@functools.cache
def _conv_fields_known() -> bool:
  return {f.name for f in dataclasses.fields(nn.Conv)} <= _KNOWN_CONV_FIELDS


def _all_ones(value: Any) -> bool:
  return value is None or value == 1 or (not isinstance(value, int) and all(v == 1 for v in value))


def _conv_plan(module: nn.Conv, inputs: Any) -> tuple[tuple[int, int], tuple[int, int], Any] | None:
  """(kernel_size, strides, canonical padding) when `conv2d` can run `module`, else None.

  Decided BEFORE any parameter is read: once `self.param` has run, the stock method cannot be
  called any more (the names are taken), so everything that can send a call to the stock path
  is checked here.
  """
  if (not _conv_fields_known() or type(module).__call__ is not nn.Conv.__call__ or
      not module.shared_weights or module.conv_general_dilated is not None or
      module.conv_general_dilated_cls is not None or module.feature_group_count != 1 or
      module.precision is not None or not _all_ones(module.input_dilation) or
      not _all_ones(module.kernel_dilation)):
    return None
  if isinstance(module.kernel_size, int):  # flax reads an int kernel_size as a 1-D convolution
    return None
  kernel_size = tuple(module.kernel_size)
  if len(kernel_size) != 2 or not isinstance(inputs, (jax.Array, np.ndarray)):
    return None
  if inputs.ndim < 3 or not jnp.issubdtype(inputs.dtype, jnp.floating):
    return None
  strides = 1 if module.strides is None else module.strides
  strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
  if len(strides) != 2:
    return None
  try:
    padding = flax_linear.canonicalize_padding(module.padding, 2)
  except ValueError:
    return None  # the stock method raises flax's own error
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID") and padding not in _PAD_MODES:
      return None  # CAUSAL (an error for 2-D), SAME_LOWER, ...: flax/lax decide
  elif any(not isinstance(v, int) or v < 0 for pair in padding for v in pair):
    return None
  return kernel_size, strides, padding


def _fast_conv_call(module: nn.Conv, inputs: jax.Array, kernel_size, strides, padding) -> jax.Array:
  """`nn.Conv.__call__` (flax 0.12.8, shared weights, 2-D, no dilation) with `conv2d` inside."""
  num_batch_dimensions = inputs.ndim - (len(kernel_size) + 1)
  if num_batch_dimensions != 1:
    input_batch_shape = inputs.shape[:num_batch_dimensions]
    inputs = jnp.reshape(inputs, (-1,) + inputs.shape[num_batch_dimensions:])
  if isinstance(padding, str) and padding in _PAD_MODES:
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in kernel_size] + [(0, 0)]
    inputs = jnp.pad(inputs, pads, mode=_PAD_MODES[padding])
    padding = "VALID"
  kernel_shape = kernel_size + (inputs.shape[-1], module.features)
  if module.mask is not None and module.mask.shape != kernel_shape:
    raise ValueError("Mask needs to have the same shape as weights. "
                     f"Shapes are: {module.mask.shape}, {kernel_shape}")
  kernel = module.param("kernel", module.kernel_init, kernel_shape, module.param_dtype)
  if module.mask is not None:
    kernel *= module.mask
  bias = (module.param("bias", module.bias_init,
                       (module.features,), module.param_dtype) if module.use_bias else None)
  inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
  if inputs.dtype == kernel.dtype and jnp.issubdtype(inputs.dtype, jnp.floating):
    y = conv2d(inputs, kernel, strides, padding)
  else:  # a custom promote_dtype left mixed or integer dtypes: XLA's convolution, as flax
    y = jax.lax.conv_general_dilated(inputs,
                                     kernel,
                                     strides,
                                     padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if module.use_bias:
    y += bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
  if num_batch_dimensions != 1:
    y = jnp.reshape(y, input_batch_shape + y.shape[1:])
  return y


def _conv_interceptor(next_fun, args, kwargs, context):
  module = context.module
  if (not _FAST.get() or context.method_name != "__call__" or not isinstance(module, nn.Conv)):
    return next_fun(*args, **kwargs)
  if len(args) == 1 and not kwargs:
    inputs = args[0]
  elif not args and set(kwargs) == {"inputs"}:
    inputs = kwargs["inputs"]
  else:
    return next_fun(*args, **kwargs)
  plan = _conv_plan(module, inputs)
  if plan is None:
    return next_fun(*args, **kwargs)
  return _fast_conv_call(module, inputs, *plan)


# Whether the innermost open `fast_cpu_ops` of this thread (or async context) is on: the conv
# interceptor and the max_pool dispatcher both obey it, so `fast_cpu_ops(False)` inside an open
# context turns the fast ops off again.
_FAST = contextvars.ContextVar("gen_jax_fast_cpu_ops", default=False)

# The max_pool patch: installed while any context is open, in any thread.
_PATCH_LOCK = threading.Lock()
_patch_count = 0
_STOCK_MAX_POOL = flax_pooling.max_pool


@functools.wraps(_STOCK_MAX_POOL)
def _dispatch_max_pool(inputs, window_shape, strides=None, padding="VALID"):
  if _FAST.get():
    return pool_lib.max_pool(inputs, window_shape, strides, padding)
  return _STOCK_MAX_POOL(inputs, window_shape, strides, padding)


def _install_pool_patch() -> None:
  global _patch_count
  with _PATCH_LOCK:
    if _patch_count == 0:
      nn.max_pool = _dispatch_max_pool
      flax_pooling.max_pool = _dispatch_max_pool
    _patch_count += 1


def _remove_pool_patch() -> None:
  global _patch_count
  with _PATCH_LOCK:
    _patch_count -= 1
    if _patch_count == 0:
      # Only undo our own patch: a name someone else re-bound meanwhile stays theirs.
      for module in (nn, flax_pooling):
        if module.max_pool is _dispatch_max_pool:
          module.max_pool = _STOCK_MAX_POOL


@contextlib.contextmanager
def fast_cpu_ops(enabled: bool = True, *, impl: str = "auto") -> Iterator[bool]:
  """Routes `nn.Conv` (2-D) and `nn.max_pool` of linen models applied inside to fast CPU ops.

  Args:
    enabled: False: the stock layers inside (also inside an enclosing `fast_cpu_ops`), for an
      opt-out flag.
    impl: one of `gen_jax.ops.conv.CONV_IMPLS`: "auto" (the fast ops on the CPU backend only,
      decided when the context opens, i.e. at trace time if opened inside a traced function),
      "fast" (always) or "xla" (never).

  Yields:
    Whether the fast ops are on.

  Raises:
    ValueError: for an unknown `impl`.

  The values and gradients equal the stock layers' within float rounding; see the module
  docstring for what is covered, what falls back and the (scoped) `max_pool` patch.

  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> model = nn.Conv(4, (3, 3))
  >>> x = jnp.ones((1, 8, 8, 3))
  >>> variables = model.init(jax.random.key(0), x)
  >>> with fast_cpu_ops(impl="fast"):
  ...   y = model.apply(variables, x)
  >>> bool(jnp.allclose(y, model.apply(variables, x), atol=1e-6))
  True
  """
  on = use_custom_vjp(impl) and enabled
  token = _FAST.set(on)
  try:
    if not on:
      yield False
      return
    _install_pool_patch()
    try:
      with nn.intercept_methods(_conv_interceptor):
        yield True
    finally:
      _remove_pool_patch()
  finally:
    _FAST.reset(token)
