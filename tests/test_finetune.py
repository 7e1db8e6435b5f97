"""The mechanism diagnostic: clean fine-tunes of a PGD-AT model and their mixtures."""
import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from gen_jax import config as cfg
from gen_jax import finetune, models, runs, training

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
  """A tiny study: natural-s0 and pgd_at-s0 (the compare.py layout).

  The natural run gets 8 epochs so that its model leaves chance (PGD-AT's one epoch stays there):
  the baselines then have a clean and a robust gap, and every chord score is a number.
  """
  root = tmp_path_factory.mktemp("study")
  for method, epochs in (("natural", 8), ("pgd_at", 1)):
    config = dataclasses.replace(cfg.get_config("tiny"), method=method, epochs=epochs)
    training.train_and_evaluate(config, root / f"{method}-s0", progress=False)
  return root


def _robust(study_dir):
  config = runs.read_config(study_dir / "pgd_at-s0")
  splits = runs.load_splits(config)
  network = runs.build_model(config, splits.num_classes)
  abstract = jax.eval_shape(
      lambda: models.init_variables(network, jax.random.key(0), tuple(splits.train_x.shape[1:])))
  robust, _ = runs.load_init(study_dir / "pgd_at-s0", config, abstract, num_classes=10)
  return config, splits, robust


@pytest.mark.slow
def test_finetune_resumes_from_its_saved_budgets_to_the_same_models(study_dir, tmp_path):
  config, splits, robust = _robust(study_dir)
  straight = dict(finetune.finetune(config, robust, splits, lr=0.05, at_steps=(1, 3)))
  first = dict(
      finetune.finetune(config, robust, splits, lr=0.05, at_steps=(1,), checkpoint_dir=tmp_path))
  resumed = dict(
      finetune.finetune(config, robust, splits, lr=0.05, at_steps=(1, 3), checkpoint_dir=tmp_path))
  assert list(resumed) == [1, 3]
  for k in (1, 3):
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed[k], straight[k])
  jax.tree_util.tree_map(np.testing.assert_array_equal, first[1], straight[1])
  # Training moved the weights (the comparison above can fail).
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), straight[3]["params"],
                                 robust["params"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0


@pytest.mark.slow
def test_the_program_measures_its_baselines_with_the_mixtures_engine_and_resumes(study_dir):
  command = [
      sys.executable,
      str(ROOT / "experiments" / "finetune_mix.py"), "--study",
      str(study_dir), "--lrs", "0.05", "--steps", "1,2", "--betas", "0,0.5,1"
  ]
  done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  out = study_dir / "finetune-mix"
  result = json.loads((out / "finetune_mix.json").read_text())
  assert len(result["points"]) == 6  # 2 budgets x 3 betas, one seed
  # The baselines are the runs' final models measured by the engine the mixtures use, so they
  # equal the runs' own summaries (written by the same engine, key and threat) and β = 1 is the
  # PGD-AT baseline itself.
  baselines = result["baselines"]["0"]
  for method in ("natural", "pgd_at"):
    final = runs.read_summary(study_dir / f"{method}-s0")["models"]["global"]
    assert baselines[method] == {"clean": final["clean_acc"], "robust": final["pgd_acc"]}
  for p in result["points"]:
    if p["beta"] == 1.0:
      assert {"clean": p["clean"], "robust": p["robust"]} == baselines["pgd_at"]
      assert p["chord"] == pytest.approx(1.0)
  assert [r["steps"] for r in result["summary"]] == [1, 2]
  assert (out / "finetune_mix.png").stat().st_size > 0
  assert "| BatchNorm | lr | steps |" in (out / "finetune_mix.md").read_text()
  assert {p["bn"] for p in result["points"]} == {"mixed"}
  before = (out / "s0.json").read_text()
  again = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "seed 0 BatchNorm" not in again.stdout  # nothing recomputed
  assert (out / "s0.json").read_text() == before
  # A second BatchNorm mode adds its points from the saved fine-tunes; the first mode's stay.
  both = subprocess.run(command + ["--bn", "mixed,clean", "--recalibration-n", "64"],
                        capture_output=True,
                        text=True,
                        timeout=900,
                        cwd=ROOT)
  assert both.returncode == 0, both.stderr[-3000:]
  assert "BatchNorm mixed" not in both.stdout and "BatchNorm clean" in both.stdout
  result = json.loads((out / "finetune_mix.json").read_text())
  old = json.loads(before)["points"]
  assert [p for p in result["points"] if p["bn"] == "mixed"] == old
  clean = [p for p in result["points"] if p["bn"] == "clean"]
  assert len(clean) == 6 and all(0.0 <= p["clean"] <= 1.0 for p in clean)
  assert [(r["bn"], r["steps"]) for r in result["summary"]] == [("mixed", 1), ("mixed", 2),
                                                                ("clean", 1), ("clean", 2)]


def test_a_missing_baseline_is_named_before_any_work(tmp_path):
  done = subprocess.run(
      [sys.executable,
       str(ROOT / "experiments" / "finetune_mix.py"), "--study",
       str(tmp_path)],
      capture_output=True,
      text=True,
      timeout=300,
      cwd=ROOT)
  assert done.returncode != 0
  assert "natural-s0 holds no finished run" in done.stderr


def test_summary_picks_each_seeds_best_its_best_proper_mixture_and_the_best_fixed_beta():
  base = {"natural": {"clean": 0.6, "robust": 0.0}, "pgd_at": {"clean": 0.4, "robust": 0.4}}
  points = []
  for seed, figures in ((0, {
      0.0: (0.6, 0.1),
      1.0: (0.4, 0.4)
  }), (1, {
      0.0: (0.5, 0.0),
      1.0: (0.45, 0.4)
  })):
    for beta, (c, r) in figures.items():
      p = {"seed": seed, "lr": 0.1, "steps": 5, "beta": beta, "clean": c, "robust": r}
      points.append({**p, "chord": finetune.chord(p, base)})
  recalibrated = [{**p, "bn": "clean", "chord": 0.5} for p in points]
  (row, other) = finetune.summarize(points + recalibrated)  # a point without "bn" is "mixed"
  assert (row["bn"], other["bn"]) == ("mixed", "clean") and other["best"]["mean"] == 0.5
  assert row["best"]["betas"] == [0.0, 1.0]  # seed 0: 1.25 at beta 0; seed 1: 1.25 at beta 1
  assert row["best"]["mean"] == pytest.approx(1.25)
  # The proper mixtures (beta < 1) alone: seed 1's best is its beta 0, below the line.
  assert row["mixture"]["betas"] == [0.0, 0.0]
  assert row["mixture"]["mean"] == pytest.approx(0.875)
  assert row["fixed"]["beta"] == 1.0  # mean chords: beta 0 0.875, beta 1 1.125
  assert row["fixed"]["mean"] == pytest.approx(1.125)


def test_recalibration_replaces_the_mixtures_batchnorm_statistics(study_dir):
  config, splits, robust = _robust(study_dir)
  assert finetune.recalibrator(config, splits, "mixed") is None
  with pytest.raises(ValueError, match="unknown BatchNorm mode"):
    finetune.recalibrator(config, splits, "adversarial")
  recalibrate = finetune.recalibrator(config, splits, "clean", n=64)
  out = recalibrate(robust, 1.0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, out["params"], robust["params"])
  changed = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), out["batch_stats"],
                                   robust["batch_stats"])
  assert max(jax.tree_util.tree_leaves(changed)) > 0
