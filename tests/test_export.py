"""Tests for gen_jax.export and experiments/export.py: parity of every export with the JAX logits.

Every architecture family is exported at a small width (both formats) and the full-size
ResNet-18 to ONNX; each export must give the JAX logits within 1e-4 on 64 images: the ONNX graph
in ONNX Runtime, the PyTorch weights in a numpy re-implementation of the PyTorch forward pass and,
where an interpreter with torch and safetensors is found, in PyTorch itself with the written
`torch_model.py` (`GEN_JAX_TORCH_PYTHON`, else this interpreter if it has torch, else the
reference environment /opt/torchenv of experiments/reference/README.md; skipped with the reason
otherwise). Then the way back (PyTorch weights -> gen_jax variables, also weights written by
PyTorch), the command line, and bad input.
"""
import dataclasses
import importlib.util
import json
import os
import pathlib
import stat
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gen_jax import config as cfg
from gen_jax import models, runs
from gen_jax.models import PreActResNet18, ResNet18, WideResNet

pytest.importorskip("jax2onnx", reason="the export tests need requirements-test.txt (jax2onnx)")
pytest.importorskip("onnxruntime", reason="the export tests need onnxruntime")
pytest.importorskip("safetensors", reason="the export tests need safetensors")

from gen_jax import export  # noqa: E402
from gen_jax.export import numpy_reference, onnx_graph, torch_weights  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_cli():
  # experiments/export.py by path, without putting experiments/ on sys.path for other tests.
  spec = importlib.util.spec_from_file_location("export_cli", ROOT / "experiments" / "export.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


export_cli = _load_cli()

TOLERANCE = 1e-4
N_IMAGES = 64

# Every family at a small width. WRN-16-1 has a block whose widths match (no convShortcut) and
# blocks that project; WRN-14-2 counts depth the Madry way (6n + 2).
SMALL = {
    "smallcnn":
        lambda: models.create_model(
            "smallcnn", 10, conv_impl="auto", mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26)),
    "resnet18":
        lambda: ResNet18(num_classes=10, width=4),
    "preactresnet18":
        lambda: PreActResNet18(num_classes=10, width=4),
    "wrn16_1":
        lambda: WideResNet(num_classes=10, depth=16, widen_factor=1),
    "wrn14_2":
        lambda: WideResNet(num_classes=7, depth=14, widen_factor=2),
}


def _variables(model, in_channels=3, seed=0):
  """Trained-like variables for `model`: random weights, BatchNorm statistics far from identity.

  Drawn with numpy on the shapes of `jax.eval_shape` (no XLA compilation of an initialiser,
  which costs tens of seconds for a ResNet on a busy 2-core machine).
  """
  arch = export.architecture_of(model, in_channels=in_channels)
  abstract = export.architecture.abstract_variables(arch)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "var":
      return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if name == "scale":
      return (1 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    if name in ("mean", "bias"):
      return (0.2 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[:-1]))
    return (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _images(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (N_IMAGES, *shape), dtype=np.uint8)


def _logits(model, variables, x):
  return export.jax_logits(model, variables, x)


@dataclasses.dataclass
class Exported:
  out: pathlib.Path
  arch: export.Architecture
  model: nn.Module
  variables: dict
  x_nchw: np.ndarray
  reference: np.ndarray
  record: dict


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """Each SMALL model exported in both formats, with its JAX logits on 64 images."""
  result = {}
  for name, make in SMALL.items():
    model = make()
    variables = _variables(model)
    images = _images((32, 32, 3))
    x = images.astype(np.float32) / 255
    reference = _logits(model, variables, x)
    out = tmp_path_factory.mktemp(name)
    record = export.export_model(model,
                                 variables,
                                 out,
                                 image_shape=(32, 32, 3),
                                 formats="both",
                                 parity_images=images,
                                 config={"model": name},
                                 which={"role": "global"},
                                 overwrite=True)
    result[name] = Exported(out, export.architecture_of(model), model, variables,
                            np.ascontiguousarray(x.transpose(0, 3, 1, 2)), reference, record)
  return result


def _check_close(got, reference):
  assert got.shape == reference.shape
  # The logits carry signal (so that agreement means something) and agree.
  assert reference.std() > 0.05
  assert np.abs(got - reference).max() < TOLERANCE


@pytest.mark.parametrize("name", SMALL)
def test_onnx_parity_small_width(exported, name):
  e = exported[name]
  _check_close(onnx_graph.run(e.out / export.ONNX_FILE, e.x_nchw), e.reference)
  parity = e.record["parity"]["onnx"]
  assert parity["passed"] and parity["images"] == N_IMAGES and parity["max_abs_diff"] < TOLERANCE


@pytest.mark.parametrize("name", SMALL)
def test_torch_weights_parity_numpy(exported, name):
  e = exported[name]
  state = torch_weights.load_safetensors(e.out / export.WEIGHTS_FILE)
  _check_close(numpy_reference.forward(state, e.arch, e.x_nchw), e.reference)
  assert e.record["parity"]["torch"]["passed"]


def test_model_json_describes_the_export(exported):
  e = exported["smallcnn"]
  record = json.loads((e.out / export.RECORD_FILE).read_text())
  assert record["architecture"]["family"] == "smallcnn" and record["num_classes"] == 10
  assert record["input"]["range"] == [0.0, 1.0] and record["input"]["mean"] == [0.49, 0.48, 0.45]
  assert record["onnx"]["layout"] == "NCHW" and record["onnx"]["shape"] == ["batch", 3, 32, 32]
  assert record["files"] == {
      "onnx": "model.onnx",
      "torch_weights": "model.safetensors",
      "torch_module": "torch_model.py"
  }
  assert record["config"] == {"model": "smallcnn"} and record["model"] == {"role": "global"}
  assert set(record["export_seconds"]) == {"onnx", "torch"}
  # PyTorch's parameters (weights and biases) are exactly flax's params collection.
  assert record["torch"]["parameters"] == models.count_params(e.variables["params"])
  assert export.read_export(e.out)[0] == e.arch


def test_every_exported_file_has_the_default_mode(exported):
  # safetensors' save_file creates its file 0600; the weights must be as readable as the rest.
  umask = os.umask(0)
  os.umask(umask)
  out = exported["smallcnn"].out
  modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
  assert set(modes) == {"model.onnx", "model.safetensors", "torch_model.py", "model.json"}
  assert modes == dict.fromkeys(modes, 0o666 & ~umask), modes


def test_safetensors_file_is_0644_under_umask_022(tmp_path):
  old = os.umask(0o022)
  try:
    path = torch_weights.save_safetensors({"w": np.ones((2, 3), np.float32)},
                                          tmp_path / "w.safetensors")
  finally:
    os.umask(old)
  assert stat.S_IMODE(path.stat().st_mode) == 0o644
  np.testing.assert_array_equal(torch_weights.load_safetensors(path)["w"], np.ones((2, 3)))


def test_torch_keys_and_shapes_are_the_reference_ones(exported):
  state = torch_weights.load_safetensors(exported["resnet18"].out / export.WEIGHTS_FILE)
  # models/resnet.py of the reference: names, OIHW kernels, (out, in) linear weight.
  assert state["conv1.weight"].shape == (4, 3, 3, 3)
  assert state["layer2.0.shortcut.0.weight"].shape == (8, 4, 1, 1)
  assert state["layer2.0.shortcut.1.running_var"].shape == (8,)
  assert state["layer4.1.bn2.num_batches_tracked"].dtype == np.int64
  assert state["linear.weight"].shape == (10, 32) and "layer1.0.shortcut.0.weight" not in state
  preact = torch_weights.load_safetensors(exported["preactresnet18"].out / export.WEIGHTS_FILE)
  assert "layer2.0.shortcut.0.weight" in preact and "layer2.0.shortcut.1.weight" not in preact
  assert "bn1.weight" not in preact
  wrn = torch_weights.load_safetensors(exported["wrn16_1"].out / export.WEIGHTS_FILE)
  assert "block1.layer.0.convShortcut.weight" not in wrn  # 16 -> 16: equalInOut
  assert wrn["block2.layer.0.convShortcut.weight"].shape == (32, 16, 1, 1)
  assert {"bn1.running_mean", "fc.weight", "fc.bias", "block3.layer.1.conv2.weight"} <= set(wrn)


@pytest.mark.parametrize("name,num_classes,count", [
    ("resnet18", 10, 11_173_962),
    ("preactresnet18", 10, 11_171_146),
    ("wrn34_10", 10, 46_160_474),
    ("wrn32_10", 100, 46_218_164),
])
def test_full_size_key_maps_count_the_reference_parameters(name, num_classes, count):
  # The parameter counts of the reference PyTorch definitions (tests/test_models.py).
  arch = export.architecture_of(models.create_model(name, num_classes))
  mapping = torch_weights.key_map(arch)
  abstract = export.architecture.abstract_variables(arch)
  params = sum(
      np.prod(torch_weights._get(abstract[c], path, c).shape)
      for key, (c, path, kind) in mapping.items()
      if c == "params")
  assert params == count
  assert sum(kind == "count" for _, _, kind in mapping.values()) == len(
      [k for k in mapping if k.endswith("running_var")])


def test_full_size_resnet18_onnx_parity(tmp_path):
  model = models.create_model("resnet18", 10, conv_impl="auto")
  variables = _variables(model, seed=1)
  images = _images((32, 32, 3), seed=1)
  start = time.perf_counter()
  record = export.export_model(model,
                               variables,
                               tmp_path,
                               image_shape=(32, 32, 3),
                               formats="onnx",
                               parity_images=images)
  seconds = time.perf_counter() - start
  reference = np.asarray(_logits(model, variables, images.astype(np.float32) / 255))
  got = onnx_graph.run(tmp_path / export.ONNX_FILE, images.transpose(0, 3, 1, 2) / 255)
  _check_close(got, reference)
  parity = record["parity"]["onnx"]
  assert parity["passed"] and parity["same_predictions"]
  assert not (tmp_path / export.WEIGHTS_FILE).exists()
  print(f"\nfull-size ResNet-18 ONNX: export {record['export_seconds']['onnx']:.2f} s (with "
        f"parity {seconds:.1f} s), max |logit diff| {parity['max_abs_diff']:.2e}")


def test_onnx_nhwc_layout_and_dynamic_batch(tmp_path):
  model = models.create_model("smallcnn", 4)
  variables = _variables(model, in_channels=1, seed=2)
  images = _images((16, 16, 1), seed=2)
  record = export.export_model(model,
                               variables,
                               tmp_path,
                               image_shape=(16, 16, 1),
                               formats=["onnx"],
                               layout="nhwc",
                               opset=21,
                               parity_images=images)
  assert record["onnx"]["shape"] == ["batch", 16, 16, 1] and record["onnx"]["opset"] == 21
  session = onnx_graph.session(tmp_path / export.ONNX_FILE)
  (inp,) = session.get_inputs()
  assert inp.name == "input" and inp.shape == ["batch", 16, 16, 1]
  x = images.astype(np.float32) / 255
  reference = np.asarray(_logits(model, variables, x))
  for batch in (1, 5, N_IMAGES):
    got = session.run(["logits"], {"input": x[:batch]})[0]
    assert np.abs(got - reference[:batch]).max() < TOLERANCE


def _torch_python():
  """(python, None) of an interpreter with torch and safetensors, or (None, why not)."""
  candidates = []
  if os.environ.get("GEN_JAX_TORCH_PYTHON"):
    candidates.append(os.environ["GEN_JAX_TORCH_PYTHON"])
  if importlib.util.find_spec("torch") is not None:
    candidates.append(sys.executable)
  if os.path.exists("/opt/torchenv/bin/python"):
    candidates.append("/opt/torchenv/bin/python")
  for python in candidates:
    probe = subprocess.run([python, "-c", "import torch, safetensors"],
                           capture_output=True,
                           text=True,
                           timeout=120)
    if probe.returncode == 0:
      return python, None
    last = f"{python} cannot import torch and safetensors ({probe.stderr.strip()[-200:]})"
  if not candidates:
    return None, ("torch not installed (no GEN_JAX_TORCH_PYTHON, no torch here, no "
                  "/opt/torchenv of experiments/reference/README.md): PyTorch itself not run; "
                  "the numpy re-implementation of its forward pass checked the weights")
  return None, last + "; install them there (pip install torch==2.13.0 safetensors==0.8.0)"


_TORCH_SCRIPT = """
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
result = {}
for directory in sys.argv[1:]:
  sys.path.insert(0, directory)
  sys.modules.pop("torch_model", None)
  import torch_model
  model = torch_model.load(directory)
  with torch.no_grad():
    logits = model(torch.from_numpy(np.load(directory + "/x.npy"))).numpy()
  reference = np.load(directory + "/reference.npy")
  result[directory] = float(np.abs(logits - reference).max())
  sys.path.remove(directory)
print(json.dumps(result))
"""


def test_torch_parity_in_pytorch(exported):
  python, reason = _torch_python()
  if python is None:
    pytest.skip(reason)
  for e in exported.values():
    np.save(e.out / "x.npy", e.x_nchw)
    np.save(e.out / "reference.npy", e.reference)
  out = subprocess.run([python, "-c", _TORCH_SCRIPT, *(str(e.out) for e in exported.values())],
                       capture_output=True,
                       text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  diffs = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"\nPyTorch parity ({python}): " +
        ", ".join(f"{n} {diffs[str(e.out)]:.1e}" for n, e in exported.items()))
  assert all(d < TOLERANCE for d in diffs.values()), diffs


_TORCH_WRITER = """
import json, sys
import numpy as np, torch
from safetensors.torch import save_file
torch.manual_seed(0)
directory, target = sys.argv[1], sys.argv[2]
sys.path.insert(0, directory)
import torch_model
with open(directory + "/model.json") as f:
  model = torch_model.build(json.load(f)["architecture"])
for m in model.modules():  # as after training: BatchNorm far from the identity
  if isinstance(m, torch.nn.BatchNorm2d):
    m.running_mean.normal_(0, 0.2)
    m.running_var.uniform_(0.5, 2.0)
    m.weight.data.normal_(1, 0.3)
    m.bias.data.normal_(0, 0.2)
model.eval()
x = torch.rand(16, 3, 32, 32)
with torch.no_grad():
  logits = model(x).numpy()
# As the reference code saves it: through nn.DataParallel, hence the "module." prefix.
state = torch.nn.DataParallel(model).state_dict()
save_file({k: v.contiguous() for k, v in state.items()}, target + ".safetensors")
np.save(target + "_x.npy", x.numpy())
np.save(target + "_logits.npy", logits)
"""


@pytest.mark.parametrize("name", ["resnet18", "wrn16_1"])
def test_import_of_weights_trained_in_pytorch(exported, name, tmp_path):
  python, reason = _torch_python()
  if python is None:
    pytest.skip(reason)
  e = exported[name]
  target = str(tmp_path / "torch")
  out = subprocess.run(
      [python, "-c", _TORCH_WRITER, str(e.out), target],
      capture_output=True,
      text=True,
      timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  variables = export.load_torch_weights(target + ".safetensors", e.arch)
  x = np.load(target + "_x.npy").transpose(0, 2, 3, 1)
  _check_close(_logits(e.model, variables, x), np.load(target + "_logits.npy"))


def test_torch_module_source_compiles():
  compile(export.torch_source.SOURCE, export.TORCH_MODULE_FILE, "exec")


# ------------------------------------------------------------------------------- the way back
@pytest.mark.parametrize("name", SMALL)
def test_import_round_trip(exported, name):
  e = exported[name]
  variables = export.load_torch_weights(e.out / export.WEIGHTS_FILE, e.arch)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, jax.device_get(e.variables))
  # Loaded into the network it came from, the logits are the same.
  np.testing.assert_allclose(_logits(e.model, variables, e.x_nchw.transpose(0, 2, 3, 1)),
                             e.reference,
                             atol=1e-6)


def test_import_accepts_what_the_reference_code_saves(exported, tmp_path):
  # nn.DataParallel's "module." prefix, the TRADES WRN's unused sub_block1, and no
  # num_batches_tracked.
  e = exported["wrn16_1"]
  state = torch_weights.load_safetensors(e.out / export.WEIGHTS_FILE)
  reference_style = {
      f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")
  }
  reference_style["module.sub_block1.layer.0.conv1.weight"] = np.zeros((16, 16, 3, 3), np.float32)
  path = torch_weights.save_safetensors(reference_style, tmp_path / "trades.safetensors")
  variables = export.load_torch_weights(path, e.model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, jax.device_get(e.variables))


def _write_state(tmp_path, state, name="bad.safetensors"):
  return torch_weights.save_safetensors(state, tmp_path / name)


def test_import_names_the_first_missing_or_unexpected_key(exported, tmp_path):
  e = exported["resnet18"]
  state = torch_weights.load_safetensors(e.out / export.WEIGHTS_FILE)
  renamed = dict(state)
  renamed["layer1.0.conv1.kernel"] = renamed.pop("layer1.0.conv1.weight")
  with pytest.raises(ValueError) as err:
    export.load_torch_weights(_write_state(tmp_path, renamed), e.arch)
  message = str(err.value)
  assert "missing key 'layer1.0.conv1.weight' (1 missing)" in message
  assert "unexpected key 'layer1.0.conv1.kernel' (1 unexpected)" in message
  # Weights of another family: PreAct ResNet weights read as a ResNet-18.
  other = exported["preactresnet18"].out / export.WEIGHTS_FILE
  with pytest.raises(ValueError, match="missing key 'bn1.weight'"):
    export.load_torch_weights(other, e.arch)
  # Right names, wrong shape (another width).
  wrong = dict(state)
  wrong["conv1.weight"] = np.zeros((8, 3, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"'conv1.weight' has shape \(8, 3, 3, 3\).*\(4, 3, 3, 3\)"):
    export.load_torch_weights(_write_state(tmp_path, wrong, "wrong.safetensors"), e.arch)


def test_import_refuses_a_pickle(tmp_path):
  path = tmp_path / "model.pth"
  path.write_bytes(b"\x80\x04\x95PK\x03\x04 not safetensors")
  arch = export.architecture_of(models.create_model("smallcnn", 10))
  with pytest.raises(ValueError, match="torch.save is a pickle"):
    export.load_torch_weights(path, arch)
  with pytest.raises(FileNotFoundError):
    export.load_torch_weights(tmp_path / "missing.safetensors", arch)


def test_import_refuses_nan_weights_and_names_a_missing_package(tmp_path, monkeypatch):
  path = torch_weights.save_safetensors({"conv1.weight": np.full((2, 2), np.nan, np.float32)},
                                        tmp_path / "nan.safetensors")
  with pytest.raises(ValueError, match="tensor conv1.weight holds NaN or inf"):
    torch_weights.load_safetensors(path)

  def missing():
    raise ImportError("reading and writing PyTorch weights needs safetensors: pip install ...")

  monkeypatch.setattr(torch_weights, "_safetensors_numpy", missing)
  with pytest.raises(ImportError, match="needs safetensors"):  # not "not a safetensors file"
    torch_weights.load_safetensors(path)


# ----------------------------------------------------------------------------------- bad input
def test_unknown_format_and_layout():
  with pytest.raises(ValueError, match="unknown export format 'tflite'"):
    export.check_formats("tflite")
  assert export.check_formats("both") == ("onnx", "torch")
  with pytest.raises(ValueError, match="unknown layout 'NWHC'"):
    onnx_graph.check_layout("NWHC")
  with pytest.raises(SystemExit):
    export_cli.main(["--checkpoint", "x", "--out", "y", "--format", "tflite"])


class _Unsupported(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, *, train):
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def test_unsupported_architecture_is_refused(tmp_path):
  model = _Unsupported()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  with pytest.raises(ValueError, match="cannot export a _Unsupported.*smallcnn"):
    export.export_model(model, variables, tmp_path / "out", image_shape=(8, 8, 3))
  assert not (tmp_path / "out").exists()


def test_variables_of_another_network_are_refused_before_writing(tmp_path):
  variables = _variables(ResNet18(num_classes=10, width=4))
  with pytest.raises(ValueError, match="has shape .* the variables belong to another network"):
    export.export_model(ResNet18(num_classes=10, width=8),
                        variables,
                        tmp_path / "out",
                        image_shape=(8, 8, 3))
  with pytest.raises(ValueError, match="opset must be an int >= 18"):
    export.export_model(models.create_model("smallcnn", 10),
                        variables,
                        tmp_path / "out",
                        image_shape=(8, 8, 3),
                        opset=17)
  assert not (tmp_path / "out").exists()


def test_earlier_export_is_not_overwritten_unless_asked(tmp_path):
  model = models.create_model("smallcnn", 3)
  variables = _variables(model, in_channels=1)
  export.export_model(model, variables, tmp_path, image_shape=(8, 8, 1), formats="both")
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="model.onnx already exists.*--overwrite"):
    export.export_model(model, variables, tmp_path, image_shape=(8, 8, 1), formats="torch")
  record = export.export_model(model,
                               variables,
                               tmp_path,
                               image_shape=(8, 8, 1),
                               formats="torch",
                               overwrite=True)
  # The earlier ONNX file does not outlive the new model.json; other files are left alone.
  assert not (tmp_path / export.ONNX_FILE).exists() and "onnx" not in record["files"]
  assert (tmp_path / "notes.txt").read_text() == "mine"
  with pytest.raises(NotADirectoryError):
    export.prepare_directory(tmp_path / "notes.txt")


def test_a_killed_export_leaves_nothing_under_its_name_and_the_rerun_cleans_up(
    tmp_path, monkeypatch, capsys):
  model = models.create_model("smallcnn", 3)
  variables = _variables(model, in_channels=1)
  out = tmp_path / "export"

  def killed(*args, **kwargs):
    raise KeyboardInterrupt  # the kill arrives after model.onnx was written

  with monkeypatch.context() as patch:
    patch.setattr(torch_weights, "save_safetensors", killed)
    with pytest.raises(KeyboardInterrupt):
      export.export_model(model, variables, out, image_shape=(8, 8, 1), formats="both")
  assert not out.exists()  # before: a folder with model.onnx, "an earlier export" to the rerun
  partial = tmp_path / ".export.partial"
  assert (partial / export.ONNX_FILE).exists()
  record = export.export_model(model, variables, out, image_shape=(8, 8, 1), formats="both")
  assert "removed" in capsys.readouterr().err and not partial.exists()
  assert sorted(p.name for p in out.iterdir()) == sorted([*record["files"].values(), "model.json"])


def test_a_killed_model_save_is_cleaned_and_saved_under_the_same_name(tmp_path, capsys):
  from gen_jax import checkpoint  # pylint: disable=import-outside-toplevel
  target = tmp_path / "mix-beta0.30"
  (tmp_path / ".mix-beta0.30.partial" / "variables").mkdir(parents=True)  # a kill mid-save
  saved = checkpoint.save_model(target, {"params": {"w": np.ones(3, np.float32)}}, {"config": {}})
  assert saved == target and (target / "model.json").exists()
  assert not (tmp_path / ".mix-beta0.30.partial").exists()
  assert "unfinished save" in capsys.readouterr().err


def test_a_parity_failure_raises_after_recording_it(exported, tmp_path, monkeypatch):
  e = exported["resnet18"]
  # A PyTorch side that is off by 1e-3, as a wrong weight map would be (by far more).
  forward = numpy_reference.forward_batched
  monkeypatch.setattr(numpy_reference, "forward_batched", lambda *a: forward(*a) + 1e-3)
  with pytest.raises(RuntimeError, match="does not reproduce the JAX model"):
    export.export_model(e.model,
                        e.variables,
                        tmp_path,
                        image_shape=(32, 32, 3),
                        formats="torch",
                        parity_images=e.x_nchw.transpose(0, 2, 3, 1)[:4])
  record = json.loads((tmp_path / export.RECORD_FILE).read_text())
  assert record["parity"]["torch"]["passed"] is False and record["parity"]["torch"]["images"] == 4
  with pytest.raises(ValueError, match="tolerance must be a positive number"):
    export.export_model(e.model, e.variables, tmp_path / "b", image_shape=(32, 32, 3), tolerance=0)


# ------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def saved_mixture(tmp_path_factory):
  """A saved smallcnn mixture (as sweep_mix.py --select writes it) of the tiny preset."""
  config = cfg.tiny()
  model = models.create_model(config.model, 10)
  variables = _variables(model, in_channels=1, seed=3)
  path = tmp_path_factory.mktemp("run") / "eval" / "mix-beta0.30"
  runs.save_model(path, variables, config, beta=0.3, bn_recalibrated=None, rule="clean>=0.9")
  return path, variables


def test_cli_exports_a_saved_mixture_and_imports_it_back(saved_mixture, tmp_path, capsys):
  path, variables = saved_mixture
  out = tmp_path / "export"
  export_cli.main(["--checkpoint", str(path), "--out", str(out)])
  printed = capsys.readouterr().out
  assert "mixture, beta 0.3" in printed and "max |logit diff|" in printed
  assert "every file holds the mixture" in printed
  assert "model.safetensors (PyTorch weights)" in printed
  record = json.loads((out / export.RECORD_FILE).read_text())
  assert record["model"]["role"] == "mixture" and record["model"]["beta"] == 0.3
  assert record["config"]["dataset"] == "digits" and record["config"]["model"] == "smallcnn"
  assert record["architecture"]["in_channels"] == 1
  for name in ("onnx", "torch"):
    # The digits test split has 50 images in the tiny preset.
    assert record["parity"][name]["images"] == 50
    assert record["parity"][name]["max_abs_diff"] < TOLERANCE
  # Refused the second time, replaced with --overwrite.
  with pytest.raises(FileExistsError):
    export_cli.main(["--checkpoint", str(path), "--out", str(out)])
  export_cli.main(["--checkpoint", str(path), "--out", str(out), "--overwrite", "--parity-n", "0"])
  # The way back: a gen_jax model that evaluate.py --checkpoint reads.
  imported = tmp_path / "imported"
  export_cli.main(
      ["--from-torch",
       str(out / export.WEIGHTS_FILE), "--preset", "tiny", "--out",
       str(imported)])
  run = runs.load_model(imported)
  (restored,) = run.models.values()
  jax.tree_util.tree_map(np.testing.assert_allclose, jax.device_get(restored), variables)


def test_cli_says_which_model_the_files_hold():
  # An export of best/ is not the final model whose figures training printed: the summary says so.
  best = {
      "role": "global",
      "name": "global (best, epoch 27)",
      "selected": "best by validation clean + PGD accuracy",
      "checkpoint": "/r/pilot/best"
  }
  assert export_cli.model_description(best) == (
      "the best global model (epoch 27) of /r/pilot, selected by validation clean + PGD "
      "accuracy; not the final model whose figures training printed")
  latest = {"role": "robust", "checkpoint": "latest", "source": "/r/pilot"}
  assert export_cli.model_description(latest).startswith(
      "the robust model of the latest checkpoint of /r/pilot (the final model")
  mixture = {"role": "mixture", "beta": 0.3, "checkpoint": "/r/pilot/eval/mix-beta0.30"}
  assert export_cli.model_description(
      mixture) == "the mixture, beta 0.3 (/r/pilot/eval/mix-beta0.30)"


def test_cli_refuses_a_checkpoint_of_an_unsupported_architecture(saved_mixture, tmp_path):
  path, variables = saved_mixture
  record = json.loads((path / "model.json").read_text())
  record["config"]["model"] = "vit_b16"
  other = tmp_path / "vit"
  runs.save_model(other, variables, cfg.tiny())
  (other / "model.json").write_text(json.dumps(record))
  with pytest.raises(ValueError, match=r"cannot export .*vit: .*'vit_b16'"):
    export_cli.main(["--checkpoint", str(other), "--out", str(tmp_path / "out")])
  assert not (tmp_path / "out").exists()


def test_cli_refuses_import_flags_on_an_export(saved_mixture, tmp_path):
  path, _ = saved_mixture
  with pytest.raises(SystemExit):
    export_cli.main(["--checkpoint", str(path), "--out", str(tmp_path), "--preset", "tiny"])
  with pytest.raises(SystemExit):
    export_cli.main(["--checkpoint", str(path), "--workdir", str(path), "--out", str(tmp_path)])
