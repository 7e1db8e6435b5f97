"""Smoke test of experiments/bench.py in its smallest configuration: it runs and its JSON is whole.

Nothing about time is asserted (tests never time anything); this only keeps the benchmark from
rotting as the training, model and attack APIs evolve.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "experiments", "bench.py")
FIELDS = ("what", "model", "batch", "backend", "devices", "images_per_second", "seconds_per_step",
          "compile_seconds", "peak_memory_bytes")


def _run(*flags: str) -> list[dict]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([sys.executable, BENCH, *flags], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
  assert lines, f"no JSON line in the output:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
  return [json.loads(l) for l in lines]


def _check(record: dict, what: str, model: str, batch: int) -> None:
  for field in FIELDS:
    assert field in record, f"{field} missing from {record}"
  assert record["what"] == what and record["model"] == model and record["batch"] == batch
  assert record["backend"] == "cpu" and record["devices"] >= 1
  assert record["images_per_second"] > 0 and record["seconds_per_step"] > 0
  assert record["compile_seconds"] >= 0
  assert abs(record["images_per_second"] * record["seconds_per_step"] - batch) < 1e-6 * batch
  assert len(record["seconds_all"]) == record["steps"]


@pytest.mark.slow
def test_training_step_and_pgd_smallest_config():
  records = _run("--what", "generalist_step,pgd20", "--model", "smallcnn", "--batch", "2",
                 "--pgd-steps", "1", "--steps", "1", "--warmup", "0", "--image-size", "8")
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
  records = _run("--what", "conv", "--conv-shape", "2,6,6,3,4,3,2", "--steps", "1", "--out",
                 str(out))
  assert {(r["conv_impl"], r["part"]) for r in records} == {
      ("xla", "forward"), ("xla", "grad_input"), ("xla", "grad_kernel"), ("xla", "grad_both"),
      ("custom", "grad_input"), ("custom", "grad_kernel"), ("custom", "grad_both")}
  for r in records:
    _check(r, "conv", "conv:2,6,6,3,4,3,2", 2)
  assert len(out.read_text().splitlines()) == len(records)
  # A sweep runs each point in its own process and labels it.
  records = _run("--what", "natural_step", "--model", "smallcnn", "--image-size", "8", "--steps",
                 "1", "--warmup", "0", "--sweep", "batch", "--sweep-values", "2,4")
  assert [r["batch"] for r in records] == [2, 4]
  for r in records:
    _check(r, "natural_step", "smallcnn", r["batch"])


def test_bad_flags_fail_clearly():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, BENCH, "--what", "nonsense"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120, check=False)
  assert result.returncode != 0 and "--what" in result.stderr


@pytest.mark.slow
def test_side_by_side_pairs_rounds_and_reports_the_median_ratio(tmp_path):
  # A stand-in for the PyTorch environment: a "python" that prints one bench line at 2 img/s.
  fake = tmp_path / "fake_python"
  fake.write_text("#!/bin/sh\necho '{\"what\": \"pgd20\", \"images_per_second\": 2.0}'\n")
  fake.chmod(0o755)
  out = tmp_path / "side.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([
      sys.executable,
      os.path.join(ROOT, "experiments", "side_by_side.py"), "--torch-python",
      str(fake), "--what", "pgd20", "--model", "smallcnn", "--batch", "2", "--pgd-steps", "1",
      "--image-size", "8", "--rounds", "2", "--steps", "1", "--warmup", "0", "--out",
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
