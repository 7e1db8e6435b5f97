"""Common-corruption robustness: CIFAR-10-C style corruptions computed in JAX, and their accuracy.

Eight of Hendrycks & Dietterich's corruptions are computed on the device, at their CIFAR-10-C
severities 1..5: gaussian_noise, shot_noise, impulse_noise, gaussian_blur, contrast, brightness,
pixelate and jpeg_compression. The others (motion/zoom/glass blur, snow, frost, fog, ...) need
image libraries or texture files and are only read from TFDS's prepared `cifar10_corrupted`.

Every corruption is a pure function of the images and an explicit PRNG key (the deterministic ones
ignore the key); the severity only indexes a parameter table, so it is traced and one program per
corruption serves all five severities.

Synopsis::

    from gen_jax.evaluation import corruptions
    x_c = corruptions.corrupt(x, "jpeg_compression", 3, key)       # float NHWC in [0, 1]
    x_q = corruptions.jpeg_compress(x, quality=10)                  # any quality, traced
    result = corruptions.corruption_accuracy({"global": fn_mix, "robust": fn_rob}, images, labels,
                                             key=jax.random.key(0))
    print(corruptions.to_markdown(result))
    # The released CIFAR-10-C, when TFDS has it prepared (never downloads; None otherwise):
    result = corruptions.cifar10_corrupted_accuracy({"global": fn_mix}, "/data/tfds", n=1000)

Deviations from the reference (which works on one 8-bit PIL image at a time): images stay float
(no rounding to 8 bits between or after the steps, except inside the JPEG codec, whose samples are
8-bit by definition); brightness uses the closed form of its HSV round trip; the JPEG codec is a
float re-implementation of libjpeg's baseline path, not libjpeg itself.

References:
  Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
  Perturbations", ICLR 2019, https://arxiv.org/abs/1903.12261. Severity parameters from
  https://github.com/hendrycks/robustness/blob/master/ImageNet-C/create_c/make_cifar_c.py
  ITU-T T.81 (JPEG), Annex K.1 quantisation tables; IJG libjpeg `jcparam.c`
  (`jpeg_quality_scaling`, `jpeg_add_quant_table`) and `jdsample.c` (`h2v2_fancy_upsample`).
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gen_jax.attacks.core import as_pytree_fn
from gen_jax.data import to_float
from gen_jax.data.batching import eval_batches
from gen_jax.data.sources import import_tfds, read_tfds_source
from gen_jax.evaluation.engine import example_keys
from gen_jax.evaluation.modelset import ModelSet

CORRUPTIONS: tuple[str, ...] = ("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur",
                                "contrast", "brightness", "pixelate", "jpeg_compression")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
# The corruptions that draw random numbers (the others ignore their key).
RANDOM: tuple[str, ...] = ("gaussian_noise", "shot_noise", "impulse_noise")

# Severity 1..5 parameters of make_cifar_c.py (CIFAR-10-C), one tuple per corruption.
SEVERITY_PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of the additive noise
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity: Poisson(x c) / c
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of values set to 0 or 1
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on the deviation from the channel mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to V in HSV
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # down-sampling factor of the side
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
}

# Our corruption name -> the `cifar10_corrupted` config prefix (configs are "<prefix>_<severity>").
TFDS_NAMES: dict[str, str] = {
    "gaussian_noise": "gaussian_noise",
    "shot_noise": "shot_noise",
    "impulse_noise": "impulse_noise",
    "gaussian_blur": "gaussian_blur",
    "contrast": "contrast",
    "brightness": "brightness",
    "pixelate": "pixelate",
    "jpeg_compression": "jpeg_compression",
}

# skimage.filters.gaussian (scipy.ndimage.gaussian_filter) cuts the kernel at 4 sigma.
_BLUR_TRUNCATE = 4.0

# ITU-T T.81 Annex K.1, row-major, natural (not zig-zag) order.
_JPEG_LUMA = np.array([[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
                       [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
                       [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
                       [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]],
                      dtype=np.int32)
_JPEG_CHROMA = np.full((8, 8), 99, dtype=np.int32)
_JPEG_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]

# JFIF RGB <-> YCbCr (full range, offset 128 on the chroma).
_RGB_TO_YCC = np.array(
    [[0.299, 0.587, 0.114], [-0.168735892, -0.331264108, 0.5], [0.5, -0.418687589, -0.081312411]],
    dtype=np.float32)
_YCC_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136286, -0.714136286], [1.0, 1.772, 0.0]],
                       dtype=np.float32)

# ---------------------------------------------------------------------------------------------
# validation


def _check_name(name: Any) -> None:
  if not isinstance(name, str) or name not in CORRUPTIONS:
    raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}.")


def _check_severity(severity: Any) -> None:
  if isinstance(severity, bool) or not isinstance(severity,
                                                  (int, np.integer)) or severity not in SEVERITIES:
    raise ValueError(f"severity must be one of {SEVERITIES} (a Python int), got {severity!r}.")


def _check_names(corruptions: Sequence[str]) -> tuple[str, ...]:
  if isinstance(corruptions, str) or not corruptions:
    raise ValueError(f"corruptions must be a non-empty sequence of names from {CORRUPTIONS}, "
                     f"got {corruptions!r}.")
  for name in corruptions:
    _check_name(name)
  return tuple(corruptions)


def _check_severities(severities: Sequence[int]) -> tuple[int, ...]:
  if isinstance(severities, (str, int)) or not severities:
    raise ValueError(f"severities must be a non-empty sequence of ints from {SEVERITIES}, "
                     f"got {severities!r}.")
  for severity in severities:
    _check_severity(severity)
  return tuple(int(s) for s in severities)


def _check_image_shape(shape: Sequence[int], what: str) -> None:
  if len(shape) != 4 or shape[-1] not in (1, 3):
    raise ValueError(f"{what} must be NHWC images [N, H, W, C] with C = 1 (grey) or 3 (RGB), got "
                     f"shape {tuple(shape)}; add a batch or channel axis.")


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")


# ---------------------------------------------------------------------------------------------
# the corruptions (x: float32 [B, H, W, C] in [0, 1]; level: traced int32 severity - 1)


def _param(name: str, level: jax.Array) -> jax.Array:
  return jnp.asarray(SEVERITY_PARAMS[name], jnp.float32)[level]


def _gaussian_noise(x, key, level):
  return x + _param("gaussian_noise", level) * jax.random.normal(key, x.shape, x.dtype)


def _shot_noise(x, key, level):
  c = _param("shot_noise", level)
  return jax.random.poisson(key, x * c, x.shape).astype(x.dtype) / c


def _impulse_noise(x, key, level):
  # skimage.util.random_noise(mode="s&p", salt_vs_pepper=0.5): every value (channels apart) is hit
  # with probability `amount`, and a hit is salt (1) or pepper (0) with equal probability.
  flip_key, salt_key = jax.random.split(key)
  hit = jax.random.uniform(flip_key, x.shape) < _param("impulse_noise", level)
  salt = jax.random.bernoulli(salt_key, 0.5, x.shape)
  return jnp.where(hit, salt.astype(x.dtype), x)


def _blur_kernels() -> np.ndarray:
  """[5, 2R+1] Gaussian kernels of scipy.ndimage (radius int(4 sigma + 0.5)), zero-padded to R."""
  radii = [int(_BLUR_TRUNCATE * s + 0.5) for s in SEVERITY_PARAMS["gaussian_blur"]]
  size = 2 * max(radii) + 1
  table = np.zeros((len(radii), size), np.float64)
  for i, (sigma, radius) in enumerate(zip(SEVERITY_PARAMS["gaussian_blur"], radii)):
    t = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 * t * t / sigma**2)
    start = max(radii) - radius
    table[i, start:start + 2 * radius + 1] = phi / phi.sum()
  return table.astype(np.float32)


def _blur_axis(x: jax.Array, kernel: jax.Array, axis: int) -> jax.Array:
  """Correlates `x` with `kernel` along `axis`, edges replicated (scipy mode "nearest")."""
  radius = (kernel.shape[0] - 1) // 2
  pad = [(0, 0)] * x.ndim
  pad[axis] = (radius, radius)
  xp = jnp.pad(x, pad, mode="edge")
  n = x.shape[axis]
  return sum(kernel[i] * _slice_axis(xp, i, n, axis) for i in range(kernel.shape[0]))


def _slice_axis(x: jax.Array, start: int, size: int, axis: int) -> jax.Array:
  """x[..., start:start + size, ...] along `axis` (static bounds)."""
  return jax.lax.slice_in_dim(x, start, start + size, axis=axis)


def _gaussian_blur(x, key, level):
  del key
  kernel = jnp.asarray(_blur_kernels())[level]
  return _blur_axis(_blur_axis(x, kernel, 1), kernel, 2)


def _contrast(x, key, level):
  del key
  means = jnp.mean(x, axis=(1, 2), keepdims=True)  # per image and channel, as the reference
  return (x - means) * _param("contrast", level) + means


def _brightness(x, key, level):
  """V += c in HSV, in closed form.

  With hue and saturation fixed, HSV -> RGB is linear in V, so raising V to V' scales every channel
  by V' / V; black pixels (V = 0, saturation 0 in skimage) become grey V'. Grey images are their
  own V, so they get x + c.
  """
  del key
  v = jnp.max(x, axis=-1, keepdims=True)
  v_new = jnp.clip(v + _param("brightness", level), 0.0, 1.0)
  ratio = v_new / jnp.where(v > 0, v, 1.0)
  return jnp.where(v > 0, x * ratio, v_new)


def _pil_box_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] resampling matrix of Pillow's `Image.resize(..., BOX)` along one axis.

  Pillow (libImaging/Resample.c, `precompute_coeffs`) samples the box at input pixel centres:
  output pixel i takes the mean of the input pixels whose centres lie in the window of width
  max(in/out, 1) centred at (i + 0.5) in/out, i.e. a box average when shrinking and nearest
  neighbour when enlarging.
  """
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 0.5 * filterscale
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = (i + 0.5) * scale
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    for j in range(lo, hi):
      t = (j - center + 0.5) / filterscale
      weights[i, j] = 1.0 if -0.5 < t <= 0.5 else 0.0
    weights[i] /= weights[i].sum()
  return weights


@functools.lru_cache(maxsize=64)
def _pixelate_matrices(size: int) -> np.ndarray:
  """[5, size, size]: box down-sampling to int(size c) then back up, one matrix per severity."""
  table = []
  for c in SEVERITY_PARAMS["pixelate"]:
    small = max(int(size * c), 1)
    table.append(_pil_box_weights(small, size) @ _pil_box_weights(size, small))
  return np.stack(table).astype(np.float32)


def _pixelate(x, key, level):
  del key
  rows = jnp.asarray(_pixelate_matrices(x.shape[1]))[level]
  cols = jnp.asarray(_pixelate_matrices(x.shape[2]))[level]
  return jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)


@functools.lru_cache(maxsize=1)
def _dct_matrix() -> np.ndarray:
  """The orthonormal 8-point DCT-II, D[u, t] (JPEG's 2-D DCT is D X D^T)."""
  t = np.arange(8)
  d = np.sqrt(2.0 / 8.0) * np.cos((2 * t[None, :] + 1) * t[:, None] * np.pi / 16.0)
  d[0] /= np.sqrt(2.0)
  return d.astype(np.float32)


def _quant_table(base: np.ndarray, quality: jax.Array) -> jax.Array:
  """libjpeg's `jpeg_set_quality(quality, force_baseline=TRUE)` scaling of a base table."""
  quality = jnp.clip(quality.astype(jnp.int32), 1, 100)
  scale = jnp.where(quality < 50, 5000 // quality, 200 - 2 * quality)
  return jnp.clip((jnp.asarray(base) * scale + 50) // 100, 1, 255).astype(jnp.float32)


def _round(x: jax.Array) -> jax.Array:
  """Round half up, as libjpeg's fixed-point `(v + ONE_HALF) >> SCALEBITS`."""
  return jnp.floor(x + 0.5)


def _jpeg_plane(plane: jax.Array, table: jax.Array) -> jax.Array:
  """Codes one plane of 8-bit samples: level shift, 8x8 block DCT, quantise, and back.

  `plane` is [B, H, W] with H and W multiples of 8; `table` is [8, 1, 8] (u, -, v). The
  quantiser rounds to nearest, ties away from zero, as libjpeg's does; the decoded samples are
  rounded and clipped to 0..255 as libjpeg's inverse DCT does.
  """
  b, h, w = plane.shape
  d = jnp.asarray(_dct_matrix())
  hi = jax.lax.Precision.HIGHEST
  blocks = (plane - 128.0).reshape(b, h // 8, 8, w // 8, 8)
  coef = jnp.einsum("ut,bitjs,vs->biujv", d, blocks, d, precision=hi)
  # libjpeg's integer DCT yields coefficients x8 as integers; its quantiser then rounds the
  # magnitude half up, (|c8| + 4q) // 8q. Rounding to 1/8 first keeps exact ties exact in float32.
  c8 = _round(coef * 8.0)
  coef = jnp.sign(c8) * jnp.floor((jnp.abs(c8) + 4.0 * table) / (8.0 * table)) * table
  blocks = jnp.einsum("ut,biujv,vs->bitjs", d, coef, d, precision=hi)
  return jnp.clip(_round(blocks.reshape(b, h, w) + 128.0), 0.0, 255.0)


def _downsample2(plane: jax.Array) -> jax.Array:
  """libjpeg's `h2v2_downsample`: 2x2 sums, rounded with a bias alternating 1, 2 along a row."""
  b, h, w = plane.shape
  sums = plane.reshape(b, h // 2, 2, w // 2, 2).sum(axis=(2, 4))
  bias = 1.0 + (jnp.arange(w // 2) % 2)
  return jnp.floor((sums + bias) / 4.0)


def _neighbours(plane: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """The previous and next sample along `axis`, edges replicated."""
  n = plane.shape[axis]
  first, last = _slice_axis(plane, 0, 1, axis), _slice_axis(plane, n - 1, 1, axis)
  prev = jnp.concatenate([first, _slice_axis(plane, 0, n - 1, axis)], axis)
  nxt = jnp.concatenate([_slice_axis(plane, 1, n - 1, axis), last], axis)
  return prev, nxt


def _interleave(even: jax.Array, odd: jax.Array, axis: int) -> jax.Array:
  shape = list(even.shape)
  shape[axis] *= 2
  return jnp.stack([even, odd], axis=axis + 1).reshape(shape)


def _upsample2(plane: jax.Array) -> jax.Array:
  """libjpeg's `h2v2_fancy_upsample`: triangle filter (3/4 nearer, 1/4 farther sample) per axis.

  Rows first, kept as sums 3 near + far (x4); columns then round `(3 s + s' + 8) >> 4` for even and
  `(3 s + s' + 7) >> 4` for odd outputs. Edges are replicated, as libjpeg's context rows are.
  """
  up, down = _neighbours(plane, 1)
  colsum = _interleave(3.0 * plane + up, 3.0 * plane + down, 1)
  left, right = _neighbours(colsum, 2)
  return _interleave(jnp.floor((3.0 * colsum + left + 8.0) / 16.0),
                     jnp.floor((3.0 * colsum + right + 7.0) / 16.0), 2)


def jpeg_compress(images: jax.Array, quality: Any) -> jax.Array:
  """A JPEG encode/decode round trip in JAX, following libjpeg's baseline path (as Pillow uses it).

  RGB -> YCbCr (JFIF), chroma subsampled 2x2 (Pillow's default 4:2:0) and restored with libjpeg's
  triangle ("fancy") up-sampling; each plane is level-shifted, cut into 8x8 blocks, transformed by
  the 2-D DCT, quantised by the Annex K tables scaled by `quality` exactly as libjpeg's
  `jpeg_set_quality` does (baseline: entries clipped to 1..255), rounded, dequantised and
  inverted. Grey (C = 1) images are coded as the luminance plane alone. Images whose sides are not
  multiples of the block (8, or 16 with subsampled chroma) are edge-padded, as libjpeg does, and
  cropped back. Samples are 8-bit integers between the stages, rounded where libjpeg rounds; the
  float DCT differs from libjpeg's integer one by rounding only (tests/test_corruptions.py bounds
  the difference from Pillow's JPEG at the CIFAR-10-C qualities).

  Args:
    images: float NHWC images in [0, 1], C = 1 or 3.
    quality: JPEG quality 1..100 (may be traced: the tables are computed on the device).

  Returns:
    The decoded images, same shape and dtype, in [0, 1] (multiples of 1/255).

  Raises:
    ValueError: a shape that is not NHWC with 1 or 3 channels, or non-float images.
  """
  _check_image_shape(jnp.shape(images), "images")
  if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
    raise ValueError("jpeg_compress takes float images in [0, 1], got dtype "
                     f"{jnp.result_type(images)}; convert uint8 with x.astype(jnp.float32) / 255.")
  return _jpeg_jit(jnp.asarray(images), jnp.asarray(quality, jnp.int32))


def _jpeg(x: jax.Array, quality: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  luma_q = _quant_table(_JPEG_LUMA, quality).reshape(8, 1, 8)
  chroma_q = _quant_table(_JPEG_CHROMA, quality).reshape(8, 1, 8)
  block = 16 if c == 3 else 8
  samples = jnp.pad(_round(jnp.clip(x, 0.0, 1.0) * 255.0),
                    ((0, 0), (0, -h % block), (0, -w % block), (0, 0)),
                    mode="edge")
  if c == 1:
    return _jpeg_plane(samples[..., 0], luma_q)[:, :h, :w, None] / 255.0
  hi = jax.lax.Precision.HIGHEST
  ycc = _round(jnp.einsum("bhwc,kc->bhwk", samples, jnp.asarray(_RGB_TO_YCC), precision=hi))
  luma = _jpeg_plane(ycc[..., 0], luma_q)[:, :h, :w]
  # The decoder up-samples only the chroma that covers the image, ceil(side / 2).
  ch, cw = -(-h // 2), -(-w // 2)
  cb, cr = (
      _upsample2(_jpeg_plane(_downsample2(ycc[..., k] + 128.0), chroma_q)[:, :ch, :cw])[:, :h, :w] -
      128.0 for k in (1, 2))
  m = _YCC_TO_RGB
  rgb = jnp.stack([
      luma + _round(m[0, 2] * cr), luma + _round(m[1, 1] * cb + m[1, 2] * cr),
      luma + _round(m[2, 1] * cb)
  ],
                  axis=-1)
  return jnp.clip(rgb, 0.0, 255.0) / 255.0


@jax.jit
def _jpeg_jit(images: jax.Array, quality: jax.Array) -> jax.Array:
  return _jpeg(images.astype(jnp.promote_types(images.dtype, jnp.float32)),
               quality).astype(images.dtype)


def _jpeg_compression(x, key, level):
  del key
  return _jpeg(x, jnp.asarray(SEVERITY_PARAMS["jpeg_compression"], jnp.int32)[level])


_FUNCTIONS = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}


def _apply(x: jax.Array, key: jax.Array, level: jax.Array, name: str) -> jax.Array:
  """Corruption `name` at severity `level + 1` (traced) of float images; clipped, same dtype."""
  out = _FUNCTIONS[name](x.astype(jnp.promote_types(x.dtype, jnp.float32)), key, level)
  return jnp.clip(out, 0.0, 1.0).astype(x.dtype)


_apply_jit = jax.jit(_apply, static_argnames="name")


def corrupt(images: jax.Array, name: str, severity: int, key: jax.Array) -> jax.Array:
  """Applies the common corruption `name` at `severity` (CIFAR-10-C parameters) to a batch.

  The severity indexes a parameter table on the device, so the compiled program is shared by all
  five severities of a corruption. `corrupt` may itself be called under `jax.jit` with `name` and
  `severity` static.

  >>> x = jnp.full((1, 4, 4, 3), 0.5)
  >>> float(corrupt(x, "contrast", 5, jax.random.key(0)).mean())  # a constant image has no contrast
  0.5

  Args:
    images: float NHWC images in [0, 1], C = 1 (grey) or 3 (RGB), any H and W.
    name: one of `CORRUPTIONS`.
    severity: 1..5.
    key: PRNG key; the noise corruptions are deterministic given it, the others ignore it.

  Returns:
    The corrupted images, same shape and dtype, clipped to [0, 1].

  Raises:
    ValueError: an unknown name or severity (the message lists the valid ones), or images that are
      not float NHWC with 1 or 3 channels.
  """
  _check_name(name)
  _check_severity(severity)
  _check_image_shape(jnp.shape(images), "images")
  if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
    raise ValueError(f"corrupt takes float images in [0, 1], got dtype {jnp.result_type(images)}; "
                     "convert uint8 images with x.astype(jnp.float32) / 255.")
  return _apply_jit(images, key, jnp.int32(severity - 1), name=name)


# ---------------------------------------------------------------------------------------------
# accuracy


@functools.partial(jax.jit, static_argnames=("name",))
def _batch_correct(logits_fns, images, labels, index, mask, key, level, *, name: str | None):
  """Correct predictions of each model on one padded batch, after corruption `name` (None: none).

  The batch is corrupted once and every model sees the same corrupted images. `key` is the
  corruption's; at severity s = `level` + 1 a random corruption draws example i's noise from
  `fold_in(fold_in(key, s), i)` (`index` holds the examples' positions in the evaluated set), so
  the draws do not depend on the batch.
  """
  x = to_float(images)
  if name in RANDOM:
    keys = example_keys(key, level + 1, index)
    x = jax.vmap(lambda xi, ki: _apply(xi[None], ki, level, name)[0])(x, keys)
  elif name is not None:
    x = _apply(x, key, level, name)
  return {
      role: jnp.sum((jnp.argmax(fn(x), -1) == labels) & mask, dtype=jnp.int32)
      for role, fn in logits_fns.items()
  }


def _check_models(logits_fns: dict[str, Callable]) -> dict[str, jax.tree_util.Partial]:
  if not isinstance(logits_fns, dict) or not logits_fns:
    raise ValueError("logits_fns must be a non-empty dict role -> logits_fn (x -> logits [B, C]), "
                     f"got {type(logits_fns).__name__}.")
  for role, fn in logits_fns.items():
    if not callable(fn):
      raise ValueError(f"logits_fns[{role!r}] must be callable (x -> logits [B, C]), got "
                       f"{type(fn).__name__}.")
  return {role: as_pytree_fn(fn) for role, fn in logits_fns.items()}


def _check_data(fns: dict[str, jax.tree_util.Partial], images: np.ndarray, labels: np.ndarray,
                batch_size: int) -> int:
  """Checks shapes, dtypes, value ranges and the models' outputs before any expensive work.

  Returns:
    The batch size to use: `batch_size`, capped at the number of images.
  """
  _check_image_shape(images.shape, "images")
  if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be uint8 (0..255) or float in [0, 1], got dtype {images.dtype}.")
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise ValueError(f"labels must have shape [N] = [{images.shape[0]}] to match the images, got "
                     f"{labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}.")
  if images.shape[0] == 0:
    raise ValueError("no images to evaluate: the image set is empty.")
  _check_positive_int("batch_size", batch_size)
  batch_size = min(int(batch_size), int(images.shape[0]))
  if np.issubdtype(images.dtype, np.floating):
    lo, hi = float(images.min()), float(images.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
      raise ValueError(f"float images must lie in [0, 1], got values in [{lo}, {hi}]; rescale "
                       "(uint8 / 255) and move any normalisation inside logits_fn.")
  spec = jax.ShapeDtypeStruct((batch_size,) + images.shape[1:], jnp.float32)
  for role, fn in fns.items():
    out = jax.eval_shape(fn, spec)
    if not isinstance(out, jax.ShapeDtypeStruct) or len(
        out.shape) != 2 or out.shape[0] != batch_size:
      raise ValueError(f"logits_fns[{role!r}] must return logits [B, C], got "
                       f"{getattr(out, 'shape', type(out).__name__)} for a batch of {batch_size}.")
    if labels.min() < 0 or labels.max() >= out.shape[1]:
      raise ValueError(f"labels must lie in [0, {out.shape[1]}) for logits_fns[{role!r}], got "
                       f"[{labels.min()}, {labels.max()}].")
  return batch_size


def _device_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> list[tuple]:
  """Padded, masked batches (images, labels, example indices, mask), uploaded once and reused by
  every corruption and severity."""
  idx, masks = eval_batches(int(labels.shape[0]), batch_size)
  return [jax.device_put((images[i], labels[i].astype(np.int32), i, m)) for i, m in zip(idx, masks)]


def _count(fns, batches, key, level, name) -> dict[str, jax.Array]:
  totals = {role: jnp.zeros((), jnp.int32) for role in fns}
  for batch in batches:
    counts = _batch_correct(fns, *batch, key, level, name=name)
    totals = {role: totals[role] + counts[role] for role in fns}
  return totals


def _summarise(source: str, names: tuple[str, ...], severities: tuple[int, ...], roles,
               clean: dict[str, Any] | None, n_clean: int,
               counts: dict[str, dict[int, dict[str, Any]]], n: int) -> dict[str, Any]:
  """Turns the correct counts on the device into the result dict (one host transfer).

  `clean` holds the counts over `n_clean` clean images (None: not measured), `counts[name][s]`
  those over `n` images corrupted by `name` at severity `s`.
  """
  clean, counts = jax.device_get((clean, counts))
  models = {}
  for role in roles:
    per_corruption = {}
    for name in names:
      per_corruption[name] = [float(counts[name][s][role]) / n for s in severities]
    table = np.array([per_corruption[name] for name in names])
    models[role] = {
        "clean": None if clean is None else float(clean[role]) / n_clean,
        "mean": float(table.mean()),
        "per_corruption": per_corruption,
        "per_severity": [float(v) for v in table.mean(axis=0)],
    }
  return {
      "source": source,
      "corruptions": list(names),
      "severities": list(severities),
      "n": n,
      "models": models
  }


def corruption_accuracy(logits_fns: dict[str, Callable],
                        images: Any,
                        labels: Any,
                        *,
                        key: jax.Array,
                        corruptions: Sequence[str] = CORRUPTIONS,
                        severities: Sequence[int] = SEVERITIES,
                        batch_size: int = 250,
                        progress: Callable[[str], Any] | None = None) -> dict[str, Any]:
  """Accuracy of each model on the clean images and under each corruption and severity.

  The images are uploaded once as padded, masked batches; each batch is corrupted on the device
  and evaluated by every model in the same jitted call, so all models see the same corrupted
  images. Nothing retraces per batch or per severity: one program per corruption (plus the clean
  one). Corruption `name` at severity `s` draws example i's noise from
  `fold_in(fold_in(fold_in(key, CORRUPTIONS.index(name)), s), i)` (per example, as the
  correctness engine draws its attacks' starts: `engine.example_keys`), so a figure depends
  neither on `batch_size` nor on which other corruptions are evaluated.

  Args:
    logits_fns: role -> `x -> logits [B, C]` for float NHWC images in [0, 1] (e.g. a
      `jax.tree_util.Partial` over a model's variables, which does not recompile per model).
    images: [N, H, W, C] uint8 (0..255) or float in [0, 1], C = 1 or 3 (host or device array).
    labels: [N] integer labels.
    key: PRNG key for the noise corruptions.
    corruptions: names from `CORRUPTIONS`.
    severities: from `SEVERITIES`.
    batch_size: images per compiled batch (capped at N; the last batch is padded and masked); the
      figures do not depend on it.
    progress: optional callable, given a one-line message before each corruption.

  Returns:
    {"source": "computed", "corruptions": [...], "severities": [...], "n": N, "models": {role:
    {"clean": acc, "mean": mean over corruptions x severities, "per_corruption": {name: [acc per
    severity]}, "per_severity": [mean over corruptions]}}}, accuracies as fractions in [0, 1].

  Raises:
    ValueError: unknown corruptions or severities, bad shapes, dtypes or values of the images or
      labels, a non-positive batch size, or a logits function that does not return [B, C].
  """
  names, severities = _check_names(corruptions), _check_severities(severities)
  fns = _check_models(logits_fns)
  images, labels = np.asarray(images), np.asarray(labels)
  batch_size = _check_data(fns, images, labels, batch_size)
  n = int(labels.shape[0])
  batches = _device_batches(images, labels, batch_size)
  clean = _count(fns, batches, key, jnp.int32(0), None)
  counts = {}
  for j, name in enumerate(names):
    if progress is not None:
      progress(f"corruption {name} ({j + 1}/{len(names)}), severities {list(severities)}")
    name_key = jax.random.fold_in(key, CORRUPTIONS.index(name))
    counts[name] = {s: _count(fns, batches, name_key, jnp.int32(s - 1), name) for s in severities}
  return _summarise("computed", names, severities, fns, clean, n, counts, n)


# ---------------------------------------------------------------------------------------------
# CIFAR-10-C from TFDS


def _open_sources(data_dir: str | None, names: tuple[str, ...],
                  severities: tuple[int, ...]) -> dict[str, dict[int, Any]] | None:
  """TFDS data sources of the requested `cifar10_corrupted` configs, or None if any is missing."""
  tfds = import_tfds("CIFAR-10-C")
  sources, missing = {}, []
  for name in names:
    for s in severities:
      config = f"cifar10_corrupted/{TFDS_NAMES[name]}_{s}"
      try:
        source = tfds.data_source(config, split="test", data_dir=data_dir, download=False)
      except Exception as err:  # pylint: disable=broad-except  # TFDS raises many kinds.
        missing.append(f"{config} ({type(err).__name__})")
        continue
      sources.setdefault(name, {})[s] = source
  if missing:
    if sources:
      warnings.warn(
          f"cifar10_corrupted is only partly prepared in {data_dir or 'the TFDS default'}"
          f"; missing: {', '.join(missing)}. Pass corruptions=/severities= for the "
          "configs that are there, or prepare the rest (array_record format) with "
          "`tfds build cifar10_corrupted --data_dir=D` on a machine with network.",
          stacklevel=3)
    return None
  return sources


def load_cifar10_corrupted(
    data_dir: str | None,
    *,
    n: int | None = None,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES
) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] | None:
  """Reads the released CIFAR-10-C from TFDS's `cifar10_corrupted`, if it is prepared on disk.

  Never downloads: each config `cifar10_corrupted/<name>_<severity>` is opened with
  `tfds.data_source(..., download=False)` (array_record format, no TensorFlow needed). Our names
  map to TFDS's through `TFDS_NAMES` (TFDS has more corruptions than are computed here).

  Args:
    data_dir: the TFDS data dir; None uses TFDS's default (~/tensorflow_datasets or
      $TFDS_DATA_DIR).
    n: read only the first n test images of each config (None: all 10,000).
    corruptions: names from `CORRUPTIONS`.
    severities: from `SEVERITIES`.

  Returns:
    name -> severity -> (uint8 images [n, 32, 32, 3], int32 labels [n]); None when any requested
    config is not prepared there (a warning names the missing ones when some are present).

  Raises:
    ValueError: unknown corruptions or severities, or a non-positive n.
  """
  names, severities = _check_names(corruptions), _check_severities(severities)
  if n is not None:
    _check_positive_int("n", n)
  sources = _open_sources(data_dir, names, severities)
  if sources is None:
    return None
  return {name: {s: read_tfds_source(sources[name][s], n) for s in severities} for name in names}


def cifar10_corrupted_accuracy(
    logits_fns: dict[str, Callable],
    data_dir: str | None,
    *,
    n: int | None = None,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    batch_size: int = 250,
    progress: Callable[[str], Any] | None = None) -> dict[str, Any] | None:
  """Accuracy of each model on the released CIFAR-10-C (TFDS `cifar10_corrupted`), if prepared.

  Configs are read one at a time (all of them at once would take 1.2 GB), so memory stays at one
  config's images. The clean accuracy is that of the first n images of TFDS's `cifar10` test split
  when it is prepared in the same data dir (else None); the two data sets are stored separately, so
  for n < 10,000 these need not be the same images as the corrupted ones.

  Args:
    logits_fns: role -> `x -> logits [B, C]` for float NHWC images in [0, 1].
    data_dir: the TFDS data dir (None: TFDS's default).
    n: the first n images of each config (None: all 10,000).
    corruptions: names from `CORRUPTIONS`.
    severities: from `SEVERITIES`.
    batch_size: images per compiled batch.
    progress: optional callable, given a one-line message before each corruption.

  Returns:
    The dict of `corruption_accuracy` with "source": "tfds:cifar10_corrupted", or None when any
    requested config is not prepared.

  Raises:
    ValueError: unknown corruptions or severities, a non-positive n or batch size, or a logits
      function that does not return [B, C].
  """
  names, severities = _check_names(corruptions), _check_severities(severities)
  if n is not None:
    _check_positive_int("n", n)
  _check_positive_int("batch_size", batch_size)
  fns = _check_models(logits_fns)
  sources = _open_sources(data_dir, names, severities)
  if sources is None:
    return None

  def count(images, labels):
    size = _check_data(fns, images, labels, batch_size)
    # No corruption is computed here: the key and the level are unused.
    return _count(fns, _device_batches(images, labels, size), jax.random.key(0), jnp.int32(0), None)

  tfds = import_tfds("CIFAR-10-C")
  try:
    clean_source = tfds.data_source("cifar10", split="test", data_dir=data_dir, download=False)
  except Exception:  # pylint: disable=broad-except  # clean accuracy is optional here.
    clean_source = None
  clean, n_clean = None, 0
  if clean_source is not None:
    clean_images, clean_labels = read_tfds_source(clean_source, n)
    clean, n_clean = count(clean_images, clean_labels), int(clean_labels.shape[0])
  counts, n_corrupted = {}, 0
  for j, name in enumerate(names):
    if progress is not None:
      progress(f"cifar10_corrupted {name} ({j + 1}/{len(names)}), severities {list(severities)}")
    counts[name] = {}
    for s in severities:
      images, labels = read_tfds_source(sources[name][s], n)
      n_corrupted = int(labels.shape[0])
      counts[name][s] = count(images, labels)
  return _summarise("tfds:cifar10_corrupted", names, severities, fns, clean, n_clean, counts,
                    n_corrupted)


# ---------------------------------------------------------------------------------------------
# the analysis of the robustness report


def run(models: ModelSet,
        images: Any,
        labels: Any,
        *,
        key: jax.Array,
        batch_size: int = 250,
        progress: Callable[[str], Any] | None = None,
        cifar10c: bool = False,
        data_dir: str | None = None) -> dict[str, Any]:
  """The corruption analysis of `gen_jax.evaluation.report`: every model on the same images.

  With `cifar10c`, the released CIFAR-10-C is read from TFDS (`data_dir`) when it is prepared
  there, for the first N test images; otherwise (or when it is not prepared) the corruptions are
  computed on `images` (`corruption_accuracy`).
  """
  fns = models.logits_fns()
  result = None
  if cifar10c:
    result = cifar10_corrupted_accuracy(fns,
                                        data_dir,
                                        n=int(np.shape(labels)[0]),
                                        batch_size=batch_size,
                                        progress=progress)
  return result or corruption_accuracy(
      fns, images, labels, key=key, batch_size=batch_size, progress=progress)


def to_markdown(result: dict[str, Any]) -> str:
  """A markdown table of a `corruption_accuracy` / `cifar10_corrupted_accuracy` result.

  One row per model: clean accuracy, mean corruption accuracy, then one column per corruption
  (the mean over the evaluated severities), all in percent; a last line gives the source and n.

  Raises:
    ValueError: `result` lacks the keys of a corruption-accuracy result.
  """
  needed = ("source", "corruptions", "severities", "n", "models")
  if not isinstance(result, dict) or any(k not in result for k in needed):
    raise ValueError(f"to_markdown takes the dict of corruption_accuracy (keys {needed}), got "
                     f"{sorted(result) if isinstance(result, dict) else type(result).__name__}.")
  names = result["corruptions"]
  pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"
  lines = [
      "| model | clean | mean corruption acc | " + " | ".join(names) + " |",
      "|---|" + "---:|" * (2 + len(names)),
  ]
  for role, row in result["models"].items():
    cells = [pct(row["clean"]), pct(row["mean"])]
    cells += [pct(float(np.mean(row["per_corruption"][name]))) for name in names]
    lines.append(f"| {role} | " + " | ".join(cells) + " |")
  severities = ", ".join(str(s) for s in result["severities"])
  lines.append("")
  lines.append(f"Source: {result['source']}; n = {result['n']} images per corruption and severity; "
               f"accuracy in percent; each corruption column is the mean over severities "
               f"{severities}.")
  return "\n".join(lines) + "\n"
