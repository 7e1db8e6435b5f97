"""Image-folder source: the way a user brings their own images.

Layout::

    ROOT/train/<class>/*.png|*.jpg|*.jpeg     (extensions case-insensitive)
    ROOT/test/<class>/...                     (the same class folders as train)

Class names are the sorted sub-folder names of `train`; files are read in sorted path order, so the
arrays are the same on every run. Images in nested sub-folders of a class folder belong to that
class (as torchvision's ImageFolder reads them). Hidden entries (names starting with ".", such as
`.ipynb_checkpoints` or `.DS_Store`) and files with other extensions (README) are skipped, and a
warning counts them. Images are decoded with Pillow in a thread pool (Pillow releases the GIL while
decoding), to RGB, or to one grey channel when every image of both splits is greyscale; 16-bit
images are rescaled to 8 bits (x / 257), palette images expanded to their colours. A file with an
image extension that Pillow cannot decode stops the load with its path; a data set needs at least
two classes.

Synopsis::

    ds = load_image_folder("/data/inspection", image_size=32, max_per_class=1000)
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import pathlib

import numpy as np

from gen_jax.data.dataset import Dataset, first_per_class

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_GREY_MODES = ("1", "L", "LA")
# Pillow opens 16-bit greyscale PNG/TIFF files in these modes; "I" is 32-bit integer, which
# Pillow uses for 16-bit data in some versions and formats. Both are rescaled from 0..65535.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_CHUNK = 256

_LOG = logging.getLogger(__name__)


def _hidden(path: pathlib.Path) -> bool:
  return path.name.startswith(".")


def _class_files(folder: pathlib.Path) -> tuple[list[str], int]:
  """Image files under a class folder, nested ones included, sorted; and how many were skipped.

  Hidden files and folders (and what they contain) are skipped, as are non-image files.
  """
  files, skipped = [], 0
  for dirpath, dirnames, filenames in os.walk(folder):
    kept = sorted(d for d in dirnames if not d.startswith("."))
    skipped += len(dirnames) - len(kept)
    dirnames[:] = kept  # os.walk then never enters the hidden ones
    for name in filenames:
      if name.startswith(".") or pathlib.Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
        skipped += 1
      else:
        files.append(str(pathlib.Path(dirpath) / name))
  return sorted(files), skipped


def _list_split(
    root: pathlib.Path, split: str,
    class_names: tuple[str, ...] | None) -> tuple[list[str], list[int], tuple[str, ...]]:
  """Lists (paths, labels, class names) of one split, checking the layout."""
  split_dir = root / split
  if not split_dir.is_dir():
    raise ValueError(f"image folder {str(root)!r} has no {split!r} folder; expected the layout "
                     f"ROOT/{{train,test}}/<class>/*.png|jpg|jpeg (missing: {str(split_dir)!r}).")
  entries = list(split_dir.iterdir())
  found = tuple(sorted(p.name for p in entries if p.is_dir() and not _hidden(p)))
  skipped = sum(1 for p in entries if _hidden(p) or not p.is_dir())
  if not found:
    raise ValueError(f"{str(split_dir)!r} has no class sub-folders; expected "
                     f"{split}/<class>/*.png|jpg|jpeg.")
  if class_names is None and len(found) < 2:
    raise ValueError(f"{str(split_dir)!r} has one class folder ({found[0]!r}); a classifier needs "
                     "at least two classes: add a folder per class, e.g. train/cats and "
                     "train/dogs.")
  if class_names is not None and found != class_names:
    missing = sorted(set(class_names) - set(found))
    extra = sorted(set(found) - set(class_names))
    raise ValueError(f"the classes of {str(split_dir)!r} differ from those of train: missing "
                     f"{missing}, extra {extra}; both splits need the same class folders.")
  paths, labels = [], []
  for label, name in enumerate(found):
    files, skipped_here = _class_files(split_dir / name)
    skipped += skipped_here
    if not files:
      raise ValueError(f"class folder {str(split_dir / name)!r} has no images "
                       f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder.")
    paths.extend(files)
    labels.extend([label] * len(files))
  if skipped:
    _LOG.warning(
        "%s: skipped %d hidden or non-image entries (names starting with '.', or not "
        "%s).", split_dir, skipped, "/".join(IMAGE_EXTENSIONS))
  return paths, labels, found


def _decode(path: str, image_size: int | None) -> np.ndarray:
  """Decodes one file to (H, W) for greyscale or (H, W, 3) uint8, resized when asked."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as img:
      if img.mode in _WIDE_GREY_MODES:
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
      elif img.mode == "F":
        raise ValueError("32-bit floating-point images have no defined pixel range; save them "
                         "as 8- or 16-bit PNG")
      else:
        img = img.convert("L" if img.mode in _GREY_MODES else "RGB")
      if image_size is not None and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
      return np.asarray(img, dtype=np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
    # Pillow signals truncated or corrupt data as OSError/SyntaxError/ValueError.
    raise ValueError(f"cannot decode image file {path!r} ({type(err).__name__}: {err}); "
                     "replace or delete it.") from err


def _decode_chunk(paths: list[str], image_size: int | None) -> list[np.ndarray]:
  return [_decode(p, image_size) for p in paths]


def _decode_all(paths: list[str], image_size: int | None, num_threads: int) -> list[np.ndarray]:
  chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
  with concurrent.futures.ThreadPoolExecutor(max_workers=num_threads) as pool:
    decoded = pool.map(_decode_chunk, chunks, [image_size] * len(chunks))
    return [arr for chunk in decoded for arr in chunk]


def _stack(arrays: list[np.ndarray], paths: list[str], grey: bool) -> np.ndarray:
  """Stacks decoded images into NHWC, raising when their sizes differ."""
  first = arrays[0].shape[:2]
  for arr, path in zip(arrays, paths):
    if arr.shape[:2] != first:
      raise ValueError(
          f"images of different sizes: {paths[0]!r} is {first[0]}x{first[1]} but {path!r} is "
          f"{arr.shape[0]}x{arr.shape[1]} (height x width); pass image_size= to resize all "
          "images to image_size x image_size.")
  out = np.empty((len(arrays), *first, 1 if grey else 3), dtype=np.uint8)
  for i, arr in enumerate(arrays):
    # A grey image among colour ones is replicated over the channels, as Pillow's L->RGB does.
    out[i] = arr[..., None] if arr.ndim == 2 else arr
  return out


def class_interleaved_order(labels: np.ndarray) -> np.ndarray:
  """The order that takes the first example of each class, then the second of each, and so on.

  A folder lists its images class by class, so its first n test images would hold only the first
  classes; in this order every prefix holds each class within one example of equally (until a
  class runs out), with no random draw. Within a class the original order is kept.

  >>> class_interleaved_order(np.array([0, 0, 0, 1, 1, 2])).tolist()
  [0, 3, 5, 1, 4, 2]
  """
  labels = np.asarray(labels)
  rank = np.zeros(labels.shape[0], dtype=np.int64)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    rank[members] = np.arange(members.size)
  return np.lexsort((labels, rank))


def load_image_folder(root: str | os.PathLike,
                      *,
                      image_size: int | None = None,
                      max_per_class: int | None = None,
                      max_test_per_class: int | None = None,
                      num_threads: int | None = None) -> Dataset:
  """Loads `ROOT/{train,test}/<class>/*.{png,jpg,jpeg}` into a `Dataset` named "folder".

  Args:
    root: the folder holding `train/` and `test/`.
    image_size: resize every image to image_size x image_size (Pillow bilinear). Without it all
      images must already have the same size.
    max_per_class: keep only the first N files (sorted order) of each class of train; handy for
      CPU pilots. Files beyond it are never decoded. None keeps all.
    max_test_per_class: the same for test.
    num_threads: decoding threads; defaults to 4 per CPU core (at most 32).

  Returns:
    A `Dataset` with uint8 images of 3 channels, or 1 when every image is greyscale. The training
    split is in folder order (class by class, files sorted); the test split is interleaved by
    class (`class_interleaved_order`), so that the first n test images, which quick evaluations
    use (`--n`, the periodic test figure of training), hold every class equally.

  Raises:
    ValueError: a missing root or split folder, a split without class folders, test classes that
      differ from train's, a class folder without images, a file that cannot be decoded (its path),
      images of different sizes without `image_size`, a bad `image_size`.
  """
  if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or
                                 image_size < 1):
    raise ValueError(f"image_size must be a positive int or None, got {image_size!r}.")
  root = pathlib.Path(root) if root is not None else None
  if root is None or not root.is_dir():
    raise ValueError(f"image folder root {str(root)!r} does not exist or is not a directory; pass "
                     "data_dir=ROOT laid out as ROOT/{train,test}/<class>/*.png|jpg|jpeg.")
  if num_threads is None:
    num_threads = min(32, 4 * (os.cpu_count() or 1))
  train_paths, train_labels, class_names = _list_split(root, "train", None)
  test_paths, test_labels, _ = _list_split(root, "test", class_names)
  train_keep = first_per_class(np.asarray(train_labels), max_per_class)
  test_keep = first_per_class(np.asarray(test_labels), max_test_per_class)
  train_paths = [train_paths[i] for i in train_keep]
  test_keep = test_keep[class_interleaved_order(np.asarray(test_labels)[test_keep])]
  test_paths = [test_paths[i] for i in test_keep]
  paths = train_paths + test_paths
  arrays = _decode_all(paths, image_size, num_threads)
  grey = all(arr.ndim == 2 for arr in arrays)
  images = _stack(arrays, paths, grey)
  n_train = len(train_paths)
  return Dataset(name="folder",
                 train_images=images[:n_train],
                 train_labels=np.asarray(train_labels, dtype=np.int32)[train_keep],
                 test_images=images[n_train:],
                 test_labels=np.asarray(test_labels, dtype=np.int32)[test_keep],
                 class_names=class_names)
