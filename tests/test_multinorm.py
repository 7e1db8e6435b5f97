"""Tests of the N-expert Generalist (Generalist++): natural, L-inf and L2 experts, one global model.

The two-expert Generalist must be exactly the N = 2 case: `test_two_experts_equal_todays_trainer`
runs the trainer against a frozen copy of the two-expert code path it replaced (copied below from
gen_jax/training/steps.py as committed before the N-expert form) and asks for the same bits.
"""
import dataclasses
import functools
import json
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gen_jax import cli, experts, mixing, models, study, training
from gen_jax import config as cfg
from gen_jax.attacks.threat import Threat
from gen_jax.data.augment import augment_batch
from gen_jax.evaluation import ModelSet, report, sweep
from gen_jax.training import losses, schedules
from gen_jax.training import steps as steps_lib


# ------------------------------------------------------ frozen copy of the two-expert trainer
def _old_sgd(learning_rate, momentum, weight_decay):
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum))


def _old_optimizer(config, role):
  weight_decay = config.weight_decay_nat if role == "natural" else config.weight_decay_rob
  lr = config.lr_nat if role == "natural" else config.lr_rob
  return optax.inject_hyperparams(_old_sgd)(learning_rate=lr,
                                            momentum=config.momentum,
                                            weight_decay=weight_decay)


def _old_apply_update(state, grads, lr, config, role, new_stats):
  tx = _old_optimizer(config, role)
  opt_state = state.opt_state._replace(hyperparams={
      **state.opt_state.hyperparams, "learning_rate": lr
  })
  updates, opt_state = tx.update(grads, opt_state, state.variables["params"])
  params = optax.apply_updates(state.variables["params"], updates)
  return steps_lib.ExpertState(variables={
      "params": params,
      "batch_stats": new_stats
  },
                               opt_state=opt_state)


def _old_forward(model, params, batch_stats, inputs):
  logits, updated = model.apply({
      "params": params,
      "batch_stats": batch_stats
  },
                                inputs,
                                train=True,
                                mutable=["batch_stats"])
  return logits, updated.get("batch_stats", batch_stats)


def _old_natural_step(state, x, y, lr, *, model, config):
  stats = state.variables["batch_stats"]

  def loss_fn(params):
    logits, new_stats = _old_forward(model, params, stats, x)
    return losses.cross_entropy(logits, y).mean(), new_stats

  (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.variables["params"])
  return _old_apply_update(state, grads, lr, config, "natural", new_stats)


def _old_robust_step(state, x, y, key, hparams, *, model, config):
  from gen_jax import attacks  # pylint: disable=import-outside-toplevel
  variables = state.variables
  stats = variables["batch_stats"]
  logits_fn = lambda z: model.apply(variables, z, train=False)
  if config.uses_trades:
    x_adv = attacks.trades_attack(logits_fn,
                                  x,
                                  key=key,
                                  eps=hparams["eps"],
                                  step_size=hparams["step_size"],
                                  steps=config.pgd_steps,
                                  norm=config.norm)
  else:
    x_adv = attacks.pgd(logits_fn,
                        x,
                        y,
                        key=key,
                        eps=hparams["eps"],
                        step_size=hparams["step_size"],
                        steps=config.pgd_steps,
                        norm=config.norm)
  x_adv = jax.lax.stop_gradient(x_adv)

  def loss_fn(params):
    if config.uses_trades:
      logits_nat, stats_1 = _old_forward(model, params, stats, x)
      logits_adv, new_stats = _old_forward(model, params, stats_1, x_adv)
      loss = losses.trades_objective(logits_nat, logits_adv, y, beta=hparams["trades_beta"])
    else:
      logits_adv, new_stats = _old_forward(model, params, stats, x_adv)
      loss = losses.cross_entropy(logits_adv, y).mean()
    return loss, new_stats

  (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
  return _old_apply_update(state, grads, hparams["lr_rob"], config, "robust", new_stats)


def _old_generalist_update(state, *, beta, redistribute, config):
  decay = mixing.ema_decay(state.step, config.ema_decay)
  teachers = {
      role: mixing.ema_update(state.teachers[role], expert.variables, decay)
      for role, expert in state.experts.items()
  }
  target = mixing.mix(teachers["natural"], teachers["robust"], beta)
  global_model = mixing.ema_update(state.global_model, target, decay)
  select = lambda own: jax.tree_util.tree_map(lambda g, o: jnp.where(redistribute, g, o),
                                              global_model, own)
  experts = {role: e.replace(variables=select(e.variables)) for role, e in state.experts.items()}
  return state.replace(step=state.step + 1,
                       experts=experts,
                       teachers=teachers,
                       global_model=global_model)


def _old_train_step(state, images, labels, key, tables, *, model, config):
  aug_key, attack_key = jax.random.split(key)
  x = augment_batch(aug_key, images, pad=config.crop_padding, flip=False)
  t = jnp.minimum(state.step, tables["beta"].shape[0] - 1)
  experts = dict(state.experts)
  experts["natural"] = _old_natural_step(experts["natural"],
                                         x,
                                         labels,
                                         tables["lr_nat"][t],
                                         model=model,
                                         config=config)
  hparams = {
      "lr_rob": tables["lr_rob"][t],
      "eps": tables["eps"],
      "step_size": tables["step_size"],
      "trades_beta": tables["trades_beta"]
  }
  experts["robust"] = _old_robust_step(experts["robust"],
                                       x,
                                       labels,
                                       attack_key,
                                       hparams,
                                       model=model,
                                       config=config)
  return _old_generalist_update(state.replace(experts=experts),
                                beta=tables["beta"][t],
                                redistribute=tables["redistribute"][t],
                                config=config)


def _old_tables(config, steps_per_epoch):
  built = schedules.build_schedules(config, steps_per_epoch)
  tables = {k: jnp.asarray(built[k]) for k in ("beta", "redistribute")}
  for name in ("lr_nat", "lr_rob"):  # the two-expert code's own learning-rate tables
    tables[name] = jnp.asarray(
        schedules.learning_rate_table(getattr(config, name), config, steps_per_epoch))
  tables.update(eps=jnp.float32(config.eps),
                step_size=jnp.float32(config.step_size),
                trades_beta=jnp.float32(config.trades_beta))
  return tables


# ---------------------------------------------------------------------------- helpers
# Six steps over three epochs of two batches: β falls from the first epoch and redistribution
# starts at step 2, so every branch of the update runs.
_SHORT = dict(epochs=3,
              beta_start=0.2,
              redistribute_start=0.3,
              redistribute_period=0.3,
              redistribute_duty=0.5,
              batch_size=16,
              flip=False)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  return models.create_model("smallcnn", 10), images, labels


def _leaves(state):
  flat, _ = jax.tree_util.tree_flatten_with_path(
      (state.experts, state.teachers, state.global_model, state.step))
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def _train(step_fn, state, tables, images, labels, steps):
  for i in range(steps):
    state = step_fn(state, tables, jax.random.fold_in(jax.random.key(7), i), images, labels)
  return state


# ------------------------------------------------------------------- N = 2 equals today's
@pytest.mark.parametrize("robust_loss,spec", [("pgd", ()), ("pgd", ("natural", "robust")),
                                              ("trades", ())])
def test_two_experts_equal_todays_trainer(data, robust_loss, spec):
  model, images, labels = data
  config = dataclasses.replace(cfg.get_config("tiny"),
                               robust_loss=robust_loss,
                               experts_spec=spec,
                               **_SHORT).validate()
  assert config.experts == ("natural", "robust")
  init = lambda: steps_lib.create_train_state(
      config, model, jax.random.key(0), image_shape=(16, 16, 1))

  @jax.jit
  def new_step(state, tables, key, x, y):
    return steps_lib.train_step(state, x, y, key, tables, model=model, config=config)[0]

  @jax.jit
  def old_step(state, tables, key, x, y):
    return _old_train_step(state, x, y, key, tables, model=model, config=config)

  new = _train(new_step, init(), steps_lib.schedule_arrays(config, 2), images, labels, 6)
  old = _train(old_step, init(), _old_tables(config, 2), images, labels, 6)
  new_leaves, old_leaves = _leaves(new), _leaves(old)
  assert new_leaves.keys() == old_leaves.keys()  # the same pytree: checkpoints stay readable
  differ = [k for k in old_leaves if not np.array_equal(new_leaves[k], old_leaves[k])]
  assert not differ, differ[:5]
  assert int(new.step) == 6


def test_mix_many_of_two_is_mix_bit_for_bit():
  rng = np.random.default_rng(1)
  nat = {"w": jnp.asarray(rng.normal(size=(64,)), jnp.float32)}
  rob = {"w": jnp.asarray(rng.normal(size=(64,)), jnp.float32)}
  for beta in np.asarray(schedules.beta_table(cfg.get_config("cifar10"), 3)[::17]):
    weights = jnp.stack([1 - jnp.float32(beta), jnp.float32(beta)])
    np.testing.assert_array_equal(
        jax.jit(mixing.mix)(nat, rob, beta)["w"],
        jax.jit(mixing.mix_many)([nat, rob], weights)["w"])


# ------------------------------------------------------------------------ weight schedule
@pytest.mark.parametrize("preset", ["cifar10", "pilot", "cifar100"])
def test_two_expert_weights_are_the_beta_table_exactly(preset):
  config = cfg.get_config(preset)
  tables = schedules.build_schedules(config, 7)
  beta = schedules.beta_table(config, 7)
  np.testing.assert_array_equal(tables["weights"][:, 1], beta)
  np.testing.assert_array_equal(tables["weights"][:, 0], np.float32(1) - beta)
  np.testing.assert_array_equal(tables["beta"], beta)
  explicit = dataclasses.replace(config,
                                 expert_weights_final=(1 - config.beta_final, config.beta_final))
  np.testing.assert_array_equal(
      schedules.build_schedules(explicit, 7)["weights"], tables["weights"])


@pytest.mark.parametrize("spec,weights", [
    (("natural", "pgd:linf:8/255:10", "pgd:l2:0.5:10"), ()),
    (("natural", "pgd:linf:8/255:10", "pgd:l2:0.5:10"), (0.2, 0.5, 0.3)),
    (("natural", "robust", "pgd:l2:0.5:10", "trades:linf:4/255:5"), (0.4, 0.1, 0.3, 0.2)),
    (("pgd:linf:8/255:10", "pgd:l2:0.5:10"), ()),
])
def test_every_row_of_the_weight_table_sums_to_one(spec, weights):
  config = dataclasses.replace(cfg.get_config("cifar10"),
                               epochs=30,
                               experts_spec=spec,
                               expert_weights_final=weights).validate()
  tables = schedules.build_schedules(config, 5)
  w = tables["weights"]
  assert w.shape == (30 * 5, len(spec)) and w.dtype == np.float32
  np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
  assert w.min() >= 0.0 and w.max() <= 1.0
  start, final = schedules.mixing_weights(config)
  adversarial = [s.adversarial for s in config.expert_specs]
  np.testing.assert_allclose(w[0], start, atol=1e-6)  # held until beta_start (epoch 20)...
  np.testing.assert_allclose(w[20 * 5 - 1], start, atol=1e-6)
  np.testing.assert_allclose(w[-1], final, atol=1e-6)  # ...then linear to the final weights
  assert all(s == 0.0 for s, a in zip(start, adversarial) if not a)
  np.testing.assert_allclose(tables["beta"], w[:, adversarial].sum(axis=1), atol=1e-7)
  if weights:
    np.testing.assert_allclose(final, weights)
  epochs = np.arange(30 * 5) // 5 + 1  # linear in the epoch after the knot
  mid = np.flatnonzero(epochs == 25)[0]
  np.testing.assert_allclose(w[mid],
                             np.asarray(start) + 0.5 * (np.asarray(final) - start),
                             atol=1e-6)


def test_default_multinorm_weights_split_the_robust_share_equally():
  start, final = schedules.mixing_weights(cfg.get_config("cifar10-multinorm"))
  assert start == (0.0, 0.5, 0.5)
  np.testing.assert_allclose(final, (0.6, 0.2, 0.2))
  config = dataclasses.replace(cfg.get_config("pilot-multinorm"), beta_final=0.6)
  np.testing.assert_allclose(schedules.mixing_weights(config)[1], (0.4, 0.3, 0.3))


# --------------------------------------------------------------------- config grammar
def test_expert_grammar():
  defaults = experts.classic_experts(cfg.get_config("cifar10"))
  spec = experts.parse_expert("pgd:l2:0.5:10", defaults=defaults)
  assert (spec.role, spec.objective, spec.norm, spec.eps, spec.steps) == ("robust_l2", "pgd", "l2",
                                                                          0.5, 10)
  assert spec.step_size == pytest.approx(0.125) and spec.lr == 0.01 and spec.weight_decay == 3.5e-3
  spec = experts.parse_expert("big=trades:linf:16/255:7:step=0.01:lr=0.05:wd=5e-4",
                              defaults=defaults)
  assert (spec.role, spec.objective, spec.eps, spec.steps, spec.step_size, spec.lr,
          spec.weight_decay) == ("big", "trades", 16 / 255, 7, 0.01, 0.05, 5e-4)
  assert experts.parse_expert("robust", defaults=defaults) == defaults["robust"]
  assert experts.parse_expert("natural:lr=0.1", defaults=defaults).lr == 0.1
  for text, message in [("pgd:l1:0.5:10", "norm 'l1'"), ("pgd:linf:2:10", "pixel range"),
                        ("pgd:l2:0.5", "NORM:EPS:STEPS"), ("pgd:l2:x:10", "not a number"),
                        ("pgd:l2:0.5:0", "STEPS"), ("adv:l2:0.5:10", "task 'adv'"),
                        ("pgd:l2:0.5:10:steps=3", "option 'steps=3'"),
                        ("natural:step=0.1", "adversarial experts only"),
                        ("Global=natural", "role 'Global'"), ("global=natural", "role 'global'")]:
    with pytest.raises(ValueError, match=message):
      experts.parse_expert(text, defaults=defaults)


@pytest.mark.parametrize("changes,field,message", [
    (dict(experts_spec=("natural", "pgd:l2:0.5")), "experts_spec", "NORM:EPS:STEPS"),
    (dict(experts_spec=("natural",)), "experts_spec", "at least two"),
    (dict(experts_spec=("natural", "pgd:linf:8/255:10", "pgd:linf:4/255:10")), "experts_spec",
     "two experts have the role 'robust_linf'"),
    (dict(experts_spec=("natural", "pgd:l2:0.5:10"),
          method="pgd_at"), "experts_spec", "generalist only"),
    (dict(expert_weights_final=(0.5, 0.5),
          method="natural"), "expert_weights_final", "generalist only"),
    (dict(expert_weights_final=(0.5, 0.3)), "expert_weights_final", "sum to 1"),
    (dict(expert_weights_final=(1.0,)), "expert_weights_final", "1 weights for 2 experts"),
    (dict(expert_weights_final=(1.5, -0.5)), "expert_weights_final", r"\[0, 1\]"),
])
def test_config_validation_names_the_field(changes, field, message):
  with pytest.raises(cfg.ConfigError, match=message) as error:
    dataclasses.replace(cfg.get_config("pilot"), **changes).validate()
  assert error.value.field == field


def test_presets_and_command_line():
  config = cfg.get_config("pilot-multinorm").validate()
  assert config.experts == ("natural", "robust_linf", "robust_l2")
  assert [s.norm for s in config.expert_specs] == [None, "linf", "l2"]
  c10 = cfg.get_config("cifar10-multinorm").validate()
  assert c10.model == "resnet18" and c10.expert_specs[1].eps == pytest.approx(8 / 255)
  assert c10.expert_specs[2].eps == 0.5 and c10.expert_specs[2].step_size == 0.125
  parser = cli.build_parser("test")
  _, parsed = cli.parse_config(parser, [
      "--preset", "pilot", "--experts-spec", "natural,pgd:linf:0.2:5,pgd:l2:1.0:5",
      "--expert-weights-final", "0.5,0.25,0.25"
  ])
  assert parsed.experts == ("natural", "robust_linf", "robust_l2")
  assert parsed.expert_weights_final == (0.5, 0.25, 0.25)
  record = cfg.config_record(parsed)
  assert cfg.config_from_record(json.loads(json.dumps(record))) == parsed
  # A record written before the fields existed reads as the classic two experts.
  old = {k: v for k, v in cfg.config_record(cfg.get_config("pilot")).items() if "expert" not in k}
  assert cfg.config_from_record(old).experts == ("natural", "robust")


# --------------------------------------------------------------- the N-expert train step
def test_three_expert_update_matches_hand_computation(data):
  model, _, _ = data
  config = cfg.get_config("pilot-multinorm")
  state = steps_lib.create_train_state(config, model, jax.random.key(0), image_shape=(16, 16, 1))
  leaf = lambda v: {"params": {"w": jnp.full((2,), v)}, "batch_stats": {"m": jnp.full((2,), v)}}
  roles = config.experts
  s = state.replace(
      step=jnp.int32(3),
      experts={
          r: state.experts[r].replace(variables=leaf(2.0 * (i + 1))) for i, r in enumerate(roles)
      },
      teachers={
          r: leaf(1.0 + i) for i, r in enumerate(roles)
      },
      global_model=leaf(0.0))
  d = 4 / 13
  teachers = [d * (1.0 + i) + (1 - d) * 2.0 * (i + 1) for i in range(3)]
  weights = np.array([0.2, 0.5, 0.3], np.float32)
  glob = (1 - d) * float(np.dot(weights, teachers))
  for redistribute in (False, True):
    out = steps_lib.generalist_update(s,
                                      weights=jnp.asarray(weights),
                                      redistribute=jnp.bool_(redistribute),
                                      config=config)
    for i, r in enumerate(roles):
      np.testing.assert_allclose(out.teachers[r]["params"]["w"], teachers[i], rtol=1e-6)
      np.testing.assert_allclose(out.experts[r].variables["batch_stats"]["m"],
                                 glob if redistribute else 2.0 * (i + 1),
                                 rtol=1e-6)
    np.testing.assert_allclose(out.global_model["params"]["w"], glob, rtol=1e-6)


def test_three_expert_step_compiles_once_and_trains_each_expert(data):
  model, images, labels = data
  config = dataclasses.replace(cfg.get_config("tiny"),
                               experts_spec=("natural", "pgd:linf:0.2:2:step=0.05",
                                             "pgd:l2:1.0:2:step=0.25"),
                               **_SHORT).validate()
  state = steps_lib.create_train_state(config, model, jax.random.key(0), image_shape=(16, 16, 1))
  assert set(state.experts) == set(state.teachers) == set(config.experts)
  traced = chex.assert_max_traces(steps_lib.train_step, n=1)
  step = jax.jit(functools.partial(traced, model=model, config=config), donate_argnums=0)
  first = jax.tree_util.tree_map(np.asarray, state.experts)
  for i in range(5):  # new learning rates half-way: the same compiled step
    lr_rob = 0.05 if i < 3 else 0.025
    tables = steps_lib.schedule_arrays(dataclasses.replace(config, lr_rob=lr_rob), 2)
    state, metrics = step(state, images, labels, jax.random.key(i), tables)
  assert set(metrics) == set(config.experts) and int(state.step) == 5
  assert bool(tables["redistribute"][4])
  for role in config.experts:  # every expert moved, each its own way
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                   state.experts[role].variables, first[role].variables)
    assert max(jax.tree_util.tree_leaves(moved)) > 0
  # Redistributed after the last step (index 4): every expert holds the global model.
  for role in config.experts:
    chex.assert_trees_all_equal(state.experts[role].variables, state.global_model)


@pytest.mark.slow
def test_three_expert_run_resumes_to_the_uninterrupted_result(tmp_path):
  config = dataclasses.replace(cfg.get_config("tiny"),
                               experts_spec=("natural", "pgd:linf:0.2:2", "pgd:l2:1.0:2"))
  full = training.train_and_evaluate(config, tmp_path / "full", progress=False)
  assert list(full["models"]) == ["natural", "robust_linf", "robust_l2", "global"]
  assert training.train_and_evaluate(config, tmp_path / "cut", progress=False, max_epochs=1) == {
      "stopped_at_epoch": 1
  }
  resumed = training.train_and_evaluate(config, tmp_path / "cut", progress=False)
  assert resumed["models"] == full["models"]
  record = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
  assert list(record["weights"]) == list(config.experts)
  assert sum(record["weights"].values()) == pytest.approx(1.0)
  assert set(record["lr"]) == set(record["train"]) == set(config.experts)


# ---------------------------------------------------------------------- union robustness
def test_union_accuracy_of_hand_made_results():
  correct = {
      "pgd20": np.array([1, 1, 1, 0, 1, 0], bool),
      "pgd20-l2": np.array([1, 0, 1, 1, 1, 0], bool),
  }
  union = report.union_accuracy(correct)
  assert union == {"attacks": ["pgd20", "pgd20-l2"], "accuracy": 0.5, "robust": 3, "n": 6}
  three = report.union_accuracy({**correct, "other": np.array([0, 1, 1, 1, 1, 1], bool)})
  assert three["robust"] == 2  # examples 2 and 4 survive all three
  assert report.union_accuracy({"pgd20": [True, False]})["accuracy"] == 0.5
  with pytest.raises(ValueError, match="one result per example"):
    report.union_accuracy({"pgd20": [True], "pgd20-l2": [True, False]})
  with pytest.raises(ValueError, match="at least one attack"):
    report.union_accuracy({})


@pytest.fixture(scope="module")
def three_teachers(data):
  model, _, _ = data
  variables = [models.init_variables(model, jax.random.key(i), (16, 16, 1)) for i in range(3)]
  roles = ("natural", "robust_linf", "robust_l2")
  named = dict(zip(roles, variables))
  named["global"] = mixing.mix_many(variables, [0.6, 0.2, 0.2])
  return ModelSet(model, named), roles


def test_attack_table_adds_l2_and_the_per_example_union(data, three_teachers):
  _, images, labels = data
  modelset, _ = three_teachers
  threat = Threat("linf", 0.1, 0.025, 20)
  table = report.attack_table(modelset.subset(("natural", "global")),
                              images,
                              labels,
                              key=jax.random.key(0),
                              threat=threat,
                              attacks=("clean", "pgd20", "pgd20-l2"),
                              l2=threat.at(1.0, norm="l2"))
  assert table["l2_eps"] == 1.0 and table["l2_step_size"] == pytest.approx(0.25)
  assert table["threats"]["pgd20"]["name"] == str(threat)
  assert table["threats"]["pgd20-l2"] == threat.at(1.0, norm="l2").record()
  assert table["union"]["attacks"] == ["pgd20", "pgd20-l2"]
  for name, row in table["models"].items():
    union = table["union"]["models"][name]["accuracy"]
    assert union <= min(row["pgd20"]["accuracy"], row["pgd20-l2"]["accuracy"])
  text = report.to_markdown(table)
  assert "## Union robustness" in text and "L2 attacks (pgd20-l2) at eps = 1, step 0.25" in text
  assert "PGD step 0.025" in text
  with pytest.raises(ValueError, match="need the L2 threat"):
    report.attack_table(modelset.subset(("natural",)),
                        images,
                        labels,
                        key=jax.random.key(0),
                        threat=threat,
                        attacks=("pgd20-l2",))
  with pytest.raises(ValueError, match="must be the L-inf `Threat`"):
    report.attack_table(modelset.subset(("natural",)),
                        images,
                        labels,
                        key=jax.random.key(0),
                        threat=threat.at(1.0, norm="l2"),
                        attacks=("pgd20",))


# ------------------------------------------------------------------ the simplex sweep
def test_simplex_grid():
  grid = sweep.simplex_grid(3, 0.25)
  assert len(grid) == 15 and len(set(grid)) == 15
  assert all(abs(sum(w) - 1.0) < 1e-9 for w in grid)
  assert (1.0, 0.0, 0.0) in grid and (0.5, 0.25, 0.25) in grid
  assert len(sweep.simplex_grid(4, 0.5)) == 10
  with pytest.raises(ValueError, match="step 1/k"):
    sweep.simplex_grid(3, 0.3)


def test_simplex_sweep_evaluates_every_mixture_and_writes_its_files(data, three_teachers, tmp_path):
  _, images, labels = data
  modelset, roles = three_teachers
  threats = {"linf": Threat("linf", 0.1, 0.025, 20), "l2": Threat("l2", 1.0, 0.25, 20)}
  result = sweep.run(modelset,
                     images[:8],
                     labels[:8],
                     roles=roles,
                     key=jax.random.key(0),
                     threats=threats,
                     grid_step=0.5)
  assert (result["kind"], result["grid_step"], result["l2_eps"]) == ("simplex", 0.5, 1.0)
  assert result["metrics"] == ["clean", "linf", "l2", "union"]
  assert [tuple(p["weights"].values()) for p in result["points"]] == sweep.simplex_grid(3, 0.5)
  vertex = next(p for p in result["points"] if p["weights"]["robust_l2"] == 1.0)
  for metric in result["metrics"]:  # a vertex is the expert itself
    assert vertex[metric] == result["experts"]["robust_l2"][metric]
  for p in result["points"]:
    assert p["union"] <= min(p["linf"], p["l2"])
  # A mixture's figures are the attack table's for mix_many(teachers, w), with the same key.
  point = next(p for p in result["points"] if p["weights"]["natural"] == 0.5)
  mixed = mixing.mix_many([modelset.variables[r] for r in roles], list(point["weights"].values()))
  table = report.attack_table(ModelSet(modelset.module, {"m": mixed}),
                              images[:8],
                              labels[:8],
                              key=jax.random.key(0),
                              threat=threats["linf"],
                              attacks=("clean", "pgd20", "pgd20-l2"),
                              l2=threats["l2"])
  row = table["models"]["m"]
  assert [point[m] for m in result["metrics"]] == [
      row["clean"]["accuracy"], row["pgd20"]["accuracy"], row["pgd20-l2"]["accuracy"],
      table["union"]["models"]["m"]["accuracy"]
  ]
  paths = sweep.write_sweep(result, tmp_path)
  assert [p.name for p in paths.values()] == ["simplex.json", "simplex.md", "simplex.png"]
  assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  text = paths["md"].read_text()
  header = ("| weights (natural, robust_linf, robust_l2) | clean | L-inf PGD-20 | L2 PGD-20 | "
            "union |")
  assert header in text
  assert "| 0.50, 0.00, 0.50 |" in text and "| global model |" in text


# ------------------------------------------------------------------------ the comparison
def test_multinorm_baselines_and_positions():
  config = cfg.get_config("pilot-multinorm")
  baselines = study.multinorm_baselines(config)
  assert list(baselines) == ["natural", "pgd_at_linf", "pgd_at_l2"]
  l2 = dataclasses.replace(config, **baselines["pgd_at_l2"]).validate()
  assert (l2.method, l2.norm, l2.eps, l2.pgd_steps, l2.step_size,
          l2.experts) == ("pgd_at", "l2", 1.0, 5, 0.25, ("robust",))
  assert l2.eval_step_size == pytest.approx(0.25)  # scaled with the radius, as L-inf's eps / 4
  for overrides in baselines.values():  # same budget
    run = dataclasses.replace(config, **overrides).validate()
    assert (run.epochs, run.batch_size, run.model,
            run.dataset) == (config.epochs, config.batch_size, config.model, config.dataset)
  pairs = study.multinorm_pairs(config, baselines)
  assert pairs == [("natural", "pgd_at_linf", "clean", "linf"),
                   ("natural", "pgd_at_l2", "clean", "l2"),
                   ("pgd_at_linf", "pgd_at_l2", "linf", "l2")]
  plan = study.plan_multinorm_runs((0, 1), baselines)
  assert [r.name for r in plan[:4]
         ] == ["natural-s0", "pgd_at_linf-s0", "pgd_at_l2-s0", "generalist-s0"]
  rows = [
      dict(variant="natural", seed=0, clean=0.9, linf=0.0, l2=0.1, union=0.0),
      dict(variant="pgd_at_linf", seed=0, clean=0.7, linf=0.5, l2=0.3, union=0.3),
      dict(variant="pgd_at_l2", seed=0, clean=0.8, linf=0.2, l2=0.5, union=0.2),
      dict(variant="generalist", seed=0, clean=0.85, linf=0.4, l2=0.4, union=0.3),
  ]
  result = study.aggregate_multinorm(rows, pairs)
  first = result["pairs"][0]["per_seed"][0]
  assert first == {"keeps_a": 0.75, "keeps_b": 0.8, "score": 1.55}
  assert result["pairs"][2]["per_seed"][0]["score"] == pytest.approx(2 / 3 + 0.5)
  text = study.multinorm_markdown(result)
  assert "generalist (global model)" in text and "natural vs pgd_at_l2" in text
  flat = study.pair_position(rows[3], rows[0], dict(rows[1], linf=0.0), "clean", "linf")
  assert np.isnan(flat["keeps_b"]) and np.isnan(flat["score"])  # no gap: no position


@pytest.mark.programs_compile_fast
@pytest.mark.slow
def test_compare_command_multinorm_trains_the_baselines_and_reports_the_union(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  args = [
      sys.executable,
      str(root / "experiments" / "compare.py"), "--preset", "tiny", "--epochs", "1",
      "--experts-spec", "natural,pgd:linf:0.2:2,pgd:l2:1.0:2", "--workdir",
      str(tmp_path), "--eval-n", "20", "--no-progress"
  ]
  out = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((tmp_path / "compare.json").read_text())
  assert result["kind"] == "multinorm"
  assert [r["name"] for r in result["runs"]
         ] == ["natural-s0", "pgd_at_linf-s0", "pgd_at_l2-s0", "generalist-s0"]
  for row in result["runs"]:
    assert {"clean", "linf", "l2", "union"} <= set(row)
    assert row["union"] <= min(row["linf"], row["l2"])
  l2 = json.loads((tmp_path / "pgd_at_l2-s0" / "config.json").read_text())
  assert (l2["method"], l2["norm"], l2["eps"], l2["experts_spec"]) == ("pgd_at", "l2", 1.0, [])
  assert [(p["a"], p["b"]) for p in result["aggregate"]["pairs"]] == [("natural", "pgd_at_linf"),
                                                                      ("natural", "pgd_at_l2"),
                                                                      ("pgd_at_linf", "pgd_at_l2")]
  text = (tmp_path / "compare.md").read_text()
  assert "union (%)" in text and "generalist (global model)" in text
  assert (tmp_path / "compare.png").exists()
  assert (tmp_path / "generalist-s0" / "eval" / "norms.json").exists()
