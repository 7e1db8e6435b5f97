"""A numpy forward pass of the PyTorch networks, read from their state dict: the torch-free check.

Owns `forward(state, arch, x)`: inference (BatchNorm on running statistics) of the PyTorch
definitions that `torch_model.py` writes and the reference code uses, computed in float32 numpy
from the state dict by its PyTorch key names and layouts (NCHW images, OIHW kernels), block by
block as the PyTorch `forward` methods go, and independent of the flax code. Agreement with the
JAX logits therefore checks the weight map and the layer order where torch is not installed (CI).

Synopsis::

    state = torch_weights.load_safetensors("out/model.safetensors")
    logits = forward(state, arch, x_nchw)          # (batch, num_classes) float32
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from gen_jax.export.architecture import Architecture

BN_EPS = 1e-5  # PyTorch's BatchNorm2d default (and gen_jax's).


def conv2d(x: np.ndarray, weight: np.ndarray, stride: int) -> np.ndarray:
  """`torch.nn.functional.conv2d` without bias, padding (k - 1) // 2: NCHW x, OIHW weight."""
  k = weight.shape[-1]
  pad = (k - 1) // 2
  if pad:
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  windows = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
  # (N, C, Ho, Wo, k, k) x (O, C, k, k) -> (N, Ho, Wo, O): one BLAS matmul after im2col.
  out = np.tensordot(windows, weight, axes=([1, 4, 5], [1, 2, 3]))
  return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def batch_norm(x: np.ndarray, state: dict[str, np.ndarray], prefix: str) -> np.ndarray:
  """`BatchNorm2d` in eval mode: running statistics, affine."""
  mean, var = state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"]
  scale = state[f"{prefix}.weight"] / np.sqrt(var + np.float32(BN_EPS))
  shift = state[f"{prefix}.bias"] - mean * scale
  return x * scale[None, :, None, None] + shift[None, :, None, None]


def relu(x: np.ndarray) -> np.ndarray:
  return np.maximum(x, np.float32(0))


def linear(x: np.ndarray, state: dict[str, np.ndarray], prefix: str) -> np.ndarray:
  return x @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]


def _resnet_block(x, state, prefix, stride):
  # models/resnet.py BasicBlock.forward.
  out = relu(batch_norm(conv2d(x, state[f"{prefix}.conv1.weight"], stride), state, f"{prefix}.bn1"))
  out = batch_norm(conv2d(out, state[f"{prefix}.conv2.weight"], 1), state, f"{prefix}.bn2")
  if f"{prefix}.shortcut.0.weight" in state:
    x = batch_norm(conv2d(x, state[f"{prefix}.shortcut.0.weight"], stride), state,
                   f"{prefix}.shortcut.1")
  return relu(out + x)


def _preact_block(x, state, prefix, stride):
  # models/preact_resnet.py PreActBlock.forward.
  out = relu(batch_norm(x, state, f"{prefix}.bn1"))
  shortcut = x
  if f"{prefix}.shortcut.0.weight" in state:
    shortcut = conv2d(out, state[f"{prefix}.shortcut.0.weight"], stride)
  out = conv2d(out, state[f"{prefix}.conv1.weight"], stride)
  out = conv2d(relu(batch_norm(out, state, f"{prefix}.bn2")), state[f"{prefix}.conv2.weight"], 1)
  return out + shortcut


def _wide_block(x, state, prefix, stride):
  # models/wide_resnet.py BasicBlock.forward (equalInOut: no convShortcut).
  act = relu(batch_norm(x, state, f"{prefix}.bn1"))
  equal_in_out = f"{prefix}.convShortcut.weight" not in state
  out = conv2d(act, state[f"{prefix}.conv1.weight"], stride)
  out = relu(batch_norm(out, state, f"{prefix}.bn2"))
  out = conv2d(out, state[f"{prefix}.conv2.weight"], 1)
  shortcut = x if equal_in_out else conv2d(act, state[f"{prefix}.convShortcut.weight"], stride)
  return shortcut + out


def _normalize(x: np.ndarray, arch: Architecture) -> np.ndarray:
  if arch.mean is not None:
    x = x - np.asarray(arch.mean, np.float32)[None, :, None, None]
  if arch.std is not None:
    x = x / np.asarray(arch.std, np.float32)[None, :, None, None]
  return x


def forward(state: dict[str, Any], arch: Architecture, x: np.ndarray) -> np.ndarray:
  """Logits of the PyTorch network `arch` with weights `state` for NCHW images `x` in [0, 1].

  Args:
    state: the PyTorch state dict (numpy arrays; `torch_weights.torch_state_dict` or a file).
    arch: the architecture.
    x: float images, shape (batch, channels, height, width).

  Returns:
    float32 logits, shape (batch, num_classes).
  """
  state = {k: np.asarray(v, np.float32) for k, v in state.items() if "num_batches" not in k}
  x = _normalize(np.asarray(x, np.float32), arch)
  if arch.family == "smallcnn":
    for i, stride in enumerate((1, 2, 2, 1), start=1):
      x = relu(batch_norm(conv2d(x, state[f"conv{i}.weight"], stride), state, f"bn{i}"))
  elif arch.family in ("resnet18", "preactresnet18"):
    x = conv2d(x, state["conv1.weight"], 1)
    if arch.family == "resnet18":
      x = relu(batch_norm(x, state, "bn1"))
    block = _resnet_block if arch.family == "resnet18" else _preact_block
    for stage in range(1, 5):
      for i in range(2):
        x = block(x, state, f"layer{stage}.{i}", 2 if stage > 1 and i == 0 else 1)
  else:
    x = conv2d(x, state["conv1.weight"], 1)
    for stage in range(1, 4):
      for i in range(arch.blocks_per_stage):
        x = _wide_block(x, state, f"block{stage}.layer.{i}", 2 if stage > 1 and i == 0 else 1)
    x = relu(batch_norm(x, state, "bn1"))
  # The references' avg_pool2d(out, 4) (or 8) on the last 4x4 (8x8) map of a 32x32 image.
  features = x.mean(axis=(2, 3))
  return linear(features, state,
                "fc" if arch.family == "wideresnet" else "linear").astype(np.float32)


def forward_batched(state: dict[str, Any],
                    arch: Architecture,
                    x: np.ndarray,
                    batch_size: int = 16) -> np.ndarray:
  """`forward` in chunks of `batch_size` images (bounds the im2col memory of wide networks)."""
  return np.concatenate(
      [forward(state, arch, x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
