"""gen_jax variables <-> PyTorch state dicts of the reference networks, and their safetensors files.

Owns the name and layout map between a flax network of `gen_jax.models` and the PyTorch
definition of the same network (`architecture.TORCH_REFERENCES`), both ways, and the reading and
writing of `.safetensors` files (numpy arrays only: no torch, no pickle).

The map, per layer (flax path -> PyTorch key):

    conv  .../conv1/kernel (H, W, I, O)       -> ...conv1.weight (O, I, H, W)
    dense linear|fc/kernel (I, O)             -> linear|fc.weight (O, I); bias -> bias
    BN    bn1/scale, bias; batch_stats mean, var
                                              -> bn1.weight, bias, running_mean, running_var,
                                                 num_batches_tracked (int64 0: not tracked here)
    module paths: layer2_0 -> layer2.0, shortcut_conv -> shortcut.0, shortcut_bn -> shortcut.1
                  (ResNets); block2_0 -> block2.layer.0, shortcut_conv -> convShortcut (WRNs)

BatchNorm running variances are copied as they are: flax keeps the biased batch variance where
PyTorch keeps the unbiased one, but inference uses the stored value in the same formula, so the
logits agree; only the update rule of further training differs (by n / (n - 1)).

Synopsis::

    state = torch_state_dict(variables, arch)             # {"conv1.weight": (O, I, H, W), ...}
    save_safetensors(state, "out/model.safetensors", metadata={"format": "pt"})
    variables = flax_variables(load_safetensors("out/model.safetensors"), arch)
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import numpy as np

from gen_jax.export.architecture import Architecture, abstract_variables

# Keys of a reference state dict that have no counterpart here and are dropped on import:
# the TRADES Wide_ResNet's sub_block1 (registered, never called in forward).
IGNORED_PREFIXES: dict[str, tuple[str, ...]] = {"wideresnet": ("sub_block1.",)}
# nn.DataParallel (as the reference code trains) prefixes every key with this.
DATA_PARALLEL_PREFIX = "module."


def _torch_module(family: str, path: tuple[str, ...]) -> str:
  """The PyTorch module name of a flax module path, e.g. ("layer2_0", "shortcut_bn")."""
  parts = []
  for name in path:
    if m := re.fullmatch(r"layer(\d+)_(\d+)", name):
      parts.append(f"layer{m[1]}.{m[2]}")
    elif m := re.fullmatch(r"block(\d+)_(\d+)", name):
      parts.append(f"block{m[1]}.layer.{m[2]}")
    elif name == "shortcut_conv":
      parts.append("convShortcut" if family == "wideresnet" else "shortcut.0")
    elif name == "shortcut_bn":
      parts.append("shortcut.1")
    else:
      parts.append(name)
  return ".".join(parts)


def _modules(tree: dict[str, Any], path: tuple[str, ...] = ()):
  """Yields (module path, {leaf name: leaf}) for every flax module holding arrays, in order."""
  leaves = {k: v for k, v in tree.items() if not isinstance(v, dict)}
  if leaves:
    yield path, leaves
  for name, sub in tree.items():
    if isinstance(sub, dict):
      yield from _modules(sub, path + (name,))


def key_map(arch: Architecture) -> dict[str, tuple[str, tuple[str, ...], str]]:
  """The PyTorch keys of `arch`, in its flax variables' order: key -> (collection, path, kind).

  `kind` says how the array is laid out: "conv" (HWIO <-> OIHW), "dense" (transposed), "copy",
  or "count" (num_batches_tracked, written as int64 0 and not read back).
  """
  abstract = abstract_variables(arch)
  stats = dict(_modules(abstract["batch_stats"]))
  result = {}
  for path, leaves in _modules(abstract["params"]):
    prefix = _torch_module(arch.family, path)
    if "scale" in leaves:  # BatchNorm: PyTorch's order weight, bias, running_mean, running_var.
      result[f"{prefix}.weight"] = ("params", path + ("scale",), "copy")
      result[f"{prefix}.bias"] = ("params", path + ("bias",), "copy")
      if path not in stats:
        raise AssertionError(f"BatchNorm {'/'.join(path)} has no batch_stats")
      result[f"{prefix}.running_mean"] = ("batch_stats", path + ("mean",), "copy")
      result[f"{prefix}.running_var"] = ("batch_stats", path + ("var",), "copy")
      result[f"{prefix}.num_batches_tracked"] = ("batch_stats", path, "count")
      continue
    kernel = leaves["kernel"]
    result[f"{prefix}.weight"] = ("params", path + ("kernel",),
                                  "conv" if len(kernel.shape) == 4 else "dense")
    if "bias" in leaves:
      result[f"{prefix}.bias"] = ("params", path + ("bias",), "copy")
  return result


def _get(tree: Any, path: tuple[str, ...], collection: str) -> Any:
  node = tree
  for i, name in enumerate(path):
    if not hasattr(node, "get") or name not in node:
      raise ValueError(f"the variables have no {collection}/{'/'.join(path[:i + 1])}: they do not "
                       "belong to the architecture given (another model, width or depth).")
    node = node[name]
  return node


def torch_state_dict(variables: dict[str, Any], arch: Architecture) -> dict[str, np.ndarray]:
  """The PyTorch state dict (numpy arrays, float32; PyTorch's names and layouts) of `variables`.

  Args:
    variables: `{"params": ..., "batch_stats": ...}` of a network of architecture `arch`.
    arch: its `Architecture`.

  Returns:
    An ordered `{key: array}` that `load_state_dict(strict=True)` of the PyTorch definition
    accepts (after `torch.from_numpy`).

  Raises:
    ValueError: the variables lack a leaf of `arch` or have a leaf of another shape.
  """
  abstract = abstract_variables(arch)
  state = {}
  for key, (collection, path, kind) in key_map(arch).items():
    if kind == "count":
      state[key] = np.zeros((), np.int64)
      continue
    value = np.asarray(_get(variables.get(collection, {}), path, collection))
    expected = tuple(_get(abstract[collection], path, collection).shape)
    if value.shape != expected:
      raise ValueError(f"{collection}/{'/'.join(path)} has shape {value.shape}, but a "
                       f"{arch.name} with {arch.num_classes} classes and {arch.in_channels} input "
                       f"channel(s) has {expected}: the variables belong to another network.")
    value = value.astype(np.float32)
    if kind == "conv":
      value = value.transpose(3, 2, 0, 1)
    elif kind == "dense":
      value = value.T
    state[key] = np.ascontiguousarray(value)
  return state


def _set(tree: dict[str, Any], path: tuple[str, ...], value: np.ndarray) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def strip_known_prefixes(state: dict[str, Any], arch: Architecture) -> dict[str, Any]:
  """Drops nn.DataParallel's "module." prefix and the keys the reference has but never uses."""
  if state and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state):
    state = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state.items()}
  ignored = IGNORED_PREFIXES.get(arch.family, ())
  return {k: v for k, v in state.items() if not k.startswith(ignored)}


def flax_variables(state: dict[str, Any], arch: Architecture, *, source: str = "the state dict"):
  """gen_jax variables from a PyTorch state dict of `arch` (the reverse of `torch_state_dict`).

  Accepts what the reference code saves: keys may carry nn.DataParallel's "module." prefix, the
  TRADES WRN's unused `sub_block1.*` keys are dropped, `num_batches_tracked` may be absent.

  Args:
    state: `{key: array}` (numpy arrays, or anything `np.asarray` reads).
    arch: the architecture the weights belong to.
    source: how to name the state dict in error messages (e.g. its file).

  Returns:
    `{"params": ..., "batch_stats": ...}` of float32 numpy arrays, for `build_model(arch)`.

  Raises:
    ValueError: a key is missing or unexpected (the first one is named, with the counts), or an
      array has another shape than `arch` needs.
  """
  state = strip_known_prefixes(dict(state), arch)
  mapping = key_map(arch)
  needed = [k for k, (_, _, kind) in mapping.items() if kind != "count"]
  missing = [k for k in needed if k not in state]
  unexpected = [k for k in state if k not in mapping]
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing key {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
      parts.append(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    raise ValueError(
        f"{source} does not hold the weights of a {arch.name} with {arch.num_classes} classes and "
        f"{arch.in_channels} input channel(s): {'; '.join(parts)}. Check the architecture "
        "(--model / --num-classes) or the file.")
  abstract = abstract_variables(arch)
  variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
  for key in needed:
    collection, path, kind = mapping[key]
    value = np.asarray(state[key], dtype=np.float32)
    expected = _get(abstract[collection], path, collection).shape
    if kind == "conv":
      value = value.transpose(2, 3, 1, 0)
    elif kind == "dense":
      value = value.T
    if value.shape != tuple(expected):
      torch_shape = tuple(np.asarray(state[key]).shape)
      raise ValueError(f"{source}: {key!r} has shape {torch_shape}, but a {arch.name} with "
                       f"{arch.num_classes} classes and {arch.in_channels} input channel(s) needs "
                       f"{torch_state_shape(expected, kind)}. Check the architecture or the file.")
    _set(variables[collection], path, np.ascontiguousarray(value))
  return variables


def torch_state_shape(flax_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  """The PyTorch shape of a flax array of `flax_shape` laid out as `kind` (see `key_map`)."""
  if kind == "conv":
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if kind == "dense":
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def _safetensors_numpy():
  try:
    from safetensors import numpy as st_numpy
  except ImportError as error:
    raise ImportError("reading and writing PyTorch weights needs safetensors: pip install "
                      "safetensors==0.8.0 (or pip install -e '.[export]').") from error
  return st_numpy


def save_safetensors(state: dict[str, np.ndarray],
                     path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> pathlib.Path:
  """Writes `{key: array}` as a safetensors file (a temporary file renamed into place).

  The bytes are written by Python, not by safetensors' `save_file` (which creates its file with
  mode 0600), so the file gets the mode of every other file of an export (0644 under umask 022).
  """
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(_safetensors_numpy().save(state, metadata=metadata))
  os.replace(tmp, path)
  return path


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a safetensors file into `{key: numpy array}` (no torch, no pickle).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a safetensors file (e.g. a torch.save pickle); the message says how to convert.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file.")
  reader = _safetensors_numpy()  # a missing package is named as such, not blamed on the file
  try:
    state = dict(reader.load_file(str(path)))
  except Exception as error:  # safetensors raises its own SafetensorError; name the culprit.
    raise ValueError(
        f"{path} is not a readable safetensors file ({error}). A PyTorch checkpoint saved with "
        "torch.save is a pickle, which gen_jax never loads: convert it where PyTorch is "
        "installed with safetensors.torch.save_file(torch.load(PATH, weights_only=True), "
        "'model.safetensors') (take the state dict out first if it is nested).") from error
  for key, value in state.items():
    if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
      raise ValueError(f"{path}: tensor {key} holds NaN or inf, so these weights are damaged or "
                       "come from a diverged run; gen_jax does not import them.")
  return state
