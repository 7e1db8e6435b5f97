"""Tests of gen_jax.training: schedules, expert steps, the Generalist update, the loop."""
import dataclasses
import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gen_jax import config as cfg
from gen_jax import mixing, models, training
from gen_jax.training import steps as steps_lib
from gen_jax.training.schedules import build_schedules


# ------------------------------------------------------------------ schedules vs the reference
def _reference_schedule(epochs, steps_per_epoch, lr=0.01):
  """Hand-written transcription of the reference main.py loops (per step, 0-indexed)."""
  knots = [0, epochs // 3, epochs * 2 // 3, epochs]
  lr_rows, beta_rows, decay_rows, redistribute_rows = [], [], [], []
  ema_step = 0
  for epoch in range(1, epochs + 1):
    for _ in range(steps_per_epoch):
      lr_rows.append(np.interp([epoch], knots, [lr, lr, lr / 10, lr / 100])[0])
      beta_rows.append(np.interp([epoch], knots, [1.0, 1.0, 1.0, 0.4])[0])
      decay_rows.append(min(0.999, (ema_step + 1) / (ema_step + 10)))
      redistribute_rows.append(epoch >= 75 and epoch % 5 == 0)
      ema_step += 1
  return (np.array(lr_rows), np.array(beta_rows), np.array(decay_rows), np.array(redistribute_rows))


def test_schedules_equal_reference_code_at_every_step_for_120_epochs():
  config = cfg.get_config("cifar10")
  steps_per_epoch = 7
  lr, beta, decay, redistribute = _reference_schedule(120, steps_per_epoch)
  tables = build_schedules(config, steps_per_epoch)
  # Both experts follow the reference's one schedule (cifar10: lr 0.01 for each).
  np.testing.assert_allclose(tables["experts"]["robust"]["lr"], lr, rtol=1e-6)
  np.testing.assert_allclose(tables["experts"]["natural"]["lr"], lr, rtol=1e-6)
  np.testing.assert_allclose(tables["beta"], beta, rtol=1e-6)
  np.testing.assert_array_equal(tables["redistribute"], redistribute)
  ours = np.asarray(jax.vmap(mixing.ema_decay)(jnp.arange(len(decay))))
  np.testing.assert_allclose(ours, decay, rtol=1e-6)
  epochs_hit = sorted(
      set(np.arange(len(redistribute))[tables["redistribute"]] // steps_per_epoch + 1))
  assert epochs_hit == list(range(75, 121, 5))


@pytest.mark.parametrize("epochs,steps_per_epoch", [(12, 10), (30, 20), (7, 13)])
def test_short_runs_keep_phase_and_one_in_five_duty_cycle(epochs, steps_per_epoch):
  config = dataclasses.replace(cfg.get_config("cifar10"), epochs=epochs)
  mask = build_schedules(config, steps_per_epoch)["redistribute"]
  total = epochs * steps_per_epoch
  on = np.flatnonzero(mask)
  # Same phase: nothing before 74/120 of the run; the first redistribution right at it.
  assert on[0] == int(np.ceil(74 / 120 * total - 1e-9))
  # Same share of the run as the reference (10 epochs of 120), to within one step per period.
  assert abs(mask.sum() - total * 10 / 120) <= 10
  # Not degenerate: the experts are free at least 4/5 of the time after the start.
  assert mask[on[0]:].mean() < 0.3
  # Periodic with period 5/120 of the run: each period opens with a burst of one fifth of it
  # (at least one step), and no period is skipped.
  period = 5 / 120 * total
  burst = max(1, round(0.2 * period))
  period_index = np.floor((on - 74 / 120 * total) / period + 1e-9).astype(int)
  period_start = np.ceil(74 / 120 * total + period_index * period - 1e-9)
  assert np.all(on - period_start < burst)
  assert sorted(set(period_index)) == list(range(period_index.max() + 1))


def test_no_redistribution_for_baselines():
  config = dataclasses.replace(cfg.get_config("cifar10"), method="pgd_at")
  assert not build_schedules(config, 5)["redistribute"].any()


# ------------------------------------------------------------------------- the expert steps
@pytest.fixture(scope="module")
def tiny_setup():
  config = dataclasses.replace(cfg.get_config("tiny"), batch_size=16)
  model = models.create_model("smallcnn", 10)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  state = steps_lib.create_train_state(config, model, jax.random.key(0), image_shape=(16, 16, 1))
  return config, model, images, labels, state


def _loss(model, variables, x, y):
  logits = model.apply(variables, x, train=False)
  return float(jnp.mean(training.losses.cross_entropy(logits, y)))


def test_natural_step_lowers_the_clean_loss(tiny_setup):
  config, model, images, labels, state = tiny_setup
  x = jnp.asarray(images, jnp.float32) / 255
  expert = state.experts["natural"]
  before = _loss(model, expert.variables, x, labels)
  step = jax.jit(lambda s: steps_lib.natural_train_step(
      s, x, labels, jnp.float32(0.05), model=model, config=config))
  for _ in range(5):
    expert, metrics = step(expert)
  assert _loss(model, expert.variables, x, labels) < before
  assert int(metrics["count"]) == 16


def test_training_adversary_stays_in_ball_and_box_and_raises_loss(tiny_setup):
  config, model, images, labels, state = tiny_setup
  x = jnp.asarray(images, jnp.float32) / 255
  hparams = {"eps": jnp.float32(0.1), "step_size": jnp.float32(0.03)}
  for robust_loss in ("pgd", "trades"):
    c = dataclasses.replace(config, robust_loss=robust_loss, pgd_steps=5)
    x_adv = steps_lib.adversarial_examples(state.experts["robust"].variables,
                                           x,
                                           labels,
                                           jax.random.key(1),
                                           hparams,
                                           model=model,
                                           config=c)
    assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.1 + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(jnp.max(jnp.abs(x_adv - x))) > 0.05  # it moved
    if robust_loss == "pgd":
      assert _loss(model, state.experts["robust"].variables, x_adv,
                   labels) > _loss(model, state.experts["robust"].variables, x, labels)


def test_robust_step_lowers_the_adversarial_loss(tiny_setup):
  config, model, images, labels, state = tiny_setup
  x = jnp.asarray(images, jnp.float32) / 255
  hparams = {
      "lr_rob": jnp.float32(0.05),
      "eps": jnp.float32(0.1),
      "step_size": jnp.float32(0.03),
      "trades_beta": jnp.float32(6.0)
  }
  key = jax.random.key(3)

  def adv_loss(expert):
    x_adv = steps_lib.adversarial_examples(expert.variables,
                                           x,
                                           labels,
                                           key,
                                           hparams,
                                           model=model,
                                           config=config)
    return _loss(model, expert.variables, x_adv, labels)

  expert = state.experts["robust"]
  before = adv_loss(expert)
  step = jax.jit(
      lambda s: steps_lib.robust_train_step(s, x, labels, key, hparams, model=model, config=config))
  for _ in range(5):
    expert, _ = step(expert)
  assert adv_loss(expert) < before


def test_generalist_update_matches_hand_computation(tiny_setup):
  config, _, _, _, state = tiny_setup
  leaf = lambda v: {"params": {"w": jnp.full((2,), v)}, "batch_stats": {"m": jnp.full((2,), v)}}
  experts = state.experts
  s = state.replace(step=jnp.int32(3),
                    experts={
                        "natural": experts["natural"].replace(variables=leaf(2.0)),
                        "robust": experts["robust"].replace(variables=leaf(4.0))
                    },
                    teachers={
                        "natural": leaf(1.0),
                        "robust": leaf(3.0)
                    },
                    global_model=leaf(0.0))
  d = 4 / 13  # min(0.999, (3 + 1) / (3 + 10))
  t_nat, t_rob = d * 1 + (1 - d) * 2, d * 3 + (1 - d) * 4
  beta = 0.7
  glob = (1 - d) * (beta * t_rob + (1 - beta) * t_nat)
  for redistribute in (False, True):
    out = steps_lib.generalist_update(s,
                                      weights=jnp.asarray([1 - beta, beta], jnp.float32),
                                      redistribute=jnp.bool_(redistribute),
                                      config=config)
    np.testing.assert_allclose(out.teachers["natural"]["params"]["w"], t_nat, rtol=1e-6)
    np.testing.assert_allclose(out.teachers["robust"]["batch_stats"]["m"], t_rob, rtol=1e-6)
    np.testing.assert_allclose(out.global_model["params"]["w"], glob, rtol=1e-6)
    np.testing.assert_allclose(out.experts["natural"].variables["params"]["w"],
                               glob if redistribute else 2.0,
                               rtol=1e-6)
    np.testing.assert_allclose(out.experts["robust"].variables["batch_stats"]["m"],
                               glob if redistribute else 4.0,
                               rtol=1e-6)
    assert int(out.step) == 4


def test_train_step_compiles_once_across_steps_and_schedule_values(tiny_setup):
  config, model, images, labels, _ = tiny_setup
  state = steps_lib.create_train_state(config, model, jax.random.key(0), image_shape=(16, 16, 1))
  traced = chex.assert_max_traces(steps_lib.train_step, n=1)
  jitted = jax.jit(lambda s, t, k: traced(s, images, labels, k, t, model=model, config=config),
                   donate_argnums=0)
  for lr_scale in (1.0, 0.5):
    tables = steps_lib.schedule_arrays(dataclasses.replace(config, lr_nat=0.05 * lr_scale), 4)
    for i in range(2):
      state, metrics = jitted(state, tables, jax.random.key(i))
  assert int(state.step) == 4
  assert set(metrics) == {"natural", "robust"}


# ------------------------------------------------------------------------------ the loop
def test_tiny_run_writes_files_and_resume_reproduces_the_uninterrupted_run(tmp_path):
  config = cfg.get_config("tiny")
  full = training.train_and_evaluate(config, tmp_path / "full", progress=False)
  for name in ("config.json", "metrics.jsonl", "summary.json"):
    assert (tmp_path / "full" / name).exists()
  assert list(full["models"]) == ["natural", "robust", "global"]
  for role in ("natural", "robust", "global"):
    for key in ("clean_acc", "pgd_acc"):
      assert 0.0 <= full["models"][role][key] <= 1.0
  assert full["pgd"]["steps"] == config.eval_pgd_steps
  lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["epoch"] for l in lines] == [1, 2]
  assert {"natural", "robust", "global"} <= set(json.loads(lines[0])["test"])

  stopped = training.train_and_evaluate(config, tmp_path / "cut", progress=False, max_epochs=1)
  assert stopped == {"stopped_at_epoch": 1}
  assert not (tmp_path / "cut" / "summary.json").exists()
  # A corrupt checkpoint stops the resume with a message naming it; nothing is overwritten.
  shutil.copytree(tmp_path / "cut", tmp_path / "corrupt")
  for f in (tmp_path / "corrupt" / "checkpoints").rglob("*"):
    if f.is_file() and "state" in f.parts and f.stat().st_size > 100:
      f.write_bytes(b"garbage" * 10)
  with pytest.raises(ValueError, match=r"cannot restore checkpoint step \d+ from .*corrupt"):
    training.train_and_evaluate(config, tmp_path / "corrupt", progress=False)
  resumed = training.train_and_evaluate(config, tmp_path / "cut", progress=False)
  assert resumed["models"] == full["models"]
  cut_lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
  strip = lambda l: {k: v for k, v in json.loads(l).items() if k != "train_seconds"}
  assert [strip(l) for l in cut_lines] == [strip(l) for l in lines]


def test_workdir_of_another_config_is_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg.get_config("tiny"))))
  other = dataclasses.replace(cfg.get_config("tiny"), eps=0.1)
  with pytest.raises(ValueError, match="another config.*eps"):
    training.train_and_evaluate(other, tmp_path, progress=False)


def test_the_loop_attacks_each_distinct_model_once_per_evaluation(tmp_path, monkeypatch):
  from gen_jax.training import loop  # pylint: disable=import-outside-toplevel
  calls = []  # (roles attacked, images) of every evaluation the loop runs

  def counting(models_, images, labels, **kwargs):
    calls.append((tuple(models_), len(labels)))
    return evaluate(models_, images, labels, **kwargs)

  evaluate = loop.evaluate_models
  monkeypatch.setattr(loop, "evaluate_models", counting)
  config = dataclasses.replace(cfg.get_config("tiny"), epochs=1)
  summary = training.train_and_evaluate(config, tmp_path / "whole", progress=False)
  n, val = summary["test_images"], config.validation_size
  # The last epoch's evaluation of the whole test split is the summary's: not attacked twice.
  assert sorted(calls) == [(("global",), val), (("natural", "robust", "global"), n)]
  (record,) = [
      json.loads(l) for l in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
  ]
  assert summary["models"] == record["test"]
  # A rerun after the last checkpoint but before the summary evaluates nothing again.
  (tmp_path / "whole" / "summary.json").unlink()
  calls.clear()
  assert training.train_and_evaluate(config, tmp_path / "whole",
                                     progress=False)["models"] == summary["models"]
  assert not calls
  # Epochs evaluated on part of the test split: the summary evaluates the whole of it.
  part = dataclasses.replace(config, eval_test_size=n // 2)
  calls.clear()
  cut = training.train_and_evaluate(part, tmp_path / "part", progress=False)
  assert sorted(c[1] for c in calls) == sorted([n // 2, val, n])
  assert cut["models"] == summary["models"]  # the same state, key and engine
  # A single-expert method's global model is its teacher: attacked once, reported twice.
  calls.clear()
  baseline = training.train_and_evaluate(dataclasses.replace(config, method="pgd_at"),
                                         tmp_path / "pgd_at",
                                         progress=False)
  assert sorted(calls) == [(("global",), val), (("robust",), n)]
  assert list(baseline["models"]) == ["robust", "global"]
  assert baseline["models"]["global"] == baseline["models"]["robust"]
