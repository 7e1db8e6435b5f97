"""gen_jax: Generalist decoupled adversarial training in JAX/Flax.

A natural expert (clean data) and a robust expert (adversarial data) train side by side; their
parameters are averaged into one global model, which late in training is copied back into both.

Synopsis::

    import gen_jax
    global_vars = gen_jax.mix(vars_nat, vars_rob, beta=0.6)   # 0.6 * rob + 0.4 * nat
    avg = gen_jax.mix_many([v1, v2, v3], [0.2, 0.3, 0.5])
    x_adv = gen_jax.attacks.pgd(logits_fn, x, y, key=key, eps=8 / 255, step_size=2 / 255, steps=10)

Importing this package imports JAX only: TensorFlow, TFDS and orbax are imported by the submodules
that need them (`gen_jax.data`, `gen_jax.checkpoint`), and no device is touched at import time.

References:
  Wang & Wang, "Generalist: Decoupling Natural and Robust Generalization", CVPR 2023,
  https://arxiv.org/abs/2303.13813
"""
import importlib

from gen_jax.mixing import beta_schedule, ema_decay, ema_update, mix, mix_many

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("attacks", "checkpoint", "cli", "config", "data", "evaluation", "export",
                    "models", "parallel", "runs", "study", "training")

__all__ = ["mix", "mix_many", "ema_update", "ema_decay", "beta_schedule", *_LAZY_SUBMODULES]


def __getattr__(name):
  # Submodules load on first use so that `import gen_jax` stays light (no TF/TFDS/orbax).
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f"gen_jax.{name}")
  raise AttributeError(f"module 'gen_jax' has no attribute {name!r}")
