"""Training losses: cross-entropy and TRADES (its KL attack and its regularised objective).

Synopsis::

    loss = cross_entropy(logits, labels).mean()
    x_adv = trades_attack(logits_fn, x, key=key, eps=eps, step_size=step_size, steps=10)
    loss = trades_objective(logits_nat, logits_adv, labels, beta=6.0)

The TRADES attack lives here rather than in `gen_jax.attacks`: it is a training-time
component (it maximises the KL divergence to the model's own clean prediction, needs no labels
and is not an evaluation attack).

References:
  Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy" (TRADES),
  ICML 2019.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels (computed in float32)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def kl_to_clean(logits_adv: jax.Array, logits_nat: jax.Array) -> jax.Array:
  """Per-example KL(p_nat || p_adv), PyTorch's `KLDivLoss(log_softmax(adv), softmax(nat))`."""
  log_p_nat = jax.nn.log_softmax(logits_nat.astype(jnp.float32))
  log_p_adv = jax.nn.log_softmax(logits_adv.astype(jnp.float32))
  return jnp.sum(jnp.exp(log_p_nat) * (log_p_nat - log_p_adv), axis=-1)


def trades_attack(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, *, key: jax.Array,
                  eps: float | jax.Array, step_size: float | jax.Array, steps: int) -> jax.Array:
  """L-inf PGD on KL(p(x) || p(x')), started at x + 0.001 * N(0, 1) as in the TRADES code.

  Args:
    logits_fn: the model in inference mode (BatchNorm running statistics), as in TRADES.
    x: clean images in [0, 1], NHWC.
    key: PRNG key for the Gaussian start.
    eps: L-inf radius.
    step_size: sign-step size.
    steps: number of ascent steps (static).

  Returns:
    Adversarial images in the eps-ball around `x` and in [0, 1], with gradients stopped.
  """
  logits_nat = jax.lax.stop_gradient(logits_fn(x))

  def kl_sum(x_adv):
    return kl_to_clean(logits_fn(x_adv), logits_nat).sum()

  def body(_, x_adv):
    grad = jax.grad(kl_sum)(x_adv)
    x_adv = x_adv + step_size * jnp.sign(grad)
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)

  start = x + 0.001 * jax.random.normal(key, x.shape, x.dtype)
  start = jnp.clip(jnp.clip(start, x - eps, x + eps), 0.0, 1.0)
  return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, body, start))


def trades_objective(logits_nat: jax.Array, logits_adv: jax.Array, labels: jax.Array, *,
                     beta: float | jax.Array) -> jax.Array:
  """Mean TRADES loss `CE(f(x), y) + beta * KL(f(x) || f(x_adv))` over the batch."""
  return cross_entropy(logits_nat,
                       labels).mean() + beta * kl_to_clean(logits_adv, logits_nat).mean()
