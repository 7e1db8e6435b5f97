"""CIFAR ResNet-18 and PreAct ResNet-18, as in the Generalist reference code (flax.linen, NHWC).

Owns `ResNet18` (3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2] at 64-128-256-512, 1x1 conv + BN
shortcut where the shape changes) and `PreActResNet18` (BN-ReLU before each conv, 1x1 conv shortcut
without BN, and, like the reference, no BN-ReLU after the last block). Module names follow the
PyTorch attribute names (`conv1`, `layer2_0/shortcut_conv`, `linear`), so checkpoints read alike.

Synopsis::

    model = ResNet18(num_classes=10)
    variables = model.init(key, jnp.zeros((1, 32, 32, 3)), train=False)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

References:
  He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
  He, Zhang, Ren & Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016.
  Wang & Wang, "Generalist: Decoupling Natural and Robust Generalization", CVPR 2023
  (models/resnet.py and models/preact_resnet.py of github.com/PKU-ML/Generalist).
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gen_jax.models import common

_STAGES = ((1, 1), (2, 2), (2, 3), (2, 4))  # (first stride, stage index); widths double per stage.


class BasicBlock(nn.Module):
  """Post-activation residual block: conv-BN-ReLU, conv-BN, add shortcut, ReLU."""
  features: int
  strides: int
  dtype: Any
  conv: Any

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = lambda f, k, s, pad, name: self.conv(  # noqa: E731
        f, (k, k),
        strides=(s, s),
        padding=pad,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=common.TORCH_DEFAULT_KERNEL_INIT,
        name=name)
    out = conv(self.features, 3, self.strides, common.PAD_3X3, "conv1")(x)
    out = nn.relu(common.batch_norm(train, self.dtype, "bn1")(out))
    out = conv(self.features, 3, 1, common.PAD_3X3, "conv2")(out)
    out = common.batch_norm(train, self.dtype, "bn2")(out)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.strides, common.PAD_1X1, "shortcut_conv")(x)
      shortcut = common.batch_norm(train, self.dtype, "shortcut_bn")(shortcut)
    return nn.relu(out + shortcut)


class PreActBlock(nn.Module):
  """Pre-activation residual block: BN-ReLU-conv twice; the shortcut taps the first activation."""
  features: int
  strides: int
  dtype: Any
  conv: Any

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = lambda f, k, s, pad, name: self.conv(  # noqa: E731
        f, (k, k),
        strides=(s, s),
        padding=pad,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=common.TORCH_DEFAULT_KERNEL_INIT,
        name=name)
    out = nn.relu(common.batch_norm(train, self.dtype, "bn1")(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      # As in the reference, the projection sees the activated input, not the raw one.
      shortcut = conv(self.features, 1, self.strides, common.PAD_1X1, "shortcut_conv")(out)
    out = conv(self.features, 3, self.strides, common.PAD_3X3, "conv1")(out)
    out = nn.relu(common.batch_norm(train, self.dtype, "bn2")(out))
    out = conv(self.features, 3, 1, common.PAD_3X3, "conv2")(out)
    return out + shortcut


class ResNet18(nn.Module):
  """The CIFAR ResNet-18 of the Generalist reference code.

  Attributes:
    num_classes: number of logits.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32, logits are float32.
    conv: convolution module class for every conv layer (nn.Conv or a drop-in such as FastConv).
    mean: per-channel mean subtracted inside the model, or None (the reference: no normalisation).
    std: per-channel standard deviation divided out inside the model, or None.
    width: channels of the first stage (64 in the reference; smaller only for tests).
  """
  num_classes: int
  dtype: Any = jnp.float32
  conv: Any = nn.Conv
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None
  width: int = 64

  block_cls = BasicBlock
  stem_norm = True  # Post-activation: BN-ReLU right after the stem conv.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Returns float32 logits of shape (batch, num_classes) for images `x` in [0, 1], NHWC.

    Args:
      x: images, shape (batch, height, width, channels), floating point in [0, 1].
      train: True: BatchNorm uses and updates batch statistics (apply with
        `mutable=["batch_stats"]`); False: running averages.

    Returns:
      Logits, float32.

    Raises:
      TypeError, ValueError: on bad input (see `common.prepare_input`).
    """
    name = type(self).__name__
    common.check_num_classes(self.num_classes, name)
    x = common.prepare_input(x, mean=self.mean, std=self.std, dtype=self.dtype, module=name)
    x = self.conv(self.width, (3, 3),
                  strides=(1, 1),
                  padding=common.PAD_3X3,
                  use_bias=False,
                  dtype=self.dtype,
                  param_dtype=jnp.float32,
                  kernel_init=common.TORCH_DEFAULT_KERNEL_INIT,
                  name="conv1")(x)
    if self.stem_norm:
      x = nn.relu(common.batch_norm(train, self.dtype, "bn1")(x))
    for strides, stage in _STAGES:
      features = self.width * 2**(stage - 1)
      for i in range(2):
        x = self.block_cls(features,
                           strides if i == 0 else 1,
                           self.dtype,
                           self.conv,
                           name=f"layer{stage}_{i}")(x, train=train)
    x = common.global_avg_pool(x)
    logits = common.dense_head(self.num_classes, x.shape[-1], self.dtype, "linear")(x)
    return logits.astype(jnp.float32)


class PreActResNet18(ResNet18):
  """The CIFAR PreAct ResNet-18 of the Generalist reference code (same attributes as ResNet18).

  Like the reference (models/preact_resnet.py), the stem is a bare conv and no BN-ReLU follows the
  last block: pooling reads the raw residual sum.
  """
  block_cls = PreActBlock
  stem_norm = False
