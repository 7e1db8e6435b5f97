"""Tests of gen_jax.data: sources (digits, TFDS under mock, image folders), arrays, split, augment.

Everything here uses generated data or TFDS's mock: nothing is downloaded and ../shared is not read.
"""
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gen_jax import data
from gen_jax.data import folder

# ---------------------------------------------------------------------------------------------
# digits (embedded default)


def test_digits_shapes_dtype_range():
  ds = data.load_dataset("digits")
  assert ds.name == "digits"
  assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
  assert ds.image_shape == (16, 16, 1)
  assert ds.train_images.shape[0] + ds.test_images.shape[0] == 1797
  assert ds.test_images.shape[0] == round(0.2 * 1797)
  assert ds.num_classes == 10 and ds.class_names == tuple(str(i) for i in range(10))
  assert ds.train_images.max() == 255 and ds.train_images.min() == 0
  # Pixel repetition: every 2x2 block is constant.
  blocks = ds.train_images[:, ::2, ::2]
  np.testing.assert_array_equal(ds.train_images[:, 1::2, 1::2], blocks)
  np.testing.assert_array_equal(ds.train_images[:, ::2, 1::2], blocks)
  # Stratified: every class on both sides, in proportion.
  train_counts = np.bincount(ds.train_labels, minlength=10)
  test_counts = np.bincount(ds.test_labels, minlength=10)
  assert (test_counts > 0).all()
  np.testing.assert_allclose(test_counts / (train_counts + test_counts), 0.2, atol=0.02)


def test_digits_split_is_deterministic_and_disjoint():
  a = data.load_dataset("digits", image_size=8)
  b = data.load_dataset("digits", image_size=8)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(a.test_labels, b.test_labels)
  from sklearn.datasets import load_digits
  raw = load_digits()
  raw_u8 = np.round(raw.images * (255 / 16)).astype(np.uint8)
  np.testing.assert_array_equal(np.sort(np.concatenate([a.train_labels, a.test_labels])),
                                np.sort(raw.target))
  # Each raw image appears exactly once across the two splits.
  all_imgs = np.concatenate([a.train_images, a.test_images])[..., 0].reshape(1797, -1)
  assert {r.tobytes() for r in all_imgs} == {r.tobytes() for r in raw_u8.reshape(1797, -1)}


def test_digits_other_sizes():
  assert data.load_dataset("digits", image_size=32).image_shape == (32, 32, 1)
  with pytest.raises(ValueError, match="multiple of 8"):
    data.load_dataset("digits", image_size=12)


def test_unknown_name_lists_known_names():
  with pytest.raises(ValueError, match="cifar10.*svhn_cropped.*folder"):
    data.load_dataset("mnist")


def test_max_per_class_on_digits():
  ds = data.load_dataset("digits", max_per_class=3, max_test_per_class=2)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [3] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [2] * 10)
  full = data.load_dataset("digits")
  keep = data.first_per_class(full.train_labels, 3)
  np.testing.assert_array_equal(ds.train_images, full.train_images[keep])
  with pytest.raises(ValueError, match="max_per_class"):
    data.load_dataset("digits", max_per_class=0)


def test_import_does_not_pull_tensorflow():
  code = ("import sys, gen_jax.data; bad = [m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets', 'orbax')]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code],
                 check=True,
                 cwd=str(pathlib.Path(__file__).resolve().parents[1]))


# ---------------------------------------------------------------------------------------------
# TFDS (mocked: no network)


@pytest.mark.parametrize("name,tfds_name,num_classes", [("cifar10", "cifar10", 10),
                                                        ("svhn", "svhn_cropped", 10),
                                                        ("cifar100", "cifar100", 100)])
def test_tfds_source_under_mock(name, tfds_name, num_classes, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load_dataset(name, data_dir=str(tmp_path))
  assert ds.name == tfds_name
  assert ds.train_images.shape == (6, 32, 32, 3) and ds.test_images.shape == (6, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert ds.num_classes == num_classes
  assert ((ds.train_labels >= 0) & (ds.train_labels < num_classes)).all()
  assert ds.train_images.std() > 0  # real (random) pixels were read, not zeros


def test_tfds_resize_and_caps_under_mock(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load_dataset("cifar10", data_dir=str(tmp_path), image_size=16, max_per_class=1)
  assert ds.image_shape == (16, 16, 3)
  np.testing.assert_array_equal(np.bincount(ds.train_labels)[np.unique(ds.train_labels)], 1)
  assert ds.test_images.shape[0] == 12


def test_tfds_unavailable_says_how_to_prepare(monkeypatch, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  def offline(*args, **kwargs):
    raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

  monkeypatch.setattr(tfds, "data_source", offline)
  with pytest.raises(RuntimeError) as info:
    data.load_dataset("cifar10", data_dir=str(tmp_path))
  message = str(info.value)
  assert "tfds build cifar10" in message and "--data-dir" in message
  assert str(tmp_path) in message and "ConnectionError" in message


# ---------------------------------------------------------------------------------------------
# image folder


def _value(label, index, split):
  return 40 * label + 10 * index + (5 if split == "test" else 0)


def _make_folder(root, *, grey=False, size=8, classes=("b_cat", "a_dog"), per_class=3):
  """Writes ROOT/{train,test}/<class>/ with constant-valued images encoding (class, index)."""
  sorted_classes = sorted(classes)
  for split in ("train", "test"):
    for name in classes:
      folder = root / split / name
      folder.mkdir(parents=True)
      label = sorted_classes.index(name)
      for i in range(per_class):
        value = _value(label, i, split)
        shape = (size, size) if grey else (size, size, 3)
        arr = np.full(shape, value, dtype=np.uint8)
        # PNG is lossless, so the decoded value identifies the file; a JPEG and an upper-case
        # extension are mixed in for the extension rules.
        suffix = [".png", ".PNG", ".png"][i]
        Image.fromarray(arr).save(folder / f"{i:03d}{suffix}")
      (folder / "notes.txt").write_text("not an image")
  return root


def test_folder_classes_order_labels(tmp_path):
  root = _make_folder(tmp_path / "ds")
  ds = data.load_dataset("folder", data_dir=str(root))
  assert ds.name == "folder" and ds.class_names == ("a_dog", "b_cat")
  assert ds.image_shape == (8, 8, 3)
  np.testing.assert_array_equal(ds.train_labels, [0, 0, 0, 1, 1, 1])
  expected = [_value(l, i, "train") for l in (0, 1) for i in range(3)]
  np.testing.assert_array_equal(ds.train_images[:, 0, 0, 0], expected)
  # The test split is interleaved by class: every prefix (`--n`, the periodic test figure of
  # training) holds both classes.
  np.testing.assert_array_equal(ds.test_labels, [0, 1, 0, 1, 0, 1])
  np.testing.assert_array_equal(ds.test_images[:, 0, 0, 0],
                                [_value(l, i, "test") for i in range(3) for l in (0, 1)])


def test_class_interleaved_order_balances_every_prefix():
  labels = np.repeat([2, 0, 1], [5, 3, 4])  # unequal classes, not in label order
  order = folder.class_interleaved_order(labels)
  assert sorted(order.tolist()) == list(range(12))  # a permutation
  totals = np.bincount(labels)
  for n in range(1, 13):  # the classes not yet used up are within one example of each other
    counts = np.bincount(labels[order[:n]], minlength=3)
    active = counts[counts < totals]
    assert active.size == 0 or active.max() - active.min() <= 1, (n, counts)
  for c in range(3):  # within a class the folder order is kept
    picked = order[labels[order] == c]
    assert np.all(np.diff(picked) > 0)


def test_folder_16_bit_and_palette_images_are_converted_not_clipped(tmp_path):
  root = _make_folder(tmp_path / "ds", grey=True)
  wide = tmp_path / "ds" / "train" / "a_dog" / "000.png"  # class a_dog, index 0, value 10
  Image.fromarray(np.full((8, 8), 10 * 257, np.uint16)).save(wide)  # 16-bit, same brightness
  ds = data.load_dataset("folder", data_dir=str(root))
  assert ds.train_images.dtype == np.uint8 and ds.train_images.shape[-1] == 1
  assert np.all(ds.train_images[0] == 10)  # rescaled, not clipped to 255
  colour = _make_folder(tmp_path / "colour")
  palette = Image.fromarray(np.full((8, 8, 3), (200, 30, 60),
                                    np.uint8)).convert("P",
                                                       palette=Image.Palette.ADAPTIVE,
                                                       colors=4)
  assert palette.mode == "P"
  palette.save(tmp_path / "colour" / "test" / "b_cat" / "000.png")
  ds = data.load_dataset("folder", data_dir=str(colour))
  first_cat = int(np.flatnonzero(ds.test_labels == 1)[0])
  np.testing.assert_array_equal(ds.test_images[first_cat][0, 0], [200, 30, 60])
  Image.fromarray(np.full(
      (8, 8), 0.5,
      np.float32)).save(tmp_path / "colour" / "test" / "b_cat" / "001.tif".replace(".tif", ".png"),
                        format="TIFF")
  with pytest.raises(ValueError, match="001.png.*floating-point images"):
    data.load_dataset("folder", data_dir=str(colour))


def test_folder_skips_hidden_entries_and_reads_nested_class_folders(tmp_path, caplog):
  root = _make_folder(tmp_path / "ds")
  (root / "train" / ".ipynb_checkpoints" / "x").mkdir(parents=True)  # not a class
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "a_dog" / ".hidden.png")
  nested = root / "train" / "a_dog" / "more" / "deeper"
  nested.mkdir(parents=True)
  Image.fromarray(np.full((8, 8, 3), 250, np.uint8)).save(nested / "zzz.png")
  with caplog.at_level("WARNING"):
    ds = data.load_dataset("folder", data_dir=str(root))
  assert ds.class_names == ("a_dog", "b_cat")
  assert np.sum(ds.train_labels == 0) == 4  # 3 images + the nested one, not the hidden one
  assert np.any(np.all(ds.train_images == 250, axis=(1, 2, 3)))
  # train/: .ipynb_checkpoints; each class: notes.txt; a_dog: .hidden.png.
  assert any("skipped 4 hidden or non-image entries" in r.getMessage() for r in caplog.records)


def test_folder_with_one_class_is_refused_with_a_message_about_the_data(tmp_path):
  root = _make_folder(tmp_path / "ds", classes=("only",))
  with pytest.raises(ValueError, match="one class folder.*at least two classes"):
    data.load_dataset("folder", data_dir=str(root))


def test_folder_greyscale_and_jpeg(tmp_path):
  root = _make_folder(tmp_path / "grey", grey=True)
  ds = data.load_dataset("folder", data_dir=str(root))
  assert ds.image_shape == (8, 8, 1)
  # One colour JPEG (lower- and upper-case extensions) makes the whole set RGB.
  rgb = np.zeros((8, 8, 3), np.uint8)
  rgb[..., 0] = 200
  Image.fromarray(rgb).save(root / "train" / "a_dog" / "zzz.JPEG")
  ds = data.load_dataset("folder", data_dir=str(root))
  assert ds.image_shape == (8, 8, 3) and ds.train_images.shape[0] == 7
  last_dog = ds.train_images[3]  # sorted paths: 000, 001, 002, zzz in a_dog
  assert abs(int(last_dog[..., 0].mean()) - 200) < 10 and last_dog[..., 2].mean() < 30
  # The grey images were replicated over the channels.
  np.testing.assert_array_equal(ds.train_images[0, ..., 0], ds.train_images[0, ..., 2])


def test_folder_max_per_class(tmp_path):
  root = _make_folder(tmp_path / "ds")
  ds = data.load_dataset("folder", data_dir=str(root), max_per_class=2, max_test_per_class=1)
  np.testing.assert_array_equal(ds.train_labels, [0, 0, 1, 1])
  np.testing.assert_array_equal(
      ds.train_images[:, 0, 0, 0],
      [_value(0, 0, "train"),
       _value(0, 1, "train"),
       _value(1, 0, "train"),
       _value(1, 1, "train")])
  assert ds.test_images.shape[0] == 2


def test_folder_missing_root_and_data_dir(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    data.load_dataset("folder", data_dir=str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="data_dir"):
    data.load_dataset("folder")


def test_folder_missing_split(tmp_path):
  root = _make_folder(tmp_path / "ds")
  for f in (root / "test").rglob("*"):
    if f.is_file():
      f.unlink()
  for d in sorted((root / "test").iterdir()):
    d.rmdir()
  (root / "test").rmdir()
  with pytest.raises(ValueError, match="no 'test' folder"):
    data.load_dataset("folder", data_dir=str(root))


def test_folder_empty_class(tmp_path):
  root = _make_folder(tmp_path / "ds")
  (root / "train" / "c_empty").mkdir()
  (root / "train" / "c_empty" / "readme.txt").write_text("x")
  with pytest.raises(ValueError, match="c_empty.*has no images"):
    data.load_dataset("folder", data_dir=str(root))


def test_folder_test_classes_differ(tmp_path):
  root = _make_folder(tmp_path / "ds")
  (root / "test" / "b_cat").rename(root / "test" / "c_cow")
  with pytest.raises(ValueError, match="differ from those of train"):
    data.load_dataset("folder", data_dir=str(root))


@pytest.mark.parametrize("content", [b"not a png at all", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"])
def test_folder_corrupt_file_names_its_path(tmp_path, content):
  root = _make_folder(tmp_path / "ds")
  bad = root / "test" / "b_cat" / "001.png"
  bad.write_bytes(content)
  with pytest.raises(ValueError, match="cannot decode") as info:
    data.load_dataset("folder", data_dir=str(root))
  assert str(bad) in str(info.value)


def test_folder_truncated_jpeg_names_its_path(tmp_path):
  root = _make_folder(tmp_path / "ds")
  bad = root / "train" / "a_dog" / "003.jpg"
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(bad)
  bad.write_bytes(bad.read_bytes()[:200])
  with pytest.raises(ValueError, match="cannot decode") as info:
    data.load_dataset("folder", data_dir=str(root), image_size=8)
  assert str(bad) in str(info.value)


def test_folder_mixed_sizes_and_resize(tmp_path):
  root = _make_folder(tmp_path / "ds")
  odd = root / "train" / "b_cat" / "zzz.png"
  Image.fromarray(np.full((12, 10, 3), 77, np.uint8)).save(odd)
  with pytest.raises(ValueError, match="different sizes.*image_size=") as info:
    data.load_dataset("folder", data_dir=str(root))
  assert str(odd) in str(info.value)
  ds = data.load_dataset("folder", data_dir=str(root), image_size=6)
  assert ds.image_shape == (6, 6, 3)
  assert ds.train_images.shape[0] == 7
  np.testing.assert_array_equal(ds.train_images[-1], 77)  # constant stays constant


# ---------------------------------------------------------------------------------------------
# from_arrays


def _arrays(n=6, m=4, shape=(5, 5, 3), classes=3):
  rng = np.random.default_rng(0)
  return (rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % classes,
          rng.integers(0, 256, (m, *shape), dtype=np.uint8), np.arange(m) % classes)


def test_from_arrays_valid():
  x, y, tx, ty = _arrays()
  ds = data.from_arrays(jnp.asarray(x), y.tolist(), tx, ty.astype(np.int64))
  assert isinstance(ds.train_images, np.ndarray) and ds.train_labels.dtype == np.int32
  assert ds.class_names == ("0", "1", "2") and ds.num_classes == 3
  assert ds.image_shape == (5, 5, 3) and ds.name == "arrays"
  ds = data.from_arrays(x, y, tx, ty, class_names=["a", "b", "c", "d"], name="mine")
  assert ds.num_classes == 4 and ds.name == "mine"


@pytest.mark.parametrize("change,error,match", [
    (lambda a: (a[0].astype(np.float32), *a[1:]), TypeError, "train_images must be a uint8"),
    (lambda a: (a[0][0], *a[1:]), ValueError, "rank 4"),
    (lambda a: (a[0], a[1][:-1], *a[2:]), ValueError, "train_labels must have shape"),
    (lambda a: (a[0], a[1].astype(np.float32), *a[2:]), TypeError, "integers"),
    (lambda a: (*a[:3], a[3] + 5), ValueError, r"test_labels must lie in \[0, 3\)"),
    (lambda a: (a[0], a[1], a[2][:, :4], a[3]), ValueError, "differ in shape"),
])
def test_from_arrays_rejects(change, error, match):
  args = change(_arrays())
  kwargs = {"class_names": ("a", "b", "c")}
  with pytest.raises(error, match=match):
    data.from_arrays(*args, **kwargs)


def test_from_arrays_rejects_bad_class_names():
  with pytest.raises(ValueError, match="must lie in"):
    data.from_arrays(*_arrays(), class_names=("a", "b"))
  with pytest.raises(ValueError, match="duplicates"):
    data.from_arrays(*_arrays(), class_names=("a", "a", "b"))
  with pytest.raises(TypeError, match="single str"):
    data.from_arrays(*_arrays(), class_names="abc")


# ---------------------------------------------------------------------------------------------
# train_validation_split


def test_split_stratified_deterministic_disjoint():
  labels = np.repeat(np.arange(4), [10, 20, 30, 40]).astype(np.int32)
  images = np.arange(100)[:, None]  # the image is its own id
  tx, ty, vx, vy = data.train_validation_split(images, labels, validation_size=0.2, seed=3)
  assert vx.shape == (20, 1) and tx.shape == (80, 1)
  np.testing.assert_array_equal(np.bincount(vy), [2, 4, 6, 8])
  np.testing.assert_array_equal(labels[vx[:, 0]], vy)
  np.testing.assert_array_equal(labels[tx[:, 0]], ty)
  assert sorted(np.concatenate([tx, vx])[:, 0].tolist()) == list(range(100))
  again = data.train_validation_split(images, labels, validation_size=0.2, seed=3)
  np.testing.assert_array_equal(again[2], vx)
  other = data.train_validation_split(images, labels, validation_size=0.2, seed=4)
  assert not np.array_equal(other[2], vx)
  _, _, vx_count, _ = data.train_validation_split(images, labels, validation_size=12, seed=0)
  assert vx_count.shape[0] == 12


def test_split_is_scikit_learns_stratified_split_without_importing_it():
  """The split equals `train_test_split(stratify=...)`, ties of the quotas included, and the
  digits come from scikit-learn's own file; a fresh program loading them imports neither."""
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel
  from gen_jax.data import dataset, sources  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for _ in range(300):
    classes = int(rng.integers(2, 12))
    labels = rng.permutation(
        np.concatenate(
            [np.repeat(np.arange(classes), 2),
             rng.integers(0, classes, rng.integers(0, 300))]))
    count = int(rng.integers(classes, labels.size - classes + 1))
    seed = int(rng.integers(0, 1000))
    want = train_test_split(np.arange(labels.size),
                            test_size=count,
                            stratify=labels,
                            random_state=seed)
    got = dataset.stratified_split_indices(labels, count, seed)
    for w, g in zip(want, got):
      np.testing.assert_array_equal(np.sort(w), g)
  raw = datasets.load_digits()
  images, labels = sources._digits_arrays()  # pylint: disable=protected-access
  np.testing.assert_array_equal(images, raw.images)
  np.testing.assert_array_equal(labels, raw.target)
  code = ("import sys; from gen_jax import data; data.load_digits(); "
          "print(sorted({'sklearn', 'scipy'} & set(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_split_zero_and_errors():
  labels = np.repeat(np.arange(3), 4)
  images = np.zeros((12, 2, 2, 1), np.uint8)
  tx, ty, vx, vy = data.train_validation_split(images, labels, validation_size=0, seed=0)
  assert tx.shape[0] == 12 and vx.shape == (0, 2, 2, 1) and vy.shape == (0,)
  with pytest.raises(ValueError, match="fraction in"):
    data.train_validation_split(images, labels, validation_size=1.5, seed=0)
  with pytest.raises(ValueError, match="at least one per class"):
    data.train_validation_split(images, labels, validation_size=2, seed=0)
  with pytest.raises(ValueError, match="same first"):
    data.train_validation_split(images[:5], labels, validation_size=3, seed=0)
  with pytest.raises(ValueError, match="class 2 has a single training example"):
    data.train_validation_split(images[:10],
                                np.array([0] * 5 + [1] * 4 + [2]),
                                validation_size=3,
                                seed=0)
  # With the classes' names (an image folder) the class is named, and the fixes are given.
  with pytest.raises(ValueError,
                     match=r"class 'zebra' \(label 2\) has a single training "
                     r"example.*Add images.*--validation-size 0"):
    data.train_validation_split(images[:10],
                                np.array([0] * 5 + [1] * 4 + [2]),
                                validation_size=3,
                                seed=0,
                                class_names=("cat", "dog", "zebra"))


# ---------------------------------------------------------------------------------------------
# augmentation

_aug_fn = jax.jit(data.augment_batch, static_argnames=("pad", "flip"))


def _unique_images(n=16, h=6, w=5, c=2):
  # Values 1..255 (never 0), distinct within an image, so a crop offset is identifiable.
  base = (np.arange(h * w * c).reshape(h, w, c) % 250) + 1
  return np.stack([(base + 3 * i) % 250 + 1 for i in range(n)]).astype(np.uint8)


def test_to_float():
  x = np.array([[0, 51, 255]], np.uint8)
  np.testing.assert_allclose(data.to_float(x), [[0.0, 0.2, 1.0]], rtol=1e-6)
  assert data.to_float(x).dtype == jnp.float32
  assert isinstance(data.to_float(x), np.ndarray)  # host arrays stay on the host
  assert isinstance(data.to_float(jnp.asarray(x)), jax.Array)
  halves = np.full((2,), 0.5, np.float64)  # floats are already in [0, 1]: only cast
  assert data.to_float(halves).dtype == np.float32 and data.to_float(halves)[0] == 0.5
  with pytest.raises(TypeError, match="uint8"):
    data.to_float(x.astype(np.int32))


def test_augment_deterministic_dtype_range():
  images = _unique_images()
  key = jax.random.key(0)
  a = _aug_fn(key, images, pad=2, flip=True)
  b = _aug_fn(key, images, pad=2, flip=True)
  c = _aug_fn(jax.random.key(1), images, pad=2, flip=True)
  assert a.dtype == jnp.float32 and a.shape == images.shape
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # (On the device, as the augmentation: XLA may divide by 255 as a multiply by its reciprocal.)
  np.testing.assert_array_equal(_aug_fn(key, images, pad=0, flip=False),
                                data.to_float(jnp.asarray(images)))


def test_augment_crop_shifts_content():
  images = _unique_images()
  pad = 2
  out = np.asarray(_aug_fn(jax.random.key(7), images, pad=pad, flip=False))
  # Compare in 0..255 integers: XLA may divide by 255 as a multiply by its reciprocal.
  out = np.round(out * 255).astype(np.uint8)
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, w = images.shape[1:3]
  offsets = []
  for i in range(images.shape[0]):
    matches = [(dy, dx)
               for dy in range(2 * pad + 1)
               for dx in range(2 * pad + 1)
               if np.array_equal(padded[i, dy:dy + h, dx:dx + w], out[i])]
    assert len(matches) == 1, f"example {i} is not a crop of its padded image"
    offsets.append(matches[0])
  assert len(set(offsets)) > 3  # per-example offsets, not one shared shift
  assert any(o != (pad, pad) for o in offsets)


def test_augment_flip():
  images = _unique_images(n=32)
  out = np.round(np.asarray(_aug_fn(jax.random.key(3), images, pad=0, flip=True)) * 255)
  x = images.astype(np.float32)
  flipped = [np.array_equal(out[i], x[i, :, ::-1]) for i in range(32)]
  same = [np.array_equal(out[i], x[i]) for i in range(32)]
  assert all(f or s for f, s in zip(flipped, same))
  assert 4 < sum(flipped) < 28


def test_augment_rejects_bad_input():
  images = _unique_images(n=2)
  key = jax.random.key(0)
  with pytest.raises(TypeError, match="uint8"):
    data.augment_batch(key, images.astype(np.float32))
  with pytest.raises(ValueError, match="rank 4"):
    data.augment_batch(key, images[0])
  with pytest.raises(ValueError, match="pad must be >= 0"):
    data.augment_batch(key, images, pad=-1)
  with pytest.raises(TypeError, match="flip"):
    data.augment_batch(key, images, flip=1)


def test_flip_defaults():
  assert not data.flip_default("digits") and not data.flip_default("svhn_cropped")
  assert data.flip_default("cifar10") and data.flip_default("cifar100")
  assert data.flip_default("folder")


def test_folder_same_arrays_for_any_thread_count(tmp_path):
  root = _make_folder(tmp_path / "ds", per_class=3)
  one = data.load_image_folder(root, num_threads=1)
  many = data.load_image_folder(root, num_threads=7)
  np.testing.assert_array_equal(one.train_images, many.train_images)
  np.testing.assert_array_equal(one.test_labels, many.test_labels)
  with pytest.raises(ValueError, match="image_size must be a positive int"):
    data.load_dataset("folder", data_dir=str(root), image_size=0)


# ---------------------------------------------------------------------------------------------
# batching


def test_eval_batches_cover_each_example_once():
  idx, mask = data.eval_batches(7, 3)
  assert idx.shape == mask.shape == (3, 3)
  np.testing.assert_array_equal(idx[mask], np.arange(7))
  assert mask.sum() == 7 and not mask[-1, 1:].any()


def test_tfds_not_prepared_and_unreachable_fails_at_once(tmp_path, monkeypatch):
  # TFDS itself would retry the download for minutes; the loader checks the host first.
  monkeypatch.setattr(data.sources, "_reachable", lambda host, timeout=5.0: False)
  with pytest.raises(RuntimeError, match="not prepared there and its download host"):
    data.load_dataset("cifar10", data_dir=str(tmp_path))


def test_tfds_data_set_without_tensorflow_datasets_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # an image without TFDS
  with pytest.raises(RuntimeError, match=r"not installed.*\.\[tfds\].*--dataset folder"):
    data.load_dataset("cifar10")
