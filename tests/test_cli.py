"""Tests of the command-line programs: flags, errors before any work, a tiny end-to-end run."""
import json
import math
import pathlib
import subprocess
import sys

import pytest

from gen_jax import cli, study
from gen_jax import config as cfg
from gen_jax.evaluation import corruptions, sanity

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, cwd=None, timeout=600):
  return subprocess.run([sys.executable, *args],
                        capture_output=True,
                        text=True,
                        cwd=cwd,
                        timeout=timeout)


def test_every_field_is_a_flag_and_overrides_parse_by_type():
  parser = cli.build_parser("test")
  args, config = cli.parse_config(parser, [
      "--preset", "pilot", "--epochs", "2", "--eps", "0.031", "--model", "resnet18", "--data-dir",
      "/x", "--flip", "true", "--lr_factors", "1,1,0.1,0.05", "--max_train_per_class", "none"
  ])
  assert args.preset == "pilot"
  assert (config.epochs, config.eps, config.model, config.data_dir) == (2, 0.031, "resnet18", "/x")
  assert config.flip is True and config.lr_factors == (1.0, 1.0, 0.1, 0.05)
  assert config.max_train_per_class is None
  assert config.dataset == cfg.get_config("pilot").dataset  # untouched fields keep the preset


@pytest.mark.parametrize("argv,message", [
    (["--preset", "nope"], "invalid choice: 'nope'"),
    (["--preset", "pilot", "--epochs", "two"], "expected an int"),
    (["--preset", "pilot", "--eps", "-1"], "--eps must be >= 0"),
    (["--preset", "pilot", "--method", "magic"], "--method must be one of"),
    (["--preset", "pilot", "--ema_decay", "1.5"], r"--ema-decay must lie in \[0, 1\]"),
    (["--preset", "pilot", "--dataset", "folder"], "--data-dir is required"),
    (["--preset", "pilot", "--eps", "nan"], "--eps must be a finite number"),
    (["--preset", "pilot", "--seed", "-1"], "--seed must be >= 0"),
    (["--preset", "pilot", "--no_such_field", "1"], "unrecognized arguments"),
])
def test_bad_flags_fail_before_any_work(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_config(cli.build_parser("test"), argv)
  assert exit_info.value.code == 2
  assert __import__("re").search(message, capsys.readouterr().err)


def test_help_lists_presets_and_fields():
  out = _run(str(ROOT / "experiments" / "train.py"), "--help", timeout=120)
  assert out.returncode == 0, out.stderr
  for name in list(cfg.PRESETS) + ["--eps", "--redistribute_start", "--data-dir", "--workdir"]:
    assert name in out.stdout
  assert "pilot: dataset='digits'" in out.stdout


def test_evaluate_rejects_unknown_attack_and_missing_run(tmp_path):
  script = str(ROOT / "experiments" / "evaluate.py")
  out = _run(script, "--workdir", str(tmp_path), "--attacks", "clean,pgd7", timeout=120)
  assert out.returncode == 2 and "unknown attack(s) ['pgd7']" in out.stderr
  out = _run(script, "--workdir", str(tmp_path / "none"), "--attacks", "clean", timeout=120)
  assert out.returncode == 2 and "holds no training run" in out.stderr


def test_chord_score():
  clean = {"natural": 0.9, "pgd_at": 0.7, "generalist": 0.8}
  robust = {"natural": 0.0, "pgd_at": 0.4, "generalist": 0.2}
  assert study.chord_score(clean, robust) == pytest.approx(1.0)  # on the straight line
  better = dict(clean, generalist=0.85)
  assert study.chord_score(better, robust) == pytest.approx(1.25)
  assert math.isnan(study.chord_score(dict(clean, pgd_at=0.9), robust))


def test_train_command_tiny_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  out = _run(str(ROOT / "experiments" / "train.py"),
             "--preset",
             "tiny",
             "--epochs",
             "1",
             "--workdir",
             str(workdir),
             "--no-progress",
             cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "global" in out.stdout and "natural" in out.stdout
  summary = json.loads((workdir / "summary.json").read_text())
  assert set(summary["models"]["global"]) == {"clean_acc", "pgd_acc"}
  # The robustness report of the run's three models.
  out = _run(str(ROOT / "experiments" / "evaluate.py"),
             "--workdir",
             str(workdir),
             "--model",
             "all",
             "--attacks",
             "clean,pgd20,apgd-ce",
             "--n",
             "16",
             "--batch-size",
             "16",
             cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads((workdir / "eval" / "report.json").read_text())
  roles = {"global", "natural", "robust"}
  assert set(report) == {
      "eps", "n", "attacks", "models", "sanity", "boundary", "corruptions", "examples"
  }
  assert set(report["models"]) == roles and report["n"] == 16
  for row in report["models"].values():
    assert row["pgd20"]["accuracy"] <= row["clean"]["accuracy"]
    assert row["apgd-ce"]["accuracy"] <= row["clean"]["accuracy"]
  # Every model has every analysis, on the same 16 points.
  assert set(report["sanity"]["models"]) == roles and report["sanity"]["n"] == 16
  for checks in report["sanity"]["models"].values():
    assert set(checks["checks"]) == set(sanity.CHECKS)
  for role in roles:  # figures of the attack table are reused, not recomputed
    checks = report["sanity"]["models"][role]
    assert checks["accuracies"]["pgd20"] == report["models"][role]["pgd20"]["accuracy"]
    assert "pgd20" not in checks["computed"] and "fgsm" in checks["computed"]
  assert set(report["boundary"]["models"]) == roles
  assert all(len(r["distances"]) == 16 for r in report["boundary"]["models"].values())
  assert set(report["corruptions"]["models"]) == roles
  assert report["corruptions"]["source"] == "computed"
  for row in report["corruptions"]["models"].values():
    assert set(row["per_corruption"]) == set(corruptions.CORRUPTIONS)
  md = (workdir / "eval" / "report.md").read_text()
  for heading in ("## Robust accuracy", "## Gradient-masking sanity checks",
                  "## Distance to the decision boundary", "## Common corruptions", "| global |"):
    assert heading in md
  assert (workdir / "eval" / "boundary.png").read_bytes()[:4] == b"\x89PNG"
  assert (workdir / "eval" / "examples.png").read_bytes()[:4] == b"\x89PNG"
  assert set(report["examples"]["adversarial"]) == roles and "## Adversarial examples" in md
  # A second run with other settings on the same workdir is refused, nothing is touched.
  before = (workdir / "summary.json").read_text()
  out = _run(str(ROOT / "experiments" / "train.py"),
             "--preset",
             "tiny",
             "--epochs",
             "3",
             "--workdir",
             str(workdir),
             cwd=tmp_path,
             timeout=120)
  assert out.returncode == 2 and "another config" in out.stderr
  assert (workdir / "summary.json").read_text() == before
