"""The in-memory `Dataset` container, its validating constructor and the stratified split.

Every source (`load_dataset`) returns a `Dataset`: uint8 NHWC images and int32 labels held in host
memory as numpy arrays, plus the class names. Data stays on the host until a training loop puts a
batch on the device; augmentation then runs there (`gen_jax.data.augment`).

Synopsis::

    ds = from_arrays(x_train, y_train, x_test, y_test, class_names=("cat", "dog"))
    ds.num_classes, ds.image_shape                    # 2, (32, 32, 3)
    tx, ty, vx, vy = train_validation_split(ds.train_images, ds.train_labels,
                                            validation_size=0.1, seed=0)
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A classification data set held in host memory.

  Construct it through `from_arrays` (which converts and validates) or `load_dataset`.

  Attributes:
    name: the data set's name (e.g. "cifar10", "digits", "folder", "arrays").
    train_images: uint8 array of shape (N, H, W, C).
    train_labels: int32 array of shape (N,), values in [0, num_classes).
    test_images: uint8 array of shape (M, H, W, C), same (H, W, C) as train.
    test_labels: int32 array of shape (M,).
    class_names: one name per class; label i is `class_names[i]`.
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]

  def __post_init__(self):
    _validate(self.train_images, self.train_labels, self.test_images, self.test_labels,
              self.class_names)

  @property
  def num_classes(self) -> int:
    """The number of classes, `len(class_names)`."""
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """The (height, width, channels) of every image."""
    return tuple(int(d) for d in self.train_images.shape[1:])

  def __repr__(self) -> str:
    return (f"Dataset(name={self.name!r}, train={self.train_images.shape}, "
            f"test={self.test_images.shape}, num_classes={self.num_classes})")


def _validate(train_images, train_labels, test_images, test_labels, class_names) -> None:
  """Raises TypeError/ValueError naming the offending array; see `from_arrays`."""
  if not isinstance(class_names, tuple) or not all(isinstance(c, str) for c in class_names):
    raise TypeError(f"class_names must be a tuple of str, got {class_names!r}.")
  if not class_names:
    raise ValueError("class_names is empty: a data set needs at least one class.")
  if len(set(class_names)) != len(class_names):
    raise ValueError(f"class_names has duplicates: {class_names!r}.")
  for split, images, labels in (("train", train_images, train_labels), ("test", test_images,
                                                                        test_labels)):
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
      raise TypeError(
          f"{split}_images must be a uint8 numpy array (values 0..255), got "
          f"{type(images).__name__} of dtype {getattr(images, 'dtype', None)}; convert float "
          "images in [0, 1] with (x * 255).round().astype(np.uint8).")
    if images.ndim != 4:
      raise ValueError(f"{split}_images must be NHWC (rank 4), got shape {images.shape}; add a "
                       "channel axis to greyscale images with x[..., None].")
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int32:
      raise TypeError(f"{split}_labels must be an int32 numpy array, got "
                      f"{type(labels).__name__} of dtype {getattr(labels, 'dtype', None)}.")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
      raise ValueError(f"{split}_labels must have shape ({images.shape[0]},) to match "
                       f"{split}_images {images.shape}, got {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
      raise ValueError(
          f"{split}_labels must lie in [0, {len(class_names)}) for {len(class_names)} classes, "
          f"got values in [{labels.min()}, {labels.max()}].")
  if train_images.shape[0] == 0:
    raise ValueError("train_images is empty.")
  if train_images.shape[1:] != test_images.shape[1:]:
    raise ValueError(f"train and test images differ in shape: {train_images.shape[1:]} vs "
                     f"{test_images.shape[1:]} (H, W, C); resize one of them.")


def from_arrays(train_images,
                train_labels,
                test_images,
                test_labels,
                class_names: Sequence[str] | None = None,
                name: str = "arrays") -> Dataset:
  """Builds a validated `Dataset` from array-likes (numpy or JAX arrays, lists).

  Args:
    train_images: uint8 images, shape (N, H, W, C).
    train_labels: integer labels, shape (N,).
    test_images: uint8 images, shape (M, H, W, C).
    test_labels: integer labels, shape (M,).
    class_names: one name per class. Defaults to "0", "1", ... up to the largest label present.
    name: the data set's name, used e.g. by `augment.flip_default`.

  Returns:
    A `Dataset` with numpy arrays (labels cast to int32).

  Raises:
    TypeError: images that are not uint8, labels that are not integers.
    ValueError: wrong ranks, mismatched lengths or image shapes, labels outside
      [0, len(class_names)).
  """
  arrays = {}
  for key, value in (("train_images", train_images), ("test_images", test_images),
                     ("train_labels", train_labels), ("test_labels", test_labels)):
    arr = np.asarray(value)
    if key.endswith("labels"):
      if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{key} must hold integers, got dtype {arr.dtype}.")
      if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{key} has values outside the int32 range.")
      arr = arr.astype(np.int32)
    arrays[key] = arr
  if class_names is None:
    top = max((int(a.max()) for k, a in arrays.items() if k.endswith("labels") and a.size),
              default=0)
    class_names = tuple(str(i) for i in range(top + 1))
  elif isinstance(class_names, str):
    raise TypeError("class_names must be a sequence of names, not a single str.")
  return Dataset(name=name, class_names=tuple(class_names), **arrays)


def first_per_class(labels: np.ndarray, max_per_class: int | None) -> np.ndarray:
  """Indices of the first `max_per_class` examples of each class, in their original order.

  Args:
    labels: integer labels, shape (N,).
    max_per_class: how many to keep per class; None keeps everything.

  Returns:
    Sorted int64 indices into `labels`.

  Raises:
    ValueError: `max_per_class` is not a positive int.
  """
  labels = np.asarray(labels)
  if max_per_class is None:
    return np.arange(labels.shape[0])
  if isinstance(max_per_class, bool) or not isinstance(max_per_class, (int, np.integer)) or \
      max_per_class < 1:
    raise ValueError(f"max_per_class must be a positive int or None, got {max_per_class!r}.")
  keep = np.zeros(labels.shape[0], dtype=bool)
  for c in np.unique(labels):
    keep[np.flatnonzero(labels == c)[:max_per_class]] = True
  return np.flatnonzero(keep)


def train_validation_split(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    validation_size: int | float,
    seed: int,
    class_names: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Splits a training set into train and validation parts, stratified by class.

  Used for model selection on held-out training data instead of the test set. The same `seed`
  always gives the same split; each part keeps the original relative order of its examples.

  Args:
    images: array of shape (N, ...).
    labels: integer labels, shape (N,).
    validation_size: an int count of validation examples, or a float fraction in [0, 1).
      0 returns an empty validation split (shape (0, ...)).
    seed: seed of the split's shuffle.
    class_names: the classes' names by label, to name a class in an error (else its index).

  Returns:
    `(train_images, train_labels, val_images, val_labels)`.

  Raises:
    ValueError: mismatched lengths, a size outside [0, N), or a size too small (or too large) to
      give every class at least one example on each side.
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  n = labels.shape[0]
  if labels.ndim != 1 or images.shape[0] != n:
    raise ValueError(f"images {images.shape} and labels {labels.shape} must have the same first "
                     "dimension, and labels must be rank 1.")
  if isinstance(validation_size, bool) or not isinstance(validation_size,
                                                         (int, float, np.integer, np.floating)):
    raise TypeError(f"validation_size must be an int count or a float fraction, got "
                    f"{validation_size!r}.")
  if isinstance(validation_size, (float, np.floating)):
    if not 0.0 <= validation_size < 1.0:
      raise ValueError(f"a float validation_size is a fraction in [0, 1), got {validation_size}.")
    count = int(round(validation_size * n))
  else:
    count = int(validation_size)
  if not 0 <= count < n:
    raise ValueError(f"validation_size {validation_size!r} must give between 0 and {n - 1} "
                     f"examples out of {n}.")
  if count == 0:
    return images, labels, images[:0], labels[:0]
  classes, counts = np.unique(labels, return_counts=True)
  if count < classes.size or n - count < classes.size:
    raise ValueError(f"validation_size {validation_size!r} gives {count} validation and "
                     f"{n - count} training examples; a stratified split of {classes.size} "
                     "classes needs at least one per class on each side.")
  if counts.min() < 2:
    label = int(classes[counts.argmin()])
    name = (f"'{class_names[label]}' (label {label})"
            if class_names is not None and label < len(class_names) else str(label))
    raise ValueError(f"class {name} has a single training example; a stratified validation split "
                     "needs at least two per class. Add images to that class, remove it, or "
                     "train with --validation-size 0 (no held-out model selection).")
  train_idx, val_idx = stratified_split_indices(labels, count, seed)
  return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


def _quotas(class_counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
  """Per-class draws summing to `draws`, proportional to `class_counts`: the floors first, then
  one more for the classes of the largest remainders, ties broken at random by `rng`."""
  exact = class_counts / class_counts.sum() * draws
  quotas = np.floor(exact)
  missing = int(draws - quotas.sum())
  remainder = exact - quotas
  for value in np.sort(np.unique(remainder))[::-1]:
    if missing <= 0:
      break
    tied = np.flatnonzero(remainder == value)
    chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
    quotas[chosen] += 1
    missing -= len(chosen)
  return quotas.astype(int)


def stratified_split_indices(labels: np.ndarray, count: int,
                             seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Sorted (train, validation) indices of a stratified split with `count` validation examples.

  The same split as scikit-learn's `train_test_split(..., test_size=count, stratify=labels,
  random_state=seed)` (its `StratifiedShuffleSplit` rounding of per-class quotas and its order of
  random draws; `tests/test_data.py` checks the equality), without importing scikit-learn, which
  would add about 1.5 s (SciPy and more) to the start of every program. Having it here also keeps
  the splits of existing runs fixed whatever scikit-learn version is installed.
  """
  _, inverse, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
  inverse = inverse.reshape(-1)
  members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(class_counts)[:-1])
  rng = np.random.RandomState(seed)
  train_quota = _quotas(class_counts, len(inverse) - count, rng)
  val_quota = _quotas(class_counts - train_quota, count, rng)
  train, val = [], []
  for idx, size, n_train, n_val in zip(members, class_counts, train_quota, val_quota):
    shuffled = idx[rng.permutation(size)]
    train.append(shuffled[:n_train])
    val.append(shuffled[n_train:n_train + n_val])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
