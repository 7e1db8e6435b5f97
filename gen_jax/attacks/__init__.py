"""Attacks on a `logits_fn`: FGSM, PGD, MIM, CW, APGD, APGD-T, FAB-T, Square and AutoAttack.

Every attack is `attack(logits_fn, x, y, *, key, eps, ...) -> x_adv`, where `logits_fn(x) -> logits
[B, C]` is any jit-able function (e.g. a Flax model in inference mode closed over its variables),
`x` holds NHWC images in [0, 1] and `y` integer labels. The result has the shape and dtype of `x`
and lies in the eps-ball (L-inf or L2) around `x` and in the [0, 1] box. Iterations are `jax.lax`
loops; `eps` and `step_size` may be traced, `steps`, `restarts` and `norm` are static.

Synopsis::

    from gen_jax import attacks
    logits_fn = jax.tree_util.Partial(lambda v, x: model.apply(v, x, train=False), variables)
    x_adv = attacks.pgd(logits_fn, x, y, key=key, eps=8 / 255, step_size=2 / 255, steps=10)
    x_adv = attacks.apgd(logits_fn, x, y, key=key, eps=8 / 255, loss="ce")
    x_adv, report = attacks.autoattack(logits_fn, x, y, key=key, eps=8 / 255)
    threat = attacks.Threat("linf", eps=8 / 255, step_size=2 / 255, steps=20)  # an evaluation's

Passing `logits_fn` as a `jax.tree_util.Partial(apply_fn, variables)` keeps the variables as jit
arguments (no recompilation when they change, no constants baked into the program).
"""
from gen_jax.attacks.apgd import apgd, apgd_checkpoints, apgd_targeted
from gen_jax.attacks.autoattack import autoattack, verify_adversarial
from gen_jax.attacks.core import (attack_in_batches, ce_loss, dlr_loss, dlr_targeted_loss, kl_loss,
                                  lp_norm, margin_loss, project, project_l2, project_linf,
                                  random_start, validate_attack_inputs)
from gen_jax.attacks.fab import fab, fab_targeted
from gen_jax.attacks.pgd import cw, fgsm, mim, pgd, trades_attack
from gen_jax.attacks.settings import DEFAULTS, RAND
from gen_jax.attacks.square import square
from gen_jax.attacks.threat import Threat

__all__ = [
    "fgsm", "pgd", "mim", "trades_attack", "cw", "apgd", "apgd_targeted", "apgd_checkpoints", "fab",
    "fab_targeted", "square", "autoattack", "verify_adversarial", "attack_in_batches",
    "validate_attack_inputs", "project", "project_linf", "project_l2", "random_start", "ce_loss",
    "margin_loss", "dlr_loss", "dlr_targeted_loss", "kl_loss", "lp_norm", "DEFAULTS", "RAND",
    "Threat"
]
