"""Exact clean and PGD accuracy of one or several models on a labelled image set.

`evaluate_models` is the training loop's (and the fine-tune's) view of the correctness engine
(`gen_jax.evaluation.engine`): the same padded, masked, sharded batches and per-example attack
keys, reduced to one clean and one PGD accuracy per model, so its figures are those of the report
and the sweeps for the same key, threat and images. `correct_predictions` and `accuracy` classify
images that are given (no attack).

Synopsis::

    results = evaluate_models({"natural": v_nat, "robust": v_rob, "global": v_mix}, images, labels,
                              model=model, key=key, threat=Threat.of(config))
    results["global"]["pgd_acc"]
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gen_jax.attacks.threat import Threat
from gen_jax.data.batching import map_batches
from gen_jax.evaluation import engine
from gen_jax.evaluation.modelset import ModelSet


@jax.jit
def _correct(logits_fn, x, y):
  return jnp.argmax(logits_fn(x), axis=-1) == y


def correct_predictions(logits_fn: Any, images: Any, labels: Any, batch_size: int) -> np.ndarray:
  """Whether `logits_fn` classifies each image right, as a host bool array [N].

  `logits_fn` is a `jax.tree_util.Partial` (or any pytree-callable) over float images in [0, 1];
  batches have one padded shape, so the jitted prediction compiles once per model architecture.
  """
  y = np.asarray(labels).astype(np.int32)
  return map_batches(functools.partial(_correct, logits_fn), (images, y),
                     batch_size=min(batch_size, len(y)))


def accuracy(logits_fn: Any, images: Any, labels: Any, batch_size: int) -> float:
  """Exact accuracy of `logits_fn` on `images` (see `correct_predictions`)."""
  return float(np.mean(correct_predictions(logits_fn, images, labels, batch_size)))


def evaluate_models(models: dict[str, Any],
                    images: np.ndarray,
                    labels: np.ndarray,
                    *,
                    model: nn.Module,
                    key: jax.Array,
                    threat: Threat | None,
                    batch_size: int = 500,
                    sharding: Any = None) -> dict[str, dict[str, float]]:
  """Clean and PGD accuracy of each model under `threat`: the engine's figures.

  Args:
    models: role -> linen variables, all of the architecture `model`.
    images: NHWC images, uint8 or floats in [0, 1] (host or device).
    labels: int labels.
    model: the linen module (evaluated in inference mode, as a `ModelSet` applies it).
    key: the evaluation key (`engine.attack_key(seed)` for a run's own figures); example i uses
      `fold_in(fold_in(key, threat.id), i)`, the same for every model (`engine.correctness`).
    threat: the attack (`Threat.of(config)` for a run's own figures); None or 0 steps: clean
      accuracy only (then "pgd_acc" repeats it).
    batch_size: images per batch (the last one is padded and masked); the figures depend on
      neither it nor the devices.
    sharding: optional sharding of the batches over a data-parallel mesh (e.g.
      `parallel.data_sharding(mesh)`, which may span several processes); `models` must then be
      placed on that mesh (replicated).

  Returns:
    role -> {"clean_acc", "pgd_acc"} as fractions in [0, 1].
  """
  threats = [threat] if threat is not None and threat.steps > 0 else []
  correct = engine.correctness(ModelSet(model, models),
                               images,
                               labels,
                               threats=threats,
                               key=key,
                               batch_size=batch_size,
                               sharding=sharding)
  figures = engine.accuracies(correct)
  return {
      role: {
          "clean_acc": f[engine.CLEAN],
          "pgd_acc": f[threats[0]] if threats else f[engine.CLEAN]
      } for role, f in figures.items()
  }
