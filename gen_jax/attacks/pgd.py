"""The PGD family: FGSM, PGD (CE / CW margin / DLR, L-inf / L2, restarts), MIM, CW-inf and TRADES.

All five share one engine: gradient steps on the summed per-example loss (sign steps for L-inf,
L2-normalised steps for L2), each followed by the projection onto the eps-ball and the [0, 1] box,
as a `lax.fori_loop`. `eps` and `step_size` may be traced (the training step calls `pgd` inside
`jax.jit` without recompiling when they change); `steps`, `restarts`, `norm` and `loss` are static.

These attacks return the last iterate for the examples they do not fool (Madry et al.: that is the
point adversarial training needs); with restarts, each example keeps its first successful restart,
else the last one.

Synopsis::

    from gen_jax import attacks
    x_adv = attacks.pgd(logits_fn, x, y, key=key, eps=8 / 255, step_size=2 / 255, steps=10)
    x_adv = attacks.pgd(logits_fn, x, y, key=key, eps=0.5, norm="l2", steps=20, restarts=5)
    x_adv = attacks.mim(logits_fn, x, y, key=key, eps=8 / 255, step_size=2 / 255, steps=20)
    x_adv = attacks.cw(logits_fn, x, y, key=key, eps=8 / 255, step_size=2 / 255, steps=30)
    x_adv = attacks.fgsm(logits_fn, x, y, eps=8 / 255)
    x_adv = attacks.trades_attack(logits_fn, x, key=key, eps=8 / 255, step_size=2 / 255, steps=10)

References:
  Goodfellow et al., "Explaining and Harnessing Adversarial Examples", ICLR 2015,
  https://arxiv.org/abs/1412.6572
  Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018,
  https://arxiv.org/abs/1706.06083
  Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018,
  https://arxiv.org/abs/1710.06081
  Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", S&P 2017,
  https://arxiv.org/abs/1608.04644
  Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019,
  https://arxiv.org/abs/1901.08573
"""
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from gen_jax.attacks import core

LogitsFn = Callable[[jax.Array], jax.Array]

# Where the ascent starts: the clean image, a uniform point of the ball (Madry), or the clean image
# plus 0.001 * N(0, 1) noise (the TRADES code).
STARTS = ("none", "uniform", "normal")
_TRADES_NOISE = 0.001


def _start(key, x, eps, norm, start):
  if start == "uniform":
    return core.random_start(key, x, eps, norm)
  if start == "normal":
    return core.project(x + _TRADES_NOISE * core.noise(key, x, "normal"), x, eps, norm)
  return x


def _pgd_engine(logits_fn: jax.tree_util.Partial, x: jax.Array, y: jax.Array, key: jax.Array,
                eps: jax.Array, step_size: jax.Array, *, steps: int, norm: str, loss: str,
                start: str, restarts: int, decay: Optional[float]) -> jax.Array:
  """Projected gradient ascent on `loss(logits, y)`; `decay` set turns it into MIM.

  `y` is the loss's target: labels, or the clean logits for the "kl" loss. `key` is one key, or
  one per example ([B]: each example's start and restarts then come from its own key alone). See
  `pgd`, `mim`, `trades_attack`.
  """
  loss_fn = core.get_loss_fn(loss)
  grad_fn = jax.grad(lambda xa: jnp.sum(loss_fn(logits_fn(xa), y)))
  step = core._per_example(step_size, x)  # pylint: disable=protected-access

  def one_run(run_key):
    x0 = _start(run_key, x, eps, norm, start)

    def body(_, carry):
      xa, velocity = carry
      g = grad_fn(xa)
      if decay is not None:
        # MIM: accumulate L1-normalised gradients, so every step weighs the history the same.
        g_l1 = jnp.sum(jnp.abs(g), axis=tuple(range(1, g.ndim)), keepdims=True)
        velocity = decay * velocity + g / (g_l1 + 1e-12)
        g = velocity
      direction = jnp.sign(g) if norm == "linf" else core.normalize(g, "l2")
      return core.project(xa + step * direction, x, eps, norm), velocity

    xa, _ = jax.lax.fori_loop(0, steps, body, (x0, jnp.zeros_like(x)))
    return xa

  if restarts == 1:
    x_adv = one_run(key)
  else:

    def restart(carry, run_key):
      best, found = carry
      xr = one_run(run_key)
      fooled = jnp.argmax(logits_fn(xr), axis=1) != y
      # Keep the first successful restart; until one succeeds, follow the latest.
      best = jnp.where(found[:, None, None, None], best, xr)
      return (best, found | fooled), None

    init = (x, jnp.zeros(x.shape[:1], bool))
    (x_adv, _), _ = jax.lax.scan(restart, init, core.split_keys(key, restarts))
  # The final projection makes the ball and box constraints hold whatever happened above.
  x_adv = core.project(x_adv, x, eps, norm)
  return jax.lax.stop_gradient(x_adv).astype(x.dtype)


_pgd_engine_jit = jax.jit(_pgd_engine,
                          static_argnames=("steps", "norm", "loss", "start", "restarts", "decay"))


def _run(logits_fn, x, y, key, eps, step_size, *, steps, norm, loss, random_start, restarts, decay):
  """Validates (eagerly, concrete values only), then runs the jitted engine."""
  num_classes_needed = 3 if loss == "dlr" else 2
  core.get_loss_fn(loss)
  core.check_positive_int("restarts", restarts)
  core.validate_attack_inputs(logits_fn,
                              x,
                              y,
                              eps=eps,
                              steps=steps,
                              norm=norm,
                              min_classes=num_classes_needed)
  if step_size is None:
    step_size = eps / 4
  core.check_eps("step_size", step_size)
  if key is None:
    if random_start or restarts > 1:
      raise ValueError("key is required when random_start=True or restarts > 1; pass "
                       "key=jax.random.key(seed).")
    key = jax.random.key(0)  # unused: the attack is deterministic.
  # Under an outer trace a nested jit adds nothing, and its cache would keep the caller's tracers
  # (closed over by logits_fn) alive: call the plain function there.
  engine = _pgd_engine_jit if core.is_concrete((x, y, key, eps, step_size)) else _pgd_engine
  return engine(core.as_pytree_fn(logits_fn),
                x,
                y,
                key,
                jnp.asarray(eps),
                jnp.asarray(step_size),
                steps=steps,
                norm=norm,
                loss=loss,
                start="uniform" if random_start else "none",
                restarts=restarts,
                decay=decay)


def pgd(logits_fn: LogitsFn,
        x: jax.Array,
        y: jax.Array,
        *,
        key: Optional[jax.Array],
        eps: Any,
        step_size: Any = None,
        steps: int = 10,
        norm: str = "linf",
        loss: str = "ce",
        random_start: bool = True,
        restarts: int = 1) -> jax.Array:
  """Projected gradient descent (Madry et al.) on the CE, CW-margin or DLR loss.

  Starts at x + U(-eps, eps) (L-inf) or at a random point of the L2 sphere of radius eps, both
  clipped to [0, 1]; then `steps` times: x <- P(x + step_size * sign(grad)) (L-inf) or
  x <- P(x + step_size * grad / ||grad||_2) (L2), where P projects onto the ball and the box.

  Args:
    logits_fn: `x -> logits [B, C]`, jit-able.
    x: clean images [B, H, W, C] in [0, 1].
    y: integer labels [B].
    key: PRNG key of the random start(s) (may be None only without random start and restarts),
      or one key per example ([B] typed keys): example i then starts from its key i alone, the
      same in any batch (`gen_jax.evaluation.engine` evaluates this way).
    eps: radius of the ball (may be traced); scalar or [B].
    step_size: step length (may be traced); default eps / 4.
    steps: iterations (static, >= 1).
    norm: "linf" or "l2" (static).
    loss: "ce" (cross-entropy), "cw" (margin max_{i!=y} z_i - z_y) or "dlr" (static).
    random_start: start from a random point of the ball instead of `x`.
    restarts: independent runs (static); each example keeps its first successful run, else the
      last one.

  Returns:
    Adversarial images, same shape and dtype as `x`, inside the ball and the box.

  Raises:
    ValueError, TypeError: for bad input (see `core.validate_attack_inputs`), a negative
      `step_size`, `restarts` < 1, an unknown loss, or a missing `key`.

  References:
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
  """
  return _run(logits_fn,
              x,
              y,
              key,
              eps,
              step_size,
              steps=steps,
              norm=norm,
              loss=loss,
              random_start=random_start,
              restarts=restarts,
              decay=None)


def fgsm(logits_fn: LogitsFn,
         x: jax.Array,
         y: jax.Array,
         *,
         key: Optional[jax.Array] = None,
         eps: Any,
         norm: str = "linf",
         loss: str = "ce") -> jax.Array:
  """Fast gradient sign method: one step of length `eps` from `x` (deterministic; `key` unused).

  Args:
    logits_fn: `x -> logits [B, C]`, jit-able.
    x: clean images [B, H, W, C] in [0, 1].
    y: integer labels [B].
    key: accepted for the common attack signature; FGSM uses no randomness.
    eps: radius (may be traced).
    norm: "linf" (sign step) or "l2" (normalised gradient step).
    loss: "ce", "cw" or "dlr".

  Returns:
    Adversarial images, same shape and dtype as `x`.

  Raises:
    ValueError, TypeError: for bad input.

  References:
    Goodfellow et al., "Explaining and Harnessing Adversarial Examples", ICLR 2015.
  """
  return _run(logits_fn,
              x,
              y,
              key,
              eps,
              eps,
              steps=1,
              norm=norm,
              loss=loss,
              random_start=False,
              restarts=1,
              decay=None)


def mim(logits_fn: LogitsFn,
        x: jax.Array,
        y: jax.Array,
        *,
        key: Optional[jax.Array] = None,
        eps: Any,
        step_size: Any = None,
        steps: int = 10,
        norm: str = "linf",
        loss: str = "ce",
        decay: float = 1.0,
        random_start: bool = False) -> jax.Array:
  """Momentum iterative method (MI-FGSM): PGD steps along an accumulated L1-normalised gradient.

  g <- decay * g + grad / ||grad||_1;  x <- P(x + step_size * sign(g)) (L-inf) or
  P(x + step_size * g / ||g||_2) (L2). Starts at `x` as the original (and torchattacks' MIFGSM).

  Args:
    logits_fn: `x -> logits [B, C]`, jit-able.
    x: clean images [B, H, W, C] in [0, 1].
    y: integer labels [B].
    key: PRNG key, or one per example ([B], as in `pgd`); needed only with `random_start=True`.
    eps: radius (may be traced).
    step_size: step length (may be traced); default eps / 4.
    steps: iterations (static).
    norm: "linf" or "l2".
    loss: "ce", "cw" or "dlr".
    decay: momentum decay factor mu (static; 1.0 as in the paper).
    random_start: start from a random point of the ball.

  Returns:
    Adversarial images, same shape and dtype as `x`.

  Raises:
    ValueError, TypeError: for bad input.

  References:
    Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018.
  """
  return _run(logits_fn,
              x,
              y,
              key,
              eps,
              step_size,
              steps=steps,
              norm=norm,
              loss=loss,
              random_start=random_start,
              restarts=1,
              decay=float(decay))


def cw(logits_fn: LogitsFn,
       x: jax.Array,
       y: jax.Array,
       *,
       key: Optional[jax.Array],
       eps: Any,
       step_size: Any = None,
       steps: int = 30,
       norm: str = "linf",
       random_start: bool = True,
       restarts: int = 1) -> jax.Array:
  """CW-inf as used in robustness papers: PGD on the margin loss max_{i!=y} z_i - z_y.

  Args:
    logits_fn: `x -> logits [B, C]`, jit-able.
    x: clean images [B, H, W, C] in [0, 1].
    y: integer labels [B].
    key: PRNG key of the random start(s), or one per example ([B], as in `pgd`).
    eps: radius (may be traced).
    step_size: step length (may be traced); default eps / 4.
    steps: iterations (static).
    norm: "linf" or "l2".
    random_start: start from a random point of the ball.
    restarts: independent runs; each example keeps its first successful run.

  Returns:
    Adversarial images, same shape and dtype as `x`.

  Raises:
    ValueError, TypeError: for bad input.

  References:
    Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", S&P 2017.
  """
  return _run(logits_fn,
              x,
              y,
              key,
              eps,
              step_size,
              steps=steps,
              norm=norm,
              loss="cw",
              random_start=random_start,
              restarts=restarts,
              decay=None)


def trades_attack(logits_fn: LogitsFn,
                  x: jax.Array,
                  *,
                  key: jax.Array,
                  eps: Any,
                  step_size: Any,
                  steps: int,
                  norm: str = "linf") -> jax.Array:
  """The TRADES training adversary: the PGD engine ascending KL(p(x) || p(x')).

  Starts at x + 0.001 * N(0, 1) (projected), as the TRADES code does, and needs no labels: the
  target is the model's own clean prediction. Called inside the jitted training step, so nothing
  is validated eagerly here.

  Args:
    logits_fn: the model in inference mode (BatchNorm running statistics), as in TRADES.
    x: clean images [B, H, W, C] in [0, 1].
    key: PRNG key of the Gaussian start.
    eps: radius (may be traced).
    step_size: step length (may be traced).
    steps: iterations (static).
    norm: "linf" (the TRADES setting) or "l2".

  Returns:
    Adversarial images in the ball around `x` and in [0, 1], gradients stopped.

  References:
    Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019.
  """
  clean_logits = jax.lax.stop_gradient(logits_fn(x))
  return _pgd_engine(core.as_pytree_fn(logits_fn),
                     x,
                     clean_logits,
                     key,
                     jnp.asarray(eps),
                     jnp.asarray(step_size),
                     steps=steps,
                     norm=norm,
                     loss="kl",
                     start="normal",
                     restarts=1,
                     decay=None)
