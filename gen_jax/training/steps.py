"""Training state and the pure per-batch functions of Generalist.

Each expert has its own state and its own pure step; the Generalist update mixes them:

    x = augment(key, uint8 batch)
    nat, m_nat = natural_train_step(nat, x, y, lr_nat)                  # clean data, train mode
    rob, m_rob = robust_train_step(rob, x, y, key, lr_rob, eps, ...)    # PGD (inference-mode BN)
    state = generalist_update(state with nat, rob, beta_t, redistribute_t)

`train_step` composes them for one batch, and `make_train_step` jits it with the state donated.
Every hyper-parameter that a schedule may change (learning rates, β, the redistribution flag,
eps and step sizes) reaches the compiled function as a traced argument, so nothing recompiles.

Synopsis::

    state = create_train_state(config, model, key, image_shape=(32, 32, 3), num_classes=10,
                               total_steps=T)
    step_fn = make_train_step(config, model, steps_per_epoch=S)
    state, metrics = step_fn(state, images_uint8, labels, key)

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
import numpy as np
import optax

from gen_jax import attacks, mixing
from gen_jax.config import Config
from gen_jax.data.augment import augment_batch
from gen_jax.models import init_variables
from gen_jax.training import losses
from gen_jax.training.schedules import build_schedules

Variables = dict[str, Any]  # {"params": ..., "batch_stats": ...}


@flax.struct.dataclass
class ExpertState:
  """One expert: its variables (parameters and BatchNorm statistics) and optimiser state."""
  variables: Variables
  opt_state: optax.OptState


@flax.struct.dataclass
class GeneralistState:
  """Everything a run carries from step to step (and checkpoints)."""
  step: jax.Array  # global optimiser step, int32
  nat: ExpertState
  rob: ExpertState
  teacher_nat: Variables  # EMA of the natural expert
  teacher_rob: Variables  # EMA of the robust expert
  mix: Variables  # the global model

  def models(self) -> dict[str, Variables]:
    """The three models that are evaluated, keyed as in `summary.json`."""
    return {"natural": self.teacher_nat, "robust": self.teacher_rob, "global": self.mix}


def _sgd(learning_rate, momentum, weight_decay):
  # PyTorch SGD semantics: weight decay is added to the gradient before the momentum buffer.
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum))


def make_optimizer(config: Config, role: str) -> optax.GradientTransformation:
  """SGD with momentum and weight decay, the learning rate injected so a schedule can set it."""
  weight_decay = config.weight_decay_nat if role == "nat" else config.weight_decay_rob
  lr = config.lr_nat if role == "nat" else config.lr_rob
  return optax.inject_hyperparams(_sgd)(learning_rate=lr,
                                        momentum=config.momentum,
                                        weight_decay=weight_decay)


def _set_lr(opt_state, lr):
  return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})


def create_train_state(config: Config,
                       model: nn.Module,
                       key: jax.Array,
                       *,
                       image_shape: tuple[int, int, int],
                       num_classes: int | None = None,
                       total_steps: int | None = None) -> GeneralistState:
  """Initialises both experts from the SAME weights (as the reference), teachers and global too.

  Args:
    config: the run's configuration (optimisers).
    model: the linen module.
    key: PRNG key for the initial weights.
    image_shape: (H, W, C) of one image.
    num_classes: unused (the model carries it); accepted for call-site clarity.
    total_steps: unused (schedules are separate tables); accepted for call-site clarity.
  """
  del num_classes, total_steps
  variables = init_variables(model, key, image_shape)
  # Distinct buffers for every copy: the state is donated to the jitted step.
  copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)
  experts = {
      role:
          ExpertState(variables=copy(variables),
                      opt_state=make_optimizer(config, role).init(variables["params"]))
      for role in ("nat", "rob")
  }
  return GeneralistState(step=jnp.zeros((), jnp.int32),
                         nat=experts["nat"],
                         rob=experts["rob"],
                         teacher_nat=copy(variables),
                         teacher_rob=copy(variables),
                         mix=copy(variables))


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
  return (_apply_update(state, grads, lr, config, "nat",
                        new_stats), _accuracy_metrics(logits, y, loss))


def adversarial_examples(variables: Variables, x: jax.Array, y: jax.Array, key: jax.Array,
                         hparams: dict[str, jax.Array], *, model: nn.Module,
                         config: Config) -> jax.Array:
  """The robust expert's training adversary: PGD (Madry) or the TRADES KL attack.

  Runs the model with BatchNorm in inference mode, as the reference code's attacker does.
  """
  logits_fn = lambda z: model.apply(variables, z, train=False)
  if config.uses_trades:
    x_adv = losses.trades_attack(logits_fn,
                                 x,
                                 key=key,
                                 eps=hparams["eps"],
                                 step_size=hparams["step_size"],
                                 steps=config.pgd_steps)
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
  return (_apply_update(state, grads, hparams["lr_rob"], config, "rob",
                        new_stats), _accuracy_metrics(logits, y, loss))


def generalist_update(state: GeneralistState, *, beta: jax.Array, redistribute: jax.Array,
                      config: Config) -> GeneralistState:
  """EMA teachers, the global model and redistribution, after both experts have stepped.

  With d_t = min(decay, (t + 1) / (t + 10)) (t = updates made so far):
    teacher_nat <- EMA(natural expert), teacher_rob <- EMA(robust expert),
    global <- d_t * global + (1 - d_t) * (β_t * teacher_rob + (1 - β_t) * teacher_nat),
  all over parameters AND BatchNorm statistics; then, when `redistribute`, both experts'
  variables are overwritten with the global model's (optimiser momentum is kept).
  For a single-expert method, its teacher is the global model.
  """
  decay = mixing.ema_decay(state.step, config.ema_decay)
  teacher_nat, teacher_rob, mix = state.teacher_nat, state.teacher_rob, state.mix
  if "nat" in config.experts:
    teacher_nat = mixing.ema_update(teacher_nat, state.nat.variables, decay)
  if "rob" in config.experts:
    teacher_rob = mixing.ema_update(teacher_rob, state.rob.variables, decay)
  if config.method == "generalist":
    target = mixing.mix(teacher_nat, teacher_rob, beta)
    mix = mixing.ema_update(mix, target, decay)
    select = lambda glob, own: jax.tree_util.tree_map(lambda g, o: jnp.where(redistribute, g, o),
                                                      glob, own)
    nat = state.nat.replace(variables=select(mix, state.nat.variables))
    rob = state.rob.replace(variables=select(mix, state.rob.variables))
  else:
    nat, rob = state.nat, state.rob
    mix = teacher_nat if config.method == "natural" else teacher_rob
  return state.replace(step=state.step + 1,
                       nat=nat,
                       rob=rob,
                       teacher_nat=teacher_nat,
                       teacher_rob=teacher_rob,
                       mix=mix)


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
    The state at t + 1 and per-expert metric sums (`loss_sum`, `correct`, `count`).
  """
  aug_key, attack_key = jax.random.split(key)
  x = augment_batch(aug_key, images, pad=config.crop_padding, flip=_flip(config))
  t = jnp.minimum(state.step, tables["beta"].shape[0] - 1)
  metrics = {}
  nat, rob = state.nat, state.rob
  if "nat" in config.experts:
    nat, metrics["nat"] = natural_train_step(nat,
                                             x,
                                             labels,
                                             tables["lr_nat"][t],
                                             model=model,
                                             config=config)
  if "rob" in config.experts:
    hparams = {
        "lr_rob": tables["lr_rob"][t],
        "eps": tables["eps"],
        "step_size": tables["step_size"],
        "trades_beta": tables["trades_beta"]
    }
    rob, metrics["rob"] = robust_train_step(rob,
                                            x,
                                            labels,
                                            attack_key,
                                            hparams,
                                            model=model,
                                            config=config)
  state = generalist_update(state.replace(nat=nat, rob=rob),
                            beta=tables["beta"][t],
                            redistribute=tables["redistribute"][t],
                            config=config)
  return state, metrics


def _flip(config: Config) -> bool:
  if config.flip is not None:
    return config.flip
  return config.dataset not in ("digits", "svhn_cropped", "svhn")


def schedule_arrays(config: Config, steps_per_epoch: int) -> dict[str, jax.Array]:
  """The traced inputs of `train_step`: schedule tables plus the attack's scalars."""
  tables = {k: jnp.asarray(v) for k, v in build_schedules(config, steps_per_epoch).items()}
  tables.update(eps=jnp.float32(config.eps),
                step_size=jnp.float32(config.step_size),
                trades_beta=jnp.float32(config.trades_beta))
  return tables


def make_train_step(config: Config,
                    model: nn.Module,
                    *,
                    steps_per_epoch: int | None = None,
                    total_steps: int | None = None):
  """Jits `train_step` with the state donated; returns `step_fn(state, images, labels, key)`.

  The schedule tables are passed as arguments of the compiled function (not baked in as
  constants), so one compiled program serves any schedule values.
  """
  if steps_per_epoch is None:
    steps_per_epoch = max(1, (total_steps or config.epochs) // config.epochs)
  tables = schedule_arrays(config, steps_per_epoch)
  jitted = jax.jit(functools.partial(train_step, model=model, config=config), donate_argnums=0)

  def step_fn(state, images, labels, key):
    return jitted(state, images, labels, key, tables)

  return step_fn
