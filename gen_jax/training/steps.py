"""Training state and the pure per-batch functions of Generalist.

Each expert has its own state and its own pure step; the Generalist update mixes them:

    x = augment(key, uint8 batch)
    natural, m = natural_train_step(natural, x, y, lr_nat)                  # clean, train mode
    robust, m = robust_train_step(robust, x, y, key, hparams)             # PGD (inference BN)
    state = generalist_update(state with both experts, beta_t, redistribute_t)

`train_step` composes them for one batch; `make_train_step` is the one jitted step of the
project (the training loop and `experiments/bench.py` both run it): it gathers the batch from
the device-resident training set, runs `train_step` with the state donated and adds the metrics
to running totals. Every hyper-parameter that a schedule may change (learning rates, β, the
redistribution flag, eps and step sizes) reaches it as a traced argument, so nothing recompiles.

The state speaks the role vocabulary of `training.methods`: `experts` and `teachers` are keyed
`natural` / `robust` (only the experts the method trains), and `models()` adds `global`.

`model_health(state, divergence_bounds(initial, factor))` is the loop's cheap on-device check of
every model (finite, and within `factor` of its initial magnitude): a few scalars to read.

Synopsis::

    state = create_train_state(config, model, key, image_shape=(32, 32, 3))
    tables = schedule_arrays(config, steps_per_epoch=S)
    step_fn = make_train_step(config, model)
    totals = zero_totals(config)
    state, totals = step_fn(state, totals, train_x, train_y, perm, index, key, tables)

References:
  Wang & Wang, "Generalist: Decoupling Natural and Robust Generalization", CVPR 2023.
  Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
  Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019.
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gen_jax import attacks, mixing
from gen_jax.config import Config
from gen_jax.data.augment import augment_batch, flip_default
from gen_jax.models import init_variables
from gen_jax.training import losses
from gen_jax.training.methods import GLOBAL, NATURAL, ROBUST
from gen_jax.training.schedules import build_schedules

Variables = dict[str, Any]  # {"params": ..., "batch_stats": ...}


@flax.struct.dataclass
class ExpertState:
  """One expert: its variables (parameters and BatchNorm statistics) and optimiser state."""
  variables: Variables
  opt_state: optax.OptState


@flax.struct.dataclass
class GeneralistState:
  """Everything a run carries from step to step (and checkpoints).

  Attributes:
    step: global optimiser step, int32.
    experts: role -> the expert that the method trains (`natural`, `robust` or both).
    teachers: role -> EMA of that expert's variables.
    global_model: the deployed model (for a single-expert method, its teacher).
  """
  step: jax.Array
  experts: dict[str, ExpertState]
  teachers: dict[str, Variables]
  global_model: Variables

  def models(self) -> dict[str, Variables]:
    """The evaluated models by role: the teachers, then `global`."""
    return {**self.teachers, GLOBAL: self.global_model}


def _sgd(learning_rate, momentum, weight_decay):
  # PyTorch SGD semantics: weight decay is added to the gradient before the momentum buffer.
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum))


def make_optimizer(config: Config, role: str) -> optax.GradientTransformation:
  """SGD with momentum and weight decay, the learning rate injected so a schedule can set it."""
  weight_decay = config.weight_decay_nat if role == NATURAL else config.weight_decay_rob
  lr = config.lr_nat if role == NATURAL else config.lr_rob
  return optax.inject_hyperparams(_sgd)(learning_rate=lr,
                                        momentum=config.momentum,
                                        weight_decay=weight_decay)


def _set_lr(opt_state, lr):
  return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})


def create_train_state(config: Config, model: nn.Module, key: jax.Array, *,
                       image_shape: tuple[int, int, int]) -> GeneralistState:
  """Initialises the experts from the SAME weights (as the reference), teachers and global too.

  Args:
    config: the run's configuration (method and optimisers).
    model: the linen module.
    key: PRNG key for the initial weights.
    image_shape: (H, W, C) of one image.
  """
  variables = init_variables(model, key, image_shape)
  # Distinct buffers for every copy: the state is donated to the jitted step.
  copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)
  experts = {
      role:
          ExpertState(variables=copy(variables),
                      opt_state=make_optimizer(config, role).init(variables["params"]))
      for role in config.experts
  }
  return GeneralistState(step=jnp.zeros((), jnp.int32),
                         experts=experts,
                         teachers={role: copy(variables) for role in config.experts},
                         global_model=copy(variables))


def _accuracy_metrics(logits, labels, loss):
  n = labels.shape[0]
  return {
      "loss_sum": loss * n,
      "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
      "count": jnp.asarray(n, jnp.int32)
  }


def _apply_update(state: ExpertState, grads, lr, config: Config, role: str, new_stats):
  tx = make_optimizer(config, role)
  opt_state = _set_lr(state.opt_state, lr)
  updates, opt_state = tx.update(grads, opt_state, state.variables["params"])
  params = optax.apply_updates(state.variables["params"], updates)
  return ExpertState(variables={"params": params, "batch_stats": new_stats}, opt_state=opt_state)


def _train_forward(model: nn.Module, params, batch_stats, inputs):
  """Training-mode forward pass: (logits, BatchNorm statistics updated on `inputs`)."""
  logits, updated = model.apply({
      "params": params,
      "batch_stats": batch_stats
  },
                                inputs,
                                train=True,
                                mutable=["batch_stats"])
  return logits, updated.get("batch_stats", batch_stats)


def natural_train_step(state: ExpertState, x: jax.Array, y: jax.Array, lr: jax.Array, *,
                       model: nn.Module, config: Config) -> tuple[ExpertState, dict]:
  """One SGD step of the natural expert on clean images (BatchNorm in training mode)."""
  stats = state.variables["batch_stats"]

  def loss_fn(params):
    logits, new_stats = _train_forward(model, params, stats, x)
    return losses.cross_entropy(logits, y).mean(), (logits, new_stats)

  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn,
                                                          has_aux=True)(state.variables["params"])
  return (_apply_update(state, grads, lr, config, NATURAL,
                        new_stats), _accuracy_metrics(logits, y, loss))


def adversarial_examples(variables: Variables, x: jax.Array, y: jax.Array, key: jax.Array,
                         hparams: dict[str, jax.Array], *, model: nn.Module,
                         config: Config) -> jax.Array:
  """The robust expert's training adversary: PGD (Madry) or the TRADES KL attack.

  Runs the model with BatchNorm in inference mode, as the reference code's attacker does.
  """
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
  return jax.lax.stop_gradient(x_adv)


def robust_train_step(state: ExpertState, x: jax.Array, y: jax.Array, key: jax.Array,
                      hparams: dict[str, jax.Array], *, model: nn.Module,
                      config: Config) -> tuple[ExpertState, dict]:
  """One step of the robust expert: PGD (Madry) or TRADES adversarial training.

  The adversarial examples are generated with BatchNorm in inference mode (running statistics),
  as the reference code does (`model.eval()` inside its attacker); the update then runs in
  training mode on the adversarial batch. Accuracy metrics are on the adversarial batch.

  Args:
    state: the robust expert.
    x: augmented clean images in [0, 1].
    y: labels.
    key: PRNG key of the attack's random start.
    hparams: traced scalars `lr_rob`, `eps`, `step_size`, `trades_beta`.
    model: the linen module.
    config: static settings (`pgd_steps`, `norm`, whether TRADES is used).
  """
  variables = state.variables
  stats = variables["batch_stats"]
  x_adv = adversarial_examples(variables, x, y, key, hparams, model=model, config=config)

  def loss_fn(params):
    if config.uses_trades:
      # TRADES runs the clean and the adversarial batch through the network in training mode,
      # one after the other (BatchNorm statistics updated twice, as in the TRADES code).
      logits_nat, stats_1 = _train_forward(model, params, stats, x)
      logits_adv, new_stats = _train_forward(model, params, stats_1, x_adv)
      loss = losses.trades_objective(logits_nat, logits_adv, y, beta=hparams["trades_beta"])
    else:
      logits_adv, new_stats = _train_forward(model, params, stats, x_adv)
      loss = losses.cross_entropy(logits_adv, y).mean()
    return loss, (logits_adv, new_stats)

  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn,
                                                          has_aux=True)(variables["params"])
  return (_apply_update(state, grads, hparams["lr_rob"], config, ROBUST,
                        new_stats), _accuracy_metrics(logits, y, loss))


def generalist_update(state: GeneralistState, *, beta: jax.Array, redistribute: jax.Array,
                      config: Config) -> GeneralistState:
  """EMA teachers, the global model and redistribution, after the experts have stepped.

  With d_t = min(decay, (t + 1) / (t + 10)) (t = updates made so far):
    teacher_r <- d_t * teacher_r + (1 - d_t) * expert_r for each expert r,
    global <- d_t * global + (1 - d_t) * (β_t * teacher_robust + (1 - β_t) * teacher_natural),
  all over parameters AND BatchNorm statistics; then, when `redistribute`, both experts'
  variables are overwritten with the global model's (optimiser momentum is kept).
  For a single-expert method, its teacher is the global model.
  """
  decay = mixing.ema_decay(state.step, config.ema_decay)
  teachers = {
      role: mixing.ema_update(state.teachers[role], expert.variables, decay)
      for role, expert in state.experts.items()
  }
  experts = state.experts
  if config.method == "generalist":
    target = mixing.mix(teachers[NATURAL], teachers[ROBUST], beta)
    global_model = mixing.ema_update(state.global_model, target, decay)
    select = lambda own: jax.tree_util.tree_map(lambda g, o: jnp.where(redistribute, g, o),
                                                global_model, own)
    experts = {role: e.replace(variables=select(e.variables)) for role, e in experts.items()}
  else:
    (global_model,) = teachers.values()
  return state.replace(step=state.step + 1,
                       experts=experts,
                       teachers=teachers,
                       global_model=global_model)


def train_step(state: GeneralistState, images: jax.Array, labels: jax.Array, key: jax.Array,
               tables: dict[str, jax.Array], *, model: nn.Module,
               config: Config) -> tuple[GeneralistState, dict[str, dict]]:
  """The whole per-batch work: augment, the experts' steps, the Generalist update.

  Args:
    state: the run's state at step t.
    images: uint8 NHWC batch (augmented here, on the device).
    labels: int labels.
    key: this step's PRNG key (already folded with the step).
    tables: per-step schedule arrays (`lr_nat`, `lr_rob`, `beta`, `redistribute`) and scalars
      (`eps`, `step_size`, `trades_beta`), all traced.
    model: the linen module.
    config: static settings.

  Returns:
    The state at t + 1 and, per expert role, metric sums (`loss_sum`, `correct`, `count`).
  """
  aug_key, attack_key = jax.random.split(key)
  flip = config.flip if config.flip is not None else flip_default(config.dataset)
  x = augment_batch(aug_key, images, pad=config.crop_padding, flip=flip)
  t = jnp.minimum(state.step, tables["beta"].shape[0] - 1)
  experts, metrics = dict(state.experts), {}
  if NATURAL in experts:
    experts[NATURAL], metrics[NATURAL] = natural_train_step(experts[NATURAL],
                                                            x,
                                                            labels,
                                                            tables["lr_nat"][t],
                                                            model=model,
                                                            config=config)
  if ROBUST in experts:
    hparams = {
        "lr_rob": tables["lr_rob"][t],
        "eps": tables["eps"],
        "step_size": tables["step_size"],
        "trades_beta": tables["trades_beta"]
    }
    experts[ROBUST], metrics[ROBUST] = robust_train_step(experts[ROBUST],
                                                         x,
                                                         labels,
                                                         attack_key,
                                                         hparams,
                                                         model=model,
                                                         config=config)
  state = generalist_update(state.replace(experts=experts),
                            beta=tables["beta"][t],
                            redistribute=tables["redistribute"][t],
                            config=config)
  return state, metrics


def schedule_arrays(config: Config, steps_per_epoch: int) -> dict[str, jax.Array]:
  """The traced inputs of `train_step`: schedule tables plus the attack's scalars."""
  tables = {k: jnp.asarray(v) for k, v in build_schedules(config, steps_per_epoch).items()}
  tables.update(eps=jnp.float32(config.eps),
                step_size=jnp.float32(config.step_size),
                trades_beta=jnp.float32(config.trades_beta))
  return tables


def zero_totals(config: Config) -> dict[str, dict[str, jax.Array]]:
  """Running metric sums of an epoch, per expert role (what `make_train_step` accumulates)."""
  return {
      role: {
          "loss_sum": jnp.zeros((), jnp.float32),
          "correct": jnp.zeros((), jnp.int32),
          "count": jnp.zeros((), jnp.int32)
      } for role in config.experts
  }


def _gathered_train_step(state, totals, train_x, train_y, perm, index, key, tables, *, model,
                         config, batch_sharding):
  """Gathers batch `index` of the permutation `perm`, runs `train_step`, adds up its metrics."""
  idx = jax.lax.dynamic_slice_in_dim(perm, index * config.batch_size, config.batch_size)
  images, labels = train_x[idx], train_y[idx]
  if batch_sharding is not None:
    images = jax.lax.with_sharding_constraint(images, batch_sharding)
    labels = jax.lax.with_sharding_constraint(labels, batch_sharding)
  step_key = jax.random.fold_in(key, state.step)
  state, metrics = train_step(state, images, labels, step_key, tables, model=model, config=config)
  totals = jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), totals, metrics)
  return state, totals


def make_train_step(config: Config, model: nn.Module, *, batch_sharding: Any = None):
  """The jitted training step of the project, with the state and the totals donated.

  Returns:
    `step_fn(state, totals, train_x, train_y, perm, index, key, tables) -> (state, totals)`:
    batch `index` of the permutation `perm` of the device-resident `train_x` / `train_y` (uint8
    images, int32 labels), this step's key `fold_in(key, state.step)`, and the schedule `tables`
    of `schedule_arrays` (arguments, not constants: one compiled program serves any values).
    `batch_sharding` (optional) lays the gathered batch out over the data-parallel mesh.
  """
  return jax.jit(functools.partial(_gathered_train_step,
                                   model=model,
                                   config=config,
                                   batch_sharding=batch_sharding),
                 donate_argnums=(0, 1))


# ------------------------------------------------------------------------- model health
def named_models(state: GeneralistState) -> dict[str, Variables]:
  """Every set of variables of the state, by a name for messages: the experts, the teachers
  and the global model (e.g. "robust expert", "natural teacher", "global model")."""
  named = {f"{role} expert": expert.variables for role, expert in state.experts.items()}
  named.update({f"{role} teacher": variables for role, variables in state.teachers.items()})
  named["global model"] = state.global_model
  return named


def divergence_bounds(variables: Variables, factor: float) -> Variables:
  """Per leaf, `factor * max(1, max |x|)` of the initial `variables`: the largest magnitude a
  healthy model's leaf may reach (infinite when `factor` is 0: no bound).

  Relative to the start because magnitudes differ by layer (a kernel of 0.05, a BatchNorm
  variance of 1); the floor of 1 keeps leaves that start at zero (biases, BatchNorm means)
  from a bound of zero.
  """
  if not factor:
    return jax.tree_util.tree_map(lambda x: jnp.float32(jnp.inf), variables)
  return jax.tree_util.tree_map(
      lambda x: jnp.float32(factor) * jnp.maximum(1.0,
                                                  jnp.max(jnp.abs(x)).astype(jnp.float32)),
      variables)


def model_health(state: GeneralistState, bounds: Variables) -> dict[str, dict[str, jax.Array]]:
  """Per model of `named_models`: `finite` (every parameter and BatchNorm statistic is finite)
  and `excess` (the largest `max |x| / bound` over its leaves; above 1 it exploded).

  A handful of device scalars: cheap enough to read at every logging step, unlike the models.
  """

  def one(variables):
    leaves = jax.tree_util.tree_leaves(variables)
    limits = jax.tree_util.tree_leaves(bounds)
    finite = jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()
    excess = jnp.stack(
        [jnp.max(jnp.abs(x)).astype(jnp.float32) / b for x, b in zip(leaves, limits)]).max()
    return {"finite": finite, "excess": excess}

  return {name: one(variables) for name, variables in named_models(state).items()}
