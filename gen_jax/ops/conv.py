"""A 2-D convolution whose kernel gradient is fast on CPU, and a drop-in `nn.Conv` replacement.

This module owns `conv2d` (NHWC input, HWIO kernel, a `jax.custom_vjp`) and `FastConv` (a
`flax.linen` module with the parameters, names, shapes and default initialisers of `nn.Conv`).

Why: XLA's CPU backend lowers the gradient of a convolution with respect to its KERNEL to a
convolution with a huge "window" (the whole feature map) that its CPU emitter runs far below the
machine's matrix-multiply rate, and inside `while` loops (PGD) it runs the INPUT gradient on a
slow generic path because the transposed kernel keeps a non-HWIO layout. `conv2d` keeps XLA's
forward pass, computes the input gradient as an ordinary forward convolution with a materialised
flipped HWIO kernel, and the kernel gradient from shifted slices: for each of the kh*kw taps, a
strided slice of the padded input contracted with the output gradient over batch x height x
width in one matrix product. On GPU/TPU the stock path is already fast, so `FastConv` picks the
custom gradient only when `jax.default_backend() == "cpu"` at trace time.

Synopsis::

    from gen_jax.ops.conv import FastConv, conv2d

    y = conv2d(x, kernel, strides=(1, 1), padding="SAME")     # x: [N,H,W,C], kernel: [kh,kw,C,O]
    layer = FastConv(64, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
    variables = layer.init(key, x)                           # {"params": {"kernel": [3,3,C,64]}}
    y = layer.apply(variables, x)                            # same variables work with nn.Conv
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["CONV_IMPLS", "FastConv", "conv2d", "conv2d_xla", "normalize_padding", "use_custom_vjp"]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# How a convolution is computed: "auto" uses the custom-VJP kernel gradient on the CPU backend and
# XLA's elsewhere, "fast" always uses the custom VJP, "xla" never does.
CONV_IMPLS = ("auto", "fast", "xla")

PaddingLike = Union[str, int, Sequence[Union[int, tuple[int, int]]]]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
  """Returns `value` as a pair of positive ints (an int is used for both spatial axes)."""
  if isinstance(value, int):
    value = (value, value)
  value = tuple(value)
  if len(value) != 2 or not all(isinstance(v, int) and v >= 1 for v in value):
    raise ValueError(f"{name} must be a positive int or a pair of positive ints for a 2-D "
                     f"convolution, got {value!r}.")
  return value


def normalize_padding(padding: PaddingLike, spatial_shape: Sequence[int],
                      kernel_size: Sequence[int],
                      strides: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """Turns a padding specification into explicit (low, high) pairs per spatial axis.

  Args:
    padding: "SAME", "VALID", an int (the same on both sides of both axes), a pair of ints (one
      per axis, both sides) or a pair of (low, high) pairs, as `flax.linen.Conv` accepts them.
    spatial_shape: (H, W) of the input.
    kernel_size: (kh, kw).
    strides: (sh, sw).

  Returns:
    ((top, bottom), (left, right)), all non-negative.

  Raises:
    ValueError: for an unsupported string (e.g. "CIRCULAR"), a malformed sequence or negative pads.
  """
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"padding {padding!r} is not supported by FastConv/conv2d; use 'SAME', "
                       "'VALID' or explicit (low, high) pairs (or nn.Conv for other modes).")
    pads = lax.padtype_to_pads(tuple(spatial_shape), tuple(kernel_size), tuple(strides),
                               padding.upper())
  elif isinstance(padding, int):
    pads = [(padding, padding)] * 2
  else:
    pads = []
    for p in padding:
      if isinstance(p, int):
        pads.append((p, p))
      else:
        p = tuple(p)
        if len(p) != 2:
          raise ValueError(f"each padding entry must be an int or a (low, high) pair, got {p!r}.")
        pads.append(p)
    if len(pads) != 2:
      raise ValueError(f"padding needs one entry per spatial axis (2), got {padding!r}.")
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if any(v < 0 for pair in pads for v in pair):
    raise ValueError(f"negative padding {pads!r} is not supported; crop the input instead.")
  return pads


def conv2d_xla(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
               padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """The stock XLA convolution (NHWC x HWIO -> NHWC) with XLA's own gradients."""
  return lax.conv_general_dilated(x,
                                  kernel,
                                  tuple(strides),
                                  tuple(padding),
                                  dimension_numbers=_DIMENSION_NUMBERS)


def _batch_groups(n: int) -> int:
  """How many partial kernel gradients the tap loop keeps: one per device when they split `n`.

  Under data parallelism the batch axis is sharded over the devices, so each tap's contraction
  over the batch is a sum of per-device partials. With one accumulator, XLA's SPMD partitioner
  puts an all-reduce inside the tap loop (one per tap), and on the CPU backend the `while` loops
  of independent layers and experts run concurrently, so two devices can enter their all-reduces
  in different orders: the program deadlocks until XLA's 40-second rendezvous timeout aborts the
  process. With one accumulator per device group the loop holds no collective, and the partials
  are summed once after it.
  """
  devices = jax.device_count()
  return devices if devices > 1 and n % devices == 0 else 1


def _kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int], strides: tuple[int, int],
                 padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """d(sum(conv(x, k) * g)) / dk (float32) from strided slices of the padded input.

  dk[i, j, c, o] = sum_{n, h, w} x_pad[n, h * sh + i, w * sw + j, c] * g[n, h, w, o]: for each of
  the kh*kw taps one strided slice of the padded input [N*Ho*Wo, C] and one matrix product with g
  [N*Ho*Wo, O] contracted over the long axis. The taps run in a `fori_loop`, so only one slice is
  alive at a time. On CPU this beats XLA's own kernel gradient, the unrolled taps, im2col and
  channels-first patches in time, and the unrolled taps in memory by several times (figures:
  docs/results.md, Performance). With several devices the batch is contracted per device group
  (`_batch_groups`), so that the loop holds no cross-device sum.
  """
  kh, kw, c, o = kernel_shape
  n, ho, wo, _ = g.shape
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  groups = _batch_groups(n)
  rows = n * ho * wo // groups  # rows of one group: its examples' output positions
  g3 = g.reshape(groups, rows, o)
  span = (n, (ho - 1) * sh + 1, (wo - 1) * sw + 1, c)

  def tap(t, dk):
    window = lax.dynamic_slice(xp, (0, t // kw, t % kw, 0), span)
    patch = lax.slice(window, (0, 0, 0, 0), span, (1, sh, sw, 1))
    # Accumulate in float32 so that a bfloat16 model still gets an accurate kernel gradient.
    value = lax.dot_general(patch.reshape(groups, rows, c),
                            g3, (((1,), (1,)), ((0,), (0,))),
                            preferred_element_type=jnp.float32)
    return lax.dynamic_update_slice(dk, value[None], (t, 0, 0, 0))

  dk = lax.fori_loop(0, kh * kw, tap, jnp.zeros((kh * kw, groups, c, o), jnp.float32))
  return dk.sum(axis=1).reshape(kh, kw, c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d_custom(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                   padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  return conv2d_xla(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
  return conv2d_xla(x, kernel, strides, padding), (x, kernel)


def _input_grad(g: jax.Array, kernel: jax.Array, input_hw: Sequence[int], strides: tuple[int, int],
                padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """d(sum(conv(x, k) * g)) / dx as a forward convolution with a physically transposed kernel.

  This is JAX's own transpose rule (a stride-1 convolution of the input-dilated cotangent with the
  spatially flipped kernel) with one difference: the flipped kernel is materialised in HWIO
  layout behind an optimisation barrier. Left to itself, XLA folds the flip and the in/out swap
  into the convolution's dimension numbers ("01oi" kernel); inside a `while` loop (every PGD
  iteration) its CPU backend then runs that convolution on a generic path about 25 times slower
  than the same convolution with an HWIO kernel.
  """
  kh, kw = kernel.shape[:2]
  ho, wo = g.shape[1:3]
  pads = []
  for size, k, s, (lo, _), out in zip(input_hw, (kh, kw), strides, padding, (ho, wo)):
    before = k - 1 - lo
    after = size + k - 1 - ((out - 1) * s + 1) - before
    pads.append((before, after))
  kernel_t = lax.optimization_barrier(jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
  return lax.conv_general_dilated(g,
                                  kernel_t, (1, 1),
                                  pads,
                                  lhs_dilation=strides,
                                  dimension_numbers=_DIMENSION_NUMBERS)


def _conv2d_bwd(strides, padding, residuals, g):
  x, kernel = residuals
  dx = _input_grad(g, kernel, x.shape[1:3], strides, padding).astype(x.dtype)
  dk = _kernel_grad(x, g, kernel.shape, strides, padding).astype(kernel.dtype)
  return dx, dk


_conv2d_custom.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv2d(x: jax.Array,
           kernel: jax.Array,
           strides: int | Sequence[int] = 1,
           padding: PaddingLike = "SAME") -> jax.Array:
  """NHWC x HWIO convolution with the custom (CPU-fast) kernel gradient.

  The forward value and the input gradient are XLA's own; the kernel gradient equals XLA's within
  float rounding (it sums the same products in a different order).

  Args:
    x: input [N, H, W, C].
    kernel: [kh, kw, C, O], same dtype as `x`.
    strides: an int or (sh, sw).
    padding: "SAME", "VALID", an int, or per-axis ints / (low, high) pairs.

  Returns:
    [N, Ho, Wo, O] in the dtype of `x`.

  Raises:
    ValueError: for wrong ranks, mismatched channels or dtypes, or unsupported padding.
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f"conv2d expects x [N,H,W,C] and kernel [kh,kw,C,O]; got shapes {x.shape} "
                     f"and {kernel.shape}.")
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"input channels {x.shape[-1]} do not match the kernel's {kernel.shape[2]} "
                     f"(kernel shape {kernel.shape}, HWIO layout).")
  if x.dtype != kernel.dtype:
    raise ValueError(f"x ({x.dtype}) and kernel ({kernel.dtype}) must share a dtype; cast one "
                     "of them first (FastConv does this through its `dtype`).")
  strides = _pair(strides, "strides")
  pads = normalize_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
  return _conv2d_custom(x, kernel, strides, pads)


def use_custom_vjp(impl: str = "auto") -> bool:
  """Whether `impl` resolves to the custom-VJP path; "auto" means: only on the CPU backend.

  Called at trace time, so a jitted function compiled for CPU uses the custom gradient and the
  same code compiled for GPU/TPU uses XLA's.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"impl must be one of {CONV_IMPLS}, got {impl!r}.")
  if impl == "auto":
    return jax.default_backend() == "cpu"
  return impl == "fast"


class FastConv(nn.Module):
  """Drop-in replacement for `nn.Conv` (2-D, NHWC) with a fast CPU kernel gradient.

  Parameters are `kernel` [kh, kw, C, features] (HWIO) and `bias` [features], with `nn.Conv`'s
  default initialisers (LeCun normal, zeros), so variables move freely between the two modules.
  Inputs, kernel and bias are promoted to `dtype` (or their common dtype) as `nn.Conv` does.

  Attributes:
    features: number of output channels.
    kernel_size: an int or (kh, kw).
    strides: an int or (sh, sw).
    padding: "SAME", "VALID", an int, or per-axis ints / (low, high) pairs.
    use_bias: whether to add a bias.
    dtype: computation dtype (None: inferred from inputs and parameters).
    param_dtype: dtype of the parameters.
    kernel_init: kernel initialiser.
    bias_init: bias initialiser.
    impl: one of `CONV_IMPLS`: "auto" (custom gradient on CPU only), "fast" or "xla".
  """
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: PaddingLike = "SAME"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()
  impl: str = "auto"

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Applies the convolution to `inputs` [N, H, W, C] and returns [N, Ho, Wo, features]."""
    if inputs.ndim != 4:
      raise ValueError(f"FastConv expects NHWC inputs of rank 4, got shape {inputs.shape}; add "
                       "a batch axis or use nn.Conv for other ranks.")
    kernel_size = _pair(self.kernel_size, "kernel_size")
    strides = _pair(self.strides, "strides")
    pads = normalize_padding(self.padding, inputs.shape[1:3], kernel_size, strides)
    kernel = self.param("kernel", self.kernel_init, kernel_size + (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init,
                       (self.features,), self.param_dtype) if self.use_bias else None)
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    if use_custom_vjp(self.impl):
      y = _conv2d_custom(inputs, kernel, strides, pads)
    else:
      y = conv2d_xla(inputs, kernel, strides, pads)
    if bias is not None:
      y = y + bias.reshape((1, 1, 1, -1))
    return y
