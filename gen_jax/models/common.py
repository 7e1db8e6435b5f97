"""Building blocks shared by the model definitions: input handling, BatchNorm, PyTorch-style inits.

Owns the pieces every network needs in the same form, so that the networks read like their PyTorch
references: the in-model input normalisation (attacks stay in pixel space), a BatchNorm with the
PyTorch defaults, the PyTorch default initialisers, and global average pooling.

Synopsis::

    x = prepare_input(x, mean=self.mean, std=self.std, dtype=self.dtype, module="ResNet")
    y = batch_norm(train, self.dtype, name="bn1")(y)
    logits = dense_head(self.num_classes, self.dtype, name="linear")(global_avg_pool(y))
"""
from collections.abc import Sequence
import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's default Conv2d/Linear weight init, kaiming_uniform(a=sqrt(5)), is U(-b, b) with
# b = 1 / sqrt(fan_in), i.e. variance 1 / (3 fan_in).
TORCH_DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

PAD_3X3 = ((1, 1), (1, 1))
PAD_1X1 = ((0, 0), (0, 0))


def torch_linear_bias_init(fan_in: int):
  """Returns PyTorch's default Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Args:
    fan_in: number of input features of the layer.

  Returns:
    An initialiser `init_fn(key, shape, dtype)`.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init_fn(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init_fn


def prepare_input(x: jax.Array, *, mean: Sequence[float] | None, std: Sequence[float] | None,
                  dtype: Any, module: str) -> jax.Array:
  """Checks an NHWC image batch, normalises it in float32 and casts it to the compute dtype.

  Args:
    x: images, shape (batch, height, width, channels), floating point, values in [0, 1].
    mean: per-channel mean subtracted inside the model, or None for no normalisation.
    std: per-channel standard deviation divided out inside the model, or None.
    dtype: compute dtype of the network.
    module: name of the calling module, for error messages.

  Returns:
    `(x - mean) / std` (or `x`) in `dtype`.

  Raises:
    TypeError: `x` is not floating point (e.g. uint8 images that were not scaled to [0, 1]).
    ValueError: `x` is not 4-D, or `mean`/`std` do not match its channel count.
  """
  if x.ndim != 4:
    raise ValueError(f"{module} expects NHWC images of shape (batch, height, width, channels); "
                     f"got shape {tuple(x.shape)}. Add a batch axis with x[None] for one image.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{module} expects floating-point images in [0, 1]; got dtype {x.dtype}. "
                    "Convert uint8 images with x.astype(jnp.float32) / 255.")
  x = x.astype(jnp.float32)
  channels = x.shape[-1]
  for field, value in (("mean", mean), ("std", std)):
    if value is not None and len(value) != channels:
      raise ValueError(f"{module}.{field} has {len(value)} entries but the images have {channels} "
                       f"channel(s); give one {field} per channel or None.")
  if mean is not None:
    x = x - jnp.asarray(mean, jnp.float32)
  if std is not None:
    x = x / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


# Running-statistics update `new = BN_MOMENTUM * old + (1 - BN_MOMENTUM) * batch` (flax convention);
# `gen_jax.evaluation.sweep.recalibrate_batch_norm` inverts it to read a batch's own statistics.
BN_MOMENTUM = 0.9


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  """Returns a BatchNorm with PyTorch's defaults (momentum 0.1 there is 0.9 here, eps 1e-5).

  Running statistics use the biased batch variance (flax), where PyTorch stores the unbiased one;
  the difference is a factor n / (n - 1) over n = batch * height * width values, negligible.

  Args:
    train: True uses batch statistics and updates `batch_stats` (apply with
      `mutable=["batch_stats"]`); False uses the running averages.
    dtype: compute dtype; scale and bias stay float32.
    name: module name.

  Returns:
    The `nn.BatchNorm` module.
  """
  return nn.BatchNorm(use_running_average=not train,
                      momentum=BN_MOMENTUM,
                      epsilon=1e-5,
                      dtype=dtype,
                      param_dtype=jnp.float32,
                      name=name)


def dense_head(num_classes: int,
               fan_in: int,
               dtype: Any,
               name: str,
               bias_init: Any = None) -> nn.Dense:
  """Returns the classifier layer with PyTorch's default Linear init.

  Args:
    num_classes: number of outputs.
    fan_in: number of input features (for PyTorch's bias init).
    dtype: compute dtype; parameters stay float32.
    name: module name.
    bias_init: bias initialiser; default PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Returns:
    The `nn.Dense` module.
  """
  return nn.Dense(num_classes,
                  dtype=dtype,
                  param_dtype=jnp.float32,
                  kernel_init=TORCH_DEFAULT_KERNEL_INIT,
                  bias_init=bias_init or torch_linear_bias_init(fan_in),
                  name=name)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Averages over height and width (in float32, whatever the compute dtype).

  The references use `avg_pool2d(out, 4)` (or 8) on the final 4x4 (8x8) map of a 32x32 input,
  which is this global mean; the global form also serves other input sizes.

  Args:
    x: features, shape (batch, height, width, channels).

  Returns:
    Shape (batch, channels), in the dtype of `x`.
  """
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def check_num_classes(num_classes: Any, module: str) -> None:
  """Raises a clear error unless `num_classes` is a positive int.

  Args:
    num_classes: the value to check.
    module: name of the calling module, for error messages.

  Raises:
    TypeError: not an int.
    ValueError: not positive.
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
    raise TypeError(f"{module}.num_classes must be an int; got {num_classes!r}.")
  if num_classes < 1:
    raise ValueError(f"{module}.num_classes must be >= 1; got {num_classes}.")
