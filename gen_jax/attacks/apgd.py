"""Auto-PGD: APGD-CE, APGD-DLR (`apgd`) and APGD-T on the targeted DLR loss (`apgd_targeted`).

A faithful JAX port of the protocol of the reference AutoAttack (settings in
`gen_jax.attacks.settings.DEFAULTS.apgd` / `.apgd_t`): step size 2 * eps, momentum 0.75 after the
first step, step-size checkpoints (`apgd_checkpoints`) at which the step is halved for the points
whose loss rose in at most rho = 75 % of the steps since the previous checkpoint, or whose best loss
did not improve while their step was not reduced at the previous checkpoint; those points restart
from their best point. Per example, the best loss and the latest adversarial point are tracked. The
iterations are a `lax.fori_loop`, restarts and target classes a `lax.scan`, all in one jit program.

Examples the attack does not fool keep their clean input (as the reference); every returned point
lies in the eps-ball and the [0, 1] box.

Synopsis::

    from gen_jax import attacks
    x_adv = attacks.apgd(logits_fn, x, y, key=key, eps=8 / 255)              # APGD-CE
    x_adv = attacks.apgd(logits_fn, x, y, key=key, eps=8 / 255, loss="dlr")  # APGD-DLR
    x_adv = attacks.apgd_targeted(logits_fn, x, y, key=key, eps=0.5, norm="l2")  # APGD-T
    attacks.apgd_checkpoints(100)  # [0, 22, 41, 57, 70, 80, 87, 93, 99]

For randomised models (`randomized=True`), `logits_fn(x, key)` takes a PRNG key and the gradient
is averaged over `eot_iter` samples (Expectation over Transformation).

References:
  Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690
  Athalye et al., "Obfuscated Gradients Give a False Sense of Security", ICML 2018 (EOT),
  https://arxiv.org/abs/1802.00420
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gen_jax.attacks import core
from gen_jax.attacks.settings import DEFAULTS

LogitsFn = Callable[..., jax.Array]


def apgd_checkpoints(steps: int,
                     first: float = DEFAULTS.apgd.first_checkpoint,
                     decrease: float = DEFAULTS.apgd.checkpoint_decrease,
                     minimum: float = DEFAULTS.apgd.min_checkpoint_interval) -> list[int]:
  """APGD's step-size checkpoints, as numbers of completed iterations, starting with 0.

  The first interval is int(first * steps); each later one shrinks by int(decrease * steps), down
  to int(minimum * steps) (each at least 1), as in the reference implementation. A checkpoint at
  `steps` itself would not change the result and is omitted.

  Args:
    steps: iterations of the run (>= 1).
    first: first checkpoint as a fraction of `steps` (0.22).
    decrease: shrinkage of the interval per checkpoint as a fraction of `steps` (0.03).
    minimum: smallest interval as a fraction of `steps` (0.06).

  Returns:
    [0, w_1, w_2, ...]: for steps = 100, [0, 22, 41, 57, 70, 80, 87, 93, 99].

  Raises:
    TypeError, ValueError: if `steps` is not an int >= 1.

  References:
    Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690 (section 3.2).
  """
  core.check_positive_int("steps", steps)
  interval = max(int(first * steps), 1)
  min_interval = max(int(minimum * steps), 1)
  shrink = max(int(decrease * steps), 1)
  points, done = [0], interval
  while done < steps:
    points.append(done)
    interval = max(interval - shrink, min_interval)
    done += interval
  return points


def _schedule_arrays(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Per iteration i: whether a checkpoint follows it, and the length of the window it closes."""
  points = apgd_checkpoints(steps)
  is_check = np.zeros(steps, bool)
  window = np.ones(steps, np.float32)
  for prev, cur in zip(points[:-1], points[1:]):
    is_check[cur - 1] = True
    window[cur - 1] = cur - prev
  return is_check, window


def _single_run(logits_fn, x, y, target, key, eps, *, steps, norm, loss, rho, momentum,
                step_size_factor, eot_iter, randomized):
  """One APGD run from a random start; per example: (latest adversarial point, still correct)."""
  if loss == "ce":
    loss_fn = lambda z: core.ce_loss(z, y)
  elif loss == "dlr":
    loss_fn = lambda z: core.dlr_loss(z, y)
  else:
    loss_fn = lambda z: core.dlr_targeted_loss(z, y, target)

  def summed(xa, sample_key):
    z = logits_fn(xa, sample_key) if randomized else logits_fn(xa)
    per_example = loss_fn(z)
    return jnp.sum(per_example), (per_example, z)

  grad_fn = jax.grad(summed, has_aux=True)

  def loss_and_grad(xa, step_key):
    if eot_iter == 1:
      g, (per_example, z) = grad_fn(xa, step_key)
      return per_example, z, g

    def sample(g_sum, sample_key):
      g, aux = grad_fn(xa, sample_key)
      return g_sum + g, aux

    keys = jax.random.split(step_key, eot_iter)
    g_sum, (per_examples, zs) = jax.lax.scan(sample, jnp.zeros_like(xa), keys)
    # The reference reports the loss and logits of the last sample and the mean gradient.
    return per_examples[-1], zs[-1], g_sum / eot_iter

  def step_project(xa):
    return core.project(xa, x, eps, norm)

  start_key, loop_key = jax.random.split(key)
  eps_b = core._per_example(eps, x)  # pylint: disable=protected-access
  if norm == "linf":
    t = jax.random.uniform(start_key, x.shape, x.dtype, -1.0, 1.0)
    x_adv = x + eps_b * core.normalize(t, "linf")
  else:
    t = jax.random.normal(start_key, x.shape, x.dtype)
    x_adv = x + eps_b * core.normalize(t, "l2")
  x_adv = jnp.clip(x_adv, 0.0, 1.0)
  per_example, z, grad = loss_and_grad(x_adv, jax.random.fold_in(loop_key, steps))
  batch = x.shape[0]
  eps_vec = jnp.broadcast_to(jnp.asarray(eps, x.dtype), (batch,))
  is_check, window = _schedule_arrays(steps)
  is_check, window = jnp.asarray(is_check), jnp.asarray(window)
  state = dict(
      x_adv=x_adv,
      x_adv_old=x_adv,
      grad=grad,
      step=step_size_factor * eps_vec,
      x_best=x_adv,
      grad_best=grad,
      loss_best=per_example,
      correct=jnp.argmax(z, axis=1) == y,
      x_best_adv=x_adv,
      # The reference's first oscillation window compares the first loss with an unwritten (zero)
      # entry of its loss history; starting the previous loss at 0 reproduces that.
      loss_prev=jnp.zeros_like(per_example),
      n_increase=jnp.zeros_like(per_example),
      loss_best_last_check=per_example,
      reduced_last_check=jnp.ones((batch,), bool),
  )

  def body(i, s):
    b = lambda v: v.reshape((-1,) + (1,) * (x.ndim - 1))
    a = jnp.where(i > 0, momentum, 1.0).astype(x.dtype)
    last_move = s["x_adv"] - s["x_adv_old"]
    x_cur = s["x_adv"]
    direction = jnp.sign(s["grad"]) if norm == "linf" else core.normalize(s["grad"], "l2")
    z_step = step_project(x_cur + b(s["step"]) * direction)
    x_new = step_project(x_cur + (z_step - x_cur) * a + last_move * (1 - a))
    per_example, z, grad = loss_and_grad(x_new, jax.random.fold_in(loop_key, i))
    correct_now = jnp.argmax(z, axis=1) == y
    x_best_adv = jnp.where(b(~correct_now), x_new, s["x_best_adv"])
    improved = per_example > s["loss_best"]
    x_best = jnp.where(b(improved), x_new, s["x_best"])
    grad_best = jnp.where(b(improved), grad, s["grad_best"])
    loss_best = jnp.where(improved, per_example, s["loss_best"])
    n_increase = s["n_increase"] + (per_example > s["loss_prev"]).astype(per_example.dtype)
    check = is_check[i]
    oscillating = n_increase <= window[i] * rho
    no_improvement = (~s["reduced_last_check"]) & (s["loss_best_last_check"] >= loss_best)
    halve = check & (oscillating | no_improvement)
    return dict(
        x_adv=jnp.where(b(halve), x_best, x_new),
        x_adv_old=x_cur,
        grad=jnp.where(b(halve), grad_best, grad),
        step=jnp.where(halve, s["step"] / 2, s["step"]),
        x_best=x_best,
        grad_best=grad_best,
        loss_best=loss_best,
        correct=s["correct"] & correct_now,
        x_best_adv=x_best_adv,
        loss_prev=per_example,
        n_increase=jnp.where(check, 0.0, n_increase),
        loss_best_last_check=jnp.where(check, loss_best, s["loss_best_last_check"]),
        reduced_last_check=jnp.where(check, halve, s["reduced_last_check"]),
    )

  state = jax.lax.fori_loop(0, steps, body, state)
  return state["x_best_adv"], state["correct"]


def _apgd_engine(logits_fn, x, y, key, eps, *, steps, norm, loss, restarts, n_targets, rho,
                 momentum, step_size_factor, eot_iter, randomized):
  """Runs (targets x restarts) APGD runs, each merged into the points that are still robust."""
  clean_key, runs_key = jax.random.split(key)
  z_clean = logits_fn(x, clean_key) if randomized else logits_fn(x)
  robust = jnp.argmax(z_clean, axis=1) == y
  n_targets_eff = n_targets if n_targets else 1
  if n_targets:
    # Target of run t: the (t + 2)-th highest clean logit (the reference's sort order).
    order = jnp.argsort(z_clean, axis=1)
    targets = jnp.stack([order[:, -(t + 2)] for t in range(n_targets)])
  else:
    targets = jnp.zeros((1,) + y.shape, y.dtype)
  targets = jnp.repeat(targets, restarts, axis=0)
  keys = jax.random.split(runs_key, n_targets_eff * restarts)

  def run(carry, inputs):
    adv, robust = carry
    target, run_key = inputs
    x_best_adv, correct = _single_run(logits_fn,
                                      x,
                                      y,
                                      target,
                                      run_key,
                                      eps,
                                      steps=steps,
                                      norm=norm,
                                      loss=loss,
                                      rho=rho,
                                      momentum=momentum,
                                      step_size_factor=step_size_factor,
                                      eot_iter=eot_iter,
                                      randomized=randomized)
    fooled = robust & ~correct
    adv = jnp.where(fooled[:, None, None, None], x_best_adv, adv)
    return (adv, robust & ~fooled), None

  (adv, _), _ = jax.lax.scan(run, (x, robust), (targets, keys))
  adv = core.project(adv, x, eps, norm)
  return jax.lax.stop_gradient(adv).astype(x.dtype)


_apgd_engine_jit = jax.jit(_apgd_engine,
                           static_argnames=("steps", "norm", "loss", "restarts", "n_targets", "rho",
                                            "momentum", "step_size_factor", "eot_iter",
                                            "randomized"))


def _engine(x, y, key, eps):
  """The jitted engine for concrete inputs; the plain one under an outer trace (see pgd.py)."""
  return _apgd_engine_jit if core.is_concrete((x, y, key, eps)) else _apgd_engine


def _validate(logits_fn, x, y, key, eps, steps, norm, restarts, rho, eot_iter, randomized,
              min_classes):
  if key is None:
    raise ValueError("key is required (APGD starts from a random point); pass "
                     "key=jax.random.key(seed).")
  core.check_positive_int("restarts", restarts)
  core.check_positive_int("eot_iter", eot_iter)
  if not 0.0 <= float(rho) <= 1.0:
    raise ValueError(f"rho must lie in [0, 1], got {rho}.")
  if eot_iter > 1 and not randomized:
    raise ValueError("eot_iter > 1 averages over the randomness of the model: pass "
                     "randomized=True and a logits_fn(x, key).")
  check_fn = (lambda xx: logits_fn(xx, key)) if randomized else logits_fn
  return core.validate_attack_inputs(check_fn,
                                     x,
                                     y,
                                     eps=eps,
                                     steps=steps,
                                     norm=norm,
                                     min_classes=min_classes)


def apgd(logits_fn: LogitsFn,
         x: jax.Array,
         y: jax.Array,
         *,
         key: jax.Array,
         eps: Any,
         norm: str = "linf",
         loss: str = "ce",
         steps: int = DEFAULTS.apgd.steps,
         restarts: int = DEFAULTS.apgd.restarts,
         rho: float = DEFAULTS.apgd.rho,
         eot_iter: int = DEFAULTS.apgd.eot_iter,
         randomized: bool = False) -> jax.Array:
  """APGD-CE / APGD-DLR (untargeted), with the settings of the reference AutoAttack.

  Settings (`DEFAULTS.apgd`): 100 steps, 1 restart, rho 0.75, momentum 0.75, initial step 2 * eps,
  checkpoints `apgd_checkpoints(steps)`. The random start is x + eps * u / ||u|| (u uniform in
  [-1, 1] for L-inf, standard normal for L2), clipped to [0, 1].

  Args:
    logits_fn: `x -> logits [B, C]` (or `(x, key) -> logits` with `randomized=True`).
    x: clean images [B, H, W, C] in [0, 1].
    y: integer labels [B].
    key: PRNG key (random starts, EOT samples).
    eps: radius (may be traced).
    norm: "linf" or "l2".
    loss: "ce" (APGD-CE) or "dlr" (APGD-DLR, needs >= 3 classes).
    steps: iterations per restart (static).
    restarts: restarts (static); each example keeps its first successful restart.
    rho: oscillation threshold of the step-size rule.
    eot_iter: gradient samples per iteration for randomised models (the 'rand' version uses 20).
    randomized: whether `logits_fn` takes `(x, key)` and is random.

  Returns:
    Adversarial images (the clean input where the attack fails), shape and dtype of `x`.

  Raises:
    ValueError, TypeError: for bad input, an unknown loss, DLR with fewer than 3 classes,
      `restarts` or `eot_iter` < 1, rho outside [0, 1], a missing key.

  References:
    Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690
  """
  if loss not in ("ce", "dlr"):
    raise ValueError(f"loss must be 'ce' or 'dlr' (for the targeted DLR use apgd_targeted), got "
                     f"{loss!r}.")
  _validate(logits_fn,
            x,
            y,
            key,
            eps,
            steps,
            norm,
            restarts,
            rho,
            eot_iter,
            randomized,
            min_classes=3 if loss == "dlr" else 2)
  engine = _engine(x, y, key, eps)
  return engine(core.as_pytree_fn(logits_fn),
                x,
                y,
                key,
                jnp.asarray(eps),
                steps=steps,
                norm=norm,
                loss=loss,
                restarts=restarts,
                n_targets=0,
                rho=float(rho),
                momentum=DEFAULTS.apgd.momentum,
                step_size_factor=DEFAULTS.apgd.step_size_factor,
                eot_iter=eot_iter,
                randomized=bool(randomized))


def apgd_targeted(logits_fn: LogitsFn,
                  x: jax.Array,
                  y: jax.Array,
                  *,
                  key: jax.Array,
                  eps: Any,
                  norm: str = "linf",
                  steps: int = DEFAULTS.apgd_t.steps,
                  restarts: int = DEFAULTS.apgd_t.restarts,
                  n_target_classes: int = DEFAULTS.apgd_t.n_target_classes,
                  rho: float = DEFAULTS.apgd_t.rho,
                  eot_iter: int = DEFAULTS.apgd_t.eot_iter,
                  randomized: bool = False) -> jax.Array:
  """APGD-T: APGD on the targeted DLR loss, once per target class (the top non-first classes).

  Target class t = 1..n of each example is its (t + 1)-th highest clean logit; with C < 10
  classes, the number of targets is min(n_target_classes, C - 1). Settings (`DEFAULTS.apgd_t`):
  9 targets x 1 restart x 100 steps, rho 0.75, momentum 0.75, initial step 2 * eps.

  Args:
    logits_fn: `x -> logits [B, C]` with C >= 4 (or `(x, key) -> logits` if `randomized`).
    x: clean images [B, H, W, C] in [0, 1].
    y: integer labels [B].
    key: PRNG key.
    eps: radius (may be traced).
    norm: "linf" or "l2".
    steps: iterations per run (static).
    restarts: restarts per target class (static).
    n_target_classes: target classes (static, >= 1; capped at C - 1).
    rho: oscillation threshold of the step-size rule.
    eot_iter: gradient samples per iteration for randomised models.
    randomized: whether `logits_fn` takes `(x, key)` and is random.

  Returns:
    Adversarial images (the clean input where the attack fails), shape and dtype of `x`.

  Raises:
    ValueError, TypeError: for bad input, fewer than 4 classes, `n_target_classes` < 1.

  References:
    Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690
  """
  core.check_positive_int("n_target_classes", n_target_classes)
  num_classes = _validate(logits_fn,
                          x,
                          y,
                          key,
                          eps,
                          steps,
                          norm,
                          restarts,
                          rho,
                          eot_iter,
                          randomized,
                          min_classes=4)
  n_targets = min(n_target_classes, num_classes - 1)
  engine = _engine(x, y, key, eps)
  return engine(core.as_pytree_fn(logits_fn),
                x,
                y,
                key,
                jnp.asarray(eps),
                steps=steps,
                norm=norm,
                loss="dlr-targeted",
                restarts=restarts,
                n_targets=n_targets,
                rho=float(rho),
                momentum=DEFAULTS.apgd_t.momentum,
                step_size_factor=DEFAULTS.apgd_t.step_size_factor,
                eot_iter=eot_iter,
                randomized=bool(randomized))
