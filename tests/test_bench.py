"""Smoke test of experiments/bench.py in its smallest configuration: it runs and its JSON is whole.

Nothing about time is asserted (tests never time anything); this only keeps the benchmark from
rotting as the training, model and attack APIs evolve, and checks that the fast CPU ops that
`ModelSet` applies to a user's network (bench.py's `plaincnn`) leave the attacks' results as they
are. The PyTorch side (experiments/reference/) needs torch, which CI never has: side_by_side.py
is run against a stand-in "python", and the flags it passes to bench_torch.py are checked against
that script's source.
"""
import ast
import importlib.util
import json
import os
import subprocess
import sys

import flax.linen
import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "experiments", "bench.py")
REFERENCE = os.path.join(ROOT, "experiments", "reference")
SIDE_BY_SIDE = os.path.join(REFERENCE, "side_by_side.py")
BENCH_TORCH = os.path.join(REFERENCE, "bench_torch.py")
FIELDS = ("what", "model", "batch", "backend", "devices", "images_per_second", "seconds_per_step",
          "compile_seconds", "peak_memory_bytes")


def _run(*flags: str) -> list[dict]:
  env = dict(os.environ,
             JAX_PLATFORMS="cpu",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([sys.executable, BENCH, *flags],
                          capture_output=True,
                          text=True,
                          cwd=ROOT,
                          env=env,
                          timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
  assert lines, f"no JSON line in the output:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
  return [json.loads(l) for l in lines]


def _check(record: dict, what: str, model: str, batch: int, images: int | None = None) -> None:
  """`images`: the images one repetition handles (the attack targets' N), default `batch`."""
  images = images or batch
  for field in FIELDS:
    assert field in record, f"{field} missing from {record}"
  assert record["what"] == what and record["model"] == model and record["batch"] == batch
  assert record["backend"] == "cpu" and record["devices"] >= 1
  assert record["images_per_second"] > 0 and record["seconds_per_step"] > 0
  assert record["compile_seconds"] >= 0
  assert abs(record["images_per_second"] * record["seconds_per_step"] - images) < 1e-6 * images
  assert len(record["seconds_all"]) == record["repeats"]


def _load(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  # Registered before it runs, as an import would: dataclasses (bench.py's linen PlainCNN) look
  # their module up in sys.modules to resolve string annotations.
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def _option_strings(path: str) -> set[str]:
  """Every "--flag" string literal passed to an add_argument call in a script's source."""
  flags = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and
        node.func.attr == "add_argument"):
      flags |= {
          a.value
          for a in node.args
          if isinstance(a, ast.Constant) and str(a.value).startswith("--")
      }
  return flags


@pytest.mark.slow
def test_training_step_and_pgd_smallest_config():
  records = _run("--what", "generalist_step,pgd20", "--model", "smallcnn", "--batch-size", "2",
                 "--pgd-steps", "1", "--repeats", "1", "--warmup", "0", "--image-size", "8")
  assert [r["what"] for r in records] == ["generalist_step", "pgd20"]
  for r in records:
    _check(r, r["what"], "smallcnn", 2)
    assert r["pgd_steps"] == 1
    assert r["model_flops_per_step"] > 0
  # Model FLOPs convention: generalist = (2k + 6) forward passes, pgd = 2k.
  f_gen, f_pgd = (r["model_flops_per_step"] for r in records)
  assert f_gen == pytest.approx(f_pgd * 8 / 2)


@pytest.mark.slow
def test_conv_and_sweep_smallest_config(tmp_path):
  out = tmp_path / "bench.jsonl"
  records = _run("--what", "conv", "--conv-shape", "2,6,6,3,4,3,2", "--repeats", "1", "--out",
                 str(out))
  assert {(r["conv_impl"], r["part"]) for r in records} == {("xla", "forward"),
                                                            ("xla", "grad_input"),
                                                            ("xla", "grad_kernel"),
                                                            ("xla", "grad_both"),
                                                            ("fast", "grad_input"),
                                                            ("fast", "grad_kernel"),
                                                            ("fast", "grad_both")}
  for r in records:
    _check(r, "conv", "conv:2,6,6,3,4,3,2", 2)
  assert len(out.read_text().splitlines()) == len(records)
  # A sweep runs each point in its own process and labels it; a fixed batch size (here in its old
  # spelling) is replaced by the swept one.
  records = _run("--what", "natural_step", "--model", "smallcnn", "--image-size", "8", "--repeats",
                 "1", "--warmup", "0", "--batch", "8", "--sweep", "batch-size", "--sweep-values",
                 "2,4")
  assert [r["batch"] for r in records] == [2, 4]
  for r in records:
    _check(r, "natural_step", "smallcnn", r["batch"])


@pytest.mark.slow
def test_user_network_attack_targets_smallest_config():
  records = _run("--what", "pgd20,apgd_ce,autoattack", "--model", "plaincnn", "--n", "4",
                 "--batch-size", "2", "--pgd-steps", "2", "--repeats", "1", "--warmup", "0",
                 "--image-size", "8", "--aa-attacks", "apgd-ce")
  assert [r["what"] for r in records] == ["pgd20", "apgd_ce", "autoattack"]
  for r in records:
    _check(r, r["what"], "plaincnn", 2, images=4)
    assert r["n"] == 4 and r["labels"] == "predictions" and r["eps"] == pytest.approx(8 / 255)
    assert r["fast_ops"] is True and r["conv_impl"] == "auto"
    assert 0 <= r["robust_count"] <= 4
  pgd, apgd, aa = records
  assert pgd["pgd_steps"] == apgd["pgd_steps"] == 2
  # Model FLOPs over the 2 batches: PGD-k = 2k forward passes, APGD-CE-k = 2 (k + 1) + 1.
  assert apgd["model_flops_per_step"] == pytest.approx(pgd["model_flops_per_step"] * 7 / 4)
  assert aa["attacks"] == ["apgd-ce"] and set(aa["stage_robust_accuracy"]) == {"apgd-ce"}


def test_fast_ops_do_not_change_the_attacks_results():
  """The user network through ModelSet's fast CPU ops and through the stock flax layers: the same
  adversarial robust count on the same seed (here 16x16 images, where neither attack fools every
  point or none)."""
  bench = _load(BENCH, "bench_under_test")
  for what, steps in (("pgd20", "2"), ("apgd_ce", "5")):
    counts = {}
    for fast in ("true", "false"):
      args = bench._parse_args([
          "--what", what, "--model", "plaincnn", "--n", "8", "--batch-size", "4", "--pgd-steps",
          steps, "--image-size", "16", "--repeats", "1", "--warmup", "0", "--fast-ops", fast
      ])
      record = bench.bench_attack(args, what)
      assert record["fast_ops"] is (fast == "true")
      assert record["conv_impl"] == ("auto" if fast == "true" else "xla")
      counts[fast] = record["robust_count"]
    assert counts["true"] == counts["false"], (what, counts)


def test_model_flops_count_every_convolution_multiply_add_twice():
  """The FLOP count behind MFU comes from the HLO before compilation, where a convolution is a
  `convolution` op on every backend (after GPU compilation it is a cuDNN call XLA counts as 0)."""
  bench = _load(BENCH, "bench_under_test")
  model = flax.linen.Conv(8, (3, 3), strides=(2, 2), padding="VALID", use_bias=False)
  variables = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))

  class Apply:  # the `train=` keyword every gen_jax model takes

    def apply(self, v, x, train):
      del train
      return model.apply(v, x)

  flops = bench._forward_flops(Apply(), variables, batch=4, image_size=16)
  assert flops == pytest.approx(2 * 4 * 7 * 7 * 8 * 3 * 3 * 3)  # 7 x 7 outputs, 3 x 3 x 3 taps


def test_user_network_is_the_same_on_both_sides():
  bench = _load(BENCH, "bench_under_test")
  # The weights are drawn (or read from a bench_fixture.py file) by the same code in both scripts
  # (bench_torch.py needs torch to run).
  for name in ("plaincnn_weights", "plaincnn_file"):
    sources = []
    for path in (BENCH, BENCH_TORCH):
      text = open(path, encoding="utf-8").read()
      (fn,) = [n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == name]
      sources.append(ast.get_source_segment(text, fn))
    assert sources[0] == sources[1], name
  weights = bench.plaincnn_weights(0, 10, 16)
  assert [k.shape for k, _ in weights][-2:] == [(4 * 4 * 64, 256), (256, 10)]
  args = bench._parse_args(["--what", "pgd20", "--model", "plaincnn", "--image-size", "16"])
  _, variables, logits_fn = bench._attack_network(args)
  assert logits_fn(np.zeros((2, 16, 16, 3), np.float32)).shape == (2, 10)
  assert sum(v.size for v in jax.tree.leaves(variables)) == sum(k.size + b.size for k, b in weights)


def test_user_network_flags_parse_and_fail_clearly():
  bench = _load(BENCH, "bench_under_test")
  args = bench._parse_args(["--what", "apgd_ce", "--model", "plaincnn", "--fast-ops", "false"])
  assert args.fast_ops is False and args.n is None
  assert bench._parse_args(["--what", "pgd20", "--model", "plaincnn"]).fast_ops is True
  for bad in (["--what", "natural_step", "--model",
               "plaincnn"], ["--fast-ops", "maybe"], ["--what", "pgd20", "--n", "0"]):
    with pytest.raises(SystemExit):
      bench._parse_args(bad)


def test_old_flag_spellings_still_parse_the_same():
  bench = _load(BENCH, "bench_under_test")
  new = vars(bench._parse_args(["--batch-size", "16", "--repeats", "3", "--sweep", "pgd-steps"]))
  old = vars(bench._parse_args(["--batch", "16", "--steps", "3", "--sweep", "pgd_steps"]))
  assert new == old and new["batch"] == 16 and new["repeats"] == 3
  assert new["sweep"] == "pgd-steps"
  assert bench._parse_args(["--sweep", "batch"]).sweep == "batch-size"
  side = _load(SIDE_BY_SIDE, "side_by_side_under_test")
  common = ["--torch-python", sys.executable, "--what", "pgd20"]
  new = vars(side._parse_args(common + ["--batch-size", "4", "--repeats", "2"]))
  old = vars(side._parse_args(common + ["--batch", "4", "--steps", "2"]))
  assert new == old and new["batch"] == 4 and new["repeats"] == 2


def test_side_by_side_finds_both_bench_scripts_and_passes_flags_they_define():
  side = _load(SIDE_BY_SIDE, "side_by_side_under_test")
  args = side._parse_args([
      "--torch-python", sys.executable, "--batch-size", "4", "--repeats", "2", "--pgd-steps", "1",
      "--image-size", "8"
  ])
  ours, theirs = side._commands(args, "pgd20")
  assert os.path.samefile(ours[1], BENCH) and os.path.samefile(theirs[1], BENCH_TORCH)
  # bench.py parses what it is given; bench_torch.py (torch is absent here) defines every flag.
  parsed = _load(BENCH, "bench_under_test")._parse_args(ours[2:])
  assert (parsed.batch, parsed.repeats, parsed.pgd_steps, parsed.image_size) == (4, 2, 1, 8)
  passed = {a for a in theirs[2:] if a.startswith("--")}
  assert passed <= _option_strings(BENCH_TORCH), passed - _option_strings(BENCH_TORCH)
  # The attack targets on a user's network: --n to both, --fast-ops to bench.py only, the torch
  # PGD implementation to bench_torch.py only.
  args = side._parse_args([
      "--torch-python", sys.executable, "--model", "plaincnn", "--n", "8", "--batch-size", "4",
      "--fast-ops", "false", "--torch-pgd-impl", "torchattacks"
  ])
  for what in ("pgd20", "apgd_ce", "autoattack"):
    ours, theirs = side._commands(args, what)
    parsed = _load(BENCH, "bench_under_test")._parse_args(ours[2:])
    assert (parsed.whats, parsed.n, parsed.fast_ops, parsed.model) == ([what], 8, False, "plaincnn")
    assert theirs[theirs.index("--n") + 1] == "8" and "--fast-ops" not in theirs
    assert theirs[theirs.index("--pgd-impl") + 1] == "torchattacks"
    passed = {a for a in theirs[2:] if a.startswith("--")}
    assert passed <= _option_strings(BENCH_TORCH), passed - _option_strings(BENCH_TORCH)


def test_bad_flags_fail_clearly():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, BENCH, "--what", "nonsense"],
                          capture_output=True,
                          text=True,
                          cwd=ROOT,
                          env=env,
                          timeout=120,
                          check=False)
  assert result.returncode != 0 and "--what" in result.stderr


@pytest.mark.slow
def test_side_by_side_pairs_rounds_and_reports_the_median_ratio(tmp_path):
  # A stand-in for the PyTorch environment: a "python" that notes its arguments and prints one
  # bench line at 2 img/s.
  fake = tmp_path / "fake_python"
  calls = tmp_path / "calls.txt"
  fake.write_text(f"#!/bin/sh\necho \"$*\" >> '{calls}'\n"
                  "echo '{\"what\": \"pgd20\", \"images_per_second\": 2.0}'\n")
  fake.chmod(0o755)
  out = tmp_path / "side.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([
      sys.executable, SIDE_BY_SIDE, "--torch-python",
      str(fake), "--what", "pgd20", "--model", "smallcnn", "--batch-size", "2", "--pgd-steps", "1",
      "--image-size", "8", "--rounds", "2", "--repeats", "1", "--warmup", "0", "--out",
      str(out)
  ],
                          capture_output=True,
                          text=True,
                          cwd=ROOT,
                          env=env,
                          timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(out.read_text())
  (summary,) = record["summary"]
  assert summary["what"] == "pgd20" and summary["rounds"] == 2 and len(record["raw"]) == 4
  ours = [line["images_per_second"] for line in record["raw"][::2]]
  assert summary["torch_images_per_second"] == 2.0
  assert summary["ratios"] == [o / 2.0 for o in ours]
  assert summary["ratio_median_of_pairs"] == pytest.approx(sum(ours) / 4.0)
  assert "| pgd20 |" in result.stdout
  torch_calls = calls.read_text().splitlines()
  assert len(torch_calls) == 2
  assert torch_calls[0].startswith(BENCH_TORCH + " --what pgd20 --model smallcnn --batch-size 2 "
                                   "--repeats 1 --warmup 0 --pgd-steps 1 --image-size 8")


def test_a_trained_fixture_is_the_network_and_the_images_the_attacks_get(tmp_path):
  """bench_fixture.py trains PlainCNN on an image folder; bench.py --weights attacks that network
  on the file's images with their true labels."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for split, count in (("train", 6), ("test", 3)):
    for label in range(3):
      folder = tmp_path / "data" / split / f"c{label}"
      folder.mkdir(parents=True)
      for i in range(count):
        image = rng.integers(0, 100, (8, 8, 3), dtype=np.uint8)
        image[..., label] = 255
        Image.fromarray(image).save(folder / f"{i}.png")
  fixture = _load(os.path.join(ROOT, "experiments", "bench_fixture.py"), "fixture_under_test")
  out = tmp_path / "plaincnn.npz"
  argv = [
      "--data-dir",
      str(tmp_path / "data"), "--out",
      str(out), "--image-size", "8", "--epochs", "2", "--batch-size", "6", "--pgd-steps", "1",
      "--test-n", "5", "--lr", "0.05"
  ]
  assert fixture.main(argv) == 0
  with pytest.raises(SystemExit):  # an existing file is never replaced
    fixture._parse(argv)
  bench = _load(BENCH, "bench_under_test")
  weights, images, labels = bench.plaincnn_file(str(out))
  assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8 and set(labels) <= {0, 1, 2}
  args = bench._parse_args([
      "--what", "pgd20", "--model", "plaincnn", "--image-size", "8", "--num-classes", "3", "--n",
      "5", "--batch-size", "5", "--pgd-steps", "2", "--repeats", "1", "--warmup", "0", "--weights",
      str(out)
  ])
  _, variables, logits_fn = bench._attack_network(args)
  assert [np.asarray(variables["params"][f"Dense_{i}"]["kernel"]).tolist() for i in (0, 1)
         ] == [weights[4][0].tolist(), weights[5][0].tolist()]
  clean = np.argmax(np.asarray(logits_fn(images / np.float32(255))), -1) == labels
  record = bench.bench_attack(args, "pgd20")
  assert record["labels"] == "file" and record["weights"] == "plaincnn.npz"
  assert record["n"] == 5 and record["robust_count"] <= clean.sum()
  with pytest.raises(SystemExit):  # --weights belongs to plaincnn
    bench._parse_args(["--what", "pgd20", "--model", "smallcnn", "--weights", str(out)])
