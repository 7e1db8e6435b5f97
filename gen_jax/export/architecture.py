"""What an exported network is: its family and sizes, read off a gen_jax model, rebuilt from them.

Owns `Architecture` (family, classes, input channels, width or depth and widening, the in-model
mean/std), `architecture_of(model)` for the four families the registry builds (smallcnn,
resnet18, preactresnet18, the WideResNets, at any width or depth), `build_model(arch)` (the float32
flax network with plain `nn.Conv`, as the exporters need it) and the JSON record of `model.json`.

Synopsis::

    arch = architecture_of(models.create_model("wrn34_10", 10), in_channels=3)
    arch.family, arch.depth, arch.widen_factor          # "wideresnet", 34, 10
    model = build_model(arch)                           # WideResNet(..., conv=nn.Conv, float32)
    arch == Architecture.from_record(arch.record())     # True
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gen_jax import models
from gen_jax.models import PreActResNet18, ResNet18, SmallCNN, WideResNet
from gen_jax.models.wide_resnet import blocks_per_stage

FAMILIES: tuple[str, ...] = ("smallcnn", "resnet18", "preactresnet18", "wideresnet")

# The PyTorch definitions whose state-dict names and shapes the exported weights match.
TORCH_REFERENCES: dict[str, str] = {
    "smallcnn": "gen_jax SmallCNN (no reference definition; torch_model.py defines it)",
    "resnet18": "PKU-ML/Generalist models/resnet.py ResNet18 (the CIFAR ResNet-18)",
    "preactresnet18": "PKU-ML/Generalist models/preact_resnet.py PreActResNet18",
    "wideresnet": "models/wrn_madry.py Wide_ResNet_Madry (WRN-32-10); TRADES "
                  "models/wide_resnet.py Wide_ResNet (WRN-34-10) with strict=False, since its "
                  "sub_block1, which forward never calls, is not exported",
}


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The description of a network that the exporters and importers need.

  Attributes:
    family: one of `FAMILIES`.
    num_classes: number of logits.
    in_channels: image channels (3 for CIFAR, 1 for the digits).
    width: channels of the first stage of a ResNet (64 in the reference); None otherwise.
    depth: WideResNet depth (6n + 4 or 6n + 2); None otherwise.
    widen_factor: WideResNet width multiplier; None otherwise.
    mean: per-channel mean subtracted inside the model, or None.
    std: per-channel standard deviation divided out inside the model, or None.
  """
  family: str
  num_classes: int
  in_channels: int = 3
  width: int | None = None
  depth: int | None = None
  widen_factor: int | None = None
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  @property
  def name(self) -> str:
    """The registry name when the sizes are the registry's (e.g. "wrn34_10"), else descriptive."""
    if self.family == "wideresnet":
      return f"wrn{self.depth}_{self.widen_factor}"
    if self.family in ("resnet18", "preactresnet18") and self.width != 64:
      return f"{self.family}-width{self.width}"
    return self.family

  @property
  def blocks_per_stage(self) -> int | None:
    """Residual blocks per stage of a WideResNet (n); None for the other families."""
    return blocks_per_stage(self.depth) if self.family == "wideresnet" else None

  def record(self) -> dict[str, Any]:
    """The JSON record (`model.json` "architecture"); `from_record` reads it back."""
    record = dataclasses.asdict(self)
    record["name"] = self.name
    for field in ("mean", "std"):
      record[field] = None if record[field] is None else list(record[field])
    return record

  @classmethod
  def from_record(cls, record: dict[str, Any]) -> Architecture:
    """Rebuilds an `Architecture` from `record()`; ValueError names a bad or missing field."""
    if not isinstance(record, dict):
      raise ValueError(f"an architecture record must be a JSON object; got {record!r}.")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in record.items() if k in fields}
    for field in ("family", "num_classes"):
      if field not in values:
        raise ValueError(f"the architecture record has no {field!r}; got {record!r}.")
    for field in ("mean", "std"):
      if values.get(field) is not None:
        values[field] = tuple(float(v) for v in values[field])
    arch = cls(**values)
    arch.check()
    return arch

  def check(self) -> None:
    """Raises ValueError unless the fields describe a network `build_model` can make."""
    if self.family not in FAMILIES:
      raise ValueError(f"unknown architecture family {self.family!r}; known: "
                       f"{', '.join(FAMILIES)}.")
    for field in ("num_classes", "in_channels"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Architecture.{field} must be a positive int; got {value!r}.")
    needs = {
        "resnet18": ("width",),
        "preactresnet18": ("width",),
        "wideresnet": ("depth", "widen_factor")
    }.get(self.family, ())
    for field in ("width", "depth", "widen_factor"):
      value = getattr(self, field)
      if field in needs and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"a {self.family} needs a positive int {field}; got {value!r}.")
      if field not in needs and value is not None:
        raise ValueError(f"a {self.family} has no {field}; got {field}={value!r}.")
    if self.family == "wideresnet":
      blocks_per_stage(self.depth)
    for field in ("mean", "std"):
      value = getattr(self, field)
      if value is not None and len(value) != self.in_channels:
        raise ValueError(f"Architecture.{field} has {len(value)} entries for {self.in_channels} "
                         "input channel(s); give one per channel or None.")


def _stats(value: Any) -> tuple[float, ...] | None:
  return None if value is None else tuple(float(v) for v in value)


def architecture_of(model: nn.Module, *, in_channels: int = 3) -> Architecture:
  """Reads the architecture of a gen_jax network (`models.create_model` or a module built by hand).

  Args:
    model: a SmallCNN, ResNet18, PreActResNet18 or WideResNet of `gen_jax.models`, at any width,
      depth, dtype and conv implementation.
    in_channels: channels of the images it reads (the model itself does not record them).

  Returns:
    The `Architecture`.

  Raises:
    ValueError: any other module (the message names its class and the exportable families).
  """
  mean, std = _stats(getattr(model, "mean", None)), _stats(getattr(model, "std", None))
  common = dict(num_classes=int(model.num_classes) if hasattr(model, "num_classes") else 0,
                in_channels=int(in_channels),
                mean=mean,
                std=std)
  # PreActResNet18 subclasses ResNet18: test it first.
  if isinstance(model, PreActResNet18):
    arch = Architecture("preactresnet18", width=int(model.width), **common)
  elif isinstance(model, ResNet18):
    arch = Architecture("resnet18", width=int(model.width), **common)
  elif isinstance(model, WideResNet):
    arch = Architecture("wideresnet",
                        depth=int(model.depth),
                        widen_factor=int(model.widen_factor),
                        **common)
  elif isinstance(model, SmallCNN):
    arch = Architecture("smallcnn", **common)
  else:
    raise ValueError(
        f"cannot export a {type(model).__name__}: the exporters know the networks of "
        f"gen_jax.models ({', '.join(models.MODEL_NAMES)}, and their narrower or shallower "
        "variants). Train one of those, or add the family to gen_jax.export.")
  arch.check()
  return arch


def build_model(arch: Architecture) -> nn.Module:
  """The float32 flax network of `arch`, with plain `nn.Conv` (what an exporter should trace).

  Its variables are those of any model with the same architecture (FastConv keeps nn.Conv's).
  """
  arch.check()
  common = dict(num_classes=arch.num_classes,
                dtype=jnp.float32,
                conv=nn.Conv,
                mean=arch.mean,
                std=arch.std)
  if arch.family == "smallcnn":
    return SmallCNN(**common)
  if arch.family == "resnet18":
    return ResNet18(width=arch.width, **common)
  if arch.family == "preactresnet18":
    return PreActResNet18(width=arch.width, **common)
  return WideResNet(depth=arch.depth, widen_factor=arch.widen_factor, **common)


@functools.lru_cache(maxsize=64)
def abstract_variables(arch: Architecture) -> dict[str, Any]:
  """Shapes and dtypes of the variables of `arch` (`jax.ShapeDtypeStruct` leaves; nothing runs).

  Parameter shapes do not depend on the image size, so a 32x32 image stands in for any. Cached
  per architecture: treat the result as read-only.
  """
  model = build_model(arch)
  return jax.eval_shape(lambda key: models.init_variables(model, key, (32, 32, arch.in_channels)),
                        jax.random.key(0))
