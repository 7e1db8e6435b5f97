"""Max pooling whose gradient avoids XLA's select-and-scatter (slow on CPU).

This module owns `max_pool` (the signature and values of `flax.linen.max_pool`) and
`reduce_window_max` (the same on a full-rank window specification, a `jax.custom_vjp`).

Why: the gradient of `lax.reduce_window` with `lax.max` is XLA's `SelectAndScatter`, which the
CPU backend runs as a scalar loop over every window, several times slower than the convolutions
around it in a small CNN. A forward pass that is not differentiated is XLA's own reduce-window
(the tap slices below, left in a forward-only program such as Square's queries, made a plain
CNN's forward about twice as slow). The forward pass of the VJP records, for every output
element, WHICH tap of its window holds the maximum (one small integer per output: kh*kw strided
slices of the padded input compared in one fused elementwise pass), and the backward pass routes
the cotangent back to that tap with elementwise selects: for non-overlapping windows (strides ==
window) one select into the windows laid out by a reshape, otherwise one interior-padded
(strided "unslice") copy per tap, summed. No gather, no scatter.

Ties go where XLA sends them: XLA's select-and-scatter for max (`select_prim=ge`) keeps the
element it has selected unless a later one is strictly greater, scanning the window in row-major
order, so the FIRST maximal element of the window gets the whole cotangent. The tap scan here
uses a strict `>` in the same order. Padded positions hold -inf (XLA's init value), so a window
whose real elements are all -inf sends its cotangent into the padding, as XLA's does.

Synopsis::

    from gen_jax.ops.pool import max_pool

    y = max_pool(x, (2, 2), strides=(2, 2))                 # x: [N, H, W, C], as nn.max_pool
    g = jax.grad(lambda x: max_pool(x, (3, 3), (1, 1), "SAME").sum())(x)   # no select-and-scatter
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["max_pool", "reduce_window_max"]

Pads = tuple[tuple[int, int], ...]
PoolPadding = Union[str, Sequence[tuple[int, int]]]


def _window_taps(dims: Sequence[int]) -> list[tuple[int, ...]]:
  """The offsets of a window's elements in row-major order (XLA's scan order)."""
  return list(itertools.product(*(range(d) for d in dims)))


def _tap_slice(xp: jax.Array, offsets: Sequence[int], strides: Sequence[int],
               out_shape: Sequence[int]) -> jax.Array:
  """xp[off_0::s_0, off_1::s_1, ...] cut to `out_shape`: one tap of every window at once."""
  limits = [o + (n - 1) * s + 1 for o, n, s in zip(offsets, out_shape, strides)]
  return lax.slice(xp, tuple(offsets), tuple(limits), tuple(strides))


def _padded(x: jax.Array, pads: Pads, value) -> jax.Array:
  return lax.pad(x, jnp.asarray(value, x.dtype), [(lo, hi, 0) for lo, hi in pads])


def _out_shape(padded_shape, dims, strides) -> tuple[int, ...]:
  return tuple((p - d) // s + 1 for p, d, s in zip(padded_shape, dims, strides))


def _argmax_forward(x: jax.Array, dims, strides, pads) -> tuple[jax.Array, jax.Array]:
  """(window max, index of the window's first maximal tap) for every output element."""
  xp = _padded(x, pads, -jnp.inf)
  out_shape = _out_shape(xp.shape, dims, strides)
  taps = _window_taps(dims)
  index_dtype = jnp.int8 if len(taps) <= 127 else jnp.int32
  value = _tap_slice(xp, taps[0], strides, out_shape)
  index = jnp.zeros(out_shape, index_dtype)
  for t, offsets in enumerate(taps[1:], start=1):
    candidate = _tap_slice(xp, offsets, strides, out_shape)
    # Strictly greater: an equal later element does not take the cotangent (XLA's `ge` select).
    index = jnp.where(candidate > value, jnp.asarray(t, index_dtype), index)
    # lax.max (not a select) for the value, so that NaNs propagate exactly as in reduce_window.
    value = lax.max(value, candidate)
  return value, index


def _disjoint(dims, strides) -> bool:
  return all(d == s for d, s in zip(dims, strides))


def _backward_disjoint(g, index, padded_shape, dims) -> jax.Array:
  """Cotangent on the padded input when windows tile it (strides == window): one select."""
  # Interleave [n_0, d_0, n_1, d_1, ...]: window element (i_0, i_1, ...) of output (j_0, j_1, ...)
  # sits at padded position (j_0 * d_0 + i_0, ...), so a reshape lays the windows out in place.
  expand = tuple(range(1, 2 * g.ndim, 2))
  tap = jnp.zeros([1] * (2 * g.ndim), jnp.int32)
  weight = 1
  for axis in reversed(range(g.ndim)):
    shape = [1] * (2 * g.ndim)
    shape[2 * axis + 1] = dims[axis]
    tap = tap + (jnp.arange(dims[axis], dtype=jnp.int32) * weight).reshape(shape)
    weight *= dims[axis]
  chosen = jnp.expand_dims(index.astype(jnp.int32), expand) == tap
  windows = jnp.where(chosen, jnp.expand_dims(g, expand), jnp.zeros((), g.dtype))
  covered = windows.reshape([n * d for n, d in zip(g.shape, dims)])
  # Elements past the last whole window (VALID with a remainder) get no cotangent.
  tail = [(0, p - c, 0) for p, c in zip(padded_shape, covered.shape)]
  return lax.pad(covered, jnp.zeros((), g.dtype), tail)


def _backward_overlapping(g, index, padded_shape, dims, strides) -> jax.Array:
  """Cotangent on the padded input for any windows: per tap, a strided "unslice", summed."""
  zero = jnp.zeros((), g.dtype)
  total = None
  for t, offsets in enumerate(_window_taps(dims)):
    routed = jnp.where(index == t, g, zero)
    # The transpose of `_tap_slice`: put element j at offset + j * stride, zeros elsewhere.
    config = [(o, p - (o + (n - 1) * s + 1), s - 1)
              for o, p, n, s in zip(offsets, padded_shape, g.shape, strides)]
    placed = lax.pad(routed, zero, config)
    total = placed if total is None else total + placed
  return total


# `in_shape` (static, = x.shape) lets the backward pass size the input gradient without keeping
# the input itself as a residual: only the small index array is kept.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _reduce_window_max_custom(x: jax.Array, dims: tuple[int, ...], strides: tuple[int, ...],
                              pads: Pads, in_shape: tuple[int, ...]) -> jax.Array:
  del in_shape
  return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, pads)


def _fwd(x, dims, strides, pads, in_shape):
  del in_shape
  return _argmax_forward(x, dims, strides, pads)


def _bwd(dims, strides, pads, in_shape, index, g):
  padded_shape = tuple(n + lo + hi for n, (lo, hi) in zip(in_shape, pads))
  if _disjoint(dims, strides):
    grad_padded = _backward_disjoint(g, index, padded_shape, dims)
  else:
    grad_padded = _backward_overlapping(g, index, padded_shape, dims, strides)
  # The transpose of the padding: crop it off again (a pad with the negated amounts).
  return (_padded(grad_padded, tuple((-lo, -hi) for lo, hi in pads), 0),)


_reduce_window_max_custom.defvjp(_fwd, _bwd)


def reduce_window_max(x: jax.Array, window_dimensions: Sequence[int], window_strides: Sequence[int],
                      padding: PoolPadding) -> jax.Array:
  """`lax.reduce_window(x, -inf, lax.max, ...)` with the argmax-routing gradient.

  Args:
    x: a floating-point array of any rank.
    window_dimensions: the window size on every axis of `x` (1 on axes not pooled).
    window_strides: the stride on every axis of `x`.
    padding: "SAME", "VALID" or one (low, high) pair per axis of `x`.

  Returns:
    The window maxima, equal to `lax.reduce_window`'s; the gradient equals XLA's (ties included).
    Non-floating inputs, empty outputs and negative padding use `lax.reduce_window` itself.
  """
  dims = tuple(int(d) for d in window_dimensions)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape, dims, strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)  # hashable: static arguments
  if not (len(dims) == len(strides) == len(pads) == x.ndim):
    raise ValueError(f"window_dimensions {dims}, window_strides {strides} and padding {pads} need "
                     f"one entry per axis of the input (shape {x.shape}).")
  padded_shape = [n + lo + hi for n, (lo, hi) in zip(x.shape, pads)]
  stock = (not jnp.issubdtype(x.dtype, jnp.floating) or any(v < 0 for pair in pads for v in pair) or
           math.prod(_out_shape(padded_shape, dims, strides)) == 0 or
           any(p < d for p, d in zip(padded_shape, dims)))
  if stock:
    return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, pads)
  return _reduce_window_max_custom(x, dims, strides, pads, tuple(x.shape))


def max_pool(inputs: jax.Array,
             window_shape: Sequence[int],
             strides: Sequence[int] | None = None,
             padding: PoolPadding = "VALID") -> jax.Array:
  """`flax.linen.max_pool` with a gradient that avoids XLA's select-and-scatter.

  Same arguments, shapes and values as `flax.linen.max_pool` (flax 0.12), and the same gradient
  (the first maximal element of each window in row-major order takes the cotangent).

  Args:
    inputs: [*batch_dims, *window_dims, features]; no batch dimension is allowed, as in flax.
    window_shape: the window, one int per spatial axis.
    strides: the inter-window strides (default: all 1).
    padding: "SAME", "VALID" or one (low, high) pair per spatial axis.

  Returns:
    The maximum of every window.

  >>> import jax.numpy as jnp
  >>> max_pool(jnp.arange(16.).reshape(1, 4, 4, 1), (2, 2), (2, 2))[0, :, :, 0]
  Array([[ 5.,  7.],
         [13., 15.]], dtype=float32)
  """
  window_shape = tuple(window_shape)
  strides = tuple(strides) if strides else (1,) * len(window_shape)
  if len(window_shape) != len(strides):
    raise ValueError(f"len({window_shape}) must equal len({strides})")
  num_batch_dims = inputs.ndim - (len(window_shape) + 1)
  if num_batch_dims < 0:
    raise ValueError(f"inputs of shape {inputs.shape} have fewer axes than window {window_shape} "
                     "plus a feature axis.")
  dims = (1,) * num_batch_dims + window_shape + (1,)
  full_strides = (1,) * num_batch_dims + strides + (1,)
  if not isinstance(padding, str):
    padding = tuple(map(tuple, padding))
    if len(padding) != len(window_shape) or any(len(p) != 2 for p in padding):
      raise ValueError(f"padding {padding} must be one (low, high) pair per window dimension "
                       f"{window_shape}.")
    padding = ((0, 0),) * num_batch_dims + padding + ((0, 0),)
  return reduce_window_max(inputs, dims, full_strides, padding)
