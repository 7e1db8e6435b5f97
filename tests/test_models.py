"""Tests for gen_jax.models: shapes, parameter counts, BatchNorm modes, dtypes, normalisation.

The big networks are only traced (`jax.eval_shape`); real forward passes use tiny inputs and the
small or narrowed networks, so the file runs in seconds on two CPU cores.
"""
import functools

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gen_jax import models
from gen_jax.models import PreActResNet18, ResNet18, WideResNet

# Parameter counts (params collection only) of the PyTorch definitions in PKU-ML/Generalist
# models/ (resnet.py ResNet18, preact_resnet.py PreActResNet18, wide_resnet.py Wide_ResNet,
# wrn_madry.py Wide_ResNet_Madry), counted with torch 2.13 as sum(p.numel() for p in
# model.parameters()) for 3-channel input. For wrn34_10 / wrn28_10 the count leaves out the
# `sub_block1` that Wide_ResNet registers but never calls in forward (with it: 48,262,586 and
# 38,119,866 for 10 classes). smallcnn: the same layers written as a torch.nn.Sequential.
TORCH_PARAM_COUNTS = {
    ("smallcnn", 10): 242_474,
    ("resnet18", 10): 11_173_962,
    ("resnet18", 100): 11_220_132,
    ("preactresnet18", 10): 11_171_146,
    ("preactresnet18", 100): 11_217_316,
    ("wrn34_10", 10): 46_160_474,
    ("wrn34_10", 100): 46_218_164,
    ("wrn32_10", 10): 46_160_474,
    ("wrn28_10", 10): 36_479_194,
    ("wrn28_10", 100): 36_536_884,
}


def _abstract_variables(model, image_shape=(32, 32, 3)):
  return jax.eval_shape(lambda k: models.init_variables(model, k, image_shape), jax.random.key(0))


# Jitted with the (hashable) module static: one compile per model and mode is much faster than
# op-by-op dispatch of a whole network.
@functools.partial(jax.jit, static_argnums=0)
def _eval(model, variables, x):
  return model.apply(variables, x, train=False)


@functools.partial(jax.jit, static_argnums=0)
def _eval_mutable(model, variables, x):
  # Lets the test see any write to batch_stats that inference mode might make.
  return model.apply(variables, x, train=False, mutable=["batch_stats"])


@functools.partial(jax.jit, static_argnums=0)
def _train(model, variables, x):
  return model.apply(variables, x, train=True, mutable=["batch_stats"])


def _images(key, shape):
  return jax.random.uniform(key, shape, jnp.float32)


def test_registry_names():
  assert set(models.MODEL_NAMES) == {
      "smallcnn", "resnet18", "preactresnet18", "wrn34_10", "wrn32_10", "wrn28_10"
  }


@pytest.mark.parametrize("name", models.MODEL_NAMES)
@pytest.mark.parametrize("num_classes", [10, 7])
def test_output_shapes(name, num_classes):
  model = models.create_model(name, num_classes)
  variables = _abstract_variables(model)
  x = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
  logits = jax.eval_shape(lambda v, x: _eval(model, v, x), variables, x)
  assert logits.shape == (3, num_classes)
  assert logits.dtype == jnp.float32
  out, state = jax.eval_shape(lambda v, x: _train(model, v, x), variables, x)
  assert out.shape == (3, num_classes)
  assert jax.tree_util.tree_structure(state["batch_stats"]) == jax.tree_util.tree_structure(
      variables["batch_stats"])


@pytest.mark.parametrize("name,num_classes", sorted(TORCH_PARAM_COUNTS))
def test_param_counts_equal_pytorch(name, num_classes):
  variables = _abstract_variables(models.create_model(name, num_classes))
  assert models.count_params(variables["params"]) == TORCH_PARAM_COUNTS[(name, num_classes)]
  # Every float leaf is float32 whatever the compute dtype.
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))


def test_count_params_on_concrete_tree():
  tree = {"a": jnp.zeros((2, 3)), "b": [np.ones(4), jnp.float32(1.0)]}
  assert models.count_params(tree) == 11


def test_module_names_are_readable():
  params = _abstract_variables(models.create_model("resnet18", 10))["params"]
  assert {"conv1", "bn1", "layer1_0", "layer4_1", "linear"} <= set(params)
  assert set(params["layer2_0"]) == {"conv1", "bn1", "conv2", "bn2", "shortcut_conv", "shortcut_bn"}
  assert "shortcut_conv" not in params["layer1_0"]
  assert params["layer2_0"]["shortcut_conv"]["kernel"].shape == (1, 1, 64, 128)
  assert "bias" not in params["conv1"]
  wrn = _abstract_variables(models.create_model("wrn28_10", 10))["params"]
  assert {"conv1", "block1_0", "block3_3", "bn1", "fc"} <= set(wrn)
  assert "block1_4" not in wrn


def test_wrn34_and_wrn32_are_the_same_network():
  # Madry's WRN-32-10 counts depth as 6n + 2, TRADES' WRN-34-10 as 6n + 4: both have n = 5.
  a = _abstract_variables(models.create_model("wrn34_10", 10))
  b = _abstract_variables(models.create_model("wrn32_10", 10))
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


@pytest.mark.parametrize("depth", [33, 4, 3])
def test_wide_resnet_bad_depth(depth):
  with pytest.raises(ValueError, match="depth"):
    models.wide_resnet(depth, 10)


def _tiny_models():
  """Real-forward versions of every architecture, narrow enough for CPU tests."""
  return {
      "smallcnn": models.create_model("smallcnn", 5),
      "resnet": ResNet18(num_classes=5, width=4),
      "preact": PreActResNet18(num_classes=5, width=4),
      "wrn": WideResNet(num_classes=5, depth=10, widen_factor=1),
  }


@pytest.mark.parametrize("kind", ["smallcnn", "resnet", "preact", "wrn"])
def test_batchnorm_train_updates_stats_eval_does_not(kind):
  model = _tiny_models()[kind]
  k_init, k_x = jax.random.split(jax.random.key(1))
  variables = models.init_variables(model, k_init, (8, 8, 3))
  x = _images(k_x, (4, 8, 8, 3))
  logits, state = _train(model, variables, x)
  assert logits.shape == (4, 5)
  old = jax.tree_util.tree_leaves(variables["batch_stats"])
  new = jax.tree_util.tree_leaves(state["batch_stats"])
  assert len(old) == len(new) > 0
  assert all(not np.allclose(a, b) for a, b in zip(old, new))
  # Eval mode uses the running averages: the output depends on them, and nothing changes.
  logits_eval, state_eval = _eval_mutable(model, variables, x)
  jax.tree_util.tree_map(np.testing.assert_array_equal, state_eval["batch_stats"],
                         variables["batch_stats"])
  updated = {"params": variables["params"], "batch_stats": state["batch_stats"]}
  assert not np.allclose(logits_eval, _eval(model, updated, x))
  # Train mode ignores the running averages (batch statistics only).
  logits_train_updated, _ = _train(model, updated, x)
  np.testing.assert_allclose(logits_train_updated, logits, rtol=1e-5, atol=1e-5)


def test_batch_stats_running_mean_update_matches_pytorch_momentum():
  model = models.create_model("smallcnn", 3)
  variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
  x = _images(jax.random.key(2), (4, 8, 8, 3))
  _, state = _train(model, variables, x)
  conv_out = nn.Conv(32, (3, 3), padding=((1, 1), (1, 1)),
                     use_bias=False).apply({"params": variables["params"]["conv1"]}, x)
  np.testing.assert_allclose(state["batch_stats"]["bn1"]["mean"],
                             0.1 * conv_out.mean(axis=(0, 1, 2)),
                             rtol=1e-4,
                             atol=1e-6)


def test_bfloat16_compute_gives_float32_logits_and_params():
  model = models.create_model("smallcnn", 4, dtype=jnp.bfloat16)
  variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  x = _images(jax.random.key(3), (2, 8, 8, 3))
  logits = _eval(model, variables, x)
  assert logits.dtype == jnp.float32
  reference = _eval(models.create_model("smallcnn", 4), variables, x)
  np.testing.assert_allclose(logits, reference, rtol=0.1, atol=0.1)
  _, state = _train(model, variables, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state))
  # The big networks too (traced only).
  wrn = models.create_model("wrn28_10", 10, dtype=jnp.bfloat16)
  out = jax.eval_shape(lambda v, x: _eval(wrn, v, x), _abstract_variables(wrn),
                       jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert out.dtype == jnp.float32


def test_normalisation_inside_the_model():
  mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
  plain = models.create_model("smallcnn", 3)
  normed = models.create_model("smallcnn", 3, mean=mean, std=std)
  variables = models.init_variables(plain, jax.random.key(0), (8, 8, 3))
  x = _images(jax.random.key(4), (2, 8, 8, 3))
  expected = _eval(plain, variables, (x - jnp.array(mean)) / jnp.array(std))
  got = _eval(normed, variables, x)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(got, _eval(plain, variables, x), atol=1e-3)
  # Mean only / std only.
  only_mean = models.create_model("smallcnn", 3, mean=mean)
  np.testing.assert_allclose(_eval(only_mean, variables, x),
                             _eval(plain, variables, x - jnp.array(mean)),
                             rtol=1e-5,
                             atol=1e-5)
  identity = models.create_model("smallcnn", 3, mean=[0.0] * 3, std=[1.0] * 3)
  np.testing.assert_allclose(_eval(identity, variables, x),
                             _eval(plain, variables, x),
                             rtol=1e-6,
                             atol=1e-6)


def test_normalisation_channel_mismatch():
  model = models.create_model("smallcnn", 3, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
  with pytest.raises(ValueError, match="mean has 3 entries but the images have 1 channel"):
    models.init_variables(model, jax.random.key(0), (16, 16, 1))


def test_smallcnn_on_greyscale_16x16():
  model = models.create_model("smallcnn", 10, mean=(0.5,), std=(0.25,))
  variables = models.init_variables(model, jax.random.key(0), (16, 16, 1))
  assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 1, 32)
  x = _images(jax.random.key(5), (3, 16, 16, 1))
  logits, _ = _train(model, variables, x)
  assert logits.shape == (3, 10)
  assert np.all(np.isfinite(logits))
  assert not np.allclose(logits[0], logits[1])
  # Gradients reach every parameter.
  grads = jax.jit(
      jax.grad(
          lambda p: model.apply({
              **variables, "params": p
          }, x, train=True, mutable=["batch_stats"])[0].sum()))(variables["params"])
  assert all(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads))


def test_init_is_deterministic_and_key_dependent():
  model = models.create_model("smallcnn", 3)
  a = models.init_variables(model, jax.random.key(0), (8, 8, 3))
  b = models.init_variables(model, jax.random.key(0), (8, 8, 3))
  c = models.init_variables(model, jax.random.key(1), (8, 8, 3))
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  assert not np.allclose(a["params"]["conv1"]["kernel"], c["params"]["conv1"]["kernel"])
  assert type(a) is dict and type(a["params"]) is dict and type(a["batch_stats"]) is dict
  # A module built by hand with list fields is unhashable: init still works (uncached).
  d = models.init_variables(models.SmallCNN(num_classes=3, mean=[0.0] * 3), jax.random.key(0),
                            (8, 8, 3))
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, d)


def test_pytorch_default_init_scale():
  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the WRN uses N(0, 2/fan_out).
  tiny = _tiny_models()
  params = models.init_variables(tiny["resnet"], jax.random.key(0), (8, 8, 3))["params"]
  kernel = np.asarray(params["layer1_0"]["conv1"]["kernel"])  # fan_in = 3 * 3 * 4
  bound = 1 / np.sqrt(36)
  assert np.abs(kernel).max() <= bound
  assert np.abs(kernel).max() > 0.9 * bound
  bias = np.asarray(params["linear"]["bias"])  # fan_in = 32
  assert np.abs(bias).max() <= 1 / np.sqrt(32) and np.any(bias != 0)
  wrn = models.init_variables(tiny["wrn"], jax.random.key(0), (8, 8, 3))["params"]
  kernel = np.asarray(wrn["block3_0"]["conv2"]["kernel"])  # fan_out = 3 * 3 * 64
  np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (9 * 64)), rtol=0.05)
  assert np.all(np.asarray(wrn["fc"]["bias"]) == 0)


class _TaggedConv(nn.Conv):
  """An nn.Conv that records each call, to see which conv class every layer was built from."""

  def __call__(self, x):
    self.sow("intermediates", "tagged", True)
    return super().__call__(x)


@pytest.mark.parametrize("kind", ["smallcnn", "resnet", "preact", "wrn"])
def test_conv_class_is_used_for_every_conv(kind):
  model = _tiny_models()[kind].clone(conv=_TaggedConv)
  variables = _abstract_variables(model, (8, 8, 3))
  _, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]),
                            variables, jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32))
  tagged = {path[:-1] for path in traverse_util.flatten_dict(state["intermediates"])}
  convs = {
      path[:-1]
      for path in traverse_util.flatten_dict(variables["params"])
      if path[-1] == "kernel" and path[-2] not in ("linear", "fc")
  }
  assert len(convs) >= 4
  assert tagged == convs


def test_conv_impl_fast_uses_fastconv():
  conv_module = pytest.importorskip("gen_jax.ops.conv")
  assert models.create_model("smallcnn", 10, conv_impl="auto").conv is conv_module.FastConv
  forced = models.create_model("smallcnn", 10, conv_impl="fast").conv
  assert forced.func is conv_module.FastConv and forced.keywords == {"impl": "fast"}
  assert models.create_model("smallcnn", 10).conv is nn.Conv
  fast = models.create_model("smallcnn", 4, conv_impl="fast")
  xla = models.create_model("smallcnn", 4)
  variables = models.init_variables(xla, jax.random.key(0), (8, 8, 3))
  x = _images(jax.random.key(7), (2, 8, 8, 3))
  np.testing.assert_allclose(_eval(fast, variables, x),
                             _eval(xla, variables, x),
                             rtol=1e-4,
                             atol=1e-5)


def test_unknown_name_lists_known_models():
  with pytest.raises(ValueError, match="resnet18") as err:
    models.create_model("resnet19", 10)
  assert all(name in str(err.value) for name in models.MODEL_NAMES)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_classes=0), ValueError, "num_classes"),
    (dict(num_classes=2.5), TypeError, "num_classes"),
    (dict(num_classes=True), TypeError, "num_classes"),
    (dict(num_classes=10, conv_impl="cudnn"), ValueError, "conv_impl"),
    (dict(num_classes=10, dtype=jnp.int32), TypeError, "dtype"),
    (dict(num_classes=10, std=(0.2, 0.0, 0.2)), ValueError, "std must be positive"),
    (dict(num_classes=10, mean=(0.5, 0.5), std=(0.2, 0.2, 0.2)), ValueError, "one per channel"),
    (dict(num_classes=10, mean=("a",)), TypeError, "mean"),
])
def test_create_model_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    models.create_model("smallcnn", **kwargs)


def test_bad_inputs():
  model = models.create_model("smallcnn", 3)
  variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
  with pytest.raises(TypeError, match="uint8"):
    model.apply(variables, jnp.zeros((1, 8, 8, 3), jnp.uint8), train=False)
  with pytest.raises(ValueError, match="NHWC"):
    model.apply(variables, jnp.zeros((8, 8, 3)), train=False)
  for bad in [(8, 8), (8, 8, 0), (8.0, 8, 3), "32x32"]:
    with pytest.raises(ValueError, match="image_shape"):
      models.init_variables(model, jax.random.key(0), bad)
