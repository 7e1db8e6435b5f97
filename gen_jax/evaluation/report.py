"""The robustness report: the paper's evaluation table for one or several models.

Every robust accuracy is recomputed on the host from adversarial images that were verified to lie
in the eps-ball and the [0, 1] box (`attacks.verify_adversarial`); no attack's internal success
flag is trusted.

Synopsis::

    report = robustness_report({"global": v_mix, "robust": v_rob}, model, images, labels,
                               attacks=("clean", "pgd20", "aa"), eps=8 / 255, key=key)
    write_report(report, "runs/c10/eval")      # report.json and report.md

Attack settings are the paper's (eps 8/255; PGD-20/100, MIM-20 and CW-20 with step 2/255 and a
random start; APGD, FAB-T, Square and AutoAttack with the 'standard' settings of
`gen_jax.attacks.settings`). Unlike the reference code, "PGD-20" really runs 20 steps.
"""
from __future__ import annotations

import functools
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gen_jax import attacks
from gen_jax.evaluation import boundary, corruptions, outputs, sanity
from gen_jax.evaluation.accuracy import accuracy

ATTACKS = ("clean", "pgd20", "pgd100", "mim", "cw", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t",
           "square", "aa")

# AutoAttack stages run through `attacks.autoattack` (robust subsets, batching, verification).
_AUTOATTACK_STAGES = {
    "apgd-ce": ["apgd-ce"],
    "apgd-dlr": ["apgd-dlr"],
    "apgd-t": ["apgd-t"],
    "fab-t": ["fab-t"],
    "square": ["square"],
    "aa": None
}


def _pgd_family(name: str, step_size: float) -> Callable[..., jax.Array]:
  if name in ("pgd20", "pgd100"):
    steps = int(name[3:])
    return lambda f, x, y, key, eps: attacks.pgd(
        f, x, y, key=key, eps=eps, step_size=step_size, steps=steps)
  if name == "mim":
    return lambda f, x, y, key, eps: attacks.mim(
        f, x, y, key=key, eps=eps, step_size=step_size, steps=20)
  if name == "cw":
    return lambda f, x, y, key, eps: attacks.cw(
        f, x, y, key=key, eps=eps, step_size=step_size, steps=20)
  raise ValueError(name)


def check_attack_names(names: Sequence[str]) -> tuple[str, ...]:
  """Validates attack names before any work; ValueError listing the known ones."""
  unknown = [n for n in names if n not in ATTACKS]
  if unknown or not names:
    raise ValueError(f"unknown attack(s) {unknown or names}; choose from {', '.join(ATTACKS)}.")
  return tuple(names)


def evaluate_attack(name: str, logits_fn, x: np.ndarray, y: np.ndarray, *, key: jax.Array,
                    eps: float, step_size: float, batch_size: int) -> dict[str, Any]:
  """Robust accuracy of one attack, measured on verified adversarial images."""
  started = time.time()
  if name == "clean":
    return {
        "accuracy": accuracy(logits_fn, x, y, batch_size),
        "seconds": round(time.time() - started, 2)
    }
  if name in _AUTOATTACK_STAGES:
    x_adv, aa_report = attacks.autoattack(logits_fn,
                                          x,
                                          y,
                                          key=key,
                                          eps=eps,
                                          attacks=_AUTOATTACK_STAGES[name],
                                          batch_size=batch_size)
    extra = {"stages": aa_report["stages"]}
  else:
    attack_fn = jax.jit(_pgd_family(name, step_size))
    x_adv = attacks.attack_in_batches(
        lambda xb, yb, key: attack_fn(logits_fn, xb, yb, key, jnp.float32(eps)),
        x,
        y,
        key=key,
        batch_size=batch_size)
    extra = {}
  attacks.verify_adversarial(x_adv, x, eps, "linf")
  return {
      "accuracy": accuracy(logits_fn, x_adv, y, batch_size),
      "seconds": round(time.time() - started, 2),
      **extra
  }


def _apply(model, variables, x):
  return model.apply(variables, x, train=False)


def logits_functions(models: dict[str, Any], model: nn.Module) -> dict[str, Any]:
  """role -> `x -> logits` in inference mode, as `Partial`s (new weights never retrace)."""
  return {
      role: jax.tree_util.Partial(functools.partial(_apply, model), variables)
      for role, variables in models.items()
  }


def as_float_images(images: Any) -> np.ndarray:
  """uint8 images -> float32 in [0, 1]; float images are cast to float32."""
  x = np.asarray(images)
  return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


# Figures of the attack table that the sanity checks may reuse (same points, same settings).
# ("aa" is left out: it ends with Square, so it would hide a white-box attack's failure.)
_REUSABLE = ("clean", "pgd20", "pgd100", "mim", "cw", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t",
             "square")


def known_figures(report: dict[str, Any], role: str) -> dict[str, float]:
  """The accuracies of `role` in an attack report that `sanity.sanity_checks` can reuse."""
  row = report["models"][role]
  return {name: row[name]["accuracy"] for name in _REUSABLE if name in row}


def robustness_report(models: dict[str, Any],
                      model: nn.Module,
                      images: np.ndarray,
                      labels: np.ndarray,
                      *,
                      attacks_to_run: Sequence[str],
                      eps: float = 8 / 255,
                      step_size: float = 2 / 255,
                      key: jax.Array,
                      batch_size: int = 250,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Evaluates each model under each attack (L-inf).

  Args:
    models: role -> linen variables of `model`.
    model: the linen module, applied in inference mode.
    images: uint8 NHWC images (or floats in [0, 1]).
    labels: int labels.
    attacks_to_run: names from `ATTACKS`.
    eps: L-inf radius (8/255; the reference code used 0.031).
    step_size: step of the PGD family.
    key: PRNG key (the same attack keys for every model).
    batch_size: images per attack batch.
    progress: optional callback told "role/attack" before each evaluation.

  Returns:
    {"eps", "n", "attacks", "models": {role: {attack: {"accuracy", "seconds", ...}}}}.
  """
  names = check_attack_names(list(attacks_to_run))
  x = as_float_images(images)
  y = np.asarray(labels).astype(np.int32)
  results = {}
  for role, logits_fn in logits_functions(models, model).items():
    results[role] = {}
    for i, name in enumerate(names):
      if progress:
        progress(f"{role}/{name}")
      results[role][name] = evaluate_attack(name,
                                            logits_fn,
                                            x,
                                            y,
                                            key=jax.random.fold_in(key, i),
                                            eps=eps,
                                            step_size=step_size,
                                            batch_size=batch_size)
  return {"eps": eps, "n": int(len(y)), "attacks": list(names), "models": results}


def write_report(report: dict[str, Any], directory: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """Writes `report.json`, the markdown `report.md` and, with a boundary analysis, `boundary.png`.

  Earlier files of the same name are kept (`report.1.json`, ...: see `outputs`).

  Returns:
    {"json", "md"[, "boundary"]} -> path.
  """
  directory = pathlib.Path(directory)
  names = report["attacks"]
  lines = [
      "## Robust accuracy", "", f"Accuracy (%) under each attack, L-inf eps = {report['eps']:.5f} "
      f"({255 * report['eps']:.2f}/255), {report['n']} test images.", "",
      "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)
  ]
  for role, row in report["models"].items():
    lines.append(f"| {role} | " + " | ".join(f"{100 * row[n]['accuracy']:.2f}" for n in names) +
                 " |")
  sections = [("sanity", "Gradient-masking sanity checks", sanity.to_markdown),
              ("boundary", "Distance to the decision boundary", boundary.to_markdown),
              ("corruptions", "Common corruptions", corruptions.to_markdown)]
  for key, title, render in sections:
    if key in report:
      part = report[key]["models"] if key == "sanity" else report[key]
      lines += ["", f"## {title}", "", render(part).rstrip("\n")]
  paths = {"json": outputs.write_json(directory / "report.json", report)}
  paths["md"] = outputs.write_text(directory / "report.md", "\n".join(lines) + "\n")
  if "boundary" in report:
    outputs.keep_previous(directory / "boundary.png")
    paths["boundary"] = boundary.plot_boundary(report["boundary"], directory / "boundary.png")
  return paths
