"""Tests of the mixing sweep, BatchNorm recalibration, the selection rule and model checkpoints."""
import gc
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gen_jax
from gen_jax import checkpoint, runs, training
from gen_jax import config as cfg
from gen_jax.attacks.threat import Threat
from gen_jax.evaluation import ModelSet, evaluate_models, outputs, sweep
from gen_jax.models import common

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A finished 2-epoch tiny Generalist run and its restored models."""
  workdir = tmp_path_factory.mktemp("run")
  training.train_and_evaluate(cfg.get_config("tiny"), workdir, progress=False)
  return workdir, runs.restore_models(workdir)


def test_two_expert_sweep_is_the_engine_on_each_mixture_and_writes_line_files(tiny_run):
  workdir, run = tiny_run
  config, model = run.config, run.model
  assert list(run.models) == ["natural", "robust", "global"]
  result = sweep.run(ModelSet(model, run.models),
                     run.test_x,
                     run.test_y,
                     betas=[1.0, 0.0, 0.5],
                     key=jax.random.key(3),
                     threats={"robust": Threat("linf", config.eps, config.eval_step_size, 3)})
  assert (result["kind"], result["roles"], result["metrics"]) == ("line", ["natural", "robust"],
                                                                  ["clean", "robust"])
  assert result["betas"] == [0.0, 0.5, 1.0] and result["steps"] == 3
  assert result["n"] == len(run.test_y) and not result["bn_recalibrated"]

  def direct(variables):  # the shared evaluator, called on the same variables
    figures = evaluate_models({"m": variables},
                              run.test_x,
                              run.test_y,
                              model=model,
                              key=jax.random.key(3),
                              threat=Threat("linf", config.eps, config.eval_step_size, 3))["m"]
    return {"clean": figures["clean_acc"], "robust": figures["pgd_acc"]}

  for p in result["points"]:
    mixed = gen_jax.mix(run.models["natural"], run.models["robust"], p["beta"])
    assert p == {"beta": p["beta"], **direct(mixed)}, p["beta"]
  assert result["global"] == direct(run.models["global"])
  # The endpoints are the experts themselves.
  points = {p["beta"]: p for p in result["points"]}
  assert points[0.0] == {"beta": 0.0, **result["experts"]["natural"]}
  assert points[1.0] == {"beta": 1.0, **result["experts"]["robust"]}
  # The front is over every plotted point: sweep, experts and global model.
  everything = {p["beta"]: (p["clean"], p["robust"]) for p in result["points"]}
  everything.update({r: (f["clean"], f["robust"]) for r, f in result["experts"].items()})
  everything["global"] = (result["global"]["clean"], result["global"]["robust"])
  dominated = lambda a: any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in everything.values())
  assert set(result["pareto"]) == {k for k, v in everything.items() if not dominated(v)}
  # Without recalibration the endpoints are the experts: both or neither are on the front.
  assert (0.0 in result["pareto"]) == ("natural" in result["pareto"])
  assert (1.0 in result["pareto"]) == ("robust" in result["pareto"])
  paths = sweep.write_sweep(result, workdir / "plot")
  assert [p.name for p in paths.values()] == ["sweep.json", "sweep.md", "tradeoff.png"]
  assert json.loads(paths["json"].read_text()) == result
  assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = paths["md"].read_text()
  assert "| model | clean | robust | Pareto |" in table
  for row in ("| beta = 0.50 |", "| natural expert |", "| global model |"):
    assert row in table


class _InputNorm(nn.Module):
  """A BatchNorm straight on the input: its batch statistics are the images' own moments."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = common.batch_norm(train, jnp.float32, "bn")(x)
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_bn_recalibration_averages_each_batch_statistics():
  model = _InputNorm()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(70, 4, 4, 2), dtype=np.uint8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)), train=False)
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  # Arbitrary stored statistics: the recalibration must not depend on them.
  variables["batch_stats"] = jax.tree_util.tree_map(lambda v: v + 7.0, variables["batch_stats"])
  out = sweep.recalibrate_batch_norm(model, variables, images, batch_size=32)
  x = images[:64].astype(np.float64) / 255.0  # two full batches; the remainder is dropped
  batches = x.reshape(2, 32, 4, 4, 2)
  mean = batches.mean(axis=(1, 2, 3)).mean(0)
  var = batches.var(axis=(1, 2, 3)).mean(0)
  np.testing.assert_allclose(out["batch_stats"]["bn"]["mean"], mean, atol=1e-5)
  np.testing.assert_allclose(out["batch_stats"]["bn"]["var"], var, atol=1e-5)
  assert out["params"] is variables["params"]
  with pytest.raises(ValueError, match="at least batch_size=128"):
    sweep.recalibrate_batch_norm(model, variables, images, batch_size=128)


def test_recalibration_sample_covers_every_class_of_a_class_sorted_split():
  # An image-folder training split is stored class by class: its first rows are one class.
  labels = np.repeat(np.arange(10), 100)
  images = np.arange(1000)[:, None] * np.ones((1, 3), np.int64)
  x, y = runs.training_subset(images, labels, 200, seed=3)
  assert len(y) == 200 and np.all(np.bincount(y, minlength=10) > 5)
  np.testing.assert_array_equal(x[:, 0], images[x[:, 0], 0])  # rows stay paired with labels
  assert np.all(labels[x[:, 0]] == y) and len(set(x[:, 0])) == 200
  again, _ = runs.training_subset(images, labels, 200, seed=3)
  other, _ = runs.training_subset(images, labels, 200, seed=4)
  np.testing.assert_array_equal(x, again)
  assert not np.array_equal(x, other)
  whole, _ = runs.training_subset(images, labels, None, seed=3)
  assert sorted(whole[:, 0]) == list(range(1000))


def test_matched_recalibration_weights_clean_and_adversarial_statistics():
  model = _InputNorm()
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(64, 4, 4, 2), dtype=np.uint8)
  labels = rng.integers(0, 3, size=64).astype(np.int32)
  variables = dict(model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)), train=False))
  eps = 0.1
  matched = sweep.recalibrator(model,
                               images,
                               mode="matched",
                               labels=labels,
                               key=jax.random.key(2),
                               eps=eps,
                               step_size=0.05,
                               steps=3,
                               batch_size=32)
  clean = sweep.recalibrator(model, images, mode="clean", batch_size=32)
  stats = {b: matched(variables, b)["batch_stats"]["bn"] for b in (0.0, 0.5, 1.0)}
  reference = clean(variables, 0.7)["batch_stats"]["bn"]
  np.testing.assert_array_equal(stats[0.0]["mean"], reference["mean"])  # beta 0: clean alone
  np.testing.assert_array_equal(stats[0.0]["var"], reference["var"])
  for name in ("mean", "var"):  # linear in beta
    np.testing.assert_allclose(stats[0.5][name], (stats[0.0][name] + stats[1.0][name]) / 2,
                               atol=1e-6)
  # BatchNorm on the input: the adversarial mean moved, but by no more than eps per pixel.
  shift = np.abs(np.asarray(stats[1.0]["mean"]) - np.asarray(stats[0.0]["mean"]))
  assert shift.max() > 1e-4 and shift.max() <= eps + 1e-6
  with pytest.raises(ValueError, match="needs labels, key, eps"):
    sweep.recalibrator(model, images, mode="matched")
  with pytest.raises(ValueError, match="unknown recalibration mode"):
    sweep.recalibrator(model, images, mode="adversarial")


def test_selection_rule_picks_the_right_beta():
  points = [
      {
          "beta": 0.0,
          "clean": 0.95,
          "robust": 0.00
      },
      {
          "beta": 0.2,
          "clean": 0.93,
          "robust": 0.20
      },
      {
          "beta": 0.4,
          "clean": 0.90,
          "robust": 0.35
      },
      {
          "beta": 0.6,
          "clean": 0.87,
          "robust": 0.41
      },
      {
          "beta": 0.8,
          "clean": 0.84,
          "robust": 0.45
      },
      {
          "beta": 1.0,
          "clean": 0.80,
          "robust": 0.44
      },
  ]
  assert sweep.select_point(points, sweep.parse_rule("clean>=0.88"))["beta"] == 0.4
  assert sweep.select_point(points, sweep.parse_rule("clean >= 87%"))["beta"] == 0.6
  assert sweep.select_point(points, sweep.parse_rule("clean>0.87"))["beta"] == 0.4
  assert sweep.select_point(points, sweep.parse_rule("robust>=0.40"))["beta"] == 0.6
  assert sweep.select_point(points, sweep.parse_rule("robust>=0"))["beta"] == 0.0
  with pytest.raises(ValueError, match="no mixture reaches clean >= 0.9900.*0.9500 at beta 0.00"):
    sweep.select_point(points, sweep.parse_rule("clean>=0.99"))
  for bad in ("accuracy>=0.8", "clean<=0.8", "clean>=1.5", "", "clean>=x"):
    with pytest.raises(ValueError):
      sweep.parse_rule(bad)


def test_selection_rule_honours_its_operator():
  points = [{
      "beta": 0.2,
      "clean": 0.97,
      "robust": 0.5
  }, {
      "beta": 0.4,
      "clean": 0.98,
      "robust": 0.3
  }]
  strict, loose = sweep.parse_rule("clean>0.97"), sweep.parse_rule("clean>=0.97")
  assert sweep.select_point(points, strict)["beta"] == 0.4  # 0.97 does not exceed 0.97
  assert sweep.select_point(points, loose)["beta"] == 0.2
  assert sweep.select_point(points, sweep.parse_rule("clean > 97%"))["beta"] == 0.4
  assert sweep.select_point(points, ("clean", 0.97))["beta"] == 0.2  # a pair reads as >=
  # The rule is reported and recorded as written.
  assert (str(strict), str(loose)) == ("clean>0.97", "clean>=0.97")
  with pytest.raises(ValueError, match=r"no mixture reaches clean > 0\.9800: the best is 0\.9800"):
    sweep.select_point(points, sweep.parse_rule("clean>0.98"))
  with pytest.raises(ValueError, match=r"can never be met: no accuracy exceeds 1"):
    sweep.parse_rule("robust>1")
  for bad in ("nan", "inf"):
    with pytest.raises(ValueError, match=r"betas must be numbers in \[0, 1\]"):
      sweep.check_betas([0.0, float(bad)])


def test_pareto_front():
  assert sweep.pareto_front([(0.9, 0.1), (0.8, 0.3), (0.7, 0.2), (0.9, 0.05)]) == [1, 0]
  assert sweep.pareto_front([(0.5, 0.5), (0.5, 0.5), (0.4, 0.5)]) == [0, 1]
  assert sweep.pareto_front([(0.1, 0.9), (0.9, 0.1), (0.5, 0.5)]) == [0, 2, 1]
  with pytest.raises(ValueError, match=r"betas must be numbers in \[0, 1\]"):
    sweep.check_betas([0.0, 1.2])


# Restoring into the wrong architecture leaves orbax's reader coroutines to report their errors
# after the ValueError was raised; those late reports are the expected failure, not a leak.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_model_checkpoint_round_trip_and_no_overwrite(tmp_path):
  model = gen_jax.models.create_model("smallcnn", 10)
  variables = gen_jax.models.init_variables(model, jax.random.key(1), (16, 16, 1))
  path = checkpoint.save_model(tmp_path / "m", variables, {"config": {"a": 1}, "beta": 0.3})
  abstract = jax.eval_shape(lambda: variables)
  restored = checkpoint.load_model(path, abstract)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, variables)
  assert checkpoint.read_model_record(path)["beta"] == 0.3
  with pytest.raises(FileExistsError, match="never overwritten"):
    checkpoint.save_model(path, variables, {})
  with pytest.raises(TypeError):
    checkpoint.save_model(tmp_path / "bad", variables, {"x": object()})
  assert not (tmp_path / "bad").exists()
  with pytest.raises(FileNotFoundError, match="not a model checkpoint"):
    checkpoint.read_model_record(tmp_path)
  other = jax.eval_shape(lambda: gen_jax.models.init_variables(
      gen_jax.models.create_model("smallcnn", 3), jax.random.key(1), (16, 16, 1)))
  with pytest.raises(ValueError, match="cannot restore the model"):
    checkpoint.load_model(path, other)
  gc.collect()  # collect orbax's failed reader coroutines here, under this test's filter


def test_load_model_reads_a_runs_best_directory(tiny_run, tmp_path):
  workdir = tiny_run[0]
  best_run = runs.load_model(workdir / "best")
  ((name, variables),) = best_run.models.items()
  config, model, splits = best_run.config, best_run.model, runs.load_splits(best_run.config)
  best = json.loads((workdir / "summary.json").read_text())["best"]
  assert name == f"global (best, epoch {best['epoch']})" and config == tiny_run[1].config
  assert best_run.eval_dir == workdir / "eval" / "best"
  direct = evaluate_models({"b": variables},
                           splits.val_x,
                           splits.val_y,
                           model=model,
                           key=jax.random.key(config.seed),
                           threat=None)["b"]
  assert direct["clean_acc"] == pytest.approx(best["clean_acc"])  # the model selected on validation
  with pytest.raises(FileNotFoundError, match="neither a model checkpoint"):
    runs.load_model(tmp_path)
  with pytest.raises(FileNotFoundError, match="no such directory"):
    runs.load_model(tmp_path / "missing")


def test_outputs_keep_earlier_files(tmp_path):
  first = outputs.write_json(tmp_path / "r.json", {"v": 1})
  outputs.write_json(tmp_path / "r.json", {"v": 2})
  outputs.write_json(tmp_path / "r.json", {"v": 3})
  assert json.loads(first.read_text()) == {"v": 3}
  assert json.loads((tmp_path / "r.1.json").read_text()) == {"v": 1}
  assert json.loads((tmp_path / "r.2.json").read_text()) == {"v": 2}
  with pytest.raises(ValueError):
    outputs.write_json(tmp_path / "r.json", {"v": float("nan")})
  assert json.loads(first.read_text()) == {"v": 3}  # a failed write touches nothing
  (tmp_path / "d").mkdir()
  assert outputs.unique_directory(tmp_path / "d") == tmp_path / "d-2"
  assert outputs.unique_directory(tmp_path / "e") == tmp_path / "e"


def _run(*args, cwd):
  return subprocess.run([sys.executable, *args],
                        capture_output=True,
                        text=True,
                        cwd=cwd,
                        timeout=600)


@pytest.mark.programs_compile_fast
@pytest.mark.slow
def test_sweep_command_selects_and_evaluate_accepts_the_checkpoint(tiny_run, tmp_path):
  workdir = tiny_run[0]
  out = _run(str(ROOT / "experiments" / "sweep_mix.py"),
             "--workdir",
             str(workdir),
             "--betas",
             "0,0.5,1",
             "--steps",
             "2",
             "--bn-recalibrate",
             "--recalibration-n",
             "64",
             "--batch-size",
             "32",
             "--select",
             "robust>=0",
             cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((workdir / "eval" / "sweep.json").read_text())
  assert result["bn_recalibrated"] == "clean"
  assert [p["beta"] for p in result["points"]] == [0.0, 0.5, 1.0]
  assert (workdir / "eval" / "tradeoff.png").stat().st_size > 10_000
  selected = pathlib.Path(result["selected"]["checkpoint"])
  assert selected.parent == workdir / "eval" and selected.name.endswith("-bn-clean")
  record = checkpoint.read_model_record(selected)
  assert record["beta"] == result["selected"]["beta"] and record["config"]["model"] == "smallcnn"
  out = _run(str(ROOT / "experiments" / "evaluate.py"),
             "--checkpoint",
             str(selected),
             "--attacks",
             "clean,pgd20",
             "--n",
             "16",
             "--no-boundary",
             "--no-corruptions",
             "--sanity-queries",
             "50",
             cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads((selected / "eval" / "report.json").read_text())
  assert list(report["models"]) == [selected.name]
  assert report["models"][selected.name]["pgd20"]["accuracy"] <= report["models"][
      selected.name]["clean"]["accuracy"]
  # A target no mixture reaches: exit 2 with the best figure, but the sweep's files are written.
  (workdir / "eval" / "sweep.json").unlink()
  out = _run(str(ROOT / "experiments" / "sweep_mix.py"),
             "--workdir",
             str(workdir),
             "--betas",
             "0,1",
             "--steps",
             "1",
             "--select",
             "clean>=1",
             cwd=tmp_path)
  assert out.returncode == 2 and "no mixture reaches clean >= 1.0000" in out.stderr
  assert json.loads((workdir / "eval" / "sweep.json").read_text())["betas"] == [0.0, 1.0]
  # Bad selections fail before any work.
  out = _run(str(ROOT / "experiments" / "sweep_mix.py"),
             "--workdir",
             str(workdir),
             "--select",
             "clean<=0.5",
             cwd=tmp_path)
  assert out.returncode == 2 and "cannot read the selection rule" in out.stderr
  out = _run(str(ROOT / "experiments" / "sweep_mix.py"),
             "--workdir",
             str(workdir),
             "--betas",
             "0,2",
             cwd=tmp_path)
  assert out.returncode == 2 and "--betas" in out.stderr


def test_the_sweep_names_its_attack_by_norm_and_radius():
  """An L2 run's line is labelled with its L2 radius, an L-inf run's in 1/255 units; a sweep
  written before the norm was recorded reads as L-inf."""
  base = {
      "kind": "line",
      "roles": ("natural", "robust"),
      "metrics": ["clean", "robust"],
      "steps": 20,
      "n": 10,
      "bn_recalibrated": None,
      "pareto": [],
      "points": [],
      "experts": {},
      "global": None,
      "betas": []
  }
  l2 = {**base, "norm": "l2", "eps": 0.5}
  linf = {**base, "norm": "linf", "eps": 8 / 255}
  assert sweep.to_markdown(l2).startswith("Mixing sweep: PGD-20 at L2 eps 0.5, 10 test images")
  assert sweep.to_markdown(linf).startswith("Mixing sweep: PGD-20 at L-inf eps 8/255,")
  assert "/255" not in sweep._axis_label(l2, "robust")  # pylint: disable=protected-access
  old = {key: value for key, value in linf.items() if key != "norm"}
  assert sweep._axis_label(old, "robust") == "PGD-20 accuracy (%), L-inf eps 8/255"  # pylint: disable=protected-access
