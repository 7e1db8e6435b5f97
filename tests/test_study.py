"""Tests of gen_jax.study (the plan, the chord score and the aggregation) and of compare.py."""
import dataclasses
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from gen_jax import config as cfg
from gen_jax import study

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _row(variant, seed, clean, robust):
  method = variant if variant in study.BASELINES else "generalist"
  return {
      "name": f"{variant}-s{seed}",
      "method": method,
      "variant": variant,
      "seed": seed,
      "clean": clean,
      "robust": robust
  }


# Hand-made study: natural 0.60/0.00, PGD-AT 0.40/0.30 in every seed; Generalist above the line
# in seeds 0 and 1 (chord 1.25, 1.10) and on it in seed 2 (chord 1.0).
ROWS = [
    _row("natural", 0, 0.60, 0.00),
    _row("pgd_at", 0, 0.40, 0.30),
    _row("generalist", 0, 0.55, 0.15),
    _row("natural", 1, 0.60, 0.00),
    _row("pgd_at", 1, 0.40, 0.30),
    _row("generalist", 1, 0.50, 0.18),
    _row("natural", 2, 0.60, 0.00),
    _row("pgd_at", 2, 0.40, 0.30),
    _row("generalist", 2, 0.50, 0.15),
    _row("no-redistribution", 0, 0.58, 0.09),
]


def test_chord_score_is_one_on_the_line_and_nan_without_a_trade_off():
  clean = {"natural": 0.9, "pgd_at": 0.7, "generalist": 0.8}
  robust = {"natural": 0.0, "pgd_at": 0.4, "generalist": 0.2}
  assert study.chord_score(clean, robust) == pytest.approx(1.0)
  assert study.chord_score(dict(clean, generalist=0.85), robust) == pytest.approx(1.25)
  assert math.isnan(study.chord_score(dict(clean, pgd_at=0.9), robust))


def test_spread_mean_std_and_student_t_interval():
  s = study.spread([1.0, 2.0, 4.0])
  assert s["n"] == 3 and s["mean"] == pytest.approx(7 / 3)
  assert s["std"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
  half = stats.t.ppf(0.975, 2) * s["std"] / math.sqrt(3)
  assert (s["low"], s["high"]) == pytest.approx((7 / 3 - half, 7 / 3 + half))
  one = study.spread([0.5])
  assert one["mean"] == 0.5 and math.isnan(one["std"]) and math.isnan(one["low"])
  assert study.spread([])["n"] == 0
  assert study.spread([1.0, float("nan"), 3.0])["n"] == 2  # undefined scores are left out


def test_aggregate_on_hand_made_numbers():
  result = study.aggregate(ROWS)
  gen = result["variants"]["generalist"]
  assert gen["seeds"] == [0, 1, 2]
  assert gen["clean"]["mean"] == pytest.approx(0.51 + 2 / 300)
  assert result["variants"]["natural"]["robust"]["mean"] == 0.0
  chord = result["chord"]
  assert chord["per_seed"] == pytest.approx({0: 1.25, 1: 1.1, 2: 1.0})
  assert chord["mean"] == pytest.approx((1.25 + 1.1 + 1.0) / 3)
  expected = study.spread([1.25, 1.1, 1.0])
  assert (chord["low"], chord["high"]) == pytest.approx((expected["low"], expected["high"]))
  assert chord["excludes_one"] is (not expected["low"] <= 1.0 <= expected["high"])
  # The ablation is scored against the baselines of its own seed.
  assert result["ablations"]["no-redistribution"]["per_seed"] == pytest.approx({0: 0.9 + 0.3})
  table = study.to_markdown(result)
  assert "| generalist | 0,1,2 |" in table and "interval" in table


def test_aggregate_scores_only_complete_seeds():
  partial = ROWS[:4] + [_row("generalist", 1, 0.5, 0.2)]  # seed 1 lacks PGD-AT
  chord = study.aggregate(partial)["chord"]
  assert list(chord["per_seed"]) == [0] and chord["excludes_one"] is None


def test_excludes_one_when_every_seed_is_clearly_above():
  rows = [r for r in ROWS if r["variant"] != "generalist"]
  rows += [_row("generalist", s, 0.55, 0.15 + 0.01 * s) for s in range(3)]
  assert study.aggregate(rows)["chord"]["excludes_one"] is True


def test_plan_is_seed_major_then_ablations():
  plan = study.plan_runs([0, 1], ["beta0.6"], ablation_seeds=[0, 1])
  assert [r.name for r in plan] == [
      "natural-s0", "pgd_at-s0", "generalist-s0", "natural-s1", "pgd_at-s1", "generalist-s1",
      "beta0.6-s0", "beta0.6-s1"
  ]
  assert study.plan_runs([3], ["ema-scaled"])[-1].seed == 3  # ablations default to the 1st seed
  for bad in (dict(seeds=[]), dict(seeds=[0, 0]), dict(seeds=[0],
                                                       ablations=["nope"]), dict(seeds=[0, 2**32])):
    with pytest.raises(ValueError):
      study.plan_runs(**bad)


def test_ablation_overrides_and_paper_scaled_ema():
  assert study.paper_scaled_ema_decay(study.REFERENCE_STEPS) == pytest.approx(0.999)
  # A 1,480-step run gets a window of ~31.5 steps, the same 2.1 % of the run as 1,000 of 46,920.
  decay = study.paper_scaled_ema_decay(1480)
  assert 1 / (1 - decay) == pytest.approx(1000 * 1480 / 46920)
  study_config = cfg.get_config("cifar10-study")  # 20 epochs of 74 steps: 1,480
  context = study.AblationContext(study_config, 74)
  assert study.ablation_overrides("ema-scaled", context) == {"ema_decay": 0.9683}
  assert study.ablation_overrides("no-redistribution", context) == {"redistribute": False}
  with pytest.raises(ValueError, match="unknown ablation"):
    study.ablation_overrides("nope", context)


def test_sweep_chords_and_the_study_figure(tmp_path):
  sweeps = {
      "generalist-s0": {
          "points": [{
              "beta": 0.0,
              "clean": 0.6,
              "robust": 0.0
          }, {
              "beta": 0.5,
              "clean": 0.55,
              "robust": 0.2
          }, {
              "beta": 1.0,
              "clean": 0.4,
              "robust": 0.3
          }]
      }
  }
  chords = study.sweep_chords(ROWS, sweeps)
  assert list(chords) == ["generalist-s0"]
  assert chords["generalist-s0"]["chords"] == pytest.approx([1.0, 0.75 + 2 / 3, 1.0])
  assert chords["generalist-s0"]["best_beta"] == 0.5  # the mixture above the line
  assert "| generalist-s0 | 0.50 | 1.417 |" in study.to_markdown(study.aggregate(ROWS),
                                                                 sweep_chords=chords)
  png = study.plot_study(ROWS, sweeps, tmp_path / "study.png")
  assert png.read_bytes()[:4] == b"\x89PNG"


def test_zoom_window_frames_pgd_at_and_generalist_only():
  rows = [
      dict(variant="natural", clean=0.63, robust=0.004),
      dict(variant="pgd_at", clean=0.45, robust=0.27),
      dict(variant="generalist", clean=0.35, robust=0.25),
      dict(variant="no-redistribution", clean=0.20, robust=0.05),
  ]
  (x_low, x_high), (y_low, y_high) = study.zoom_window(rows)
  # Clean spans 35..45 (padded by a quarter of it, 2.5); robust 25..27 (by the least pad, 1.5);
  # natural training and the far ablation are left out.
  assert (x_low, x_high) == pytest.approx((32.5, 47.5))
  assert (y_low, y_high) == pytest.approx((23.5, 28.5))
  assert study.zoom_window([rows[0], rows[3]]) is None


@pytest.mark.programs_compile_fast
@pytest.mark.slow
def test_compare_command_runs_seeds_ablations_and_sweeps_and_resumes(tmp_path):
  args = [
      sys.executable,
      str(ROOT / "experiments" / "compare.py"), "--preset", "tiny", "--epochs", "1", "--workdir",
      str(tmp_path), "--seeds", "0", "--ablations", "no-redistribution", "--sweep", "--sweep-betas",
      "0,1", "--sweep-n", "16", "--no-progress"
  ]
  out = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((tmp_path / "compare.json").read_text())
  assert [r["name"] for r in result["runs"]
         ] == ["natural-s0", "pgd_at-s0", "generalist-s0", "no-redistribution-s0"]
  assert set(result["sweeps"]) == {"generalist-s0", "no-redistribution-s0"}
  assert (tmp_path / "generalist-s0" / "eval" / "sweep.json").exists()
  assert (tmp_path / "compare.png").exists()
  config = json.loads((tmp_path / "no-redistribution-s0" / "config.json").read_text())
  assert config["redistribute"] is False and config["method"] == "generalist"
  # Run again: nothing is retrained or re-swept, the same results come back.
  stamps = {p: p.stat().st_mtime for p in tmp_path.glob("*/summary.json")}
  again = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert {p: p.stat().st_mtime for p in tmp_path.glob("*/summary.json")} == stamps
  assert json.loads((tmp_path / "compare.json").read_text())["runs"] == result["runs"]
  # --report-only with a seed that never trained: it is named and left out, nothing is trained.
  (tmp_path / "no-redistribution-s0" / "eval" / "sweep.json").unlink()
  report = subprocess.run(args[:args.index("--seeds")] + ["--seeds", "0,1"] +
                          args[args.index("--seeds") + 2:] + ["--report-only"],
                          capture_output=True,
                          text=True,
                          cwd=tmp_path,
                          timeout=600)
  assert report.returncode == 0, report.stderr[-3000:]
  assert "natural-s1: not finished, left out (not trained by this command)" in report.stdout
  assert "sweep no-redistribution-s0: not computed yet, left out" in report.stdout
  assert not (tmp_path / "natural-s1").exists()
  assert not (tmp_path / "no-redistribution-s0" / "eval" / "sweep.json").exists()
  partial = json.loads((tmp_path / "compare.json").read_text())
  assert partial["runs"] == result["runs"] and set(partial["sweeps"]) == {"generalist-s0"}
  # --only trains the named runs and reads the others; a name the study does not plan is refused.
  seeds_01 = args[:args.index("--seeds")] + ["--seeds", "0,1"] + args[args.index("--seeds") + 2:]
  only = subprocess.run(seeds_01 + ["--only", "natural-s1"],
                        capture_output=True,
                        text=True,
                        cwd=tmp_path,
                        timeout=600)
  assert only.returncode == 0, only.stderr[-3000:]
  assert (tmp_path / "natural-s1" / "summary.json").exists()
  assert not (tmp_path / "pgd_at-s1").exists()
  bad = subprocess.run(args + ["--only", "nope-s0"],
                       capture_output=True,
                       text=True,
                       cwd=tmp_path,
                       timeout=600)
  assert bad.returncode == 2 and "which this study does not plan" in bad.stderr, bad.stderr


def _free_phases(mask):
  """Lengths of the runs of False after each run of True in a redistribution mask."""
  phases, count, seen = [], 0, False
  for redistributing in mask:
    if redistributing:
      if seen and count:
        phases.append(count)
      seen, count = True, 0
    else:
      count += 1
  return phases + ([count] if seen else [])


def test_budget_variants_give_the_natural_expert_the_diagnostics_budget():
  from gen_jax.training import schedules  # pylint: disable=import-outside-toplevel
  base = cfg.get_config("cifar10-study")
  context = study.AblationContext(base, 74, seed=2, study_dir="/s")
  total = context.total_steps

  def config_of(name):
    return dataclasses.replace(base, **study.ablation_overrides(name, context)).validate()

  natural_lr = config_of("natural-lr")
  lr = schedules.learning_rate_table(natural_lr.lr_nat, natural_lr, 74)
  start = math.ceil(base.redistribute_start * total)
  assert lr[start] == pytest.approx(study.DIAGNOSTIC_LR, rel=1e-4)
  assert natural_lr.lr_rob == base.lr_rob  # the robust expert is unchanged

  for name in ("free-budget", "free-budget-lr"):
    free = config_of(name)
    phases = _free_phases(schedules.redistribution_table(free, total))
    assert phases and all(abs(p - study.DIAGNOSTIC_STEPS) <= 1 for p in phases), phases
    assert free.redistribute_start >= base.redistribute_start  # inside the late phase
  assert config_of("free-budget-lr").lr_nat == natural_lr.lr_nat

  warm, continued = config_of("warm-start"), config_of("warm-start-pgd_at")
  assert warm.init_from == continued.init_from == "/s/pgd_at-s2"
  assert warm.epochs == continued.epochs == study.WARM_START_EPOCHS
  assert warm.lr_rob == continued.lr_rob == pytest.approx(base.lr_rob * base.lr_factors[-1])
  phases = _free_phases(schedules.redistribution_table(warm, warm.epochs * 74))
  assert phases[-1] == pytest.approx(study.DIAGNOSTIC_STEPS, abs=1)
  plan = study.plan_runs([2], ["warm-start", "warm-start-pgd_at"])
  assert [(r.name, r.method) for r in plan[-2:]] == [("warm-start-s2", "generalist"),
                                                     ("warm-start-pgd_at-s2", "pgd_at")]
