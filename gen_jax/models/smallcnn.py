"""SmallCNN: a four-layer CNN for fast CPU pilots on CIFAR-sized (or smaller) images.

Owns `SmallCNN`: conv3x3-BN-ReLU layers of 32, 64 (stride 2), 128 (stride 2) and 128 channels,
global average pooling and a linear layer. There is no max-pool, whose XLA gradient
(select_and_scatter) is very slow on CPU; the strided convs downsample instead. Any input size of
at least 1x1 works (16x16 digits, 32x32 CIFAR), with any channel count.

Synopsis::

    model = SmallCNN(num_classes=10)
    variables = model.init(key, jnp.zeros((1, 16, 16, 1)), train=False)
    logits = model.apply(variables, x, train=False)
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gen_jax.models import common

_LAYERS = ((32, 1), (64, 2), (128, 2), (128, 1))  # (channels, stride)


class SmallCNN(nn.Module):
  """Four conv3x3-BN-ReLU layers, global average pooling, linear head.

  Attributes:
    num_classes: number of logits.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32, logits are float32.
    conv: convolution module class for every conv layer (nn.Conv or a drop-in such as FastConv).
    mean: per-channel mean subtracted inside the model, or None (no normalisation).
    std: per-channel standard deviation divided out inside the model, or None.
  """
  num_classes: int
  dtype: Any = jnp.float32
  conv: Any = nn.Conv
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None

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
    common.check_num_classes(self.num_classes, "SmallCNN")
    x = common.prepare_input(x, mean=self.mean, std=self.std, dtype=self.dtype, module="SmallCNN")
    for i, (features, strides) in enumerate(_LAYERS, start=1):
      # No conv bias: the BatchNorm right after it has its own.
      x = self.conv(features, (3, 3),
                    strides=(strides, strides),
                    padding=common.PAD_3X3,
                    use_bias=False,
                    dtype=self.dtype,
                    param_dtype=jnp.float32,
                    kernel_init=common.TORCH_DEFAULT_KERNEL_INIT,
                    name=f"conv{i}")(x)
      x = nn.relu(common.batch_norm(train, self.dtype, f"bn{i}")(x))
    x = common.global_avg_pool(x)
    logits = common.dense_head(self.num_classes, x.shape[-1], self.dtype, "linear")(x)
    return logits.astype(jnp.float32)
