"""WideResNet of the TRADES / Generalist reference code (flax.linen, NHWC).

Owns `WideResNet(depth, widen_factor)`: a 3x3 stem conv to 16 channels, three stages of
pre-activation BasicBlocks (BN-ReLU-conv3x3, BN-ReLU-[dropout]-conv3x3) at 16k, 32k and 64k
channels (k = widen_factor, strides 1, 2, 2), a 1x1 conv shortcut where the width changes, then
BN-ReLU, global average pooling and a linear layer. Inits follow the reference: convs
N(0, 2 / (3 * 3 * out_channels)), BN scale 1 / bias 0, linear bias 0.

Blocks per stage `n` come from the depth in either counting of the references:
`(depth - 4) / 6` (models/wide_resnet.py, from TRADES: WRN-34-10, WRN-28-10) or, when that is
not whole, `(depth - 2) / 6` (models/wrn_madry.py: Madry's WRN-32-10). So WRN-34-10 and WRN-32-10
are the same network (n = 5, 46,160,474 parameters for 10 classes). The TRADES PyTorch class also
registers a `sub_block1` that `forward` never uses (2,102,112 more parameters for k = 10); it is
left out here, as it changes nothing but the parameter count.

Synopsis::

    model = WideResNet(depth=34, widen_factor=10, num_classes=10)
    logits = model.apply(variables, x, train=False)

References:
  Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
  Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy" (TRADES),
  ICML 2019.
  Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gen_jax.models import common

# N(0, sqrt(2 / (k * k * out_channels))) as the reference's init loop (plain, not truncated).
WRN_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def blocks_per_stage(depth: int) -> int:
  """Returns the number of residual blocks per stage for a WideResNet depth.

  Args:
    depth: network depth; (depth - 4) % 6 == 0 (TRADES counting) or (depth - 2) % 6 == 0
      (Madry counting, e.g. 32).

  Returns:
    Blocks per stage, at least 1.

  Raises:
    TypeError: `depth` is not an int.
    ValueError: neither counting gives a whole positive number of blocks.
  """
  if isinstance(depth, bool) or not isinstance(depth, int):
    raise TypeError(f"WideResNet.depth must be an int; got {depth!r}.")
  for offset in (4, 2):
    if depth > offset and (depth - offset) % 6 == 0:
      return (depth - offset) // 6
  raise ValueError(f"WideResNet.depth={depth} is not 6n + 4 (TRADES: 16, 22, 28, 34, ...) nor "
                   "6n + 2 (Madry: 8, 14, 20, 26, 32, ...); pick such a depth.")


def check_widen_factor(widen_factor: int) -> None:
  """Raises ValueError unless `widen_factor` is a positive int.

  Args:
    widen_factor: the WideResNet width multiplier.

  Raises:
    ValueError: not a positive int.
  """
  if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
    raise ValueError(f"WideResNet.widen_factor must be a positive int; got {widen_factor!r}.")


class WideBlock(nn.Module):
  """Pre-activation wide block of the reference (its `BasicBlock`)."""
  features: int
  strides: int
  drop_rate: float
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
        kernel_init=WRN_CONV_INIT,
        name=name)
    equal_in_out = x.shape[-1] == self.features
    act = nn.relu(common.batch_norm(train, self.dtype, "bn1")(x))
    # The reference adds the raw input when widths match, else a projection of the activation.
    shortcut = x if equal_in_out else conv(self.features, 1, self.strides, common.PAD_1X1,
                                           "shortcut_conv")(act)
    out = conv(self.features, 3, self.strides, common.PAD_3X3, "conv1")(act)
    out = nn.relu(common.batch_norm(train, self.dtype, "bn2")(out))
    if self.drop_rate > 0:
      out = nn.Dropout(self.drop_rate, deterministic=not train, name="dropout")(out)
    out = conv(self.features, 3, 1, common.PAD_3X3, "conv2")(out)
    return out + shortcut


class WideResNet(nn.Module):
  """WideResNet-`depth`-`widen_factor` of the TRADES / Generalist reference code.

  Attributes:
    num_classes: number of logits.
    depth: 6n + 4 (34, 28) or Madry's 6n + 2 (32); see `blocks_per_stage`.
    widen_factor: width multiplier k (stages of 16k, 32k, 64k channels).
    drop_rate: dropout before each block's second conv (reference: 0). When > 0, training calls
      need `rngs={"dropout": key}`.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32, logits are float32.
    conv: convolution module class for every conv layer (nn.Conv or a drop-in such as FastConv).
    mean: per-channel mean subtracted inside the model, or None (the reference: no normalisation).
    std: per-channel standard deviation divided out inside the model, or None.
  """
  num_classes: int
  depth: int = 34
  widen_factor: int = 10
  drop_rate: float = 0.0
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
        `mutable=["batch_stats"]`) and dropout is active; False: running averages, no dropout.

    Returns:
      Logits, float32.

    Raises:
      TypeError, ValueError: on a bad configuration or bad input.
    """
    common.check_num_classes(self.num_classes, "WideResNet")
    n = blocks_per_stage(self.depth)
    check_widen_factor(self.widen_factor)
    if not 0.0 <= self.drop_rate < 1.0:
      raise ValueError(f"WideResNet.drop_rate must be in [0, 1); got {self.drop_rate!r}.")
    x = common.prepare_input(x, mean=self.mean, std=self.std, dtype=self.dtype, module="WideResNet")
    x = self.conv(16, (3, 3),
                  strides=(1, 1),
                  padding=common.PAD_3X3,
                  use_bias=False,
                  dtype=self.dtype,
                  param_dtype=jnp.float32,
                  kernel_init=WRN_CONV_INIT,
                  name="conv1")(x)
    for stage, strides in ((1, 1), (2, 2), (3, 2)):
      features = 16 * 2**(stage - 1) * self.widen_factor
      for i in range(n):
        x = WideBlock(features,
                      strides if i == 0 else 1,
                      self.drop_rate,
                      self.dtype,
                      self.conv,
                      name=f"block{stage}_{i}")(x, train=train)
    x = nn.relu(common.batch_norm(train, self.dtype, "bn1")(x))
    x = common.global_avg_pool(x)
    logits = common.dense_head(self.num_classes,
                               x.shape[-1],
                               self.dtype,
                               "fc",
                               bias_init=nn.initializers.zeros)(x)
    return logits.astype(jnp.float32)
