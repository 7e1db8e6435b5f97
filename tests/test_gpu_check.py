"""CPU tests of the accelerator scripts: gpu_check.sh's smoke run and reproduce.sh's commands.

gpu_check.sh is run here so that the GPU check cannot rot between GPU runs.
The script runs in its tiny configuration (the `tiny` preset, a fake budget, one benchmark point
of smallcnn at batch 16 with one repetition, AutoAttack on 8 images) on an image folder packed as
the tarball that travels to the GPU machine, with TensorFlow and TFDS made unimportable as on that
machine. Only the outputs are checked: they exist and parse. Nothing about time is asserted.
The commands that reproduce.sh prints (the README's reproduction protocol) are parsed by the
programs' own parsers, so a renamed flag or preset breaks this test, not the user's GPU run.
"""
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu_check.sh"
# Imported first thing by every Python process of the script: TensorFlow and TFDS are absent on
# the accelerator images, so nothing the check runs may import them.
BLOCKER = """
import sys


class _Absent:
  # Wraps a finder: TensorFlow and TFDS look uninstalled (find_spec None, import fails).
  def __init__(self, finder):
    self.finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
      return None
    return self.finder.find_spec(name, path, target)

  def __getattr__(self, attr):
    return getattr(self.finder, attr)


sys.meta_path[:] = [_Absent(f) for f in sys.meta_path]
"""


def _image_folder_tarball(directory: pathlib.Path) -> pathlib.Path:
  """data_local/cifar10-jpeg.tar.gz laid out as the real one: cifar10-jpeg/{train,test}/<class>/."""
  rng = np.random.default_rng(0)
  src = directory / "src"
  for split, count in (("train", 15), ("test", 4)):
    for label in range(4):  # AutoAttack's targeted DLR loss needs at least 4 classes
      folder = src / "cifar10-jpeg" / split / f"class{label}"
      folder.mkdir(parents=True)
      for i in range(count):
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image[..., label % 3] = 255
        Image.fromarray(image).save(folder / f"{i:04d}.jpg")
  data_local = directory / "data_local"
  data_local.mkdir()
  tarball = data_local / "cifar10-jpeg.tar.gz"
  with tarfile.open(tarball, "w:gz") as tar:
    tar.add(src / "cifar10-jpeg", arcname="cifar10-jpeg")
  return data_local


def _run(tmp_path: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
  blocker = tmp_path / "blocker"
  blocker.mkdir(exist_ok=True)
  (blocker / "sitecustomize.py").write_text(BLOCKER)
  env = dict(os.environ,
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(blocker),
                                         os.environ.get("PYTHONPATH", "")]))
  return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *flags],
                        capture_output=True,
                        text=True,
                        cwd=ROOT,
                        env=env,
                        timeout=900,
                        check=False)


def _figures(out: pathlib.Path) -> list[dict]:
  lines = (out / "figures.jsonl").read_text().splitlines()
  assert lines and all(l.strip() for l in lines)
  return [json.loads(l) for l in lines]


def test_gpu_check_refuses_a_cpu_backend_without_allow_cpu(tmp_path):
  out = tmp_path / "out"
  result = _run(tmp_path, "--budget", "60", "--out", str(out), "--workdir", str(tmp_path / "w"))
  assert result.returncode != 0
  assert "budget 60 s" in result.stdout.splitlines()[0]
  assert "backend cpu" in result.stdout and "--allow-cpu" in result.stdout
  figures = _figures(out)
  assert [r["backend"] for r in figures if r["phase"] == "env"] == ["cpu"]
  assert "# gen_jax GPU check" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_gpu_check_tiny_run_writes_every_figure_as_json_and_a_summary(tmp_path):
  data_local = _image_folder_tarball(tmp_path)
  out, work = tmp_path / "out", tmp_path / "work"
  # The budget only bounds the phases (the tiny run's epochs are capped by its preset); it is
  # generous so that a loaded machine still reaches every phase (a starved CI run once did not).
  result = _run(tmp_path, "--allow-cpu", "--preset", "tiny", "--budget", "1800", "--models",
                "smallcnn", "--batches", "16", "--dtypes", "float32", "--bench-what",
                "natural_step,pgd20", "--bench-repeats", "1", "--aa-n", "8", "--aa-batch", "8",
                "--data-local", str(data_local), "--out", str(out), "--workdir", str(work))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert result.stdout.startswith("gpu_check: budget 1800 s")
  assert (data_local / "cifar10-jpeg" / "train" / "class0").is_dir()  # extracted once
  figures = _figures(out)
  phases = {r["phase"] for r in figures}
  assert phases >= {"env", "data", "bench", "plan", "compare", "chord", "autoattack", "timing"}
  bench = [r for r in figures if r["phase"] == "bench"]
  assert {r["what"] for r in bench} == {"natural_step", "pgd20"}
  assert all(r["status"] == "ok" and r["images_per_second"] > 0 for r in bench)
  plan = next(r for r in figures if r["phase"] == "plan")
  assert plan["epochs"] >= 1
  runs = {r["run"]: r for r in figures if r["phase"] == "compare"}
  assert set(runs) == {"natural-s0", "pgd_at-s0", "generalist-s0"}
  assert all(r["finished"] and 0 <= r["clean"] <= 1 for r in runs.values())
  attacked = {r["run"]: r for r in figures if r["phase"] == "autoattack"}
  assert set(attacked) == {"generalist-s0", "pgd_at-s0"}
  assert all(r["status"] == "ok" and r["n"] == 8 for r in attacked.values())
  steps = {r["step"]: r["status"] for r in figures if r["phase"] == "timing"}
  assert steps["compare"] == "ok" and steps["autoattack"] == "ok", steps
  summary = (out / "summary.md").read_text()
  for heading in ("## Throughput", "## Real run", "## AutoAttack", "## Phases"):
    assert heading in summary
  assert (out / "log.txt").read_text().startswith("gpu_check: budget 1800 s")


def _load(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("flags", [(), ("--reference-eps", "--data", "data_local/cifar10-jpeg")])
def test_reproduce_prints_commands_that_the_programs_accept(flags):
  from gen_jax import cli  # pylint: disable=import-outside-toplevel
  train = _load(ROOT / "experiments" / "train.py", "reproduce_train")
  evaluate = _load(ROOT / "experiments" / "evaluate.py", "reproduce_evaluate")
  result = subprocess.run(
      ["bash", str(ROOT / "experiments" / "reproduce.sh"), "--print", *flags],
      capture_output=True,
      text=True,
      cwd=ROOT,
      timeout=60,
      check=False)
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(l) for l in result.stdout.splitlines() if l.strip()]
  assert len(commands) == 16  # 2 models x 4 methods x (train, evaluate)
  trained, evaluated = set(), set()
  for command in commands:
    assert command[0] == "python"
    if command[1] == "experiments/train.py":
      parser = cli.build_parser("train", add_arguments=train._add_arguments)
      args, config = cli.parse_config(parser, command[2:])
      trained.add(args.workdir)
      assert (config.epochs, config.batch_size) == (120, 128)
      assert config.model in ("resnet18", "wrn32_10")
      if flags:
        assert (config.eps, config.step_size, config.eval_step_size) == (0.031, 0.007, 0.007)
        assert config.dataset == "folder" and args.workdir.endswith("-ref")
      else:
        assert config.eps == pytest.approx(8 / 255) and config.dataset == "cifar10"
    else:
      assert command[1] == "experiments/evaluate.py"
      args = evaluate._parse(command[2:])
      assert tuple(args.attacks) == ("clean", "pgd20", "aa") and args.n is None
      evaluated.add(args.workdir)
  assert trained == evaluated and len(trained) == 8
