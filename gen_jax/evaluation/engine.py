"""The correctness engine: which examples each model classifies right, clean and under each threat.

Every clean and PGD-family figure of the project comes from `correctness`: the training loop's
test and summary figures (through `accuracy.evaluate_models`), the report's attack table, the
sanity checks' PGD figures, the mixing sweeps and the comparison study. It returns per-example
answers, `{model: {"clean": bool[N], threat: bool[N]}}`, so a union over threats, a subset or a
paired comparison of two models is a host operation on the same arrays.

A figure is a function of (model, images, threat, key) only, not of the batch size, the padding,
the device count or the program that asked, because every random draw is per example: example i
under threat t is attacked from the key

    fold_in(fold_in(key, t.id), i)

(`example_keys`; `Threat.id` is a CRC-32 of the threat's fields, stable across processes), and the
PGD family draws each example's random start (and restarts) from its own key alone
(`attacks.core.noise`). Programs agree on `key` through `attack_key(seed)`: the evaluation stream
of a run of that seed, the key its training loop evaluates with, so `summary.json`, `report.json`,
the sweep and the study print one number for one model.

What "independent" means: the random draws are the same bit for bit in any batch; the arithmetic
of the network and of the attack steps may round differently for another batch shape (XLA
vectorises a loop differently, a GPU picks another convolution algorithm), which moves an
adversarial image by a last bit. That can change an answer only for an example whose logits tie
within rounding; on the tests' CPU runs the answers for batch sizes 32 and 200 are identical.

Batches: every example once, in fixed-size batches (`data.batching.eval_batches`), the last one
padded and masked, each padded again to a multiple of the device count under data-parallel
`sharding` (every process reads only its rows, `parallel.global_batch`); one compiled program per
(network, batch shape, attack kinds), with eps, step sizes, threat ids and variables traced. The
per-example answers stay on the device until one host read at the end (replicated first, so each
process can read them). Every adversarial example is checked on the device to lie in its eps-ball
and the [0, 1] box before its answer counts; a violation raises.

Synopsis::

    from gen_jax.attacks.threat import Threat
    from gen_jax.evaluation import engine, ModelSet
    threat = Threat.of(config)                               # the run's PGD-20
    correct = engine.correctness(ModelSet(model, {"global": v}), images, labels,
                                 threats=[threat], key=engine.attack_key(config.seed))
    correct["global"]["clean"].mean(), correct["global"][threat].mean()
    engine.accuracies(correct)                               # {"global": {"clean": .., threat: ..}}
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gen_jax import attacks, parallel
from gen_jax.attacks import core
from gen_jax.attacks.threat import Threat
from gen_jax.data import to_float
from gen_jax.data.batching import eval_batches
from gen_jax.evaluation.modelset import ModelSet

CLEAN = "clean"  # the key of the clean answers beside the threats

# Absolute tolerance of the on-device ball and box check, as `attacks.verify_adversarial`'s
# (plus 1e-5 of eps for the ball): float32 rounding of x + d, nothing an attack could use.
_ATOL = 1e-6

# The streams a training run splits its root key into (`training.loop.stream_keys`): the last
# is "eval". Written here, not imported, because evaluation sits below training; a test checks
# that both give the same key.
_RUN_STREAMS = 4
_EVAL_STREAM = 3


def attack_key(seed: int) -> jax.Array:
  """The evaluation key of attack seed `seed`: the "eval" stream of a training run of that seed.

  The training loop tests (and writes `summary.json`) with this key, so an evaluation program
  that passes the run's seed reproduces its figures exactly; a seed is a plain int, so the
  programs never need to share a key object.
  """
  return jax.random.split(jax.random.key(seed), _RUN_STREAMS)[_EVAL_STREAM]


def example_keys(key: jax.Array, threat_id: Any, index: Any) -> jax.Array:
  """The per-example keys `fold_in(fold_in(key, threat_id), i)` for the example indices `index`.

  `index` holds global example indices (positions in the evaluated set), so an example's key is
  the same in any batch, on any device and in any program; `threat_id` is `Threat.id`.
  """
  threat_key = jax.random.fold_in(key, threat_id)
  return jax.vmap(jax.random.fold_in, (None, 0))(threat_key, jnp.asarray(index, jnp.uint32))


def _attack(kind: tuple[str, str, int, int], logits_fn, x, y, keys, eps, step_size):
  """One threat's adversarial images; `kind` = (attack, norm, steps, restarts), all static."""
  attack, norm, steps, restarts = kind
  if attack == "fgsm":
    return attacks.fgsm(logits_fn, x, y, eps=eps, norm=norm)
  if attack == "mim":
    return attacks.mim(logits_fn,
                       x,
                       y,
                       key=keys,
                       eps=eps,
                       step_size=step_size,
                       steps=steps,
                       norm=norm)
  fn = {"pgd": attacks.pgd, "cw": attacks.cw}[attack]
  return fn(logits_fn,
            x,
            y,
            key=keys,
            eps=eps,
            step_size=step_size,
            steps=steps,
            norm=norm,
            restarts=restarts)


def _inside(x_adv, x, eps, norm):
  """Per example: finite, in the [0, 1] box and in the `norm` ball of radius `eps` around `x`."""
  flat = x_adv.reshape((x.shape[0], -1))
  box = jnp.all(jnp.isfinite(flat) & (flat >= -_ATOL) & (flat <= 1.0 + _ATOL), axis=1)
  return box & (core.lp_norm(x_adv - x, norm) <= eps + _ATOL + 1e-5 * eps)


def _kind(threat: Threat) -> tuple[str, str, int, int]:
  return (threat.attack, threat.norm, int(threat.steps), int(threat.restarts))


@functools.partial(jax.jit, static_argnames=("kinds", "replicated"))
def _batch_correct(logits_fn, images, labels, index, key, threat_ids, eps, step_size, *, kinds,
                   replicated):
  """Clean answers [B], answers under each threat [T, B] and whether each adversarial example
  lies in its ball and the box [T, B], for one padded batch."""
  x = to_float(images)
  predict = lambda z: jnp.argmax(logits_fn(z), axis=-1) == labels
  clean = predict(x)
  robust, inside = [], []
  for t, kind in enumerate(kinds):
    keys = example_keys(key, threat_ids[t], index)
    x_adv = _attack(kind, logits_fn, x, labels, keys, eps[t], step_size[t])
    robust.append(predict(x_adv))
    inside.append(_inside(x_adv, x, eps[t], kind[1]))
  robust = jnp.stack(robust) if kinds else jnp.zeros((0,) + clean.shape, bool)
  inside = jnp.stack(inside) if kinds else jnp.zeros((0,) + clean.shape, bool)
  out = (clean, robust, inside)
  if replicated is not None:
    # Every process may then read the whole answer (a multi-host mesh included).
    out = jax.lax.with_sharding_constraint(out, replicated)
  return out


def logits_functions(models: ModelSet | Mapping[str, Callable]) -> dict[str, Any]:
  """name -> logits function as a pytree (`Partial`), from a `ModelSet` or a mapping of them."""
  fns = models.logits_fns() if isinstance(models, ModelSet) else dict(models)
  if not fns:
    raise ValueError("correctness needs at least one model.")
  return {name: core.as_pytree_fn(fn) for name, fn in fns.items()}


def check_threats(threats: Sequence[Threat]) -> tuple[Threat, ...]:
  """The threats as a tuple, each a `Threat` and none twice (ValueError otherwise)."""
  threats = tuple(threats)
  bad = [t for t in threats if not isinstance(t, Threat)]
  if bad:
    raise TypeError(f"threats must be attacks.threat.Threat values, got {bad!r}.")
  if len(set(threats)) != len(threats):
    raise ValueError(f"a threat is listed twice: {list(map(str, threats))}.")
  return threats


def correctness(models: ModelSet | Mapping[str, Callable],
                images: Any,
                labels: Any,
                *,
                threats: Sequence[Threat],
                key: jax.Array,
                batch_size: int = 250,
                sharding: Any = None) -> dict[str, dict[Any, np.ndarray]]:
  """Per example, whether each model classifies it right: clean and under each threat.

  Args:
    models: a `ModelSet`, or name -> logits function (`x -> logits`, ideally a
      `jax.tree_util.Partial` over the variables so new weights never recompile).
    images: NHWC images, uint8 or floats in [0, 1] (host arrays; device arrays without
      `sharding`).
    labels: int labels [N].
    threats: the attacks (`attacks.threat.Threat`, the PGD family); may be empty (clean only).
    key: the evaluation key (`attack_key(seed)` to agree with a run's own figures); example i
      under threat t uses `fold_in(fold_in(key, t.id), i)`.
    batch_size: images per compiled batch (the last one padded and masked); the answers do not
      depend on it.
    sharding: optional sharding of the batches over a data-parallel mesh (e.g.
      `parallel.data_sharding(mesh)`, which may span several processes); the models' variables
      must then be placed on that mesh (replicated).

  Returns:
    name -> {"clean": bool [N], threat: bool [N] for each threat} (host numpy arrays).

  Raises:
    ValueError: no images, labels and images of different lengths, a repeated threat, or an
      adversarial example outside its ball or the box (the attack is broken: nothing counts).
  """
  fns = logits_functions(models)
  threats = check_threats(threats)
  labels = np.asarray(labels).astype(np.int32)
  n = int(labels.shape[0])
  if n == 0:
    raise ValueError("the evaluation got no images: the evaluation split is empty.")
  if int(np.shape(images)[0]) != n:
    raise ValueError(f"{np.shape(images)[0]} images but {n} labels.")
  core.check_positive_int("batch_size", batch_size)
  batch_size = min(batch_size, n)
  width = batch_size  # rows per compiled batch: the batch, padded to a multiple of the devices
  replicated = None
  if sharding is not None:
    width = -(-batch_size // sharding.mesh.size) * sharding.mesh.size
    replicated = parallel.replicated(sharding.mesh)
  kinds = tuple(_kind(t) for t in threats)
  ids = np.asarray([t.id for t in threats], np.uint32)
  eps = np.asarray([t.eps for t in threats], np.float32)
  step = np.asarray([t.step_size for t in threats], np.float32)
  order = np.arange(n, dtype=np.int32)
  outputs = {name: [] for name in fns}
  batches, masks = eval_batches(n, batch_size)
  for idx, mask in zip(batches, masks):
    idx, mask = np.pad(idx, (0, width - batch_size)), np.pad(mask, (0, width - batch_size))
    if sharding is None:
      batch = (jnp.asarray(images[idx]), labels[idx], idx)
    else:
      batch = parallel.global_batch((images, labels, order), idx, sharding)
    for name, fn in fns.items():
      outputs[name].append(
          _batch_correct(fn, *batch, key, ids, eps, step, kinds=kinds, replicated=replicated))
  outputs = jax.device_get(outputs)  # the one host read (it sorts a dict's keys: keep fns' order)
  keep = masks.reshape(-1)
  result = {}
  for name in fns:
    parts = outputs[name]
    clean = np.concatenate([p[0][:batch_size] for p in parts])[keep]
    robust = np.concatenate([p[1][:, :batch_size] for p in parts], axis=1)[:, keep]
    inside = np.concatenate([p[2][:, :batch_size] for p in parts], axis=1)[:, keep]
    for threat, ok in zip(threats, inside):
      if not ok.all():
        raise ValueError(f"{int((~ok).sum())} adversarial examples of {threat} against {name} "
                         "leave the eps-ball or the [0, 1] box (or are not finite): the attack is "
                         "broken, so no robust accuracy is reported.")
    result[name] = {CLEAN: clean, **dict(zip(threats, robust))}
  return result


def accuracies(correct: Mapping[str, Mapping[Any, Any]]) -> dict[str, dict[Any, float]]:
  """The mean of each per-example answer of `correctness`: name -> {"clean" / threat: fraction}.

  >>> accuracies({"m": {"clean": np.array([True, False])}})
  {'m': {'clean': 0.5}}
  """
  return {
      name: {
          k: float(np.mean(v)) for k, v in answers.items()
      } for name, answers in correct.items()
  }


@functools.partial(jax.jit, static_argnames=("kind",))
def _batch_adversarial(logits_fn, x, y, index, key, threat_id, eps, step_size, *, kind):
  keys = example_keys(key, threat_id, index)
  return _attack(kind, logits_fn, x, y, keys, eps, step_size)


def adversarial(logits_fn: Callable,
                images: Any,
                labels: Any,
                *,
                threat: Threat,
                key: jax.Array,
                batch_size: int = 250) -> np.ndarray:
  """The adversarial images of `threat` that `correctness` classifies (same per-example keys).

  For programs that need the images themselves (the report's example figure, agreement
  studies); the figures come from `correctness`.

  Returns:
    Host float32 images [N, H, W, C] in [0, 1], in the order of `images`.
  """
  threat = check_threats([threat])[0]
  fn = core.as_pytree_fn(logits_fn)
  x = to_float(np.asarray(images))
  y = np.asarray(labels).astype(np.int32)
  n = len(y)
  batch_size = min(batch_size, n)
  batches, masks = eval_batches(n, batch_size)
  out = [
      _batch_adversarial(fn,
                         x[idx],
                         y[idx],
                         idx,
                         key,
                         np.uint32(threat.id),
                         np.float32(threat.eps),
                         np.float32(threat.step_size),
                         kind=_kind(threat)) for idx in batches
  ]
  return np.concatenate(jax.device_get(out))[masks.reshape(-1)]
