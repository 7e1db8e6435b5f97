"""Training state and the pure per-batch functions of Generalist, for two experts or N.

Each expert has its own state and its own pure step; the Generalist update mixes them:

    x = augment(key, uint8 batch)
    natural, m = natural_train_step(natural, x, y, lr_nat)                  # clean, train mode
    robust, m = robust_train_step(robust, x, y, key, hparams)             # PGD (inference BN)
    state = generalist_update(state with every expert, weights_t, redistribute_t)

The experts are those of `config.expert_specs` (`gen_jax.experts.ExpertSpec`): the classic
natural and robust ones, or any list of clean, PGD-AT and TRADES experts, each with its own norm,
radius, steps and optimiser (Generalist++: e.g. natural, L-inf and L2 experts). One code path
serves every N: the classic Generalist is the case N = 2, and its global model's target
`mix(teacher_nat, teacher_rob, β)` is `mix_many([teacher_nat, teacher_rob], [1 - β, β])`.

`train_step` composes them for one batch; `make_train_step` is the one jitted step of the
project (the training loop and `experiments/bench.py` both run it): it takes one global batch
(`parallel.global_batch`), runs `train_step` with the state donated and adds the metrics to
running totals. Every hyper-parameter that a schedule may change (learning rates, β, the
redistribution flag, eps and step sizes) reaches it as a traced argument, so nothing recompiles.

The state speaks the role vocabulary of `gen_jax.experts`: `experts` and `teachers` are keyed
by role (`natural` / `robust`, or the roles of `experts_spec` such as `robust_l2`: only the
experts the run trains), and `models()` adds `global`. The state is a dict of experts, not a
stacked array of them: the experts differ in static settings (norm, PGD steps, PGD-AT or TRADES),
which a stacked (vmapped) form could only serve by running every expert's program for each, and
a dict unrolls at trace time into the same single jitted dispatch per step. It also keeps the
pytree of the two-expert runs, so their checkpoints restore and resume unchanged.

`model_health(state, divergence_bounds(initial, factor))` is the loop's cheap on-device check of
every model (finite, and within `factor` of its initial magnitude): a few scalars to read.

Synopsis::

    state = create_train_state(config, model, key, image_shape=(32, 32, 3))
    tables = schedule_arrays(config, steps_per_epoch=S)
    step_fn = make_train_step(config, model)
    totals = zero_totals(config)
    images, labels = parallel.global_batch((train_x, train_y), rows, batch_sharding)
    state, totals = step_fn(state, totals, images, labels, key, tables)

References:
  Wang & Wang, "Generalist: Decoupling Natural and Robust Generalization", CVPR 2023.
  Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
  Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019.
  Wang et al., "Generalist++: A Meta-learning Framework for Mitigating Trade-off in Adversarial
  Training", arXiv 2510.13361, 2025 (several experts, one per sub-task or norm).
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
from gen_jax.experts import (GLOBAL, MULTI_EXPERT_METHOD, NATURAL, ROBUST, ExpertSpec,
                             classic_experts)
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
    experts: role -> each expert the run trains (`natural`, `robust`, both, or the roles of
      `experts_spec`).
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


def expert_spec(config: Config, role: str) -> ExpertSpec:
  """The expert of `role`: one of the run's experts, else the flat fields' natural or robust."""
  specs = {**classic_experts(config), **{s.role: s for s in config.expert_specs}}
  if role not in specs:
    raise ValueError(f"the run has no expert {role!r}; its experts are "
                     f"{', '.join(config.experts)}.")
  return specs[role]


def make_optimizer(config: Config, role: str) -> optax.GradientTransformation:
  """SGD with momentum and the expert's weight decay, the learning rate injected so that a
  schedule can set it."""
  spec = expert_spec(config, role)
  return optax.inject_hyperparams(_sgd)(learning_rate=spec.lr,
                                        momentum=config.momentum,
                                        weight_decay=spec.weight_decay)


def _set_lr(opt_state, lr):
  return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})


def create_train_state(config: Config,
                       model: nn.Module,
                       key: jax.Array,
                       *,
                       image_shape: tuple[int, int, int],
                       variables: Variables | None = None) -> GeneralistState:
  """Initialises the experts from the SAME weights (as the reference), teachers and global too.

  Args:
    config: the run's configuration (method and optimisers).
    model: the linen module.
    key: PRNG key for the initial weights.
    image_shape: (H, W, C) of one image.
    variables: start from these weights instead (a warm start, `--init-from`; see
      `runs.load_init`), of the shapes `model` initialises; `key` is then unused.
  """
  if variables is None:
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


def natural_train_step(state: ExpertState,
                       x: jax.Array,
                       y: jax.Array,
                       lr: jax.Array,
                       *,
                       model: nn.Module,
                       config: Config,
                       role: str = NATURAL) -> tuple[ExpertState, dict]:
  """One SGD step of a clean expert (`role`, natural by default) on clean images (BatchNorm in
  training mode)."""
  stats = state.variables["batch_stats"]

  def loss_fn(params):
    logits, new_stats = _train_forward(model, params, stats, x)
    return losses.cross_entropy(logits, y).mean(), (logits, new_stats)

  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn,
                                                          has_aux=True)(state.variables["params"])
  return (_apply_update(state, grads, lr, config, role,
                        new_stats), _accuracy_metrics(logits, y, loss))


def adversarial_examples(variables: Variables,
                         x: jax.Array,
                         y: jax.Array,
                         key: jax.Array,
                         hparams: dict[str, jax.Array],
                         *,
                         model: nn.Module,
                         config: Config,
                         spec: ExpertSpec | None = None) -> jax.Array:
  """An adversarial expert's training adversary: PGD (Madry) or the TRADES KL attack.

  Runs the model with BatchNorm in inference mode, as the reference code's attacker does. `spec`
  (default: the flat fields' robust expert) gives the objective, norm and steps; `hparams` the
  traced radius `eps` and `step_size`.
  """
  spec = spec or expert_spec(config, ROBUST)
  logits_fn = lambda z: model.apply(variables, z, train=False)
  if spec.objective == "trades":
    x_adv = attacks.trades_attack(logits_fn,
                                  x,
                                  key=key,
                                  eps=hparams["eps"],
                                  step_size=hparams["step_size"],
                                  steps=spec.steps,
                                  norm=spec.norm)
  else:
    x_adv = attacks.pgd(logits_fn,
                        x,
                        y,
                        key=key,
                        eps=hparams["eps"],
                        step_size=hparams["step_size"],
                        steps=spec.steps,
                        norm=spec.norm)
  return jax.lax.stop_gradient(x_adv)


def robust_train_step(state: ExpertState,
                      x: jax.Array,
                      y: jax.Array,
                      key: jax.Array,
                      hparams: dict[str, jax.Array],
                      *,
                      model: nn.Module,
                      config: Config,
                      spec: ExpertSpec | None = None) -> tuple[ExpertState, dict]:
  """One step of an adversarial expert: PGD (Madry) or TRADES adversarial training.

  The adversarial examples are generated with BatchNorm in inference mode (running statistics),
  as the reference code does (`model.eval()` inside its attacker); the update then runs in
  training mode on the adversarial batch. Accuracy metrics are on the adversarial batch.

  Args:
    state: the expert.
    x: augmented clean images in [0, 1].
    y: labels.
    key: PRNG key of the attack's random start.
    hparams: traced scalars `lr_rob` (this expert's learning rate), `eps`, `step_size`,
      `trades_beta`.
    model: the linen module.
    config: static settings.
    spec: the expert (objective, norm, steps, optimiser); default the flat fields' robust one.
  """
  spec = spec or expert_spec(config, ROBUST)
  variables = state.variables
  stats = variables["batch_stats"]
  x_adv = adversarial_examples(variables, x, y, key, hparams, model=model, config=config, spec=spec)

  def loss_fn(params):
    if spec.objective == "trades":
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
  return (_apply_update(state, grads, hparams["lr_rob"], config, spec.role,
                        new_stats), _accuracy_metrics(logits, y, loss))


def generalist_update(state: GeneralistState,
                      *,
                      redistribute: jax.Array,
                      config: Config,
                      weights: jax.Array | None = None) -> GeneralistState:
  """EMA teachers, the global model and redistribution, after the experts have stepped.

  With d_t = min(decay, (t + 1) / (t + 10)) (t = updates made so far) and the experts r_1..r_N
  of `config.experts`:
    teacher_r <- d_t * teacher_r + (1 - d_t) * expert_r for each expert r,
    global <- d_t * global + (1 - d_t) * mix_many([teacher_r1, ..., teacher_rN], w_t),
  all over parameters AND BatchNorm statistics; then, when `redistribute`, every expert's
  variables are overwritten with the global model's (optimiser momentum is kept). For the classic
  two experts w_t = (1 - β_t, β_t): `mix(teacher_natural, teacher_robust, β_t)`.
  For a single-expert method, its teacher is the global model.

  Args:
    state: the state after the experts' steps.
    redistribute: traced bool, whether to copy the global model into the experts.
    config: static settings (method, experts, EMA decay).
    weights: traced [N] weights of the experts in `config.experts` order (summing to 1); for
      the classic two experts `[1 - β, β]`. Unused by a single-expert method.
  """
  decay = mixing.ema_decay(state.step, config.ema_decay)
  teachers = {
      role: mixing.ema_update(state.teachers[role], expert.variables, decay)
      for role, expert in state.experts.items()
  }
  experts = state.experts
  if config.method == MULTI_EXPERT_METHOD:
    if weights is None:
      raise ValueError(f"generalist_update needs `weights`, one per expert of {config.experts}.")
    # Mixing order is the config's, not the dict's (a jitted dict comes back key-sorted).
    target = mixing.mix_many([teachers[role] for role in config.experts], weights)
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
    tables: `schedule_arrays`: per-step tables (`weights` [T, N], `redistribute`, per expert
      role `experts[role]["lr"]`), per adversarial expert its `eps` and `step_size`, and
      `trades_beta`, all traced.
    model: the linen module.
    config: static settings.

  Returns:
    The state at t + 1 and, per expert role, metric sums (`loss_sum`, `correct`, `count`).
  """
  aug_key, attack_key = jax.random.split(key)
  flip = config.flip if config.flip is not None else flip_default(config.dataset)
  x = augment_batch(aug_key, images, pad=config.crop_padding, flip=flip)
  t = jnp.minimum(state.step, tables["weights"].shape[0] - 1)
  experts, metrics = dict(state.experts), {}
  adversarial = 0
  for spec in config.expert_specs:
    role, hp = spec.role, tables["experts"][spec.role]
    if not spec.adversarial:
      experts[role], metrics[role] = natural_train_step(experts[role],
                                                        x,
                                                        labels,
                                                        hp["lr"][t],
                                                        model=model,
                                                        config=config,
                                                        role=role)
      continue
    # The first adversarial expert draws from this step's attack key itself (as the classic
    # robust expert always has), later ones from keys folded from it.
    key_i = attack_key if adversarial == 0 else jax.random.fold_in(attack_key, adversarial)
    adversarial += 1
    hparams = {
        "lr_rob": hp["lr"][t],
        "eps": hp["eps"],
        "step_size": hp["step_size"],
        "trades_beta": tables["trades_beta"]
    }
    experts[role], metrics[role] = robust_train_step(experts[role],
                                                     x,
                                                     labels,
                                                     key_i,
                                                     hparams,
                                                     model=model,
                                                     config=config,
                                                     spec=spec)
  state = generalist_update(state.replace(experts=experts),
                            weights=tables["weights"][t],
                            redistribute=tables["redistribute"][t],
                            config=config)
  return state, metrics


def schedule_arrays(config: Config, steps_per_epoch: int) -> dict[str, Any]:
  """The traced inputs of `train_step`: the schedule tables (`schedules.build_schedules`), each
  adversarial expert's `eps` and `step_size` (under `experts[role]`) and `trades_beta`."""
  tables = jax.tree_util.tree_map(jnp.asarray, build_schedules(config, steps_per_epoch))
  for spec in config.expert_specs:
    if spec.adversarial:
      tables["experts"][spec.role].update(eps=jnp.float32(spec.eps),
                                          step_size=jnp.float32(spec.step_size))
  tables["trades_beta"] = jnp.float32(config.trades_beta)
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


def _batch_train_step(state, totals, images, labels, key, tables, *, model, config):
  """Runs `train_step` on one global batch with this step's key, and adds up its metrics."""
  step_key = jax.random.fold_in(key, state.step)
  state, metrics = train_step(state, images, labels, step_key, tables, model=model, config=config)
  totals = jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), totals, metrics)
  return state, totals


def make_train_step(config: Config, model: nn.Module):
  """The jitted training step of the project, with the state and the totals donated.

  The batch is an argument (not gathered inside from a device-resident training set) so that
  each process of a multi-host job supplies only the rows its devices hold and no device keeps
  the whole data set; feeding it from the host costs nothing measurable against the former
  on-device gather (`experiments/bench.py --feed`).

  Returns:
    `step_fn(state, totals, images, labels, key, tables) -> (state, totals)`: one global batch
    (uint8 images, int32 labels, laid out by `parallel.global_batch`; the step computes in that
    layout, with BatchNorm statistics, augmentation and attack noise of the global batch), the
    run's training key (the step uses `fold_in(key, state.step)`) and the schedule `tables` of
    `schedule_arrays` (arguments, not constants: one compiled program serves any values).
  """
  return jax.jit(functools.partial(_batch_train_step, model=model, config=config),
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
