"""AutoAttack: the standard ensemble APGD-CE -> APGD-T -> FAB-T -> Square, and the 'rand' version.

The host loop runs each attack only on the points that are still robust, starting from the clean
image, in batches padded to a few compiled shapes; a point is non-robust as soon as one attack fools
it. Every adversarial example is verified on the host to lie in the eps-ball (up to float
tolerance) and in [0, 1] before it is accepted, and the final robust accuracy is recomputed from the
returned images, never taken from an internal flag. Settings come from
`gen_jax.attacks.settings.VERSIONS` ('standard' = `DEFAULTS`, 'rand' = `RAND`).

Synopsis::

    from gen_jax import attacks
    x_adv, report = attacks.autoattack(logits_fn, x, y, key=key, eps=8 / 255)
    report["clean_accuracy"], report["robust_accuracy"]   # floats in [0, 1]
    report["stages"]   # [{"attack": "apgd-ce", "robust_accuracy": ..., "seconds": ...}, ...]
    # Randomised model: logits_fn(x, key); APGD-CE and APGD-DLR with EOT over 20 samples.
    x_adv, report = attacks.autoattack(noisy_logits_fn, x, y, key=key, eps=8 / 255, version="rand")

References:
  Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690
"""
import dataclasses
import functools
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gen_jax.attacks import core
from gen_jax.data.batching import map_batches
from gen_jax.attacks.apgd import apgd, apgd_targeted
from gen_jax.attacks.fab import fab, fab_targeted
from gen_jax.attacks.settings import VERSIONS, AutoAttackSettings
from gen_jax.attacks.square import square

KNOWN_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "fab", "square")


def verify_adversarial(x_adv: Any, x: Any, eps: float, norm: str, *, atol: float = 1e-6) -> None:
  """Checks on the host that every `x_adv` lies in [0, 1] and in the `norm` ball around `x`.

  Args:
    x_adv: adversarial images [N, ...].
    x: clean images [N, ...].
    eps: radius.
    norm: "linf" or "l2".
    atol: absolute float tolerance (plus a relative 1e-5 of eps for the ball).

  Raises:
    ValueError: naming how many examples violate which constraint and by how much.
  """
  core.check_norm(norm)
  x_adv = np.asarray(x_adv, np.float64)
  x = np.asarray(x, np.float64)
  if x_adv.shape != x.shape:
    raise ValueError(f"x_adv has shape {x_adv.shape}, expected the shape of x {x.shape}.")
  if not np.all(np.isfinite(x_adv)):
    raise ValueError(f"{int(np.sum(~np.isfinite(x_adv)))} adversarial values are NaN or Inf.")
  flat = x_adv.reshape(x.shape[0], -1)
  lo, hi = flat.min(initial=0.0), flat.max(initial=1.0)
  if lo < -atol or hi > 1.0 + atol:
    raise ValueError(f"adversarial images leave the [0, 1] box: values in [{lo}, {hi}].")
  d = (x_adv - x).reshape(x.shape[0], -1)
  dist = np.abs(d).max(axis=1, initial=0.0) if norm == "linf" else np.sqrt((d * d).sum(axis=1))
  bad = dist > eps + atol + 1e-5 * eps
  if np.any(bad):
    raise ValueError(f"{int(bad.sum())} adversarial examples leave the {norm} ball of radius "
                     f"{eps}: largest distance {dist.max()}.")


@jax.jit
def _predict(fn, xb):
  return jnp.argmax(fn(xb), axis=1)


@jax.jit
def _predict_randomized(fn, xb, key):
  return jnp.argmax(fn(xb, key), axis=1)


def _predict_fn(logits_fn, randomized):
  """`(x, key) -> predicted labels` for the host-side bookkeeping, compiled once per model."""
  fn = core.as_pytree_fn(logits_fn)
  if randomized:
    return lambda xb, key: np.asarray(_predict_randomized(fn, jnp.asarray(xb), key))
  return lambda xb, key: np.asarray(_predict(fn, jnp.asarray(xb)))


def _predict_all(predict, x, key, batch_size):
  """Predicted labels of `x` in padded batches of one shape."""
  return map_batches(predict, (x,), batch_size=batch_size, key=key)


def _padded_size(m: int, batch_size: int) -> int:
  """Size a remainder of m < batch_size points is padded to.

  A multiple of batch_size / 4 (rounded up), or, where the remainder's next power of two is
  smaller than that quarter, the power of two: the few points left for the last stages of a
  robust model (FAB-T and Square on 5 of 50 images, say) would otherwise pay for a quarter batch
  of padding in each of their thousands of forward passes. At most 4 + log2(batch_size / 4)
  shapes per attack are compiled, and padding wastes less than a quarter batch and less than the
  remainder itself.
  """
  quarter = -(-batch_size // 4)
  power = 1 << max(m - 1, 0).bit_length()
  if power < quarter:
    return power
  return min(batch_size, -(-m // quarter) * quarter)


def _attack_subset(attack_fn, x_sub, y_sub, key, batch_size):
  """Runs `attack_fn` on a subset in batches, padding the remainder to few compiled shapes."""
  size = batch_size if x_sub.shape[0] >= batch_size else _padded_size(x_sub.shape[0], batch_size)
  return map_batches(lambda xb, yb, k: attack_fn(xb, yb, key=k), (x_sub, y_sub),
                     batch_size=size,
                     key=key)


def _stage_fn(name: str, logits_fn, eps, norm, settings, randomized) -> Callable[..., Any]:
  """The attack of stage `name` as `(x, y, *, key) -> x_adv` with the version's settings."""
  if randomized and name not in ("apgd-ce", "apgd-dlr"):
    raise ValueError(f"attack {name!r} does not support randomised models; the 'rand' version "
                     "runs only 'apgd-ce' and 'apgd-dlr'.")
  rand_kw = dict(eot_iter=settings.apgd.eot_iter, randomized=randomized)
  if name in ("apgd-ce", "apgd-dlr"):
    return functools.partial(apgd,
                             logits_fn,
                             eps=eps,
                             norm=norm,
                             loss=name[5:],
                             steps=settings.apgd.steps,
                             restarts=settings.apgd.restarts,
                             rho=settings.apgd.rho,
                             **rand_kw)
  if name == "apgd-t":
    return functools.partial(apgd_targeted,
                             logits_fn,
                             eps=eps,
                             norm=norm,
                             steps=settings.apgd_t.steps,
                             restarts=settings.apgd_t.restarts,
                             n_target_classes=settings.apgd_t.n_target_classes,
                             rho=settings.apgd_t.rho)
  if name in ("fab-t", "fab"):
    fn = fab_targeted if name == "fab-t" else fab
    fab_settings = settings.fab_t
    kw = dict(steps=fab_settings.steps,
              restarts=fab_settings.restarts,
              alpha_max=fab_settings.alpha_max,
              eta=fab_settings.eta,
              beta=fab_settings.beta)
    if name == "fab-t":
      kw["n_target_classes"] = fab_settings.n_target_classes
    return functools.partial(fn, logits_fn, eps=eps, norm=norm, **kw)
  return functools.partial(square,
                           logits_fn,
                           eps=eps,
                           norm=norm,
                           n_queries=settings.square.n_queries,
                           p_init=settings.square.p_init,
                           restarts=settings.square.restarts)


def autoattack(logits_fn: Callable[..., jax.Array],
               x: Any,
               y: Any,
               *,
               key: jax.Array,
               eps: float,
               norm: str = "linf",
               version: str = "standard",
               batch_size: int = 500,
               attacks: Optional[Sequence[str]] = None,
               settings: Optional[AutoAttackSettings] = None,
               verbose: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
  """Runs AutoAttack on a data set and reports the robust accuracy after each stage.

  'standard': APGD-CE (1 restart x 100 steps), APGD-T (9 targets x 100 steps), FAB-T (9 targets x
  100 steps), Square (5,000 queries, p_init 0.8); settings `settings.DEFAULTS`. 'rand' (for
  randomised models, `logits_fn(x, key)`): APGD-CE and APGD-DLR with EOT over 20 samples;
  settings `settings.RAND`. Each stage attacks only the points still robust, from the clean image.

  Args:
    logits_fn: `x -> logits [B, C]` (or `(x, key) -> logits` for version='rand'), jit-able.
    x: clean images [N, H, W, C] in [0, 1] (host or device array).
    y: integer labels [N].
    key: PRNG key; stage i uses `fold_in(key, i)`.
    eps: radius (a concrete float).
    norm: "linf" or "l2".
    version: "standard" or "rand".
    batch_size: examples per compiled attack call.
    attacks: stage names to run instead of the version's list (any of KNOWN_ATTACKS, in order).
    settings: settings to use instead of the version's (e.g. fewer steps for a quick check);
      `settings.attacks` is ignored (use `attacks`).
    verbose: print one line per stage.

  Returns:
    (x_adv, report): x_adv a numpy array like `x` where every fooled point holds its adversarial
    example and every other point its clean image; report a dict with `clean_accuracy`,
    `robust_accuracy` (recomputed from x_adv), `stages` (per stage: `attack`, `robust_accuracy`
    after it, `seconds`), `num_examples`, `eps`, `norm`, `version`, `attacks`.

  Raises:
    ValueError, TypeError: for bad input (as every attack), an unknown version or attack name, a
      traced eps, or an adversarial example outside the ball or the box.

  References:
    Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690
  """
  if version not in VERSIONS:
    raise ValueError(f"version must be one of {tuple(VERSIONS)}, got {version!r}.")
  if settings is None:
    settings = VERSIONS[version]
  elif not isinstance(settings, AutoAttackSettings):
    raise TypeError(f"settings must be an AutoAttackSettings, got {type(settings).__name__}.")
  else:
    settings = dataclasses.replace(settings, attacks=VERSIONS[version].attacks)
  attacks = tuple(settings.attacks if attacks is None else attacks)
  unknown = [a for a in attacks if a not in KNOWN_ATTACKS]
  if unknown or not attacks:
    raise ValueError(f"attacks must be a non-empty sequence of {KNOWN_ATTACKS}, got {attacks!r}.")
  core.check_positive_int("batch_size", batch_size)
  if not core.is_concrete(eps) or np.ndim(eps) != 0:
    raise TypeError("autoattack runs on the host: eps must be a concrete scalar (a Python float).")
  randomized = version == "rand"
  check_fn = (lambda xx: logits_fn(xx, key)) if randomized else logits_fn
  core.validate_attack_inputs(check_fn, x, y, eps=eps, norm=norm)
  eps = float(eps)
  x_np = np.asarray(x)
  y_np = np.asarray(y).astype(np.int64)
  n = x_np.shape[0]
  if n == 0:
    raise ValueError("x is empty: pass at least one example.")
  batch_size = min(batch_size, n)
  predict = _predict_fn(logits_fn, randomized)
  eval_key = jax.random.fold_in(key, len(KNOWN_ATTACKS) + 1)
  robust = _predict_all(predict, x_np, eval_key, batch_size) == y_np
  clean_accuracy = float(robust.mean())
  x_adv = x_np.copy()
  stages = []
  if verbose:
    print(f"autoattack {version} {norm} eps={eps:.5f}: clean accuracy {clean_accuracy:.2%}")
  for i, name in enumerate(attacks):
    attack_fn = _stage_fn(name, logits_fn, eps, norm, settings, randomized)
    start = time.perf_counter()
    idx = np.flatnonzero(robust)
    if idx.size:
      stage_key = jax.random.fold_in(key, i)
      adv = _attack_subset(attack_fn, x_np[idx], y_np[idx], stage_key, batch_size)
      verify_adversarial(adv, x_np[idx], eps, norm)
      fooled = _predict_all(predict, adv, jax.random.fold_in(stage_key, 1), batch_size) != y_np[idx]
      x_adv[idx[fooled]] = adv[fooled]
      robust[idx[fooled]] = False
    seconds = time.perf_counter() - start
    stages.append(dict(attack=name, robust_accuracy=float(robust.mean()), seconds=seconds))
    if verbose:
      print(f"  after {name}: robust accuracy {robust.mean():.2%} ({seconds:.1f} s)")
  verify_adversarial(x_adv, x_np, eps, norm)
  # The reported figure is measured on the returned images, not on the bookkeeping above.
  final_correct = _predict_all(predict, x_adv, eval_key, batch_size) == y_np
  report = dict(
      clean_accuracy=clean_accuracy,
      robust_accuracy=float(final_correct.mean()),
      stages=stages,
      num_examples=n,
      eps=eps,
      norm=norm,
      version=version,
      attacks=attacks,
      # Points fooled during a stage that the final pass classifies correctly (float noise of a
      # different batch composition, or a random model); 0 for a deterministic model.
      flag_mismatches=int(np.sum(final_correct & ~robust)),
  )
  return x_adv, report
