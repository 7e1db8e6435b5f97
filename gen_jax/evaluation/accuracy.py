"""Exact clean and PGD accuracy of one or several models on a labelled image set.

The last batch is padded and masked, so every image counts once (no dropped remainder, no
average of per-batch means). Correct counts accumulate on the device; the host reads them once.

Data parallel (`sharding`): the batches are the same as on one device (the plan depends on the
batch size only), each padded with masked rows to a multiple of the device count, and every
process reads only its own rows of each (`parallel.global_batch`). Padding rows are appended
after the real ones, and JAX's random bits for the first rows of a shape do not depend on how
many rows follow (`jax_threefry_partitionable`, the default), so each image gets the same PGD
start on 1, 2 or 8 devices, or several hosts: the counts are identical.

Synopsis::

    results = evaluate_models({"natural": v_nat, "robust": v_rob, "global": v_mix}, images, labels,
                              model=model, key=key, eps=8 / 255, step_size=2 / 255, steps=20)
    results["global"]["pgd_acc"]
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gen_jax import attacks, parallel
from gen_jax.data import to_float
from gen_jax.data.batching import eval_batches, map_batches


@functools.partial(jax.jit, static_argnames=("model", "steps", "norm"))
def _batch_correct(variables, images, labels, mask, key, eps, step_size, *, model: nn.Module,
                   steps: int, norm: str):
  x = to_float(images)
  logits_fn = lambda z: model.apply(variables, z, train=False)
  clean = jnp.argmax(logits_fn(x), -1) == labels
  if steps > 0:
    x_adv = attacks.pgd(logits_fn,
                        x,
                        labels,
                        key=key,
                        eps=eps,
                        step_size=step_size,
                        steps=steps,
                        norm=norm)
    robust = jnp.argmax(logits_fn(x_adv), -1) == labels
  else:
    robust = clean
  return jnp.sum(clean & mask), jnp.sum(robust & mask)


@jax.jit
def _correct(logits_fn, x, y):
  return jnp.argmax(logits_fn(x), axis=-1) == y


def correct_predictions(logits_fn: Any, images: Any, labels: Any, batch_size: int) -> np.ndarray:
  """Whether `logits_fn` classifies each image right, as a host bool array [N].

  `logits_fn` is a `jax.tree_util.Partial` (or any pytree-callable) over float images in [0, 1];
  batches have one padded shape, so the jitted prediction compiles once per model architecture.
  """
  y = np.asarray(labels).astype(np.int32)
  return map_batches(functools.partial(_correct, logits_fn), (images, y),
                     batch_size=min(batch_size, len(y)))


def accuracy(logits_fn: Any, images: Any, labels: Any, batch_size: int) -> float:
  """Exact accuracy of `logits_fn` on `images` (see `correct_predictions`)."""
  return float(np.mean(correct_predictions(logits_fn, images, labels, batch_size)))


def evaluate_models(models: dict[str, Any],
                    images: np.ndarray,
                    labels: np.ndarray,
                    *,
                    model: nn.Module,
                    key: jax.Array,
                    eps: float,
                    step_size: float,
                    steps: int,
                    batch_size: int = 500,
                    norm: str = "linf",
                    sharding: Any = None) -> dict[str, dict[str, float]]:
  """Clean and PGD accuracy (random start, `steps` steps) of each model.

  Args:
    models: role -> linen variables, all of the architecture `model`.
    images: NHWC images, uint8 or floats in [0, 1] (host or device).
    labels: int labels.
    model: the linen module (evaluated in inference mode).
    key: PRNG key; batch i uses `fold_in(key, i)`, the same for every model.
    eps, step_size, steps, norm: the PGD attack (steps 0: clean accuracy only).
    batch_size: images per batch (the last one is padded and masked); the batches, and so
      the result, do not depend on the devices.
    sharding: optional sharding of the batches over a data-parallel mesh (e.g.
      `parallel.data_sharding(mesh)`, which may span several processes); `models` must then be
      placed on that mesh (replicated).

  Returns:
    role -> {"clean_acc", "pgd_acc"} as fractions in [0, 1].
  """
  n = int(labels.shape[0])
  if n == 0:
    raise ValueError("evaluate_models got no images: the evaluation split is empty.")
  batch_size = min(batch_size, n)
  width = batch_size  # rows per compiled batch: the batch, padded to a multiple of the devices
  if sharding is not None:
    width = -(-batch_size // sharding.mesh.size) * sharding.mesh.size
  labels = np.asarray(labels).astype(np.int32)
  totals = {role: [jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)] for role in models}
  batches, masks = eval_batches(n, batch_size)
  for i, (idx, mask) in enumerate(zip(batches, masks)):
    idx, mask = np.pad(idx, (0, width - batch_size)), np.pad(mask, (0, width - batch_size))
    if sharding is None:
      batch = (np.asarray(images[idx]), labels[idx], mask)
    else:
      batch = (*parallel.global_batch((images, labels), idx, sharding), *parallel.global_batch(
          (mask,), np.arange(width), sharding))
    batch_key = jax.random.fold_in(key, i)
    for role, variables in models.items():
      clean, robust = _batch_correct(variables,
                                     *batch,
                                     batch_key,
                                     jnp.float32(eps),
                                     jnp.float32(step_size),
                                     model=model,
                                     steps=steps,
                                     norm=norm)
      totals[role][0] += clean
      totals[role][1] += robust
  totals = jax.device_get(totals)  # (sorts the keys: keep the caller's order below)
  return {
      role: {
          "clean_acc": float(totals[role][0]) / n,
          "pgd_acc": float(totals[role][1]) / n
      } for role in models
  }
