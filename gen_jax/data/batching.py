"""Padded, masked evaluation batches: the project's one way to cut a data set into batches.

`eval_batches` says which rows form each batch, so every example is evaluated exactly once with
one compiled batch shape; `map_batches` runs a function over that plan and keeps the real rows
(attacks, predictions, distances all go through it). Training batches are not cut here: the
training set stays on the host, the loop slices each global batch from the epoch's permutation
and every process reads only its rows of it (`gen_jax.parallel.global_batch`), which
`gen_jax.training.steps.make_train_step` takes as arguments.

Synopsis::

    idx, mask = eval_batches(len(ds.test_labels), 500)
    correct = sum((predict(ds.test_images[i]) == ds.test_labels[i]) * m for i, m in zip(idx, mask))
    x_adv = map_batches(lambda xb, yb, k: attack(xb, yb, key=k), (x, y), batch_size=250, key=key)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def _check(num_examples, batch_size) -> None:
  for arg, value in (("num_examples", num_examples), ("batch_size", batch_size)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{arg} must be a positive int, got {value!r}.")


def eval_batches(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices and mask that cover every example exactly once in fixed-size batches.

  The last batch is padded with index 0 and mask False, so evaluation sums
  `mask * correct` and divides by `num_examples`: exact, with one compiled batch shape.

  Args:
    num_examples: size of the split.
    batch_size: examples per batch.

  Returns:
    `(indices, mask)`: int32 and bool numpy arrays of shape (ceil(num_examples / batch_size),
    batch_size), in the original order.

  Raises:
    ValueError: non-positive sizes.
  """
  _check(num_examples, batch_size)
  steps = -(-num_examples // batch_size)
  flat = np.arange(steps * batch_size, dtype=np.int32)
  mask = flat < num_examples
  return np.where(mask, flat, 0).reshape(steps, batch_size), mask.reshape(steps, batch_size)


def map_batches(fn: Callable[..., Any],
                arrays: Sequence[Any],
                *,
                batch_size: int,
                key: jax.Array | None = None) -> np.ndarray:
  """Applies `fn` to fixed-size batches of `arrays` and concatenates its per-example outputs.

  The plan is `eval_batches`: every example exactly once, the last batch padded (with example 0)
  to `batch_size`, so a jitted `fn` compiles once; padded rows are dropped from the output. (Pass
  `min(batch_size, N)` to give a small set one unpadded batch of its own size.)

  Args:
    fn: `fn(*batch) -> [b, ...]`, or `fn(*batch, key_i)` when `key` is given, with
      `key_i = jax.random.fold_in(key, i)` for batch i.
    arrays: host or device arrays sharing their leading dimension N.
    batch_size: examples per call.
    key: optional PRNG key.

  Returns:
    The outputs of all batches in the original order, as a numpy array [N, ...].

  Raises:
    ValueError: non-positive sizes, or arrays of different lengths.
  """
  arrays = [np.asarray(a) for a in arrays]
  n = arrays[0].shape[0]
  if any(a.shape[0] != n for a in arrays):
    raise ValueError(f"the arrays must share their first dimension, got "
                     f"{[a.shape for a in arrays]}.")
  indices, masks = eval_batches(n, batch_size)
  outputs = []
  for i, (idx, mask) in enumerate(zip(indices, masks)):
    batch = [a[idx] for a in arrays]
    if key is not None:
      batch.append(jax.random.fold_in(key, i))
    outputs.append(np.asarray(fn(*batch))[mask])
  return np.concatenate(outputs)
