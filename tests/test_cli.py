"""Tests of the command-line programs: flags, errors before any work, a tiny end-to-end run."""
import ast
import errno
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from gen_jax import checkpoint, cli, study
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
    (["--preset", "pilot", "--seed", str(2**32)], r"--seed must lie in \[0, 2\*\*32 - 1"),
    (["--preset", "pilot", "--seed", "18446744073709551616"], r"--seed must lie in \[0, 2\*\*32"),
    (["--preset", "pilot", "--image-size", "100000"], r"--image-size must lie in \[1, 4096\]"),
    (["--preset", "pilot", "--lr-factors", "1,1,-0.1,0.01"], r"--lr-factors must all be >= 0"),
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


@pytest.mark.programs_compile_fast
@pytest.mark.slow
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
             "--sanity-queries",
             "50",
             cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads((workdir / "eval" / "report.json").read_text())
  roles = {"global", "natural", "robust"}
  assert set(report) == {
      "eps", "step_size", "threats", "n", "attacks", "models", "sanity", "boundary", "corruptions",
      "examples"
  }
  assert report["threats"]["pgd20"]["name"].startswith("PGD-20 linf eps ")
  assert set(report["threats"]) == {"pgd20"}  # clean and APGD-CE are no threat of the engine
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
    assert "Square (50-query)" in json.dumps(checks)  # --sanity-queries reached the check
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


def _program(name):
  """experiments/<name>.py as a module (its `_parse` builds and runs its parser)."""
  spec = importlib.util.spec_from_file_location(f"program_{name}",
                                                ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _parse_error(parse, argv, capsys):
  """The one line with which `parse(argv)` refuses its arguments (exit code 2)."""
  with pytest.raises(SystemExit) as exit_info:
    parse(argv)
  assert exit_info.value.code == 2
  return capsys.readouterr().err


def test_flags_are_never_matched_by_prefix(capsys):
  # argparse's default would take --epoch as --epochs and --lr-r as --lr-rob.
  parser = cli.build_parser("test")
  for flag in ("--epoch", "--lr-r"):
    err = _parse_error(lambda argv: cli.parse_config(parser, argv),
                       ["--preset", "pilot", flag, "5"], capsys)
    assert f"unrecognized arguments: {flag} 5" in err
  # The old underscore spellings are explicit aliases and keep working.
  _, config = cli.parse_config(parser,
                               ["--preset", "pilot", "--data_dir", "/x", "--lr_rob", "0.02"])
  assert (config.data_dir, config.lr_rob) == ("/x", 0.02)
  evaluate, sweep_mix, export = (_program(n) for n in ("evaluate", "sweep_mix", "export"))
  # Each flag is a prefix of exactly one flag of its program (argparse would take it).
  cases = [(evaluate._parse, ["--workdir", "w", "--batch-s", "8"]),
           (sweep_mix._parse, ["--workdir", "w", "--bet", "0,1"]),
           (export._parse, ["--workdir", "w", "--out", "o", "--tol", "1e-3"])]
  for parse, argv in cases:
    assert "unrecognized arguments" in _parse_error(parse, argv, capsys)
  assert evaluate._parse(["--workdir", "w", "--batch_size", "8"]).batch_size == 8


def test_every_parser_of_the_project_refuses_abbreviations():
  # Parsers built in place (not by `cli.argument_parser` / `cli.build_parser`) must say so.
  sources = [*ROOT.glob("experiments/**/*.py"), *ROOT.glob("gen_jax/**/*.py")]
  missing = []
  for path in sources:
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and
          node.func.attr == "ArgumentParser"):
        abbrev = [k for k in node.keywords if k.arg == "allow_abbrev"]
        if not abbrev or not isinstance(abbrev[0].value, ast.Constant) or abbrev[0].value.value:
          missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
  assert not missing, f"ArgumentParser without allow_abbrev=False: {missing}"


def test_evaluation_flags_are_checked_before_any_model_is_loaded(capsys):
  evaluate, sweep_mix, export = (_program(n) for n in ("evaluate", "sweep_mix", "export"))
  # The workdir does not exist: each refusal comes from the flags alone.
  err = _parse_error(evaluate._parse, ["--workdir", "nowhere", "--eps", "2"], capsys)
  assert re.search(r"argument --eps: must lie in \(0, 1\], got 2.0", err)
  err = _parse_error(sweep_mix._parse, ["--workdir", "nowhere", "--betas", "nan"], capsys)
  assert re.search(r"argument --betas: betas must be numbers in \[0, 1\]", err)
  err = _parse_error(evaluate._parse, ["--workdir", "nowhere", "--attack-seed", str(2**32)], capsys)
  assert "argument --attack-seed/--seed: must lie in [0, 2**32 - 1" in err
  err = _parse_error(export._parse, ["--workdir", "nowhere", "--out", "o", "--parity-n", "-5"],
                     capsys)
  assert "argument --parity-n/--parity_n: must be >= 0; got -5" in err
  err = _parse_error(export._parse, ["--workdir", "nowhere", "--out", "o", "--opset", "17"], capsys)
  assert "argument --opset: must be >= 18" in err
  assert evaluate._parse(["--workdir", "w", "--eps", "1"]).eps == 1.0


def test_evaluate_refuses_model_with_a_saved_model(capsys):
  evaluate, export = _program("evaluate"), _program("export")
  err = _parse_error(evaluate._parse, ["--checkpoint", "RUN/best", "--model", "robust"], capsys)
  assert "--model applies to --workdir only" in err and "holds one model" in err
  assert len(err.strip().splitlines()[-1]) > 0 and "Traceback" not in err
  assert evaluate._parse(["--checkpoint", "RUN/best"]).model == "global"
  assert evaluate._parse(["--workdir", "RUN", "--model", "robust"]).model == "robust"
  assert evaluate._parse(["--workdir", "RUN"]).model == "global"
  err = _parse_error(export._parse, ["--checkpoint", "RUN/best", "--model", "robust", "--out", "o"],
                     capsys)
  assert "--model applies to --workdir only" in err
  assert export._parse(["--workdir", "RUN", "--out", "o"])[0].model == "global"


def test_duplicate_expert_roles_suggest_a_spelling_that_parses(capsys):
  parser = cli.build_parser("test")
  for spec in ("natural,natural", "natural,pgd:linf:8/255:10,pgd:linf:4/255:10:step=0.01",
               "natural,robust,robust", "natural,natural_2=natural,natural"):
    entries = spec.split(",")
    err = _parse_error(lambda argv: cli.parse_config(parser, argv),
                       ["--preset", "pilot", "--experts-spec", spec], capsys)
    suggestion = re.search(r"\(e\.g\. '([^']+)'\)", err)[1]
    # The suggestion renames the second entry of the role; the list then parses.
    fixed = entries[:-1] + [suggestion]
    _, config = cli.parse_config(parser, ["--preset", "pilot", "--experts-spec", ",".join(fixed)])
    assert len(set(config.experts)) == len(entries)


def _failing_program():
  raise ValueError("the run holds NaN")


@pytest.mark.parametrize("how", ["none", "flag", "env"])
def test_main_guard_shows_the_traceback_on_request(how, monkeypatch, capsys):
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  monkeypatch.setattr(sys, "argv",
                      ["prog", "--workdir", "w"] + (["--traceback"] if how == "flag" else []))
  if how == "env":
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
  with pytest.raises(SystemExit) as exit_info:
    cli.main_guard(_failing_program)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.strip().splitlines()[-1] == "error: the run holds NaN"
  assert ("Traceback (most recent call last)" in err) == (how != "none")
  assert ("_failing_program" in err) == (how != "none")


def _full_disk_hidden_by_close():
  """A checkpoint save fails on a full disk; closing the run's writers in a `finally` then
  fails on the same disk and replaces the first error (the order a run's teardown gives)."""
  try:
    raise checkpoint.DiskFull("the disk holding /w/checkpoints is full (no space left on device)")
  finally:
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_disk_writing_a_file():
  raise OSError(errno.ENOSPC, "No space left on device", "/w/metrics.jsonl")


@pytest.mark.parametrize("program, line", [
    (_full_disk_hidden_by_close, "error: the disk holding /w/checkpoints is full"),
    (_full_disk_writing_a_file, "error: the disk is full (no space left on device) while writing "
     "/w/metrics.jsonl."),
])
def test_main_guard_names_a_full_disk_even_behind_a_later_error(program, line, monkeypatch, capsys):
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  monkeypatch.setattr(sys, "argv", ["prog"])
  with pytest.raises(SystemExit) as exit_info:
    cli.main_guard(program)
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(line), lines


def test_every_guarded_program_accepts_the_traceback_flag(tmp_path):
  train = _program("train")
  parser = cli.build_parser("t", add_arguments=train._add_arguments)
  assert cli.parse_config(parser, ["--preset", "tiny", "--traceback"])[0].traceback
  assert _program("evaluate")._parse(["--workdir", "w", "--traceback"]).traceback
  assert _program("sweep_mix")._parse(["--workdir", "w", "--traceback"]).traceback
  assert _program("export")._parse(["--workdir", "w", "--out", "o", "--traceback"])[0].traceback
  # End to end: the traceback of an error, then its one line, exit code 2.
  out = _run(str(ROOT / "experiments" / "evaluate.py"),
             "--workdir",
             str(tmp_path / "none"),
             "--traceback",
             timeout=120)
  assert out.returncode == 2 and "Traceback (most recent call last)" in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "holds no training run" in (
      out.stderr.strip().splitlines()[-1])
  env = {**os.environ, cli.TRACEBACK_ENV: "1"}
  out = subprocess.run([
      sys.executable,
      str(ROOT / "experiments" / "evaluate.py"), "--workdir",
      str(tmp_path / "none")
  ],
                       capture_output=True,
                       text=True,
                       env=env,
                       timeout=120)
  assert out.returncode == 2 and "Traceback (most recent call last)" in out.stderr
