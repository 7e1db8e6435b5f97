"""Batch index plans: shuffled training batches and padded, masked evaluation batches.

The arrays stay where they are (host numpy or device); these functions only say which rows form
each batch, so a loop gathers `images[idx]` and the same key always gives the same batches.

Synopsis::

    idx = epoch_batches(jax.random.fold_in(key, epoch), len(ds.train_labels), 128)
    for b in idx: x, y = ds.train_images[b], ds.train_labels[b]        # full batches only
    idx, mask = eval_batches(len(ds.test_labels), 500)
    correct = sum((predict(ds.test_images[i]) == ds.test_labels[i]) * m for i, m in zip(idx, mask))
"""
from __future__ import annotations

import jax
import numpy as np


def _check(num_examples, batch_size) -> None:
  for arg, value in (("num_examples", num_examples), ("batch_size", batch_size)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{arg} must be a positive int, got {value!r}.")


def epoch_batches(key: jax.Array, num_examples: int, batch_size: int) -> np.ndarray:
  """Indices of one shuffled epoch, as full batches (the remainder is dropped).

  Every example appears at most once; the `num_examples % batch_size` left over after the
  shuffle are dropped, so every batch has the same shape and the step compiles once.

  Args:
    key: PRNG key of the shuffle (fold the epoch in for a new order each epoch).
    num_examples: size of the split.
    batch_size: examples per batch.

  Returns:
    int32 numpy array of shape (num_examples // batch_size, batch_size).

  Raises:
    ValueError: non-positive sizes, or `batch_size > num_examples` (no full batch).
  """
  _check(num_examples, batch_size)
  if batch_size > num_examples:
    raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples: not one full "
                     "batch; lower batch_size.")
  perm = np.asarray(jax.random.permutation(key, num_examples)).astype(np.int32)
  steps = num_examples // batch_size
  return perm[:steps * batch_size].reshape(steps, batch_size)


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
