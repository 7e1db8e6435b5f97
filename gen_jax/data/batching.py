"""Batch index plans: padded, masked evaluation batches.

The arrays stay where they are; `eval_batches` only says which rows form each batch, so every
example is evaluated exactly once with one compiled batch shape. (Training batches are drawn on
the device from a permutation, in `gen_jax.training.loop`.)

Synopsis::

    idx, mask = eval_batches(len(ds.test_labels), 500)
    correct = sum((predict(ds.test_images[i]) == ds.test_labels[i]) * m for i, m in zip(idx, mask))
"""
from __future__ import annotations

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
