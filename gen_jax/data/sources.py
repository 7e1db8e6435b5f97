"""`load_dataset`, the one entry point to every data source.

Sources:
  * "digits": scikit-learn's handwritten digits (1,797 8x8 grey images), the embedded default that
    needs no network; scaled to 0..255 and upsampled by pixel repetition to 16x16 (or another
    multiple of 8), with a fixed stratified 80/20 train/test split.
  * "cifar10", "cifar100", "svhn_cropped" (alias "svhn"): TFDS, prepared on first use into its data
    dir and read through `tfds.data_source` (array_record, no TensorFlow needed). TFDS is imported
    only when one of these is asked for.
  * "folder": `data_dir` laid out as ROOT/{train,test}/<class>/*.png|jpg|jpeg (see
    `gen_jax.data.folder`).

Synopsis::

    ds = load_dataset("digits")                                  # (1438, 16, 16, 1) train
    ds = load_dataset("cifar10", data_dir="/data/tfds")
    ds = load_dataset("folder", data_dir="/data/inspection", image_size=32, max_per_class=1000)
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import socket
from typing import Any

import numpy as np

from gen_jax.data.dataset import Dataset, first_per_class, train_validation_split
from gen_jax.data.folder import load_image_folder

# Name given to `load_dataset` -> TFDS builder name.
_TFDS_NAMES = {
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "svhn_cropped": "svhn_cropped",
    "svhn": "svhn_cropped"
}
# Where TFDS downloads each data set from (checked before a download, which retries for minutes).
_DOWNLOAD_HOSTS = {
    "cifar10": "www.cs.toronto.edu",
    "cifar100": "www.cs.toronto.edu",
    "svhn_cropped": "ufldl.stanford.edu",
}


def _reachable(host: str, timeout: float = 5.0) -> bool:
  """Whether a TCP connection to `host`:443 opens within `timeout` seconds."""
  try:
    with socket.create_connection((host, 443), timeout=timeout):
      return True
  except OSError:
    return False


DATASET_NAMES = ("digits", "cifar10", "cifar100", "svhn_cropped", "svhn", "folder")

DIGITS_IMAGE_SIZE = 16
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def _check_image_size(image_size) -> None:
  if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or
                                 image_size < 1):
    raise ValueError(f"image_size must be a positive int or None, got {image_size!r}.")


def _resize(images: np.ndarray, image_size: int) -> np.ndarray:
  """Resizes a uint8 NHWC batch to image_size x image_size with Pillow bilinear."""
  if images.shape[1:3] == (image_size, image_size):
    return images
  from PIL import Image  # pylint: disable=import-outside-toplevel
  out = np.empty((images.shape[0], image_size, image_size, images.shape[3]), dtype=np.uint8)
  for i, img in enumerate(images):
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    pil = pil.resize((image_size, image_size), Image.Resampling.BILINEAR)
    out[i] = np.asarray(pil).reshape(out.shape[1:])
  return out


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits as (float images [1797, 8, 8] with values 0..16, int32 labels).

  Read from the data file that scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`, rows of
  64 pixels and the label), located without importing scikit-learn: the import pulls in SciPy
  and costs about 1.5 s at the start of every program. Falls back to
  `sklearn.datasets.load_digits` where the file is not at that place.
  """
  spec = importlib.util.find_spec("sklearn")
  locations = list(spec.submodule_search_locations or ()) if spec else []
  for location in locations:
    path = os.path.join(location, "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
      rows = np.loadtxt(path, delimiter=",")
      return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int32)
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  raw = datasets.load_digits()
  return raw.images, raw.target.astype(np.int32)


def load_digits(image_size: int | None = None) -> Dataset:
  """scikit-learn's handwritten digits as a `Dataset` named "digits" (no network).

  Args:
    image_size: a positive multiple of 8 (default 16); each 8x8 pixel is repeated
      image_size // 8 times along both axes, which keeps the images exact.

  Returns:
    1,438 train and 359 test images of shape (image_size, image_size, 1), classes "0".."9"; the
    split is stratified and fixed (seed 0), so every run sees the same one.

  Raises:
    ValueError: `image_size` is not a positive multiple of 8.
  """
  size = DIGITS_IMAGE_SIZE if image_size is None else image_size
  if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size % 8:
    raise ValueError(f"digits are 8x8 and upsampled by pixel repetition: image_size must be a "
                     f"positive multiple of 8 (8, 16, 24, 32, ...), got {image_size!r}.")
  pixels, labels = _digits_arrays()
  # Values are 0..16; 255/16 maps 16 to exactly 255.
  images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)
  factor = size // 8
  images = np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)[..., None]
  train_x, train_y, test_x, test_y = train_validation_split(images,
                                                            labels,
                                                            validation_size=DIGITS_TEST_FRACTION,
                                                            seed=DIGITS_SPLIT_SEED)
  return Dataset(name="digits",
                 train_images=train_x,
                 train_labels=train_y,
                 test_images=test_x,
                 test_labels=test_y,
                 class_names=tuple(str(i) for i in range(10)))


def read_tfds_source(source: Any, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads the first `n` examples (all if None) of a TFDS data source: (uint8 images, int32 labels).

  The project's one TFDS reader (training sets here, CIFAR-10-C in `evaluation.corruptions`).
  Reads index by index in threads: `__getitems__` is broken under `tfds.testing.mock_data`
  (TFDS 4.9.10), and threads overlap the per-record PNG decoding anyway.

  Raises:
    ValueError: the source (or its first n) is empty.
  """
  count = len(source) if n is None else min(n, len(source))
  if count == 0:
    raise ValueError("the TFDS split is empty.")

  def read_chunk(start):
    examples = [source[i] for i in range(start, min(start + 1024, count))]
    return ([np.asarray(ex["image"], dtype=np.uint8) for ex in examples],
            [int(ex["label"]) for ex in examples])

  images, labels = [], []
  num_threads = min(16, 2 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(max_workers=num_threads) as pool:
    for chunk_images, chunk_labels in pool.map(read_chunk, range(0, count, 1024)):
      images.extend(chunk_images)
      labels.extend(chunk_labels)
  return np.stack(images), np.asarray(labels, dtype=np.int32)


def import_tfds(what: str) -> Any:
  """tensorflow_datasets, imported on first use; a clear message where it is not installed.

  GPU/TPU images often lack it and the main job does not need it (digits and image folders).
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  # heavy, lazy
  except ImportError as error:
    raise RuntimeError(f"{what} is read through tensorflow-datasets, which is not installed "
                       f"({error}). Install it with `pip install -e \".[tfds]\"` (or "
                       "`pip install tensorflow-datasets`), or use an image folder: "
                       "--dataset folder --data-dir ROOT.") from None
  return tfds


def load_tfds(name: str, *, data_dir: str | None = None, image_size: int | None = None) -> Dataset:
  """Loads a TFDS image classification data set through `tfds.data_source` (no TensorFlow).

  TFDS downloads and prepares the data on first use into `data_dir` (default: TFDS's own,
  ~/tensorflow_datasets or $TFDS_DATA_DIR); later calls read the prepared array_record files.

  Args:
    name: "cifar10", "cifar100", "svhn_cropped" or "svhn".
    data_dir: TFDS data dir; None uses TFDS's default.
    image_size: resize to image_size x image_size (Pillow bilinear); None keeps 32x32.

  Returns:
    A `Dataset` named after the TFDS builder, with its train and test splits.

  Raises:
    ValueError: an unknown name.
    RuntimeError: the data set is not prepared and cannot be downloaded (e.g. no network); the
      message says how to prepare it elsewhere.
  """
  if name not in _TFDS_NAMES:
    raise ValueError(f"unknown TFDS data set {name!r}; known: {sorted(_TFDS_NAMES)}.")
  _check_image_size(image_size)
  tfds_name = _TFDS_NAMES[name]
  tfds = import_tfds(f"the {name!r} data set")
  try:
    try:  # A prepared copy needs no network: read it without TFDS's download machinery.
      train_src, test_src = tfds.data_source(tfds_name,
                                             split=["train", "test"],
                                             data_dir=data_dir,
                                             download=False)
    except Exception:  # pylint: disable=broad-except  # not prepared there (TFDS's many kinds)
      host = _DOWNLOAD_HOSTS[tfds_name]
      if not _reachable(host):
        # TFDS would retry the download for minutes before failing; say it now.
        raise ConnectionError(f"{tfds_name} is not prepared there and its download host {host} "
                              "cannot be reached") from None
      train_src, test_src = tfds.data_source(tfds_name,
                                             split=["train", "test"],
                                             data_dir=data_dir,
                                             download=True)
  except Exception as err:  # pylint: disable=broad-except  # TFDS raises many kinds; re-raised.
    where = data_dir or "TFDS's default data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    # TFDS 4.9.10's CIFAR and SVHN builders read the downloads through tf.io.gfile (SVHN also
    # through scipy), and its download manager needs importlib_resources: preparing needs them,
    # reading a prepared copy through the data source does not.
    hint = ""
    if isinstance(err, ImportError):
      hint = (f" Preparing needs extra packages on the preparing machine: "
              f"pip install tensorflow-cpu importlib_resources scipy (missing: {err.name}).")
    raise RuntimeError(
        f"could not load or prepare TFDS data set {tfds_name!r} in {where} "
        f"({type(err).__name__}: {err}).{hint} To use it without network here, prepare it on a "
        f"machine with network (and tensorflow-cpu, importlib_resources, scipy installed):\n"
        f"  python -c \"import tensorflow_datasets as tfds; "
        f"tfds.data_source('{tfds_name}', data_dir='D')\"\n"
        f"  (or: tfds build {tfds_name} --data_dir=D)\n"
        f"then copy D here and pass --data-dir D (data_dir=D).") from err
  train_x, train_y = read_tfds_source(train_src)
  test_x, test_y = read_tfds_source(test_src)
  if image_size is not None:
    train_x, test_x = _resize(train_x, image_size), _resize(test_x, image_size)
  names = getattr(train_src.dataset_info.features["label"], "names", None)
  num_classes = train_src.dataset_info.features["label"].num_classes
  class_names = tuple(names) if names else tuple(str(i) for i in range(num_classes))
  return Dataset(name=tfds_name,
                 train_images=train_x,
                 train_labels=train_y,
                 test_images=test_x,
                 test_labels=test_y,
                 class_names=class_names)


def load_dataset(name: str,
                 *,
                 data_dir: str | None = None,
                 image_size: int | None = None,
                 max_per_class: int | None = None,
                 max_test_per_class: int | None = None) -> Dataset:
  """Loads a data set by name into host memory: uint8 NHWC images, int32 labels, class names.

  Args:
    name: one of `DATASET_NAMES`: "digits" (embedded, no network), "cifar10", "cifar100",
      "svhn_cropped" (alias "svhn"), or "folder".
    data_dir: for TFDS sets, the TFDS data dir (None: TFDS's default); for "folder", the root
      holding train/ and test/ (required); ignored by "digits".
    image_size: the square output size. "digits": a multiple of 8 (default 16, pixel
      repetition); TFDS and folder: Pillow bilinear resize (default: keep the native size).
    max_per_class: keep only the first N examples of each class of the train split (in the
      source's order, so deterministic); for CPU pilots. The test split is left whole.
    max_test_per_class: the same for the test split.

  Returns:
    A `Dataset`.

  Raises:
    ValueError: an unknown name (the message lists `DATASET_NAMES`), "folder" without data_dir,
      bad sizes, or any folder-layout/image problem (see `load_image_folder`).
    RuntimeError: a TFDS set that is neither prepared nor downloadable.
  """
  if not isinstance(name, str) or name not in DATASET_NAMES:
    raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(DATASET_NAMES)}.")
  _check_image_size(image_size)
  for arg, value in (("max_per_class", max_per_class), ("max_test_per_class", max_test_per_class)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
      raise ValueError(f"{arg} must be a positive int or None, got {value!r}.")
  if name == "folder":
    if data_dir is None:
      raise ValueError("the 'folder' data set needs data_dir=ROOT (--data-dir ROOT), laid out as "
                       "ROOT/{train,test}/<class>/*.png|jpg|jpeg.")
    # The folder loader applies the caps before decoding, so skipped files cost nothing.
    return load_image_folder(data_dir,
                             image_size=image_size,
                             max_per_class=max_per_class,
                             max_test_per_class=max_test_per_class)
  if name == "digits":
    ds = load_digits(image_size)
  else:
    ds = load_tfds(name, data_dir=data_dir, image_size=image_size)
  if max_per_class is None and max_test_per_class is None:
    return ds
  train_keep = first_per_class(ds.train_labels, max_per_class)
  test_keep = first_per_class(ds.test_labels, max_test_per_class)
  return Dataset(name=ds.name,
                 train_images=ds.train_images[train_keep],
                 train_labels=ds.train_labels[train_keep],
                 test_images=ds.test_images[test_keep],
                 test_labels=ds.test_labels[test_keep],
                 class_names=ds.class_names)
