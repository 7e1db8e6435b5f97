"""Tests of the correctness engine: per-example keys, answers independent of the batch size and
the devices, and one PGD-20 figure for one model whichever program asks (the training loop's
summary, the report, the sweep, the comparison)."""
import contextlib
import dataclasses
import io
import json
import pathlib
import runpy
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gen_jax import attacks, parallel, runs, training
from gen_jax import config as cfg
from gen_jax.attacks import core
from gen_jax.attacks.threat import Threat
from gen_jax.evaluation import ModelSet, engine, evaluate_models, report
from gen_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = jax.random.key(5)
THREATS = (
    Threat("linf", 0.1, 0.03, 4),
    Threat("l2", 0.6, 0.2, 3, restarts=2),
    Threat("linf", 0.1, 0.03, 3, attack="cw"),
    Threat("linf", 0.1, 0.03, 3, attack="mim"),
    Threat("linf", 0.1, 0.1, 1, attack="fgsm"),
)


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def problem():
  """Two random MLPs and 70 images labelled by the first one (its clean accuracy is 1)."""
  model = _MLP()
  x = jax.random.uniform(jax.random.key(0), (70, 8, 8, 1))
  variables = {f"m{i}": model.init(jax.random.key(i + 1), x[:1]) for i in range(2)}
  y = np.asarray(jnp.argmax(model.apply(variables["m0"], x), -1)).astype(np.int32)
  return ModelSet(model, variables), np.asarray(x), y


def test_answers_do_not_depend_on_batch_size_padding_or_devices(problem):
  models, x, y = problem
  by_32 = engine.correctness(models, x, y, threats=THREATS, key=KEY, batch_size=32)
  assert set(by_32) == {"m0", "m1"} and set(by_32["m0"]) == {engine.CLEAN, *THREATS}
  assert by_32["m0"][engine.CLEAN].all()
  # The attacks bite (otherwise equal answers would prove nothing about the keys).
  assert by_32["m0"][THREATS[0]].mean() < 0.9
  mesh = parallel.make_mesh()
  on_mesh = ModelSet(models.module, parallel.replicate(dict(models.variables), mesh))
  for other in (
      engine.correctness(models, x, y, threats=THREATS, key=KEY, batch_size=200),
      engine.correctness(on_mesh,
                         x,
                         y,
                         threats=THREATS[:2],
                         key=KEY,
                         batch_size=7,
                         sharding=parallel.data_sharding(mesh)),
  ):
    for name, answers in other.items():
      for threat, correct in answers.items():
        assert correct.dtype == bool and correct.shape == (70,)
        np.testing.assert_array_equal(correct, by_32[name][threat], err_msg=f"{name} {threat}")
  # The random starts are per example, bit for bit; the images agree up to the rounding of the
  # arithmetic, which XLA vectorises differently for another batch shape (a last-bit difference).
  fn = models.logits_fns()["m0"]
  idx = np.arange(70)
  start = lambda rows: core.random_start(engine.example_keys(KEY, 3, idx[rows]), x[rows], 0.1,
                                         "linf")
  np.testing.assert_array_equal(start(slice(0, 32)), start(slice(None))[:32])
  for threat in THREATS[:2]:
    np.testing.assert_allclose(engine.adversarial(fn, x, y, threat=threat, key=KEY, batch_size=32),
                               engine.adversarial(fn, x, y, threat=threat, key=KEY, batch_size=200),
                               atol=1e-6)


def test_example_i_is_attacked_from_its_documented_key(problem):
  models, x, y = problem
  fn = models.logits_fns()["m0"]
  threat = THREATS[0]
  x_adv = engine.adversarial(fn, x, y, threat=threat, key=KEY, batch_size=32)
  for i in (0, 45):
    own = jax.random.fold_in(jax.random.fold_in(KEY, threat.id), i)
    alone = attacks.pgd(fn,
                        x[i:i + 1],
                        y[i:i + 1],
                        key=own[None],
                        eps=threat.eps,
                        step_size=threat.step_size,
                        steps=threat.steps)
    np.testing.assert_allclose(np.asarray(alone)[0], x_adv[i], atol=1e-6)
  # Another key, or another threat id, gives other starts.
  other = engine.adversarial(fn, x, y, threat=threat, key=jax.random.key(6), batch_size=32)
  assert not np.array_equal(other, x_adv)


def test_threat_id_is_stable_and_the_run_key_is_the_loops():
  # A constant, not Python's per-process salted hash: every program folds in the same number.
  assert Threat("linf", 8 / 255, 2 / 255, 20).id == 1813921599
  ids = {t.id for t in THREATS} | {Threat("linf", 0.1 + 1e-9, 0.03, 4).id}
  assert len(ids) == len(THREATS) + 1 and all(0 <= i < 2**31 for i in ids)
  for seed in (0, 7):
    np.testing.assert_array_equal(jax.random.key_data(engine.attack_key(seed)),
                                  jax.random.key_data(loop.stream_keys(seed)["eval"]))
  with pytest.raises(ValueError, match="attack must be one of"):
    Threat("linf", 0.1, 0.03, 4, attack="apgd")


def test_an_attack_leaving_the_ball_raises(problem, monkeypatch):
  models, x, y = problem
  monkeypatch.setattr(engine, "_attack",
                      lambda kind, fn, x, y, keys, eps, step: jnp.clip(x + 2 * eps, 0.0, 1.0))
  engine._batch_correct.clear_cache()  # pylint: disable=protected-access
  try:
    with pytest.raises(ValueError, match="leave the eps-ball"):
      engine.correctness(models, x, y, threats=THREATS[:1], key=KEY, batch_size=32)
  finally:
    engine._batch_correct.clear_cache()  # pylint: disable=protected-access


def test_evaluate_models_is_the_engine(problem):
  models, x, y = problem
  threat = THREATS[0]
  figures = evaluate_models(dict(models.variables),
                            x,
                            y,
                            model=models.module,
                            key=KEY,
                            threat=threat,
                            batch_size=9)
  correct = engine.correctness(models, x, y, threats=[threat], key=KEY, batch_size=64)
  for name, f in figures.items():
    assert f == {
        "clean_acc": correct[name]["clean"].mean(),
        "pgd_acc": correct[name][threat].mean()
    }


def _run_compare(argv):
  old_argv = sys.argv
  sys.argv = ["compare.py", *argv]
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      runpy.run_path(str(ROOT / "experiments" / "compare.py"), run_name="__main__")
  finally:
    sys.argv = old_argv


# A tiny Generalist run that learns a little in 50 steps (the `tiny` preset alone stays at chance,
# where every key gives the same answers and equal figures would prove nothing), evaluated with
# PGD-20 so that its summary holds the report's "pgd20" figure.
_RUN_FLAGS = ("--preset tiny --epochs 2 --batch-size 16 --max-train-per-class 40 "
              "--max-test-per-class 20 --lr-nat 0.2 --lr-rob 0.2 --eps 0.1 --step-size 0.025 "
              "--eval-step-size 0.025 --eval-every 2 --eval-pgd-steps 20").split()


@pytest.mark.slow
def test_one_pgd20_figure_from_summary_report_sweep_and_compare(tmp_path):
  # compare.py trains the run, then sweeps it at beta 1, which is the robust teacher exactly.
  _run_compare([
      *_RUN_FLAGS, "--workdir",
      str(tmp_path), "--only", "generalist-s0", "--sweep", "--sweep-betas", "1", "--no-progress"
  ])
  run_dir = tmp_path / "generalist-s0"
  summary = json.loads((run_dir / "summary.json").read_text())["models"]
  compared = json.loads((tmp_path / "compare.json").read_text())
  run = runs.restore_models(run_dir)
  threat = Threat.of(run.config)
  assert threat.steps == 20 and len(run.test_y) == 200
  table = report.evaluate_run(run, attacks=("clean", "pgd20"), analyses=(), batch_size=32)
  for role in ("natural", "robust", "global"):
    assert 0 < summary[role]["pgd_acc"] < summary[role]["clean_acc"], summary
    assert table["models"][role]["pgd20"]["accuracy"] == summary[role]["pgd_acc"], role
    assert table["models"][role]["clean"]["accuracy"] == summary[role]["clean_acc"], role
  (row,) = compared["runs"]
  assert row["robust"] == summary["global"]["pgd_acc"]
  assert row["teachers"]["robust"]["pgd_acc"] == summary["robust"]["pgd_acc"]
  swept = compared["sweeps"]["generalist-s0"]
  (beta_1,) = swept["points"]
  assert beta_1["beta"] == 1.0 and beta_1["robust"] == summary["robust"]["pgd_acc"]
  assert swept["global"]["robust"] == summary["global"]["pgd_acc"]
  # The engine itself: batch sizes 32 and 200 give the same answers, whose means are the figures
  # (one model: the report above already met every model's summary figure at batch size 32).
  robust = ModelSet(run.model, run.models).subset(["robust"])
  key = engine.attack_key(run.config.seed)
  by_32, by_200 = (engine.correctness(robust,
                                      *run.test_split(),
                                      threats=[threat],
                                      key=key,
                                      batch_size=b) for b in (32, 200))
  for role, answers in by_32.items():
    np.testing.assert_array_equal(answers[threat], by_200[role][threat])
    assert answers[threat].mean() == summary[role]["pgd_acc"]
  # The answers depend on the key here, so a program attacking with other keys would fail above.
  other = engine.correctness(robust, *run.test_split(), threats=[threat],
                             key=engine.attack_key(1))["robust"]
  assert (other[threat] != by_32["robust"][threat]).any()


@pytest.mark.slow
def test_an_l2_run_is_reported_at_its_l2_radius_and_the_standard_linf_threat(tmp_path):
  # An L2 PGD-AT run that learns a little; its summary's PGD figure is L2 PGD-20 at radius 1.
  config = dataclasses.replace(cfg.get_config("tiny"),
                               method="pgd_at",
                               norm="l2",
                               eps=1.0,
                               step_size=0.25,
                               eval_step_size=0.25,
                               eval_pgd_steps=20,
                               epochs=2,
                               batch_size=16,
                               max_train_per_class=40,
                               max_test_per_class=10,
                               lr_nat=0.2,
                               lr_rob=0.2)
  training.train_and_evaluate(config, tmp_path / "l2", progress=False)
  summary = runs.read_summary(tmp_path / "l2")["models"]["global"]
  run = runs.restore_models(tmp_path / "l2")
  table = report.evaluate_run(run, attacks=("clean", "pgd20"), analyses=(), batch_size=32)
  assert table["eps"] == pytest.approx(8 / 255) and table["l2_eps"] == 1.0
  row = table["models"]["global"]
  assert 0 < summary["pgd_acc"] < summary["clean_acc"], summary
  assert row["pgd20-l2"]["accuracy"] == summary["pgd_acc"]
  assert row["clean"]["accuracy"] == summary["clean_acc"]
  # L-inf PGD-20 at 8/255, not at the L2 radius 1.0 (which would leave almost nothing standing).
  assert row["pgd20"]["accuracy"] > 0
