"""The bad-input census: every way a user has been seen to get an input wrong, and the answer.

Each case is a program's command line (run in-process through its `main`, as `python
experiments/X.py ...` would, so that the whole census takes seconds) or a library call. The
expected answer is a clear message that names the culprit: for a program, exit code 2, one line
on stderr matching the pattern, and no traceback; for the library, the exception type and a
message matching the pattern. Cases come from the reliability issue's tries as a new user and
from earlier tests.
"""
import contextlib
import io
import json
import pathlib
import runpy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import gen_jax
from gen_jax import attacks, checkpoint, data, models, runs, study
from gen_jax import config as cfg
from gen_jax.evaluation import catalogue, report, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ fixtures
def _variables():
  model = models.create_model("smallcnn", 10)
  return models.init_variables(model, jax.random.key(0), (16, 16, 1))


def _fake_run(root: pathlib.Path, method: str) -> pathlib.Path:
  """A run directory of the tiny preset with a checkpoint of the evaluated models (no training)."""
  root.mkdir(parents=True)
  config = cfg.dataclasses.replace(cfg.get_config("tiny"), method=method)
  (root / "config.json").write_text(json.dumps(cfg.config_record(config)))
  v = _variables()
  state = {"teachers": {role: v for role in config.experts}, "global_model": v}
  manager = checkpoint.open_manager(root / "checkpoints")
  checkpoint.save(manager, 1, state, {"epoch": 1})
  manager.close()
  return root


@pytest.fixture(scope="module")
def place(tmp_path_factory):
  """Paths the cases refer to, built once: runs, folders, files."""
  base = tmp_path_factory.mktemp("census")
  paths = {
      "base": base,
      "generalist": _fake_run(base / "generalist", "generalist"),
      "pgd_at": _fake_run(base / "pgd_at", "pgd_at"),
  }
  paths["no_ckpt"] = base / "no_ckpt"
  paths["no_ckpt"].mkdir()
  (paths["no_ckpt"] / "config.json").write_text(
      json.dumps(cfg.config_record(cfg.get_config("tiny"))))
  paths["garbage_config"] = base / "garbage_config"
  paths["garbage_config"].mkdir()
  (paths["garbage_config"] / "config.json").write_text("{oops")
  paths["other_config"] = base / "other_config"
  paths["other_config"].mkdir()
  (paths["other_config"] / "config.json").write_text(
      json.dumps(cfg.config_record(cfg.dataclasses.replace(cfg.get_config("tiny"), eps=0.3))))
  saved = base / "saved"
  saved.mkdir()
  (saved / "model.json").write_text("{garbage")
  paths["garbage_model"] = saved
  (base / "a_file").write_text("")
  paths["file"] = base / "a_file"
  # Image folders: good, and broken in one way each.
  for name in ("ok", "no_test", "one_class", "empty_class", "corrupt", "mixed_sizes"):
    root = base / "folders" / name
    classes = ("only",) if name == "one_class" else ("cat", "dog")
    for split in ("train",) if name == "no_test" else ("train", "test"):
      for c in classes:
        folder = root / split / c
        folder.mkdir(parents=True)
        if name == "empty_class" and c == "dog":
          continue
        for i in range(2):
          size = 12 if (name == "mixed_sizes" and i == 1) else 8
          Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    if name == "corrupt":
      (root / "train" / "cat" / "bad.png").write_bytes(b"not a png at all")
    paths[f"folder_{name}"] = root
  return paths


# ---------------------------------------------------------------------------- programs
def _run_program(script: str, argv: list[str]) -> tuple[int, str]:
  """Runs experiments/<script>.py in this process; returns (exit code, stderr)."""
  err = io.StringIO()
  old_argv = sys.argv
  sys.argv = [script, *argv]
  code = 0
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      runpy.run_path(str(ROOT / "experiments" / f"{script}.py"), run_name="__main__")
  except SystemExit as exit_:
    code = exit_.code if isinstance(exit_.code, int) else 1
  finally:
    sys.argv = old_argv
  return code, err.getvalue()


TRAIN = ["--preset", "tiny", "--no-progress"]

# (id, program, argv (with {place} fields), pattern that stderr must match)
PROGRAM_CASES = [
    ("train-unknown-preset", "train", ["--preset", "nope"], r"invalid choice: 'nope'"),
    ("train-epochs-not-int", "train", [*TRAIN, "--epochs", "two"], r"expected an int"),
    ("train-epochs-zero", "train", [*TRAIN, "--epochs", "0"], r"--epochs must be >= 1"),
    ("train-eps-negative", "train", [*TRAIN, "--eps", "-1"], r"--eps must be >= 0"),
    ("train-eps-nan", "train", [*TRAIN, "--eps", "nan"], r"--eps must be a finite number"),
    ("train-eps-inf", "train", [*TRAIN, "--eps", "inf"], r"--eps must be a finite number"),
    ("train-step-nan", "train", [*TRAIN, "--step_size", "nan"], r"--step-size must be a finite"),
    ("train-lr-nan", "train", [*TRAIN, "--lr-rob", "nan"], r"--lr-rob must be a finite number"),
    ("train-seed-negative", "train", [*TRAIN, "--seed", "-1"], r"--seed must be >= 0"),
    ("train-unknown-method", "train", [*TRAIN, "--method", "magic"], r"--method must be one of"),
    ("train-ema-above-one", "train", [*TRAIN, "--ema-decay",
                                      "1.5"], r"--ema-decay must lie in \[0, 1\]"),
    ("train-folder-without-dir", "train", [*TRAIN, "--dataset", "folder"],
     r"--data-dir is required with dataset 'folder'"),
    ("train-unknown-dataset", "train", [*TRAIN, "--dataset",
                                        "imagenet"], r"--dataset must be one of"),
    ("train-unknown-model", "train", [*TRAIN, "--model", "resnet19"], r"--model must be one of"),
    ("train-knots-length", "train", [*TRAIN, "--lr-knots", "0,0.5,1", "--lr-factors",
                                     "1,1"], r"--lr-knots and lr_factors need the same length"),
    ("train-knots-order", "train", [*TRAIN, "--lr-knots",
                                    "0,0.7,0.5,1"], r"--lr-knots must increase from 0 to 1"),
    ("train-validation-size", "train", [*TRAIN, "--validation-size",
                                        "1.5"], r"--validation-size must be a count"),
    ("train-period-zero", "train", [*TRAIN, "--redistribute-period",
                                    "0"], r"--redistribute-period must lie in \(0, 1\]"),
    ("train-dtype", "train", [*TRAIN, "--compute-dtype",
                              "float16"], r"--compute-dtype must be one of"),
    ("train-norm", "train", [*TRAIN, "--norm", "l1"], r"--norm must be one of"),
    ("train-max-per-class-zero", "train", [*TRAIN, "--max-train-per-class",
                                           "0"], r"--max-train-per-class must be >= 1"),
    ("train-unknown-flag", "train", [*TRAIN, "--no_such_field", "1"], r"unrecognized arguments"),
    ("train-flip-not-bool", "train", [*TRAIN, "--flip", "maybe"], r"expected true or false"),
    ("train-image-size-zero", "train", [*TRAIN, "--image-size", "0"], r"--image-size must be >= 1"),
    ("train-eval-every-zero", "train", [*TRAIN, "--eval-every", "0"], r"--eval-every must be >= 1"),
    ("train-robust-loss", "train", [*TRAIN, "--robust-loss",
                                    "mart"], r"--robust-loss must be one of"),
    ("train-eps-above-box", "train", [*TRAIN, "--eps", "2"], r"exceeds the \[0, 1\] pixel range"),
    ("train-missing-folder", "train",
     [*TRAIN, "--dataset", "folder", "--data-dir", "{base}/nowhere", "--workdir",
      "{base}/w1"], r"does not exist or is not a directory"),
    ("train-folder-no-test", "train",
     [*TRAIN, "--dataset", "folder", "--data-dir", "{folder_no_test}", "--workdir",
      "{base}/w2"], r"has no 'test' folder"),
    ("train-folder-one-class", "train",
     [*TRAIN, "--dataset", "folder", "--data-dir", "{folder_one_class}", "--workdir",
      "{base}/w3"], r"one class folder.*at least two classes"),
    ("train-folder-empty-class", "train", [
        *TRAIN, "--dataset", "folder", "--data-dir", "{folder_empty_class}", "--workdir",
        "{base}/w4"
    ], r"has no images"),
    ("train-folder-corrupt-image", "train",
     [*TRAIN, "--dataset", "folder", "--data-dir", "{folder_corrupt}", "--workdir",
      "{base}/w5"], r"cannot decode image file .*bad.png"),
    ("train-folder-mixed-sizes", "train", [
        *TRAIN, "--dataset", "folder", "--data-dir", "{folder_mixed_sizes}", "--workdir",
        "{base}/w6"
    ], r"images of different sizes"),
    ("train-batch-larger-than-data", "train",
     [*TRAIN, "--batch-size", "4096", "--workdir", "{base}/w7"], r"fewer than one batch"),
    ("train-batch-not-divisible", "train", [*TRAIN, "--batch-size", "33", "--workdir",
                                            "{base}/w8"], r"not divisible by the 2 devices"),
    ("train-other-config", "train", [*TRAIN, "--workdir",
                                     "{other_config}"], r"holds a run with another config \(eps"),
    ("train-garbage-config", "train", [*TRAIN, "--workdir",
                                       "{garbage_config}"], r"config.json is not valid JSON"),
    ("evaluate-unknown-attack", "evaluate",
     ["--workdir", "{generalist}", "--attacks", "clean,pgd7"], r"unknown attack\(s\) \['pgd7'\]"),
    ("evaluate-no-source", "evaluate", ["--attacks", "clean"],
     r"one of the arguments --workdir --checkpoint is required"),
    ("evaluate-missing-run", "evaluate", ["--workdir", "{base}/nowhere"], r"holds no training run"),
    ("evaluate-no-checkpoint", "evaluate", ["--workdir", "{no_ckpt}"], r"holds no checkpoint yet"),
    ("evaluate-missing-checkpoint", "evaluate", ["--checkpoint",
                                                 "{base}/nowhere"], r"no such directory"),
    ("evaluate-checkpoints-dir", "evaluate", ["--checkpoint", "{generalist}/checkpoints"],
     r"checkpoints/ directory of a run.*--workdir"),
    ("evaluate-run-dir-as-checkpoint", "evaluate", ["--checkpoint", "{generalist}"],
     r"is a run directory, not a saved model"),
    ("evaluate-garbage-model-json", "evaluate", ["--checkpoint", "{garbage_model}"],
     r"model.json is not valid JSON"),
    ("evaluate-n-zero", "evaluate", ["--workdir", "{generalist}", "--n", "0"], r"must be >= 1"),
    ("evaluate-eps-negative", "evaluate", ["--workdir", "{generalist}", "--eps",
                                           "-0.1"], r"must be a finite number > 0"),
    ("evaluate-batch-zero", "evaluate", ["--workdir", "{generalist}", "--batch-size",
                                         "0"], r"must be >= 1"),
    ("evaluate-unknown-model", "evaluate", ["--workdir", "{generalist}", "--model",
                                            "teacher"], r"has no \['teacher'\] model; it has"),
    ("evaluate-untrained-role", "evaluate", ["--workdir", "{pgd_at}", "--model",
                                             "natural"], r"has no \['natural'\] model"),
    ("evaluate-unwritable-out", "evaluate",
     ["--workdir", "{generalist}", "--attacks", "clean", "--out",
      "{file}/eval"], r"cannot write results to .*a_file/eval"),
    ("sweep-betas-range", "sweep_mix", ["--workdir", "{generalist}", "--betas",
                                        "0,2"], r"--betas.*betas must be numbers in \[0, 1\]"),
    ("sweep-betas-text", "sweep_mix", ["--workdir", "{generalist}", "--betas",
                                       "a,b"], r"expected comma-separated numbers"),
    ("sweep-rule-operator", "sweep_mix", ["--workdir", "{generalist}", "--select",
                                          "clean<=0.5"], r"cannot read the selection rule"),
    ("sweep-rule-metric", "sweep_mix", ["--workdir", "{generalist}", "--select",
                                        "acc>=0.5"], r"cannot read the selection rule"),
    ("sweep-single-expert-run", "sweep_mix", ["--workdir",
                                              "{pgd_at}"], r"nothing to mix|has no \['natural'\]"),
    ("sweep-recalibration-mode", "sweep_mix",
     ["--workdir", "{generalist}", "--bn-recalibrate", "x"], r"invalid choice: 'x'"),
    ("sweep-pgd-steps-zero", "sweep_mix", ["--workdir", "{generalist}", "--pgd-steps",
                                           "0"], r"must be >= 1"),
    ("sweep-recalibration-n-zero", "sweep_mix",
     ["--workdir", "{generalist}", "--recalibration-n", "0"], r"must be >= 1"),
    ("train-abbreviated-flag", "train", [*TRAIN, "--epoch",
                                         "1"], r"unrecognized arguments: --epoch 1"),
    ("train-seed-too-large", "train", [*TRAIN, "--seed",
                                       "4294967296"], r"--seed must lie in \[0, 2\*\*32 - 1"),
    ("train-image-size-huge", "train", [*TRAIN, "--image-size",
                                        "100000"], r"--image-size must lie in \[1, 4096\]"),
    ("train-lr-factors-negative", "train", [*TRAIN, "--lr-factors",
                                            "1,1,-0.1,0.01"], r"--lr-factors must all be >= 0"),
    ("evaluate-eps-above-one", "evaluate", ["--workdir", "{generalist}", "--eps",
                                            "2"], r"--eps: must lie in \(0, 1\]"),
    ("evaluate-checkpoint-with-model", "evaluate",
     ["--checkpoint", "{base}/nowhere", "--model", "robust"], r"--model applies to --workdir only"),
    ("sweep-betas-nan", "sweep_mix", ["--workdir", "{generalist}", "--betas",
                                      "nan"], r"--betas.*betas must be numbers in \[0, 1\]"),
    ("sweep-rule-never-met", "sweep_mix", ["--workdir", "{generalist}", "--select",
                                           "clean>1"], r"can never be met"),
    ("export-parity-n-negative", "export",
     ["--workdir", "{generalist}", "--out", "{base}/exp", "--parity-n",
      "-5"], r"--parity-n.*must be >= 0"),
    ("compare-repeated-seed", "compare", [*TRAIN, "--seeds", "0,0", "--workdir",
                                          "{base}/c1"], r"seeds repeats a seed"),
    ("compare-negative-seed", "compare", [*TRAIN, "--seeds", "-1", "--workdir",
                                          "{base}/c2"], r"seeds must lie in \[0, 2\*\*32 - 1\]"),
    ("compare-unknown-ablation", "compare",
     [*TRAIN, "--ablations", "nope", "--workdir", "{base}/c3"], r"unknown ablation 'nope'"),
]


@pytest.mark.parametrize("case", PROGRAM_CASES, ids=[c[0] for c in PROGRAM_CASES])
def test_program_answers_bad_input_with_one_clear_line(case, place):
  _, script, argv, pattern = case
  argv = [a.format(**place) for a in argv]
  code, stderr = _run_program(script, argv)
  assert code == 2, (code, stderr[-2000:])
  assert "Traceback" not in stderr, stderr[-2000:]
  assert __import__("re").search(pattern, stderr), stderr[-2000:]


# ----------------------------------------------------------------------------- library
def _bad_tree():
  return {"params": {"w": jnp.ones(2)}}, {"params": {"v": jnp.ones(2)}}


LIBRARY_CASES = [
    ("mix-structure", lambda: gen_jax.mix(*_bad_tree()), ValueError, r"params/"),
    ("mix-beta-range", lambda: gen_jax.mix({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, 1.5), ValueError,
     r"beta must lie in \[0, 1\]"),
    ("mix-integer-leaves",
     lambda: gen_jax.mix({"c": jnp.ones(2, jnp.int32)}, {"c": jnp.ones(2, jnp.int32)}), ValueError,
     r"floating"),
    ("mix-many-weights", lambda: gen_jax.mix_many([{
        "w": jnp.ones(2)
    }, {
        "w": jnp.ones(2)
    }], [0.3, 0.3]), ValueError, r"sum to 1"),
    ("mix-dtypes", lambda: gen_jax.mix({"w": jnp.ones(2, jnp.float16)}, {"w": jnp.ones(2)}),
     ValueError, r"leaf w has dtype float16 in params_nat but float32 in params_rob"),
    ("ema-decay-negative-step", lambda: gen_jax.mixing.ema_decay(-5), ValueError,
     r"must be >= 0, got -5"),
    ("pgd-uint8-images", lambda: attacks.pgd(lambda x: x.reshape(2, -1)[:, :3],
                                             jnp.zeros((2, 4, 4, 1), jnp.uint8),
                                             jnp.zeros(2, jnp.int32),
                                             key=jax.random.key(0),
                                             eps=0.1), (TypeError, ValueError), r"uint8|float"),
    ("pgd-negative-eps", lambda: attacks.pgd(lambda x: x.reshape(2, -1)[:, :3],
                                             jnp.zeros((2, 4, 4, 1)),
                                             jnp.zeros(2, jnp.int32),
                                             key=jax.random.key(0),
                                             eps=-0.1), ValueError, r"eps"),
    ("pgd-missing-key", lambda: attacks.pgd(lambda x: x.reshape(2, -1)[:, :3],
                                            jnp.zeros((2, 4, 4, 1)),
                                            jnp.zeros(2, jnp.int32),
                                            key=None,
                                            eps=0.1), ValueError, r"key is required"),
    ("create-model-unknown", lambda: models.create_model("resnet19", 10), ValueError,
     r"Unknown model 'resnet19'"),
    ("create-model-classes", lambda: models.create_model("smallcnn", 0), ValueError,
     r"num_classes must be >= 1"),
    ("dataset-unknown", lambda: data.load_dataset("imagenet"), ValueError,
     r"unknown data set 'imagenet'"),
    ("dataset-max-per-class", lambda: data.load_dataset("digits", max_per_class=0), ValueError,
     r"max_per_class must be a positive int"),
    ("to-float-labels", lambda: data.to_float(np.zeros(3, np.int32)), TypeError, r"uint8"),
    ("report-unknown-analysis", lambda: report.check_analyses(["sanity", "vibes"]), ValueError,
     r"unknown analysis\(es\) \['vibes'\]"),
    ("catalogue-unknown-attack", lambda: catalogue.check_names(["pgd7"]), ValueError,
     r"unknown attack\(s\) \['pgd7'\]"),
    ("sweep-rule", lambda: sweep.parse_rule("clean=0.5"), ValueError,
     r"cannot read the selection rule"),
    ("study-repeated-seed", lambda: study.plan_runs([1, 1]), ValueError, r"repeats a seed"),
    ("config-record-unknown-key", lambda: cfg.config_from_record({
        **cfg.config_record(cfg.get_config("tiny")), "bogus": 1
    }), cfg.ConfigError, r"bogus is not a config field"),
    ("config-validate-nan",
     lambda: cfg.dataclasses.replace(cfg.get_config("tiny"), momentum=float("nan")).validate(),
     cfg.ConfigError, r"momentum must be a finite number"),
    ("read-config-missing", lambda: runs.read_config("/nonexistent/run"), FileNotFoundError,
     r"holds no training run"),
    ("preset-unknown", lambda: cfg.get_config("cifar11"), ValueError, r"unknown preset 'cifar11'"),
]


@pytest.mark.parametrize("case", LIBRARY_CASES, ids=[c[0] for c in LIBRARY_CASES])
def test_library_answers_bad_input_with_a_named_error(case):
  _, call, error, pattern = case
  with pytest.raises(error, match=pattern):
    call()


def test_the_census_is_large_and_has_no_duplicate_case():
  ids = [c[0] for c in PROGRAM_CASES + LIBRARY_CASES]
  assert len(ids) == len(set(ids)) and len(ids) >= 60
