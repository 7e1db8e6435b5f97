"""Tests of gen_jax.evaluation.corruptions: the JAX corruptions, their accuracy and CIFAR-10-C.

Images are 32x32 crops of scikit-learn's two bundled photographs (natural statistics, no network),
their grey versions and 13x19 crops (sides that are not multiples of 8). Blur, pixelate and JPEG
are checked against their reference implementations (scipy.ndimage, Pillow), brightness against
the standard library's colorsys HSV round trip. The accuracy tests use a linear model and a small
MLP trained for a second on scikit-learn's 8x8 digits.
"""
# pylint: disable=protected-access  # the JPEG tables and the jit cache are checked directly
import colorsys
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn import datasets

from gen_jax.evaluation import corruptions as C

NOISES = ("gaussian_noise", "shot_noise", "impulse_noise")
KEY = jax.random.key(0)
KEY2 = jax.random.key(1)


@pytest.fixture(scope="module")
def photos():
  """Four RGB 32x32 crops and a 13x19 one of the bundled photographs, float32 in [0, 1]."""
  china, flower = datasets.load_sample_images().images
  crops = [
      china[100:132, 200:232], flower[50:82, 300:332], china[200:232, 400:432], flower[300:332,
                                                                                       100:132]
  ]
  rgb = np.stack(crops).astype(np.float32) / 255.0
  return {
      "rgb": rgb,
      "grey": rgb.mean(axis=-1, keepdims=True),
      "rgb_odd": rgb[:, 5:18, 3:22],
      "grey_odd": rgb[:, 5:18, 3:22].mean(axis=-1, keepdims=True),
  }


def _mean_change(a, b) -> float:
  return float(np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------------------------
# the corruptions


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_shape_dtype_range_for_rgb_grey_and_odd_sizes(name, photos):
  # 13x19: neither side a multiple of 8 (32x32 images run through the reference tests below).
  for layout in ("rgb_odd", "grey_odd"):
    x = jnp.asarray(photos[layout])
    for severity in C.SEVERITIES:
      out = C.corrupt(x, name, severity, KEY)
      assert out.shape == x.shape and out.dtype == x.dtype, (layout, severity)
      out = np.asarray(out)
      assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0, (layout, severity)
      assert _mean_change(out, x) > 0, (layout, severity)  # every severity does something


def test_dtype_is_kept_for_half_precision(photos):
  x = jnp.asarray(photos["rgb_odd"], jnp.bfloat16)
  for name in ("pixelate", "brightness"):
    out = C.corrupt(x, name, 3, KEY)
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_change_grows_with_severity(name, photos):
  x = photos["rgb_odd"]
  change = [_mean_change(C.corrupt(jnp.asarray(x), name, s, KEY), x) for s in C.SEVERITIES]
  params = C.SEVERITY_PARAMS[name]
  for s in range(4):
    if params[s] == params[s + 1]:
      assert change[s + 1] >= change[s] * 0.9, (name, change)
    else:
      assert change[s + 1] > change[s], (name, change)


def test_severity_parameters_are_the_cifar10c_ones():
  # make_cifar_c.py, hendrycks/robustness.
  assert C.SEVERITY_PARAMS["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
  assert C.SEVERITY_PARAMS["shot_noise"] == (500, 250, 100, 75, 50)
  assert C.SEVERITY_PARAMS["impulse_noise"] == (0.01, 0.02, 0.03, 0.05, 0.07)
  assert C.SEVERITY_PARAMS["gaussian_blur"] == (0.4, 0.6, 0.7, 0.8, 1.0)
  assert C.SEVERITY_PARAMS["contrast"] == (0.75, 0.5, 0.4, 0.3, 0.15)
  assert C.SEVERITY_PARAMS["brightness"] == (0.05, 0.1, 0.15, 0.2, 0.3)
  assert C.SEVERITY_PARAMS["pixelate"] == (0.95, 0.9, 0.85, 0.75, 0.65)
  assert C.SEVERITY_PARAMS["jpeg_compression"] == (80, 65, 58, 50, 40)
  assert set(C.SEVERITY_PARAMS) == set(C.CORRUPTIONS) == set(C.TFDS_NAMES)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_determinism_and_key_dependence(name, photos):
  x = jnp.asarray(photos["rgb_odd"])
  a = np.asarray(C.corrupt(x, name, 4, jax.random.key(1)))
  np.testing.assert_array_equal(a, np.asarray(C.corrupt(x, name, 4, jax.random.key(1))))
  b = np.asarray(C.corrupt(x, name, 4, jax.random.key(2)))
  if name in NOISES:
    assert (a != b).mean() > 0.005
  else:
    np.testing.assert_array_equal(a, b)


def test_noise_statistics(photos):
  # Mid-grey images of the shape used above (no new compilation); bounds are ~4 standard errors.
  x = jnp.full(photos["rgb_odd"].shape, 0.5, jnp.float32)
  size = x.size
  for s, sigma in zip(C.SEVERITIES, C.SEVERITY_PARAMS["gaussian_noise"]):
    d = np.asarray(C.corrupt(x, "gaussian_noise", s, KEY)) - 0.5
    assert abs(d.mean()) < 4 * sigma / np.sqrt(size) and abs(d.std() / sigma - 1) < 0.06
  for s, c in zip(C.SEVERITIES, C.SEVERITY_PARAMS["shot_noise"]):
    out = np.asarray(C.corrupt(x, "shot_noise", s, KEY))
    np.testing.assert_allclose(out * c, np.round(out * c), atol=1e-3)  # Poisson counts / c
    assert abs(out.mean() - 0.5) < 4 * np.sqrt(0.5 / c / size)
    assert abs(out.var() * c / 0.5 - 1) < 0.12
  for s, amount in zip(C.SEVERITIES, C.SEVERITY_PARAMS["impulse_noise"]):
    out = np.asarray(C.corrupt(x, "impulse_noise", s, KEY))
    hit = out != 0.5
    assert set(np.unique(out[hit])) <= {0.0, 1.0}
    assert abs(hit.sum() - amount * size) < 4 * np.sqrt(size * amount * (1 - amount))
    assert abs((out[hit] == 1.0).sum() - hit.sum() / 2) < 4 * np.sqrt(hit.sum() / 4) + 1


def test_gaussian_blur_matches_scipy(photos):
  for layout in ("rgb_odd", "grey"):
    x = photos[layout]
    for s, sigma in zip(C.SEVERITIES, C.SEVERITY_PARAMS["gaussian_blur"]):
      # skimage.filters.gaussian(multichannel=True) = ndimage.gaussian_filter, mode "nearest".
      ref = ndimage.gaussian_filter(x.astype(np.float64), (0, sigma, sigma, 0),
                                    mode="nearest",
                                    truncate=4.0)
      np.testing.assert_allclose(C.corrupt(jnp.asarray(x), "gaussian_blur", s, KEY), ref, atol=1e-5)


def test_pixelate_matches_pillow_box(photos):
  for layout in ("rgb", "rgb_odd"):
    x = photos[layout]
    h, w = x.shape[1:3]
    for s, c in zip(C.SEVERITIES, C.SEVERITY_PARAMS["pixelate"]):
      ref = np.empty_like(x)
      for b in range(x.shape[0]):
        for ch in range(x.shape[3]):
          im = Image.fromarray(x[b, :, :, ch], mode="F")
          small = im.resize((int(w * c), int(h * c)), Image.Resampling.BOX)
          ref[b, :, :, ch] = np.asarray(small.resize((w, h), Image.Resampling.BOX))
      np.testing.assert_allclose(C.corrupt(jnp.asarray(x), "pixelate", s, KEY), ref, atol=1e-5)


@pytest.mark.parametrize("name", ("gaussian_blur", "pixelate", "contrast"))
def test_constant_images_are_preserved(name):
  x = jnp.full((2, 13, 19, 3), 0.3, jnp.float32)
  for s in C.SEVERITIES:
    np.testing.assert_allclose(C.corrupt(x, name, s, KEY), x, atol=1e-6)


def test_brightness_is_v_plus_c_in_hsv():
  pixels = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.2, 0.4, 0.6], [0.9, 0.1, 0.3],
                     [0.5, 0.5, 0.5], [0.05, 0.0, 0.02]],
                    dtype=np.float32)
  x = jnp.asarray(pixels.reshape(1, 2, 3, 3))
  for s, c in zip(C.SEVERITIES, C.SEVERITY_PARAMS["brightness"]):
    expected = []
    for r, g, b in pixels:
      h, sat, v = colorsys.rgb_to_hsv(r, g, b)
      expected.append(colorsys.hsv_to_rgb(h, sat, min(v + c, 1.0)))
    out = np.asarray(C.corrupt(x, "brightness", s, KEY)).reshape(-1, 3)
    np.testing.assert_allclose(out, np.array(expected), atol=1e-6)
    grey = C.corrupt(x[..., :1], "brightness", s, KEY)
    np.testing.assert_allclose(grey, np.minimum(x[..., :1] + c, 1.0), atol=1e-6)


def test_contrast_scales_the_deviation_from_each_channel_mean():
  x = np.array([[[0.0, 0.2, 1.0], [0.4, 0.2, 1.0]], [[0.8, 0.6, 0.0], [0.4, 0.6, 0.0]]],
               dtype=np.float32)[None]
  channel_means = np.array([0.4, 0.4, 0.5], np.float32)  # by hand
  for s, c in zip(C.SEVERITIES, C.SEVERITY_PARAMS["contrast"]):
    out = C.corrupt(jnp.asarray(x), "contrast", s, KEY)
    np.testing.assert_allclose(out, (x - channel_means) * c + channel_means, atol=1e-6)


def _pillow_jpeg(x: np.ndarray, quality: int) -> np.ndarray:
  out = []
  for img in np.round(x * 255).astype(np.uint8):
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, "JPEG", quality=quality)
    out.append(np.asarray(Image.open(buf), np.float32).reshape(img.shape) / 255.0)
  return np.stack(out)


def test_jpeg_quality_orders_the_distortion(photos):
  for layout in ("rgb", "grey_odd"):
    x = jnp.asarray(photos[layout])
    change = [_mean_change(C.jpeg_compress(x, q), x) for q in (100, 80, 40, 10)]
    assert change[0] < (1.2 if layout == "rgb" else 0.5) / 255, change  # near identity
    assert change == sorted(change) and change[3] > 3 * change[0], change


def test_jpeg_matches_pillow(photos):
  for layout in ("rgb", "rgb_odd", "grey"):
    x = photos[layout]
    for s, quality in zip(C.SEVERITIES, C.SEVERITY_PARAMS["jpeg_compression"]):
      ref = _pillow_jpeg(x, quality)
      ours = np.asarray(C.corrupt(jnp.asarray(x), "jpeg_compression", s, KEY))
      np.testing.assert_allclose(ours * 255, np.round(ours * 255), atol=1e-3)  # 8-bit samples
      # Measured: 0.03-0.23 / 255 apart against a 2.8-5.1 / 255 change.
      assert _mean_change(ours, ref) < 0.15 * _mean_change(ref, np.round(x * 255) / 255), \
          (layout, quality)


def test_jpeg_tables_are_libjpegs():
  for quality in (*C.SEVERITY_PARAMS["jpeg_compression"], 10, 97):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG", quality=quality)
    tables = Image.open(buf).quantization
    for base, table in ((C._JPEG_LUMA, tables[0]), (C._JPEG_CHROMA, tables[1])):
      np.testing.assert_array_equal(C._quant_table(base, jnp.int32(quality)),
                                    np.asarray(table).reshape(8, 8))


def test_bad_names_severities_and_images():
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match="gaussian_noise.*jpeg_compression"):
    C.corrupt(x, "fog", 1, KEY)
  for bad in (0, 6, True, 2.0, "3"):
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 4, 5\)"):
      C.corrupt(x, "contrast", bad, KEY)
  with pytest.raises(ValueError, match="uint8"):
    C.corrupt(jnp.zeros((1, 8, 8, 3), jnp.uint8), "contrast", 1, KEY)
  for shape in ((8, 8, 3), (1, 8, 8, 2)):
    with pytest.raises(ValueError, match="NHWC"):
      C.corrupt(jnp.zeros(shape), "contrast", 1, KEY)


def test_corrupt_under_jit_with_static_name_and_severity(photos):
  x = jnp.asarray(photos["rgb_odd"])
  jitted = jax.jit(C.corrupt, static_argnames=("name", "severity"))
  for name in ("gaussian_noise", "contrast"):
    np.testing.assert_array_equal(jitted(x, name=name, severity=2, key=KEY),
                                  C.corrupt(x, name, 2, KEY))


# ---------------------------------------------------------------------------------------------
# accuracy on a tiny trained model


def _linear(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def _mlp(params, x):
  h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


@pytest.fixture(scope="module")
def digits():
  """A linear model and an MLP trained on 1,200 digits; 597 held-out uint8 test images."""
  raw = datasets.load_digits()
  images = np.round(raw.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = raw.target.astype(np.int32)
  x_train = jnp.asarray(images[:1200], jnp.float32) / 255.0
  y_train = jax.nn.one_hot(labels[:1200], 10)
  rng = np.random.default_rng(0)
  init = {
      "linear": {
          "w": jnp.zeros((64, 10)),
          "b": jnp.zeros(10)
      },
      "mlp": {
          "w1": jnp.asarray(rng.normal(size=(64, 32)) / 8, jnp.float32),
          "b1": jnp.zeros(32),
          "w2": jnp.asarray(rng.normal(size=(32, 10)) / 6, jnp.float32),
          "b2": jnp.zeros(10)
      },
  }
  fns = {}
  for role, apply_fn in (("linear", _linear), ("mlp", _mlp)):

    def loss(p, apply_fn=apply_fn):
      return -jnp.mean(jnp.sum(y_train * jax.nn.log_softmax(apply_fn(p, x_train)), -1))

    @jax.jit
    def train(p, loss=loss):
      step = lambda _, p: jax.tree_util.tree_map(lambda a, g: a - 0.5 * g, p, jax.grad(loss)(p))
      return jax.lax.fori_loop(0, 300, step, p)

    fns[role] = jax.tree_util.Partial(apply_fn, train(init[role]))
  return fns, images[1200:], labels[1200:]


def test_corruption_accuracy_on_trained_models(digits):
  fns, images, labels = digits
  messages = []
  before = C._batch_correct._cache_size()
  result = C.corruption_accuracy(fns,
                                 images,
                                 labels,
                                 key=KEY,
                                 batch_size=128,
                                 progress=messages.append)
  # One program for the clean pass and one per corruption: nothing per batch or severity.
  assert C._batch_correct._cache_size() - before <= len(C.CORRUPTIONS) + 1
  assert result["source"] == "computed" and result["n"] == len(labels)
  assert result["corruptions"] == list(C.CORRUPTIONS)
  assert result["severities"] == list(C.SEVERITIES)
  assert len(messages) == len(C.CORRUPTIONS)
  assert all(name in m for name, m in zip(C.CORRUPTIONS, messages))
  assert set(result["models"]) == set(fns)
  x = jnp.asarray(images, jnp.float32) / 255.0
  for role, row in result["models"].items():
    direct = int(np.sum(np.asarray(jnp.argmax(fns[role](x), -1)) == labels)) / len(labels)
    assert row["clean"] == direct
    assert row["clean"] > 0.85, role
    table = np.array([row["per_corruption"][name] for name in C.CORRUPTIONS])
    assert table.shape == (len(C.CORRUPTIONS), 5)
    assert ((table >= 0) & (table <= 1)).all() and 0 <= row["mean"] <= 1
    assert row["mean"] == pytest.approx(table.mean())
    np.testing.assert_allclose(row["per_severity"], table.mean(axis=0))
    for name in NOISES:
      assert row["per_corruption"][name][4] < row["clean"], (role, name, row)
    assert table.min() < row["clean"]


def test_corruption_accuracy_float_input_and_subsets_agree(digits):
  fns, images, labels = digits
  args = dict(key=KEY, batch_size=128, severities=(2, 5))
  # Same shapes and dtypes as above: these reuse the compiled programs.
  full = C.corruption_accuracy(fns, images, labels, corruptions=NOISES, **args)
  one = C.corruption_accuracy(fns, images, labels, corruptions=("shot_noise",), **args)
  # uint8 images and the same images as float / 255 give the same result.
  as_float = C.corruption_accuracy(fns,
                                   images.astype(np.float32) / 255.0,
                                   labels,
                                   corruptions=("contrast",),
                                   **args)
  as_uint8 = C.corruption_accuracy(fns, images, labels, corruptions=("contrast",), **args)
  for role in fns:
    # The draws of a corruption do not depend on the others evaluated with it.
    assert one["models"][role]["per_corruption"]["shot_noise"] == \
        full["models"][role]["per_corruption"]["shot_noise"]
    assert as_float["models"][role] == as_uint8["models"][role]


def test_corruption_figures_do_not_depend_on_the_batch_size(digits):
  # Each example draws its noise from its own key (engine.example_keys), as the attacks do.
  fns, images, labels = digits
  args = dict(key=KEY, corruptions=NOISES, severities=(3,))
  a = C.corruption_accuracy(fns, images, labels, batch_size=128, **args)
  b = C.corruption_accuracy(fns, images, labels, batch_size=50, **args)
  assert a["models"] == b["models"]
  other = C.corruption_accuracy(fns, images, labels, batch_size=50, **{**args, "key": KEY2})
  assert other["models"] != b["models"]  # the draws do depend on the key


def test_corruption_accuracy_rejects_bad_input(digits):
  fns, images, labels = digits
  with pytest.raises(ValueError, match="fog"):
    C.corruption_accuracy(fns, images, labels, key=KEY, corruptions=("fog",))
  with pytest.raises(ValueError, match="severit"):
    C.corruption_accuracy(fns, images, labels, key=KEY, severities=(0,))
  with pytest.raises(ValueError, match="labels"):
    C.corruption_accuracy(fns, images, labels[:-1], key=KEY)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    C.corruption_accuracy(fns, images.astype(np.float32), labels, key=KEY)
  with pytest.raises(ValueError, match="non-empty dict"):
    C.corruption_accuracy({}, images, labels, key=KEY)
  with pytest.raises(ValueError, match="batch_size"):
    C.corruption_accuracy(fns, images, labels, key=KEY, batch_size=0)


def test_to_markdown():
  result = {
      "source": "computed",
      "corruptions": ["contrast", "pixelate"],
      "severities": [1, 5],
      "n": 40,
      "models": {
          "global": {
              "clean": 0.5,
              "mean": 0.3,
              "per_corruption": {
                  "contrast": [0.4, 0.2],
                  "pixelate": [0.35, 0.25]
              },
              "per_severity": [0.375, 0.225]
          }
      }
  }
  text = C.to_markdown(result)
  lines = text.strip().splitlines()
  assert lines[0] == "| model | clean | mean corruption acc | contrast | pixelate |"
  assert lines[2] == "| global | 50.00 | 30.00 | 30.00 | 30.00 |"
  assert "computed" in lines[-1] and "n = 40" in lines[-1]
  with pytest.raises(ValueError, match="corruption_accuracy"):
    C.to_markdown({"models": {}})


# ---------------------------------------------------------------------------------------------
# CIFAR-10-C from TFDS


def test_cifar10_corrupted_is_none_when_not_prepared(tmp_path):
  assert C.load_cifar10_corrupted(str(tmp_path), n=4) is None
  assert C.cifar10_corrupted_accuracy({"m": lambda x: jnp.zeros((x.shape[0], 10))},
                                      str(tmp_path),
                                      n=4) is None


def test_cifar10_corrupted_under_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  names, severities = ("jpeg_compression", "gaussian_blur"), (1, 5)
  with tfds.testing.mock_data(num_examples=6):
    data = C.load_cifar10_corrupted(str(tmp_path), n=5, corruptions=names, severities=severities)
    fn = jax.tree_util.Partial(_linear, {"w": jnp.ones((32 * 32 * 3, 10)), "b": jnp.arange(10.)})
    result = C.cifar10_corrupted_accuracy({"m": fn},
                                          str(tmp_path),
                                          n=5,
                                          corruptions=names,
                                          severities=severities,
                                          batch_size=4)
  assert set(data) == set(names) and all(set(data[k]) == set(severities) for k in names)
  images, labels = data["gaussian_blur"][5]
  assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0
  assert labels.shape == (5,) and labels.dtype == np.int32 and ((labels >= 0) & (labels < 10)).all()
  assert result["source"] == "tfds:cifar10_corrupted" and result["n"] == 5
  row = result["models"]["m"]
  assert 0 <= row["clean"] <= 1 and 0 <= row["mean"] <= 1
  # The all-ones model predicts class 9 everywhere: its accuracy is the share of label 9.
  for name in names:
    expected = [float(np.mean(data[name][s][1] == 9)) for s in severities]
    assert row["per_corruption"][name] == pytest.approx(expected)
  assert "tfds:cifar10_corrupted" in C.to_markdown(result)


def test_cifar10_corrupted_partly_prepared_warns_and_gives_none(monkeypatch, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  real = tfds.data_source

  def one_missing(name, **kwargs):
    if name == "cifar10_corrupted/contrast_5":
      raise FileNotFoundError("not prepared")
    return real(name, **kwargs)

  with tfds.testing.mock_data(num_examples=3):
    monkeypatch.setattr(tfds, "data_source", one_missing)
    with pytest.warns(UserWarning, match="contrast_5"):
      assert C.load_cifar10_corrupted(str(tmp_path), corruptions=("contrast",)) is None
  with pytest.raises(ValueError, match="severit"):
    C.load_cifar10_corrupted(str(tmp_path), severities=(6,))
  with pytest.raises(ValueError, match="n must be"):
    C.load_cifar10_corrupted(str(tmp_path), n=0)
