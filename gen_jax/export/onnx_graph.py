"""ONNX export of a gen_jax network through jax2onnx, and inference with ONNX Runtime.

Owns `to_onnx(model, variables, image_shape, layout=...)`: a float32 inference graph (BatchNorm on
running statistics, the model's mean/std inside) of `model.apply(variables, x, train=False)`, with
the weights as initializers, input "input" (images in [0, 1], NCHW by default or NHWC, dynamic
batch "batch") and output "logits"; and `run(model_proto_or_path, x)` with onnxruntime.

The exporter is jax2onnx 0.13.0: its later releases (0.13.1 on) cap orbax-checkpoint below the
0.12 that gen_jax pins, and 0.13.0 converts these networks on jax 0.10.2 within float32 rounding
(tests/test_export.py). Four habits of that release are handled here. It needs opset 18 or more
(it writes ReduceMean with its axes as an input). It imports every plugin on first use,
including example modules that build and compile equinox networks at import time (about 15 s),
so only the jax and flax.linen plugin trees are loaded (if its internals differ, it imports them
all itself). Its flax Conv plugin prints debug lines, which are swallowed. And it records some
intermediate shapes in the NHWC order after rewriting the convolutions to NCHW, so the graph's
value_info is dropped (ONNX Runtime would warn about each) and onnx's shape inference redoes it.

Synopsis::

    proto = to_onnx(model, variables, (32, 32, 3), layout="NCHW")
    save(proto, "out/model.onnx")
    logits = run("out/model.onnx", x_nchw)
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import warnings
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

LAYOUTS: tuple[str, ...] = ("NCHW", "NHWC")
INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "input", "logits", "batch"
# The oldest that works: jax2onnx 0.13.0 writes ReduceMean with its axes as an input (opset 18+).
DEFAULT_OPSET = 18  # read by ONNX Runtime >= 1.14
_INSTALL_HINT = "pip install jax2onnx==0.13.0 onnx==1.23.2 (or pip install -e '.[export]')"


def check_layout(layout: str) -> str:
  """Returns the layout upper-cased; ValueError unless it is NCHW or NHWC."""
  upper = str(layout).upper()
  if upper not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; choose NCHW (PyTorch/ONNX convention) or NHWC.")
  return upper


def _import_jax2onnx():
  try:
    import jax2onnx
    from jax2onnx.plugins import plugin_system
  except ImportError as error:
    raise ImportError(f"ONNX export needs jax2onnx and onnx: {_INSTALL_HINT}.") from error
  _load_plugins(plugin_system)
  return jax2onnx


def _load_plugins(plugin_system: Any) -> None:
  """Imports the jax and flax.linen plugins only (see the module docstring)."""
  import_tree = getattr(plugin_system, "_import_tree", None)
  if getattr(plugin_system, "_already_imported_plugins", True) or import_tree is None:
    return  # Done already, or another release: to_onnx imports everything itself.
  root = pathlib.Path(plugin_system.__file__).parent
  logger = logging.getLogger("jax2onnx")
  level = logger.level
  logger.setLevel(logging.ERROR)  # e.g. dm_pix plugins that fail to import on this jax
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)  # its use of jax.core.DropVar
      for tree in ("jax", "flax/linen"):
        import_tree(root / tree, "jax2onnx.plugins." + tree.replace("/", "."))
  finally:
    logger.setLevel(level)
  plugin_system._already_imported_plugins = True


def to_onnx(model: nn.Module,
            variables: dict[str, Any],
            image_shape: tuple[int, int, int],
            *,
            layout: str = "NCHW",
            opset: int = DEFAULT_OPSET,
            metadata: dict[str, str] | None = None,
            model_name: str = "gen_jax") -> Any:
  """The ONNX inference graph of `model` with `variables` baked in.

  Args:
    model: a float32 gen_jax network with `nn.Conv` convolutions (`architecture.build_model`):
      FastConv's custom VJP is not for an exporter.
    variables: its `{"params": ..., "batch_stats": ...}`.
    image_shape: (height, width, channels) of one image.
    layout: "NCHW" (the PyTorch/ONNX convention) or "NHWC" (gen_jax's own).
    opset: ONNX opset of the graph.
    metadata: string key/values stored as the model's metadata_props.
    model_name: the graph's name.

  Returns:
    An `onnx.ModelProto` (checked with `onnx.checker`).

  Raises:
    ImportError: jax2onnx or onnx is not installed (the message says what to install).
    ValueError: a bad layout.
  """
  layout = check_layout(layout)
  jax2onnx = _import_jax2onnx()
  import onnx
  h, w, c = (int(d) for d in image_shape)
  variables = {k: dict(v) for k, v in variables.items()}

  if layout == "NCHW":
    shape = (BATCH_DIM, c, h, w)
    fn = lambda x: model.apply(variables, jnp.transpose(x, (0, 2, 3, 1)), train=False)
  else:
    shape = (BATCH_DIM, h, w, c)
    fn = lambda x: model.apply(variables, x, train=False)
  # The flax Conv plugin of this release prints debug lines on stdout.
  with contextlib.redirect_stdout(io.StringIO()):
    proto = jax2onnx.to_onnx(fn, [shape],
                             model_name=model_name,
                             opset=opset,
                             input_names=[INPUT_NAME],
                             output_names=[OUTPUT_NAME])
  del proto.graph.value_info[:]
  proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
  if metadata:
    onnx.helper.set_model_props(proto, {str(k): str(v) for k, v in metadata.items()})
  onnx.checker.check_model(proto, full_check=True)
  return proto


def save(proto: Any, path: str | os.PathLike) -> pathlib.Path:
  """Writes an ONNX model (a temporary file renamed into place)."""
  import onnx
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  onnx.save_model(proto, str(tmp))
  os.replace(tmp, path)
  return path


def session(model: Any) -> Any:
  """An onnxruntime CPU `InferenceSession` of a ModelProto or a file."""
  try:
    import onnxruntime as ort
  except ImportError as error:
    raise ImportError("running ONNX models needs onnxruntime: pip install "
                      "onnxruntime==1.32.0") from error
  options = ort.SessionOptions()
  options.log_severity_level = 3  # errors only
  source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
  return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(model: Any, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """Logits of an exported model (ModelProto, file or session) for images `x` in its layout."""
  sess = model if hasattr(model, "run") and hasattr(model, "get_inputs") else session(model)
  x = np.asarray(x, np.float32)
  return np.concatenate([
      sess.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch_size]})[0]
      for i in range(0, len(x), batch_size)
  ])
