"""Leaving with a model: ONNX and PyTorch-weight exports of gen_jax networks, and the way back.

Owns the export of a trained network (any of `gen_jax.models`: smallcnn, resnet18,
preactresnet18, the WideResNets, at any width) to an ONNX inference graph (jax2onnx) and to a
safetensors file of PyTorch weights named as in the reference PyTorch code, with a
self-contained `torch_model.py` and a `model.json` beside them; the parity checks of both against
the JAX logits; and the import of such PyTorch weights (also the reference code's own) as gen_jax
variables. Submodules: `architecture` (what a network is), `onnx_graph` (ONNX), `torch_weights`
(the name and layout map, safetensors I/O), `torch_source` (the PyTorch definitions, as text),
`numpy_reference` (the PyTorch forward pass in numpy) and `exporter` (directories and records).
Needs `pip install -e '.[export]'` (jax2onnx, onnx, onnxruntime, safetensors); nothing here
imports torch.

Synopsis::

    from gen_jax import export
    export.export_checkpoint("exports/pilot", checkpoint="runs/pilot/best", formats="both")
    export.export_model(model, variables, "exports/m", image_shape=(32, 32, 3),
                        parity_images=test_images[:64])
    arch = export.architecture_of(model)                         # or export.read_export(DIR)[0]
    variables = export.load_torch_weights("model.safetensors", arch)
    export.import_torch_checkpoint("model.safetensors", config, "runs/imported")
    logits = export.run_onnx("exports/pilot/model.onnx", x_nchw)
"""
from gen_jax.export.architecture import (FAMILIES, Architecture, architecture_of, build_model)
from gen_jax.export.exporter import (EXPORT_FILES, FORMATS, ONNX_FILE, RECORD_FILE, TOLERANCE,
                                     WEIGHTS_FILE, check_directory, check_formats,
                                     export_checkpoint, export_model, import_torch_checkpoint,
                                     jax_logits, load_torch_weights, prepare_directory, read_export)
from gen_jax.export.numpy_reference import forward as numpy_forward
from gen_jax.export.onnx_graph import LAYOUTS
from gen_jax.export.onnx_graph import run as run_onnx
from gen_jax.export.onnx_graph import to_onnx
from gen_jax.export.torch_source import TORCH_MODULE_FILE
from gen_jax.export.torch_weights import flax_variables, torch_state_dict

__all__ = [
    "FAMILIES", "Architecture", "architecture_of", "build_model", "EXPORT_FILES", "FORMATS",
    "ONNX_FILE", "RECORD_FILE", "TOLERANCE", "WEIGHTS_FILE", "TORCH_MODULE_FILE", "LAYOUTS",
    "check_directory", "check_formats", "export_checkpoint", "export_model",
    "import_torch_checkpoint", "jax_logits", "load_torch_weights", "prepare_directory",
    "read_export", "numpy_forward", "run_onnx", "to_onnx", "flax_variables", "torch_state_dict"
]
