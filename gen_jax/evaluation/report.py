"""The robustness report: the paper's attack table and the analyses, for one or several models.

`evaluate` builds the whole `report.json` from models and data: the attack table (attacks of
`catalogue`), then each analysis of `ANALYSES` (sanity checks, boundary, corruptions) on the
first `analysis_n` points, every one called with the same shape
`run(models, images, labels, *, key, batch_size, progress, **its options)` and rendered by its own
`to_markdown`. `evaluate_run` does the same for a run directory or a saved model
(`gen_jax.runs.EvalRun`), with the run's eps and PGD step. `write_report` writes `report.json`,
`report.md` and the analyses' figures.

Every robust accuracy is recomputed from adversarial images that were verified to lie in the
eps-ball and the [0, 1] box (on the device by the correctness engine, on the host by
`attacks.verify_adversarial` for AutoAttack and Square); no attack's internal success flag is
trusted. Unlike the reference code, "PGD-20" really runs 20 steps.

Keys: the clean and PGD-family entries ("pgd20", "pgd100", "mim", "cw", "fgsm", "pgd20-l2") are
the correctness engine's (`evaluation.engine`): example i under threat t uses
`fold_in(fold_in(key, t.id), i)` with the report's own `key`, so for `evaluate_run`'s default key
(the run's `engine.attack_key(seed)`) the PGD-20 figure is the one of the run's `summary.json`,
its sweep and its comparison. AutoAttack, its stages and Square keep their batch keys:
`fold_in(fold_in(key, 0), a)` for attack a of the table, batch by batch (they attack only the
points still robust, which no per-example key can make independent of the batch).

Threats: the table and the analyses take the evaluation's threat as one `Threat` value
(`attacks.threat`: `Threat.of(config)` for a run), whose radius and step size every L-inf attack
uses (each attack its own number of steps: "pgd20" 20, "pgd100" 100); the L2 attacks take a second
one, `l2` (`Threat.of(config, norm="l2")`, or `threat.at(radius, norm="l2")`). Nothing here
derives a radius or a step: the table records the threats it ran, and `report.md` prints them.

Union robustness (multi-norm runs, Generalist++): with an L2 threat (`l2`; `evaluate_run`
takes the run's L2 expert's) the table adds L2 PGD-20 ("pgd20-l2") beside L-inf PGD-20, and
`union` gives per model the share of images that survive every norm's attack
(`union_accuracy`: an image counts as robust only if it is classified right under each).

Synopsis::

    models = ModelSet(model, {"global": v_mix, "robust": v_rob})
    threat = Threat("linf", eps=8 / 255, step_size=2 / 255, steps=20)   # or Threat.of(config)
    report = evaluate(models, images, labels, key=key, threat=threat,
                      attacks=("clean", "pgd20", "aa"))
    write_report(report, "runs/c10/eval")      # report.json, report.md, boundary.png

    report = evaluate_run(runs.restore_models("runs/c10"), attacks=("clean", "pgd20"))

    table = attack_table(models, images, labels, key=key, threat=threat,
                         attacks=("clean", "pgd20", "pgd20-l2"), l2=threat.at(0.5, norm="l2"))
    table["union"]["models"]["global"]["accuracy"]     # survives L-inf AND L2 PGD-20
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from gen_jax.attacks.threat import Threat
from gen_jax.data import to_float
from gen_jax.evaluation import boundary, catalogue, corruptions, engine, outputs, plots, sanity
from gen_jax.evaluation.modelset import ModelSet


@dataclasses.dataclass(frozen=True)
class Analysis:
  """One analysis of the report: how to run it, its section title, how to render and plot it."""
  run: Callable[..., dict[str, Any]]
  title: str
  to_markdown: Callable[[dict[str, Any]], str]
  plot: Callable[[dict[str, Any], pathlib.Path], pathlib.Path] | None = None
  figure: str | None = None  # file name of the plot


# In report order. Analysis i (from 1) uses the key `fold_in(key, i)`; the attack table uses 0
# for its batch-keyed attacks and `key` itself for the engine's (which fold in the threat's id).
ANALYSES: dict[str, Analysis] = {
    "sanity":
        Analysis(sanity.run, "Gradient-masking sanity checks", sanity.to_markdown),
    "boundary":
        Analysis(boundary.run, "Distance to the decision boundary", boundary.to_markdown,
                 boundary.plot_boundary, "boundary.png"),
    "corruptions":
        Analysis(corruptions.run, "Common corruptions", corruptions.to_markdown),
    "examples":
        Analysis(plots.run, "Adversarial examples", plots.to_markdown, plots.plot_examples,
                 "examples.png"),
}


def union_accuracy(correct: Mapping[str, Any]) -> dict[str, Any]:
  """Union robustness from per-attack, per-example results: the worst case over the attacks.

  An example counts as robust only if it is classified right under every attack (for attacks of
  several norms, the per-example worst case over the norms).

  >>> union_accuracy({"pgd20": [True, True, False, True], "pgd20-l2": [True, False, False, True]})
  {'attacks': ['pgd20', 'pgd20-l2'], 'accuracy': 0.5, 'robust': 2, 'n': 4}

  Args:
    correct: attack name -> bool [N], whether each example is classified right under it.

  Returns:
    {"attacks", "accuracy" (fraction), "robust" (count), "n"}.

  Raises:
    ValueError: no attacks, or results of different lengths.
  """
  if not correct:
    raise ValueError("union_accuracy needs the results of at least one attack.")
  arrays = {name: np.asarray(c, dtype=bool).reshape(-1) for name, c in correct.items()}
  sizes = {name: len(a) for name, a in arrays.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"union_accuracy needs one result per example under every attack; got "
                     f"{sizes} examples.")
  survived = np.logical_and.reduce(list(arrays.values()))
  n = len(survived)
  return {
      "attacks": list(arrays),
      "accuracy": float(survived.mean()) if n else float("nan"),
      "robust": int(survived.sum()),
      "n": int(n)
  }


# Figures of the attack table that the sanity checks may reuse (same points, same settings).
# ("aa" is left out: it ends with Square, so it would hide a white-box attack's failure.)
_REUSABLE = tuple(name for name in catalogue.REPORT_ATTACKS if name != "aa")


def check_analyses(names: Sequence[str]) -> tuple[str, ...]:
  unknown = [n for n in names if n not in ANALYSES]
  if unknown:
    raise ValueError(f"unknown analysis(es) {unknown}; choose from {', '.join(ANALYSES)}.")
  return tuple(n for n in ANALYSES if n in names)


def check_table_threats(threat: Threat, l2: Threat | None, names: Sequence[str]) -> None:
  """Checks the threats of an attack table before any attack runs (ValueError naming the fix)."""
  if not isinstance(threat, Threat) or threat.norm != "linf":
    raise ValueError(f"threat must be the L-inf `Threat` of the table's L-inf attacks (e.g. "
                     f"Threat.of(config) of an L-inf run), got {threat!r}; the L2 attacks take "
                     "l2=.")
  l2_names = [n for n in names if catalogue.ATTACKS[n].norm == "l2"]
  if l2_names and l2 is None:
    raise ValueError(f"the attack(s) {l2_names} need the L2 threat: pass l2= (a run's "
                     "Threat.of(config, norm='l2'), or threat.at(0.5, norm='l2') for radius 0.5 "
                     "on CIFAR-10).")
  if l2 is not None and (not isinstance(l2, Threat) or l2.norm != "l2"):
    raise ValueError(f"l2 must be an L2 `Threat`, got {l2!r}.")


def attack_table(models: ModelSet,
                 images: np.ndarray,
                 labels: np.ndarray,
                 *,
                 key: jax.Array,
                 threat: Threat,
                 attacks: Sequence[str] = catalogue.REPORT_ATTACKS,
                 batch_size: int = 250,
                 progress: Callable[[str], None] | None = None,
                 l2: Threat | None = None) -> dict[str, Any]:
  """Accuracy of each model under each attack.

  Keys: "clean" and the PGD-family entries are answered by the correctness engine with `key`
  (example i under threat t: `fold_in(fold_in(key, t.id), i)`, independent of the batch size);
  any other attack i of `attacks` uses `fold_in(fold_in(key, 0), i)`, batch by batch.

  Attacks are L-inf at `threat`'s radius and step size, each with its own number of steps, except
  the L2 ones of the catalogue ("pgd20-l2"), which run at `l2`'s. When the attacks hold the PGD-20
  attack of more than one norm (`catalogue.NORM_ATTACKS`), the table adds their union robustness
  (`union_accuracy`). `progress`, if given, is told "model/attack" before each entry.

  Returns:
    {"eps", "step_size" (`threat`'s), "threats": {attack: `Threat.record()`} (each PGD-family
    attack's exact threat, its steps included), "n", "attacks", "models": {name: {attack:
    {"accuracy", "seconds", ...}}}}, plus "l2_eps" and "l2_step_size" with an L2 attack, and
    "union": {"attacks", "models": {name: {"accuracy", "robust", "n"}}} with
    attacks of several norms.

  Raises:
    ValueError: an unknown attack, `threat` not L-inf, or an L2 attack without an L2 `l2`.
  """
  names = catalogue.check_names(list(attacks), catalogue.TABLE_ATTACKS)
  check_table_threats(threat, l2, names)
  l2_names = [n for n in names if catalogue.ATTACKS[n].norm == "l2"]
  per_norm = [n for n in catalogue.NORM_ATTACKS.values() if n in names]
  union_names = per_norm if len(per_norm) > 1 else []
  x, y = to_float(np.asarray(images)), np.asarray(labels).astype(np.int32)
  batch_keyed = jax.random.fold_in(key, 0)
  # Each attack's radius and step: the L2 threat's for the L2 attacks, the L-inf one's otherwise.
  base = {n: l2 if catalogue.ATTACKS[n].norm == "l2" else threat for n in names}
  results, unions = {}, {}
  for role, logits_fn in models.logits_fns().items():
    results[role], correct = {}, {}
    for i, name in enumerate(names):
      if progress:
        progress(f"{role}/{name}")
      started = time.time()
      engine_kind = catalogue.ATTACKS[name].kind in ("clean", "pgd")
      hits, extra = catalogue.robust_correct(
          name,
          logits_fn,
          x,
          y,
          key=key if engine_kind else jax.random.fold_in(batch_keyed, i),
          eps=base[name].eps,
          step_size=base[name].step_size,
          batch_size=batch_size)
      if name in union_names:
        correct[name] = hits
      results[role][name] = {
          "accuracy": float(np.mean(hits)),
          "seconds": round(time.time() - started, 2),
          **extra
      }
    if union_names:
      unions[role] = {k: v for k, v in union_accuracy(correct).items() if k != "attacks"}
  exact = {  # the engine's threat of each PGD-family attack, as recorded
      n: catalogue.threat_of(n, eps=base[n].eps, step_size=base[n].step_size) for n in names
  }
  table = {
      "eps": threat.eps,
      "step_size": threat.step_size,
      "threats": {
          name: t.record() for name, t in exact.items() if t is not None
      },
      "n": int(len(y)),
      "attacks": list(names),
      "models": results
  }
  if l2_names:
    table.update(l2_eps=l2.eps, l2_step_size=l2.step_size)
  if union_names:
    table["union"] = {"attacks": union_names, "models": unions}
  return table


def known_figures(table: Mapping[str, Any], name: str) -> dict[str, float]:
  """The accuracies of model `name` in an attack table that `sanity.sanity_checks` can reuse."""
  row = table["models"][name]
  return {attack: row[attack]["accuracy"] for attack in _REUSABLE if attack in row}


def evaluate(models: ModelSet,
             images: Any,
             labels: Any,
             *,
             key: jax.Array,
             threat: Threat,
             attacks: Sequence[str] = catalogue.REPORT_ATTACKS,
             analyses: Sequence[str] = tuple(ANALYSES),
             analysis_n: int = 500,
             batch_size: int = 250,
             options: Mapping[str, Mapping[str, Any]] | None = None,
             progress: Callable[[str, bool], None] | None = None,
             l2: Threat | None = None) -> dict[str, Any]:
  """The whole robustness report of `models` on `images` (the content of `report.json`).

  Args:
    models: the models.
    images, labels: the test points (uint8 NHWC or floats in [0, 1]; converted once here).
    key: PRNG key: the attack table uses `key` (see `attack_table`), analysis i
      `fold_in(key, i)`.
    threat: the L-inf threat of the evaluation: the table's L-inf attacks and the analyses use
      its radius and PGD step (`Threat.of(config)` for a run).
    attacks: names from `catalogue.TABLE_ATTACKS` (the L2 ones need `l2`).
    analyses: names from `ANALYSES`, run on the first `analysis_n` points.
    analysis_n: points of the analyses (at most all).
    batch_size: points per compiled call.
    options: analysis name -> extra keyword arguments of its `run`.
    progress: optional `progress(message, new_unit)`: `new_unit` is True before each entry of
      the table ("global/pgd20") and each analysis ("sanity"), False for the analyses' own
      finer messages; a progress bar counts the units (models x attacks + analyses).
    l2: the L2 threat of the L2 attacks (see `attack_table`).

  Returns:
    The attack table (`attack_table`) with one more entry per analysis. The sanity checks reuse
    the table's figures when they run on the same points.
  """
  names = check_analyses(analyses)
  unit = (lambda what: progress(what, True)) if progress else None
  detail = (lambda what: progress(what, False)) if progress else None
  x, y = to_float(np.asarray(images)), np.asarray(labels).astype(np.int32)
  report = attack_table(models,
                        x,
                        y,
                        key=key,
                        threat=threat,
                        attacks=attacks,
                        batch_size=batch_size,
                        progress=unit,
                        l2=l2)
  eps, step_size = threat.eps, threat.step_size
  m = min(analysis_n, len(y))
  common = {
      "sanity": {
          "eps": eps,
          "step_size": step_size,
          "known": {
              n: known_figures(report, n) for n in models.names
          } if m == len(y) else None
      },
      "boundary": {
          "eps": eps
      },
      "corruptions": {},
      "examples": {
          "eps": eps,
          "step_size": step_size
      },
  }
  for name in names:
    if unit:
      unit(name)
    report[name] = ANALYSES[name].run(models,
                                      x[:m],
                                      y[:m],
                                      key=jax.random.fold_in(key,
                                                             list(ANALYSES).index(name) + 1),
                                      batch_size=batch_size,
                                      progress=detail,
                                      **common[name],
                                      **(options or {}).get(name, {}))
  return report


# The L-inf threat (radius, step) of the report's L-inf attacks and analyses for an L2 run, whose
# config holds only an L2 radius: the standard CIFAR threat of the reference code and RobustBench.
LINF_FOR_L2_RUNS = (8 / 255, 2 / 255)


def evaluate_run(run: Any,
                 *,
                 attacks: Sequence[str] = catalogue.REPORT_ATTACKS,
                 analyses: Sequence[str] = tuple(ANALYSES),
                 n: int | None = None,
                 analysis_n: int = 500,
                 eps: float | None = None,
                 batch_size: int = 250,
                 seed: int | None = None,
                 sanity_queries: int = sanity.SQUARE_QUERIES,
                 progress: Callable[[str, bool], None] | None = None) -> dict[str, Any]:
  """`evaluate` on a `gen_jax.runs.EvalRun` (a run's models or a saved model) and its test split.

  Uses the first `n` test images (default all), the run's eps (or `eps`, with the PGD step scaled
  alike), and CIFAR-10-C from TFDS for runs on TFDS CIFAR-10 when it is prepared. A run with an
  L2 expert beside its L-inf evaluation (a multi-norm run) also gets L2 PGD-20 at that expert's
  radius next to PGD-20, and the union of the two (`attack_table`). An L2 run (`norm="l2"`) gets
  L2 PGD-20 at its own radius (or `eps`), its summary's threat; the table's other attacks and the
  analyses are L-inf, so they run at the standard L-inf threat (`LINF_FOR_L2_RUNS`, 8/255 with
  step 2/255), never at the L2 radius. The key is `engine.attack_key(seed)`, by default of the
  run's own seed: the key of its `summary.json`, so the PGD-20 figures agree with it (for a run
  whose evaluation is PGD-20, on the same images). `sanity_queries` is the Square Attack budget of
  the black-box sanity check (fewer is faster and a weaker check).
  """
  config = run.config
  seed = config.seed if seed is None else seed
  if config.norm == "l2":
    l2 = Threat.of(config, eps=eps)
    threat = dataclasses.replace(l2,
                                 norm="linf",
                                 eps=LINF_FOR_L2_RUNS[0],
                                 step_size=LINF_FOR_L2_RUNS[1])
    if "pgd20-l2" not in attacks:
      attacks = tuple(attacks) + ("pgd20-l2",)
  else:
    threat = Threat.of(config, eps=eps)
    l2 = Threat.of(config, norm="l2")
    if l2 and "pgd20" in attacks and "pgd20-l2" not in attacks:
      attacks = tuple(attacks) + ("pgd20-l2",)
  return evaluate(ModelSet(run.model, run.models),
                  *run.test_split(n),
                  key=engine.attack_key(seed),
                  threat=threat,
                  attacks=attacks,
                  analyses=analyses,
                  analysis_n=analysis_n,
                  batch_size=batch_size,
                  options={
                      "sanity": {
                          "square_queries": sanity_queries
                      },
                      "corruptions": {
                          "cifar10c": config.dataset == "cifar10",
                          "data_dir": config.data_dir
                      }
                  },
                  progress=progress,
                  l2=l2)


def to_markdown(report: Mapping[str, Any]) -> str:
  """The report as markdown: the attack table, then one section per analysis present."""
  names = report["attacks"]
  # Reports written before the threat was recorded give the radii only.
  step = f", PGD step {report['step_size']:.5g}" if "step_size" in report else ""
  l2_step = f", step {report['l2_step_size']:.5g}" if "l2_step_size" in report else ""
  l2 = (f"; L2 attacks ({', '.join(n for n in names if catalogue.ATTACKS[n].norm == 'l2')}) at "
        f"eps = {report['l2_eps']:g}{l2_step}" if "l2_eps" in report else "")
  lines = [
      "## Robust accuracy", "", f"Accuracy (%) under each attack, L-inf eps = {report['eps']:.5f} "
      f"({255 * report['eps']:.2f}/255){step}{l2}, {report['n']} test images.", "",
      "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)
  ]
  for role, row in report["models"].items():
    lines.append(f"| {role} | " + " | ".join(f"{100 * row[n]['accuracy']:.2f}" for n in names) +
                 " |")
  if "union" in report:
    union = report["union"]
    lines += [
        "", "## Union robustness", "",
        f"Accuracy (%) under each norm's attack and their union: an image counts only if it "
        f"survives {' and '.join(union['attacks'])}.", "",
        "| model | " + " | ".join(union["attacks"]) + " | union |",
        "|---|" + "---|" * (len(union["attacks"]) + 1)
    ]
    for role, u in union["models"].items():
      row = report["models"][role]
      lines.append(f"| {role} | " +
                   " | ".join(f"{100 * row[n]['accuracy']:.2f}" for n in union["attacks"]) +
                   f" | {100 * u['accuracy']:.2f} |")
  for name, analysis in ANALYSES.items():
    if name in report:
      lines += ["", f"## {analysis.title}", "", analysis.to_markdown(report[name]).rstrip("\n")]
  return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], directory: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """Writes `report.json`, `report.md` and each analysis' figure (e.g. `boundary.png`).

  Earlier files of the same name are kept (`report.1.json`, ...: see `outputs`).

  Returns:
    {"json", "md", and the analyses' names with a figure} -> path.
  """
  directory = pathlib.Path(directory)
  paths = {"json": outputs.write_json(directory / "report.json", report)}
  paths["md"] = outputs.write_text(directory / "report.md", to_markdown(report))
  for name, analysis in ANALYSES.items():
    if name in report and analysis.plot is not None:
      paths[name] = analysis.plot(report[name], directory / analysis.figure)
  return paths
