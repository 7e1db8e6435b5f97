"""Model registry: the paper's networks by name, their variables, and parameter counts.

Owns the name -> constructor map (`MODEL_NAMES`, `create_model`), variable initialisation
(`init_variables`, jit-compiled so that WRN-34-10 initialises in seconds) and `count_params`. All
models are flax.linen modules over NHWC images in [0, 1], called as
`model.apply(variables, x, train=...)`; any normalisation happens inside the model, so attacks
work in pixel space. Variables are plain dicts `{"params": ..., "batch_stats": ...}`.

Synopsis::

    from gen_jax import models
    model = models.create_model("resnet18", num_classes=10, dtype=jnp.bfloat16, conv_impl="auto")
    variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
    models.count_params(variables["params"])                           # 11_173_962
    logits = model.apply(variables, x, train=False)                    # float32 logits
    logits, new_state = model.apply(variables, x, train=True, mutable=["batch_stats"])
"""
from collections.abc import Callable, Sequence
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gen_jax.ops.conv import CONV_IMPLS, FastConv
from gen_jax.models.resnet import PreActResNet18, ResNet18
from gen_jax.models.smallcnn import SmallCNN
from gen_jax.models.wide_resnet import WideResNet, blocks_per_stage, check_widen_factor

# Compute dtypes by name (parameters stay float32; logits are returned in float32).
COMPUTE_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def wide_resnet(depth: int, widen_factor: int) -> Callable[..., WideResNet]:
  """Returns a constructor `fn(**fields) -> WideResNet` for WRN-`depth`-`widen_factor`.

  Args:
    depth: 6n + 4 (TRADES counting: 28, 34) or 6n + 2 (Madry counting: 32).
    widen_factor: width multiplier.

  Returns:
    A constructor taking the remaining WideResNet fields (num_classes, dtype, conv, mean, std).

  Raises:
    TypeError, ValueError: an impossible depth or width.
  """
  # Fail here, at registration, rather than at the first forward pass.
  blocks_per_stage(depth)
  check_widen_factor(widen_factor)
  return functools.partial(WideResNet, depth=depth, widen_factor=widen_factor)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "smallcnn": SmallCNN,
    "resnet18": ResNet18,
    "preactresnet18": PreActResNet18,
    "wrn34_10": wide_resnet(34, 10),
    "wrn32_10": wide_resnet(32, 10),
    "wrn28_10": wide_resnet(28, 10),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _conv_class(conv_impl: str) -> Any:
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}; got {conv_impl!r}.")
  if conv_impl == "xla":
    return nn.Conv
  if conv_impl == "auto":
    return FastConv
  return functools.partial(FastConv, impl=conv_impl)


def _channel_stats(value: Any, field: str) -> tuple[float, ...] | None:
  if value is None:
    return None
  try:
    stats = tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1))
  except (TypeError, ValueError) as e:
    raise TypeError(f"{field} must be a sequence of per-channel floats; got {value!r}.") from e
  if not stats or not all(math.isfinite(v) for v in stats):
    raise ValueError(f"{field} must be a non-empty sequence of finite floats; got {value!r}.")
  return stats


def create_model(name: str,
                 num_classes: int,
                 *,
                 dtype: Any = jnp.float32,
                 conv_impl: str = "xla",
                 mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> nn.Module:
  """Builds a registered network.

  Args:
    name: one of `MODEL_NAMES`.
    num_classes: number of logits, >= 1.
    dtype: compute dtype (float32, bfloat16, float16); parameters stay float32 and logits are
      returned in float32.
    conv_impl: "xla" uses `flax.linen.Conv`; "fast" and "auto" use `gen_jax.ops.conv.FastConv`
      (same variables, faster kernel gradient on CPU; it keeps XLA on accelerators).
    mean: per-channel mean subtracted inside the model, or None (the reference: no normalisation).
    std: per-channel standard deviation (all > 0) divided out inside the model, or None.

  Returns:
    The flax.linen module; call it as `model.apply(variables, x, train=...)`.

  Raises:
    ValueError: unknown name (the message lists `MODEL_NAMES`), unknown `conv_impl`, a
      non-positive `num_classes` or `std`, `mean` and `std` of different lengths.
    TypeError: `num_classes` is not an int, `dtype` is not floating point.
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}.")
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
    raise TypeError(f"num_classes must be an int; got {num_classes!r}.")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
  try:
    floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise TypeError(f"dtype must be a floating-point dtype such as jnp.float32 or jnp.bfloat16; "
                    f"got {dtype!r}.")
  mean, std = _channel_stats(mean, "mean"), _channel_stats(std, "std")
  if std is not None and min(std) <= 0:
    raise ValueError(f"std must be positive; got {std}.")
  if mean is not None and std is not None and len(mean) != len(std):
    raise ValueError(f"mean has {len(mean)} entries and std {len(std)}; give one per channel.")
  conv = _conv_class(conv_impl)
  return _REGISTRY[name](num_classes=int(num_classes),
                         dtype=jnp.dtype(dtype),
                         conv=conv,
                         mean=mean,
                         std=std)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jit_init(model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]) -> Any:
  # Module-level and keyed on the (hashable) module, so equal models share one compilation.
  return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def init_variables(model: nn.Module, key: jax.Array,
                   image_shape: tuple[int, int, int]) -> dict[str, dict[str, Any]]:
  """Initialises a model's variables from a PRNG key (jit-compiled).

  Args:
    model: a module from `create_model` (or any module called as `model(x, train=...)`).
    key: PRNG key.
    image_shape: (height, width, channels) of one input image.

  Returns:
    `{"params": ..., "batch_stats": ...}` as plain nested dicts of float32 arrays;
    `batch_stats` is `{}` for a model without BatchNorm.

  Raises:
    ValueError: `image_shape` is not three positive ints.
  """
  if (not isinstance(image_shape, (tuple, list)) or len(image_shape) != 3 or not all(
      isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in image_shape)):
    raise ValueError(f"image_shape must be (height, width, channels) of positive ints; got "
                     f"{image_shape!r}.")
  image_shape = tuple(int(d) for d in image_shape)
  try:
    hash(model)
  except TypeError:  # e.g. a module built by hand with list-valued fields: no compile cache.
    init_fn = functools.partial(_jit_init.__wrapped__, model, image_shape=image_shape)
    variables = jax.jit(init_fn)(key)
  else:
    variables = _jit_init(model, key, image_shape)
  return {
      "params": dict(variables.get("params", {})),
      "batch_stats": dict(variables.get("batch_stats", {}))
  }


def count_params(tree: Any) -> int:
  """Returns the number of scalars in a pytree (arrays or `jax.ShapeDtypeStruct` leaves).

  Count `variables["params"]` to compare with PyTorch's `sum(p.numel() for p in
  model.parameters())`: BatchNorm running statistics are buffers there, not parameters.

  Args:
    tree: a pytree, e.g. `variables["params"]` or `jax.eval_shape(...)` of it.

  Returns:
    The total element count.
  """
  return sum(
      math.prod(getattr(leaf, "shape", np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


__all__ = [
    "MODEL_NAMES", "COMPUTE_DTYPES", "CONV_IMPLS", "create_model", "init_variables", "count_params",
    "wide_resnet", "SmallCNN", "ResNet18", "PreActResNet18", "WideResNet"
]
