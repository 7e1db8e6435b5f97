"""gen_jax.data: data sources -> uint8 arrays in host memory, and on-device augmentation.

Owns the `Dataset` container, `load_dataset` (the embedded "digits" default, TFDS "cifar10" /
"cifar100" / "svhn_cropped", and image folders), the stratified train/validation split used for
model selection, the padded evaluation batch plan (`eval_batches`) and the JAX augmentation
(`augment_batch`, `to_float`). Importing this package
does not import TensorFlow or TFDS; `load_dataset` imports TFDS only for the TFDS sets.

Synopsis::

    from gen_jax import data
    ds = data.load_dataset("digits")                      # or "cifar10", data_dir=...
    tx, ty, vx, vy = data.train_validation_split(ds.train_images, ds.train_labels,
                                                 validation_size=0.1, seed=0)
    x = data.augment_batch(key, tx[:128], pad=4, flip=data.flip_default(ds.name))
"""
from gen_jax.data.augment import DEFAULT_FLIP, augment_batch, flip_default, to_float
from gen_jax.data.batching import eval_batches, map_batches
from gen_jax.data.dataset import Dataset, first_per_class, from_arrays, train_validation_split
from gen_jax.data.folder import IMAGE_EXTENSIONS, load_image_folder
from gen_jax.data.sources import (DATASET_NAMES, load_dataset, load_digits, load_tfds,
                                  read_tfds_source)

__all__ = [
    "DATASET_NAMES", "DEFAULT_FLIP", "Dataset", "IMAGE_EXTENSIONS", "augment_batch", "eval_batches",
    "map_batches", "read_tfds_source", "first_per_class", "flip_default", "from_arrays",
    "load_dataset", "load_digits", "load_image_folder", "load_tfds", "to_float",
    "train_validation_split"
]
