"""Exporting a trained network (ONNX, PyTorch weights, model.json) and importing PyTorch weights.

Owns the export directory: `model.onnx`, `model.safetensors` with `torch_model.py` beside it, and
`model.json` (architecture, classes, input range and layout, mean/std, the training config, which
model it is, parity figures, export times, versions). An existing export is never overwritten
unless asked. Every export is checked against the JAX logits on the given images: the ONNX graph
with ONNX Runtime, the weights file (read back) with the numpy re-implementation of the PyTorch
forward pass; a difference above the tolerance raises after model.json has recorded it.

Synopsis::

    record = export_model(model, variables, "exports/m", image_shape=(32, 32, 3),
                          formats=("onnx", "torch"), parity_images=x_uint8[:64])
    record = export_checkpoint("exports/pilot", checkpoint="runs/pilot/best")  # or workdir=, role=
    variables = load_torch_weights("reference/model.safetensors", arch)       # the way back
    path = import_torch_checkpoint("model.safetensors", config, "runs/imported")  # for evaluate.py
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gen_jax import checkpoint
from gen_jax.export import numpy_reference, onnx_graph, torch_weights
from gen_jax.export.architecture import (TORCH_REFERENCES, Architecture, architecture_of,
                                         build_model)
from gen_jax.export.torch_source import SOURCE as TORCH_SOURCE
from gen_jax.export.torch_source import TORCH_MODULE_FILE

FORMATS: tuple[str, ...] = ("onnx", "torch")
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "model.json"
EXPORT_FILES: tuple[str, ...] = (ONNX_FILE, WEIGHTS_FILE, TORCH_MODULE_FILE, RECORD_FILE)
TOLERANCE = 1e-4  # max |logit difference| an export may have from the JAX model
PARITY_IMAGES = 64
RECORD_VERSION = 1
# The trained tensors of a PyTorch state dict (the rest are BatchNorm buffers).
TORCH_PARAMS = ("weight", "bias")


def check_formats(formats: Any) -> tuple[str, ...]:
  """Normalises "onnx", "torch", "both" or a sequence of them; ValueError names a bad one."""
  names = [formats] if isinstance(formats, str) else list(formats)
  result = []
  for name in names:
    for part in (FORMATS if name == "both" else (name,)):
      if part not in FORMATS:
        raise ValueError(f"unknown export format {part!r}; choose onnx, torch or both.")
      if part not in result:
        result.append(part)
  if not result:
    raise ValueError("no export format given; choose onnx, torch or both.")
  return tuple(result)


def check_directory(out: str | os.PathLike, *, overwrite: bool = False) -> list[str]:
  """Raises unless `out` can take a new export; returns the earlier export's files there.

  Raises:
    FileExistsError: `out` holds an export file and `overwrite` is False (names the file).
    NotADirectoryError: `out` is a file.
  """
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise NotADirectoryError(f"--out {out} is a file; give a directory for the export.")
  present = [name for name in EXPORT_FILES if (out / name).exists()]
  if present and not overwrite:
    raise FileExistsError(f"{out / present[0]} already exists: {out} holds an earlier export. "
                          "Choose another --out, or pass --overwrite (overwrite=True) to replace "
                          "it.")
  return present


def _move_into_place(staged: pathlib.Path, out: pathlib.Path, *, overwrite: bool) -> pathlib.Path:
  """Puts a complete export written in `staged` in place as `out`: one rename when `out` does
  not exist or is an empty directory (a kill leaves all of it or none); else (a directory with
  files of the user's, or an export being replaced) the earlier export's files go, the new ones
  move in with model.json last, and `staged` is removed."""
  if out.is_dir() and not any(out.iterdir()):
    # File by file, a kill between the moves would leave model.onnx without model.json, which
    # the rerun refuses as "an earlier export".
    out.rmdir()
  if not out.exists():
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, out)
    return out
  prepare_directory(out, overwrite=overwrite)
  names = sorted(p.name for p in staged.iterdir())
  for name in [n for n in names if n != RECORD_FILE] + [RECORD_FILE]:
    os.replace(staged / name, out / name)
  staged.rmdir()
  return out


def prepare_directory(out: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
  """Creates `out`, refusing to replace an earlier export unless `overwrite` (`check_directory`).

  With `overwrite`, the earlier export's files (only those, `EXPORT_FILES`) are removed, so no
  file of an earlier format outlives the new model.json.
  """
  present = check_directory(out, overwrite=overwrite)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  for name in present:
    (out / name).unlink()
  return out


def _versions() -> dict[str, str]:
  versions = {}
  for package in ("gen_jax", "jax", "flax", "jax2onnx", "onnx", "onnxruntime", "safetensors"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def _float_images(images: Any) -> np.ndarray:
  from gen_jax.data.augment import to_float
  x = np.asarray(to_float(np.asarray(images)))
  if x.ndim != 4:
    raise ValueError(f"parity images must be an NHWC batch; got shape {x.shape}.")
  return x


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: nn.Module, variables: Any, x: jax.Array) -> jax.Array:
  return model.apply(variables, x, train=False)


def jax_logits(model: nn.Module, variables: Any, images: Any, batch_size: int = 64) -> np.ndarray:
  """The logits the exports are compared with: `model` in float32, inference mode.

  Args:
    model: a gen_jax network (a float32 copy of it computes the logits: so does the export).
    variables: its variables.
    images: NHWC images, uint8 or floats in [0, 1].
    batch_size: images per compiled call.

  Returns:
    float32 logits as a numpy array.
  """
  if hasattr(model, "dtype"):
    model = model.clone(dtype=jnp.float32)
  try:
    hash(model)
    apply_fn = functools.partial(_apply, model)  # one compilation per network and batch shape
  except TypeError:  # a module built by hand with list fields
    apply_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  x = _float_images(images)
  return np.concatenate(
      [np.asarray(apply_fn(variables, x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def _parity(reference: np.ndarray, got: np.ndarray, runtime: str,
            tolerance: float) -> dict[str, Any]:
  diff = float(np.max(np.abs(reference - got))) if len(reference) else 0.0
  return {
      "runtime": runtime,
      "images": len(reference),
      "max_abs_diff": diff,
      # float32 rounding grows with the logits' size: this tells a scale from a real mismatch.
      "max_abs_logit": float(np.max(np.abs(reference))) if len(reference) else 0.0,
      "tolerance": tolerance,
      "passed": bool(diff < tolerance),
      "same_predictions": bool(np.all(reference.argmax(-1) == got.argmax(-1)))
  }


def _positive_number(value: Any) -> bool:
  return (not isinstance(value, bool) and isinstance(value, (int, float)) and
          0 < value < float("inf"))


def _input_record(arch: Architecture, image_shape: tuple[int, ...]) -> dict[str, Any]:
  normalized = arch.mean is not None or arch.std is not None
  return {
      "range": [0.0, 1.0],
      "dtype":
          "float32",
      "image_shape_hwc":
          list(image_shape),
      "mean":
          None if arch.mean is None else list(arch.mean),
      "std":
          None if arch.std is None else list(arch.std),
      "normalization": (
          "(x - mean) / std inside the exported model: feed [0, 1] images" if normalized else "none"
      ),
  }


def export_model(model: nn.Module,
                 variables: dict[str, Any],
                 out: str | os.PathLike,
                 *,
                 image_shape: tuple[int, int, int],
                 formats: Any = FORMATS,
                 layout: str = "NCHW",
                 opset: int = onnx_graph.DEFAULT_OPSET,
                 parity_images: Any = None,
                 config: dict[str, Any] | None = None,
                 which: dict[str, Any] | None = None,
                 tolerance: float = TOLERANCE,
                 overwrite: bool = False) -> dict[str, Any]:
  """Exports one network to `out` and writes its `model.json`.

  Args:
    model: a network of `gen_jax.models` (any dtype or conv implementation: the export rebuilds
      it in float32 with plain convolutions, which has the same variables).
    variables: its `{"params": ..., "batch_stats": ...}`.
    out: the export directory (created; an earlier export there is refused unless `overwrite`).
    image_shape: (height, width, channels) of the images it reads.
    formats: "onnx", "torch", "both" or a sequence of "onnx" and "torch".
    layout: input layout of the ONNX graph, "NCHW" (default) or "NHWC"; the PyTorch module
      always reads NCHW.
    opset: ONNX opset (>= 18).
    parity_images: NHWC images (uint8 or floats in [0, 1]) to compare the exports' logits with
      the JAX model's on (e.g. the first 64 test images); None skips the check.
    config: the training config record to keep in model.json.
    which: which model this is (role, mixture beta, source), kept in model.json.
    tolerance: the largest |logit difference| (exclusive) an export may have from the JAX model;
      float32 rounding grows with the size of the logits, so a network with logits in the
      hundreds may need more than the default 1e-4.
    overwrite: replace an earlier export in `out`.

  Returns:
    The model.json record.

  Raises:
    ValueError: an unknown format or layout, a network that is not exportable, variables that do
      not fit it, an opset below 18.
    FileExistsError: `out` holds an earlier export and `overwrite` is False.
    ImportError: the exporter or runtime for a requested format is not installed.
    RuntimeError: an export's logits differ from the JAX model's by `tolerance` or more (after
      model.json has recorded the figures).
  """
  formats = check_formats(formats)
  layout = onnx_graph.check_layout(layout)
  if isinstance(opset, bool) or not isinstance(opset, int) or opset < 18:
    raise ValueError(f"opset must be an int >= 18 (jax2onnx 0.13.0 writes ReduceMean with axes "
                     f"as an input, which opset 18 introduced); got {opset!r}.")
  if not _positive_number(tolerance):
    raise ValueError(f"tolerance must be a positive number such as 1e-4; got {tolerance!r}.")
  image_shape = tuple(int(d) for d in image_shape)
  arch = architecture_of(model, in_channels=image_shape[-1])
  variables = jax.device_get(variables)
  # Fail on variables of another network before anything is written.
  state = torch_weights.torch_state_dict(variables, arch)
  check_directory(out, overwrite=overwrite)
  final, out = pathlib.Path(out), checkpoint.partial_path(out)
  checkpoint.remove_partial(out)
  out.mkdir(parents=True)

  x = None if parity_images is None else _float_images(parity_images)
  reference = None if x is None else jax_logits(model, variables, x)
  x_nchw = None if x is None else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
  files, seconds, parity, details = {}, {}, {}, {}

  if "onnx" in formats:
    start = time.perf_counter()
    metadata = {
        "gen_jax.architecture": json.dumps(arch.record()),
        "gen_jax.input": f"float32 {layout} images in [0, 1]"
    }
    proto = onnx_graph.to_onnx(build_model(arch),
                               variables,
                               image_shape,
                               layout=layout,
                               opset=opset,
                               metadata=metadata,
                               model_name=f"gen_jax_{arch.name}")
    onnx_graph.save(proto, out / ONNX_FILE)
    seconds["onnx"] = round(time.perf_counter() - start, 3)
    files["onnx"] = ONNX_FILE
    details["onnx"] = {
        "opset": opset,
        "input": onnx_graph.INPUT_NAME,
        "output": onnx_graph.OUTPUT_NAME,
        "layout": layout,
        "shape": [
            onnx_graph.BATCH_DIM,
            *((image_shape[2], *image_shape[:2]) if layout == "NCHW" else image_shape)
        ],
        "batch_norm": "inference mode (running statistics)",
        "exporter": "jax2onnx"
    }
    if reference is not None:
      got = onnx_graph.run(out / ONNX_FILE, x_nchw if layout == "NCHW" else x)
      parity["onnx"] = _parity(reference, got, "onnxruntime (CPU)", tolerance)

  if "torch" in formats:
    start = time.perf_counter()
    torch_weights.save_safetensors(state, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / TORCH_MODULE_FILE).write_text(TORCH_SOURCE)
    seconds["torch"] = round(time.perf_counter() - start, 3)
    files.update(torch_weights=WEIGHTS_FILE, torch_module=TORCH_MODULE_FILE)
    parameters = sum(v.size for k, v in state.items() if k.rsplit(".", 1)[-1] in TORCH_PARAMS)
    details["torch"] = {
        "reference_definition": TORCH_REFERENCES[arch.family],
        "keys": len(state),
        "parameters": int(parameters),
        "layout": "NCHW",
        "load": f"import torch_model; model = torch_model.load(DIR)  # {TORCH_MODULE_FILE}",
        "num_batches_tracked": "0 (gen_jax does not count BatchNorm updates)",
        "running_var": "flax's biased batch variance (PyTorch keeps the unbiased one); the "
                       "inference logits are the same",
    }
    if reference is not None:
      written = torch_weights.load_safetensors(out / WEIGHTS_FILE)
      got = numpy_reference.forward_batched(written, arch, x_nchw)
      parity["torch"] = _parity(reference, got,
                                "numpy re-implementation of the PyTorch forward pass", tolerance)

  record = {
      "format": "gen_jax export",
      "version": RECORD_VERSION,
      "architecture": arch.record(),
      "num_classes": arch.num_classes,
      "input": _input_record(arch, image_shape),
      "model": which or {},
      "config": config,
      "files": files,
      **details,
      "parity": parity,
      "export_seconds": seconds,
      "versions": _versions(),
  }
  (out / RECORD_FILE).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
  out = _move_into_place(out, final, overwrite=overwrite)
  failed = {name: p["max_abs_diff"] for name, p in parity.items() if not p["passed"]}
  if failed:
    scale = max(p["max_abs_logit"] for p in parity.values())
    raise RuntimeError(
        f"the export in {out} does not reproduce the JAX model: max |logit difference| {failed} "
        f">= {tolerance} with logits up to {scale:.3g} (recorded in {RECORD_FILE}). If the "
        "difference is small next to the logits, it is float32 rounding: export again with a "
        "larger --tolerance; otherwise report it with the model.json.")
  return record


def read_export(directory: str | os.PathLike) -> tuple[Architecture, dict[str, Any]]:
  """(architecture, record) of an export directory's model.json."""
  path = pathlib.Path(directory) / RECORD_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{directory} holds no {RECORD_FILE}: not a gen_jax export.")
  record = json.loads(path.read_text())
  return Architecture.from_record(record.get("architecture")), record


def _which(run: Any, checkpoint: pathlib.Path | None, role: str | None) -> dict[str, Any]:
  """What model.json says about which model was exported."""
  if checkpoint is None:
    return {"role": role, "checkpoint": "latest", "source": str(run.source.absolute())}
  from gen_jax import checkpoint as checkpoint_lib
  if (checkpoint / checkpoint_lib.MODEL_RECORD).is_file():
    saved = {k: v for k, v in checkpoint_lib.read_model_record(checkpoint).items() if k != "config"}
    role = "mixture" if "beta" in saved else saved.get("role", "saved model")
    return {
        "role": role,
        "name": checkpoint.name,
        **saved, "checkpoint": str(checkpoint.absolute())
    }
  (name,) = run.models
  return {
      "role": "global",
      "name": name,
      "selected": "best by validation clean + PGD accuracy",
      "checkpoint": str(checkpoint.absolute())
  }


def export_checkpoint(out: str | os.PathLike,
                      *,
                      checkpoint: str | os.PathLike | None = None,
                      workdir: str | os.PathLike | None = None,
                      role: str = "global",
                      formats: Any = FORMATS,
                      layout: str = "NCHW",
                      opset: int = onnx_graph.DEFAULT_OPSET,
                      parity_n: int = PARITY_IMAGES,
                      tolerance: float = TOLERANCE,
                      overwrite: bool = False) -> dict[str, Any]:
  """Exports a saved model or a run's best/ (`checkpoint`), or one model of a run (`workdir`).

  Parity is checked on the first `parity_n` test images of the run's data set (0: no check).
  See `export_model` for the rest.

  Raises:
    ValueError: neither or both of `checkpoint` and `workdir`; see also `export_model` and
      `gen_jax.runs.load_model` / `restore_models`.
  """
  from gen_jax import runs
  from gen_jax.config import config_record
  if (checkpoint is None) == (workdir is None):
    raise ValueError("give either a checkpoint (a saved model or WORKDIR/best) or a workdir.")
  # Refuse before the models and the data are read.
  formats = check_formats(formats)
  check_directory(out, overwrite=overwrite)
  source = checkpoint if checkpoint is not None else workdir
  try:
    if checkpoint is not None:
      checkpoint = pathlib.Path(checkpoint)
      run = runs.load_model(checkpoint)
    else:
      run = runs.restore_models(workdir, (role,))
  except ValueError as error:  # e.g. a record naming a network gen_jax does not have
    raise ValueError(f"cannot export {source}: {error}") from error
  (variables,) = run.models.values()
  images, _ = run.test_split(parity_n) if parity_n else (None, None)
  return export_model(run.model,
                      variables,
                      out,
                      image_shape=tuple(run.test_x.shape[1:]),
                      formats=formats,
                      layout=layout,
                      opset=opset,
                      parity_images=images,
                      config=config_record(run.config),
                      which=_which(run, checkpoint, role),
                      tolerance=tolerance,
                      overwrite=overwrite)


def load_torch_weights(path: str | os.PathLike,
                       arch: Architecture | nn.Module,
                       *,
                       in_channels: int = 3) -> dict[str, Any]:
  """gen_jax variables from a safetensors file of PyTorch weights (an export, or the reference's).

  Args:
    path: a `.safetensors` file with the state dict of the PyTorch definition of `arch`
      (nn.DataParallel's "module." prefix, the TRADES WRN's unused sub_block1 and missing
      num_batches_tracked are accepted).
    arch: the `Architecture`, or a gen_jax network (then `in_channels` completes it).
    in_channels: image channels, when `arch` is a network.

  Returns:
    `{"params": ..., "batch_stats": ...}` (float32 numpy arrays) for `build_model(arch)` or any
    network of that architecture.

  Raises:
    FileNotFoundError, ValueError: no such file, not a safetensors file, or keys or shapes that
      do not match (the first missing or unexpected key is named).
  """
  if not isinstance(arch, Architecture):
    arch = architecture_of(arch, in_channels=in_channels)
  state = torch_weights.load_safetensors(path)
  return torch_weights.flax_variables(state, arch, source=str(path))


def _infer_sizes(state: dict[str, np.ndarray], family: str) -> tuple[int, int]:
  """(num_classes, in_channels) read off a state dict's head and stem."""
  state = {k.removeprefix(torch_weights.DATA_PARALLEL_PREFIX): v for k, v in state.items()}
  head = "fc.weight" if family == "wideresnet" else "linear.weight"
  for key in (head, "conv1.weight"):
    if key not in state:
      raise ValueError(f"the weights have no {key!r}: they are not a {family} state dict "
                       f"(first keys: {sorted(state)[:3]}).")
  return int(state[head].shape[0]), int(state["conv1.weight"].shape[1])


def import_torch_checkpoint(path: str | os.PathLike,
                            config: Any,
                            out: str | os.PathLike,
                            *,
                            num_classes: int | None = None) -> pathlib.Path:
  """Saves PyTorch weights as a gen_jax model that `experiments/evaluate.py --checkpoint` reads.

  Args:
    path: the safetensors file (see `load_torch_weights`).
    config: the `gen_jax.config.Config` to evaluate it under (its `model` names the network; its
      data set, eps and attack settings are what the evaluation uses).
    out: the new model directory (`gen_jax.runs.save_model`; never overwritten).
    num_classes: the number of classes; default read off the weights' classifier.

  Returns:
    The model directory.

  Raises:
    ValueError: the weights do not fit `config.model`; FileExistsError: `out` exists.
  """
  from gen_jax import models, runs
  path = pathlib.Path(path)
  state = torch_weights.load_safetensors(path)
  probe = architecture_of(models.create_model(config.model, 1))
  inferred_classes, in_channels = _infer_sizes(state, probe.family)
  arch = dataclasses.replace(probe,
                             num_classes=num_classes or inferred_classes,
                             in_channels=in_channels)
  variables = torch_weights.flax_variables(state, arch, source=str(path))
  return runs.save_model(out,
                         variables,
                         config,
                         role="imported",
                         imported_from=str(path.absolute()),
                         architecture=arch.record())
