"""Training losses: cross-entropy and the TRADES objective.

Synopsis::

    loss = cross_entropy(logits, labels).mean()
    loss = trades_objective(logits_nat, logits_adv, labels, beta=6.0)

The TRADES adversary is `gen_jax.attacks.trades_attack` (the PGD engine on the KL loss); its KL
divergence, `gen_jax.attacks.kl_loss`, is the one this objective adds.

References:
  Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy" (TRADES),
  ICML 2019.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gen_jax.attacks.core import kl_loss


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels (computed in float32)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def trades_objective(logits_nat: jax.Array, logits_adv: jax.Array, labels: jax.Array, *,
                     beta: float | jax.Array) -> jax.Array:
  """Mean TRADES loss `CE(f(x), y) + beta * KL(f(x) || f(x_adv))` over the batch."""
  return cross_entropy(logits_nat, labels).mean() + beta * kl_loss(logits_adv, logits_nat).mean()
