"""The PyTorch module definitions written beside exported weights (`torch_model.py`), as text.

Owns `SOURCE`: a self-contained Python file (needs torch and safetensors, not gen_jax) that
defines the four network families with the parameter names of the reference PyTorch code and
loads `model.safetensors` by `model.json`, so an exported model runs in PyTorch without pickle.
It is kept as text because gen_jax itself never imports torch; the tests run it in an
environment that has torch (experiments/reference/README.md) and check its logits.

Synopsis::

    (out / TORCH_MODULE_FILE).write_text(SOURCE)
    # then, where torch is installed:
    #   import torch_model; model = torch_model.load("out"); logits = model(x_nchw)
"""

TORCH_MODULE_FILE = "torch_model.py"

SOURCE = '''\
"""PyTorch definitions of the networks exported by gen_jax, and a loader for model.safetensors.

Written by gen_jax.export beside model.safetensors and model.json. Needs torch and safetensors
only (no gen_jax; no pickle: the weights are read with safetensors). The parameter and buffer
names are those of the reference PyTorch code, so the same weights also load into:
  resnet18        PKU-ML/Generalist models/resnet.py ResNet18
  preactresnet18  PKU-ML/Generalist models/preact_resnet.py PreActResNet18
  wideresnet      models/wrn_madry.py Wide_ResNet_Madry (WRN-32-10); the TRADES
                  models/wide_resnet.py Wide_ResNet (WRN-34-10) with load_state_dict(...,
                  strict=False): its sub_block1, which forward never calls, is not exported.
Differences from those files, none of which changes the logits of a 32x32 image: any width or
depth, any number of input channels, global average pooling instead of avg_pool2d(out, 4) (or 8),
and the mean/std of model.json (if any) applied inside forward as non-persistent buffers.

Usage (inputs: float32 NCHW images in [0, 1])::

    import torch_model
    model = torch_model.load("path/to/export")      # in eval mode
    logits = model(x)
"""
import json
import os

import torch
from torch import nn
import torch.nn.functional as F


class _Network(nn.Module):
  """Holds the input normalisation (buffers outside the state dict)."""

  def _set_normalization(self, mean, std):
    as_buffer = lambda v: None if v is None else torch.tensor(v, dtype=torch.float32).view(
        1, -1, 1, 1)
    self.register_buffer("input_mean", as_buffer(mean), persistent=False)
    self.register_buffer("input_std", as_buffer(std), persistent=False)

  def _normalize(self, x):
    if self.input_mean is not None:
      x = x - self.input_mean
    if self.input_std is not None:
      x = x / self.input_std
    return x


class SmallCNN(_Network):
  """gen_jax's SmallCNN: four conv3x3-BN-ReLU layers (32, 64/2, 128/2, 128), pooling, linear."""
  LAYERS = ((32, 1), (64, 2), (128, 2), (128, 1))

  def __init__(self, num_classes=10, in_channels=3, mean=None, std=None):
    super().__init__()
    self._set_normalization(mean, std)
    channels = in_channels
    for i, (features, stride) in enumerate(self.LAYERS, start=1):
      setattr(self, f"conv{i}",
              nn.Conv2d(channels, features, 3, stride=stride, padding=1, bias=False))
      setattr(self, f"bn{i}", nn.BatchNorm2d(features))
      channels = features
    self.linear = nn.Linear(channels, num_classes)

  def forward(self, x):
    x = self._normalize(x)
    for i in range(1, len(self.LAYERS) + 1):
      x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
    return self.linear(x.mean(dim=(2, 3)))


class BasicBlock(nn.Module):
  """models/resnet.py BasicBlock."""
  expansion = 1

  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                    nn.BatchNorm2d(planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
  """models/preact_resnet.py PreActBlock."""
  expansion = 1

  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
    out = self.conv1(out)
    out = self.conv2(F.relu(self.bn2(out)))
    return out + shortcut


class ResNet(_Network):
  """models/resnet.py ResNet (post-activation) or models/preact_resnet.py PreActResNet."""

  def __init__(self,
               block,
               num_blocks=(2, 2, 2, 2),
               num_classes=10,
               in_channels=3,
               width=64,
               mean=None,
               std=None):
    super().__init__()
    self._set_normalization(mean, std)
    self.preact = block is PreActBlock
    self.in_planes = width
    self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
    if not self.preact:
      self.bn1 = nn.BatchNorm2d(width)
    self.layer1 = self._make_layer(block, width, num_blocks[0], 1)
    self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], 2)
    self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], 2)
    self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], 2)
    self.linear = nn.Linear(8 * width, num_classes)

  def _make_layer(self, block, planes, num_blocks, stride):
    layers = []
    for s in [stride] + [1] * (num_blocks - 1):
      layers.append(block(self.in_planes, planes, s))
      self.in_planes = planes
    return nn.Sequential(*layers)

  def forward(self, x):
    out = self.conv1(self._normalize(x))
    if not self.preact:
      out = F.relu(self.bn1(out))
    out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
    return self.linear(out.mean(dim=(2, 3)))


def ResNet18(num_classes=10, in_channels=3, width=64, mean=None, std=None):
  return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, width, mean, std)


def PreActResNet18(num_classes=10, in_channels=3, width=64, mean=None, std=None):
  return ResNet(PreActBlock, (2, 2, 2, 2), num_classes, in_channels, width, mean, std)


class WideBasicBlock(nn.Module):
  """models/wide_resnet.py BasicBlock (dropout left out: inference only)."""

  def __init__(self, in_planes, out_planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.relu1 = nn.ReLU(inplace=False)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.relu2 = nn.ReLU(inplace=False)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
    self.equalInOut = in_planes == out_planes
    self.convShortcut = None if self.equalInOut else nn.Conv2d(
        in_planes, out_planes, 1, stride=stride, padding=0, bias=False)

  def forward(self, x):
    if not self.equalInOut:
      x = self.relu1(self.bn1(x))
      out = x
    else:
      out = self.relu1(self.bn1(x))
    out = self.relu2(self.bn2(self.conv1(out)))
    out = self.conv2(out)
    return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
  """models/wide_resnet.py NetworkBlock."""

  def __init__(self, nb_layers, in_planes, out_planes, stride):
    super().__init__()
    self.layer = nn.Sequential(*[
        WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
        for i in range(nb_layers)
    ])

  def forward(self, x):
    return self.layer(x)


def blocks_per_stage(depth):
  """(depth - 4) / 6 (TRADES: 34, 28) or, when not whole, (depth - 2) / 6 (Madry: 32)."""
  for offset in (4, 2):
    if depth > offset and (depth - offset) % 6 == 0:
      return (depth - offset) // 6
  raise ValueError(f"WideResNet depth {depth} is neither 6n + 4 nor 6n + 2.")


class WideResNet(_Network):
  """models/wrn_madry.py Wide_ResNet_Madry / models/wide_resnet.py Wide_ResNet (no sub_block1)."""

  def __init__(self, depth=34, widen_factor=10, num_classes=10, in_channels=3, mean=None, std=None):
    super().__init__()
    self._set_normalization(mean, std)
    channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    n = blocks_per_stage(depth)
    self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
    self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
    self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
    self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
    self.bn1 = nn.BatchNorm2d(channels[3])
    self.relu = nn.ReLU(inplace=False)
    self.fc = nn.Linear(channels[3], num_classes)

  def forward(self, x):
    out = self.block3(self.block2(self.block1(self.conv1(self._normalize(x)))))
    out = self.relu(self.bn1(out))
    return self.fc(out.mean(dim=(2, 3)))


def build(architecture):
  """The network of model.json's "architecture" record (randomly initialised)."""
  a = dict(architecture)
  common = dict(num_classes=a["num_classes"],
                in_channels=a.get("in_channels", 3),
                mean=a.get("mean"),
                std=a.get("std"))
  family = a["family"]
  if family == "smallcnn":
    return SmallCNN(**common)
  if family == "resnet18":
    return ResNet18(width=a["width"], **common)
  if family == "preactresnet18":
    return PreActResNet18(width=a["width"], **common)
  if family == "wideresnet":
    return WideResNet(depth=a["depth"], widen_factor=a["widen_factor"], **common)
  raise ValueError(f"unknown architecture family {family!r} in model.json.")


def load(directory, device="cpu"):
  """The exported network of `directory` (model.json + model.safetensors), in eval mode."""
  from safetensors.torch import load_file
  with open(os.path.join(directory, "model.json")) as f:
    record = json.load(f)
  model = build(record["architecture"])
  weights = os.path.join(directory, record["files"]["torch_weights"])
  model.load_state_dict(load_file(weights, device=device), strict=True)
  return model.to(device).eval()
'''
