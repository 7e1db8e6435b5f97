"""On-device training augmentation: random crop after zero padding, random horizontal flip.

Everything is a pure function of an explicit PRNG key and runs inside `jax.jit` with no Python
loop over examples, so the same seed gives the same batches on any device. Images arrive as uint8
NHWC (as `Dataset` holds them) and leave as float32 in [0, 1], the pixel space attacks work in.

Synopsis::

    aug_fn = jax.jit(augment_batch, static_argnames=("pad", "flip"))
    x = aug_fn(jax.random.fold_in(key, step), images_u8, pad=4, flip=flip_default(ds.name))
    x_eval = to_float(test_images_u8)

References:
  He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (the 4-pixel pad + crop
  + flip recipe for CIFAR); Wang & Wang, "Generalist: Decoupling Natural and Robust
  Generalization", CVPR 2023.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Horizontal flips change the meaning of digits and house numbers; natural photos are symmetric.
DEFAULT_FLIP = {
    "digits": False,
    "svhn_cropped": False,
    "svhn": False,
    "cifar10": True,
    "cifar100": True,
    "folder": True,
}


def flip_default(name: str) -> bool:
  """Whether random horizontal flips suit the data set `name`.

  Args:
    name: a `Dataset.name`.

  Returns:
    `DEFAULT_FLIP[name]`; True (the natural-image default) for names not listed, such as
    "arrays" from `from_arrays`: pass `flip=False` yourself for mirror-sensitive data.
  """
  return DEFAULT_FLIP.get(name, True)


def _check_uint8_nhwc(images, fn_name: str) -> None:
  if not hasattr(images, "dtype") or images.dtype != jnp.uint8:
    raise TypeError(f"{fn_name} expects uint8 images (0..255), got dtype "
                    f"{getattr(images, 'dtype', type(images).__name__)}; float images are "
                    "already converted, do not augment them twice.")
  if images.ndim != 4:
    raise ValueError(f"{fn_name} expects an NHWC batch (rank 4), got shape {images.shape}.")


def to_float(images: Any) -> Any:
  """The project's one pixel conversion: uint8 0..255 -> float32 in [0, 1] (x / 255).

  Floating-point images are taken to be in [0, 1] already and only cast to float32, so a
  function that accepts either kind calls this once. A numpy array stays a numpy array (host),
  a JAX array a JAX array (device, traceable).

  Args:
    images: uint8 or floating-point array of any shape.

  Returns:
    float32 array of the same shape and kind.

  Raises:
    TypeError: `images` is neither uint8 nor floating point (e.g. int32 labels passed by mistake).
  """
  dtype = getattr(images, "dtype", None)
  if dtype == np.uint8:
    return images.astype(np.float32) / np.float32(255.0)
  if dtype == np.float32:
    return images  # already converted: no copy
  if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
    return images.astype(np.float32)
  raise TypeError(f"to_float expects uint8 images (0..255) or floats in [0, 1], got "
                  f"{dtype if dtype is not None else type(images).__name__}.")


def augment_batch(key: jax.Array,
                  images: jax.Array,
                  *,
                  pad: int = 4,
                  flip: bool = True) -> jax.Array:
  """Random crop after zero padding and random horizontal flip, per example.

  Each image is zero-padded by `pad` pixels on every side, then an H x W window is cut at an
  offset drawn uniformly from {0, ..., 2 * pad} along each axis, independently per example;
  with `flip`, each example is mirrored left-right with probability 1/2.

  Args:
    key: PRNG key; the same key gives the same output.
    images: uint8 NHWC batch.
    pad: padding in pixels (static under jit); 0 disables the crop.
    flip: whether to flip at random (static under jit); see `flip_default`.

  Returns:
    float32 array of the shape of `images`, values in [0, 1].

  Raises:
    TypeError: `images` is not uint8, or `pad`/`flip` have the wrong type.
    ValueError: `images` is not rank 4, or `pad` is negative.
  """
  _check_uint8_nhwc(images, "augment_batch")
  if isinstance(pad, bool) or not isinstance(pad, int):
    raise TypeError(f"pad must be a Python int (static under jit), got {pad!r}.")
  if pad < 0:
    raise ValueError(f"pad must be >= 0, got {pad}.")
  if not isinstance(flip, bool):
    raise TypeError(f"flip must be a Python bool (static under jit), got {flip!r}.")
  x = to_float(images)
  n, h, w, c = x.shape
  crop_key, flip_key = jax.random.split(key)
  if pad:
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)
    crop_fn = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
    x = jax.vmap(crop_fn)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (n,))
    x = jnp.where(mirror[:, None, None, None], x[:, :, ::-1, :], x)
  return x
