"""Comparison studies: which runs a study trains, and what their results add up to.

A study trains `generalist`, `pgd_at` and `natural` on one preset for several seeds, plus named
ablations of Generalist, and asks whether the global model beats the straight line between
standard and adversarial training. The line is measured by the chord score

    chord = (C_g - C_at) / (C_nat - C_at) + (R_g - R_nat) / (R_at - R_nat),

with C clean and R robust accuracy of the Generalist global model (g), the natural model (nat) and
the PGD-AT model (at): 1 on the line, above 1 above it. Each seed gives one score (its three runs
share the seed); the study reports their mean and a Student-t interval.

A multi-norm study (a config listing several experts, e.g. `--preset pilot-multinorm`: natural,
L-inf and L2) trains the Generalist global model and, on the same budget, the natural model and
one single-norm adversarial model per adversarial expert (`multinorm_baselines`: L-inf PGD-AT, L2
PGD-AT), evaluates each under clean, L-inf PGD-20, L2 PGD-20 and their union, and places the
global model against each pair of baselines in the plane of the two figures they trade
(`pair_position`: natural vs L-inf-AT on clean and L-inf accuracy, natural vs L2-AT on clean and
L2, L-inf-AT vs L2-AT on L-inf and L2), the chord score generalised to any pair.

Synopsis::

    plan = study.plan_runs(seeds=(0, 1, 2), ablations=("no-redistribution",))
    for run in plan: ...train dataclasses.replace(config, **run.overrides) in WORKDIR/run.name
    result = study.aggregate(rows)          # rows: name, method, variant, seed, clean, robust
    print(study.to_markdown(result))

    baselines = study.multinorm_baselines(config)   # {"natural": {...}, "pgd_at_linf": {...}, ...}
    plan = study.plan_multinorm_runs((0,), baselines)
    result = study.aggregate_multinorm(rows, study.multinorm_pairs(config, baselines))
    print(study.multinorm_markdown(result))  # rows: variant, seed, clean, linf, l2, union
"""
from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from gen_jax.attacks.threat import Threat
from gen_jax.config import MAX_SEED

BASELINES = ("generalist", "pgd_at", "natural")

# Steps of the reference run: 120 epochs of 391 batches of 128 CIFAR-10 images.
REFERENCE_STEPS = 120 * 391
REFERENCE_EMA_DECAY = 0.999


def paper_scaled_ema_decay(total_steps: int,
                           reference_steps: int = REFERENCE_STEPS,
                           reference_decay: float = REFERENCE_EMA_DECAY) -> float:
  """The EMA decay whose window is the same share of a `total_steps` run as 0.999's of the paper's.

  The window 1 / (1 - d) of the reference (1,000 steps) is 2.1 % of its 46,920 steps; a run of
  1,480 steps gets a window of 32 steps (d = 0.968). With the reference's fractional
  redistribution schedule this also restores the paper's ratio of free steps between
  redistributions to the EMA window.

  >>> round(paper_scaled_ema_decay(46920), 4)
  0.999
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
  window = (1.0 / (1.0 - reference_decay)) * total_steps / reference_steps
  return float(max(0.0, 1.0 - 1.0 / max(window, 1.0)))


@dataclasses.dataclass(frozen=True)
class AblationContext:
  """What an ablation's overrides may depend on: the study's config (before the ablation), its
  run length, the seed and the study directory (where the seed's baselines live)."""
  config: Any
  steps_per_epoch: int
  seed: int = 0
  study_dir: str = "."

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.config.epochs


def ablation_overrides(name: str, context: AblationContext) -> dict[str, Any]:
  """Config overrides of the named Generalist ablation (see `ABLATIONS`)."""
  if name not in ABLATIONS:
    raise ValueError(f"unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}.")
  entry = ABLATIONS[name]
  overrides = dict(entry(context) if callable(entry) else entry)
  if overrides.get("ema_decay") == "paper-scaled":
    overrides["ema_decay"] = round(paper_scaled_ema_decay(context.total_steps), 4)
  return overrides


# The clean budget given to the natural expert by the clean-budget variants: DIAGNOSTIC_STEPS
# steps at DIAGNOSTIC_LR. The mechanism diagnostic (`gen_jax.finetune`: a PGD-AT model fine-tuned
# on clean images, then mixed with it) found no budget whose mixtures rise above the natural /
# PGD-AT line on `cifar10-study` over 3 seeds (docs/results.md); this is the larger of its two
# budgets whose best point is the line or above on average (50 steps at 0.005, the other one, is
# what the reference schedule already gives), so the variants test the larger clean budget.
DIAGNOSTIC_STEPS = 200
DIAGNOSTIC_LR = 0.02
# The length of the warm-started Generalist phase, in epochs of the study's data.
WARM_START_EPOCHS = 6


def _natural_lr(context: AblationContext) -> dict[str, Any]:
  """The natural expert's own learning rate: the robust schedule times the multiple that makes
  it DIAGNOSTIC_LR at the first redistribution (the clean budget of its free phases)."""
  from gen_jax.training import schedules  # pylint: disable=import-outside-toplevel
  config = context.config
  table = schedules.learning_rate_table(config.lr_rob, config, context.steps_per_epoch)
  at_start = float(table[math.ceil(config.redistribute_start * context.total_steps)])
  return {"lr_nat": round(config.lr_rob * DIAGNOSTIC_LR / at_start, 6)}


def _free_periods(duty: float, late_steps: int, total_steps: int) -> dict[str, Any]:
  """Redistribution periods whose free phase is DIAGNOSTIC_STEPS long, as many as fit in the
  last `late_steps` of the run, the last one ending with the run."""
  period_steps = DIAGNOSTIC_STEPS / (1.0 - duty)
  periods = max(1, math.floor(late_steps / period_steps))
  period = period_steps / total_steps
  return {
      "redistribute_period": round(period, 6),
      "redistribute_start": round(max(0.0, 1.0 - periods * period), 6)
  }


def _free_budget(context: AblationContext) -> dict[str, Any]:
  """Fewer, longer free phases in the late part of the reference schedule (from its start of
  redistribution), each DIAGNOSTIC_STEPS long."""
  config, total = context.config, context.total_steps
  late = round((1.0 - config.redistribute_start) * total)
  return _free_periods(config.redistribute_duty, late, total)


def _warm_start(context: AblationContext, method: str = "generalist") -> dict[str, Any]:
  """Only the late phase, from the seed's trained PGD-AT model, for WARM_START_EPOCHS epochs.

  Constant learning rates: the robust expert keeps PGD-AT's final one (it stays where PGD-AT
  ended), the natural expert gets DIAGNOSTIC_LR; β falls from 1 to β_final over the phase and
  the redistribution periods give free phases of DIAGNOSTIC_STEPS, the last ending with the run.
  With `method="pgd_at"`: the same continuation of PGD-AT alone (the comparison at an equal
  number of steps)."""
  config = context.config
  epochs = WARM_START_EPOCHS
  total = epochs * context.steps_per_epoch
  overrides = {
      "init_from": str(pathlib.Path(context.study_dir) / f"pgd_at-s{context.seed}"),
      "epochs": epochs,
      "lr_knots": (0.0, 1.0),
      "lr_factors": (1.0, 1.0),
      "lr_rob": round(config.lr_rob * config.lr_factors[-1], 8),
  }
  if method == "pgd_at":
    return overrides
  return {
      **overrides, "lr_nat": DIAGNOSTIC_LR,
      "beta_start": 0.0,
      **_free_periods(config.redistribute_duty, total, total)
  }


# Each ablation changes one component of Generalist; the reference schedule stays the default.
# An entry is the config overrides, or a function of the `AblationContext` returning them.
ABLATIONS: dict[str, Any] = {
    # The experts are never reset to the global model.
    "no-redistribution": {
        "redistribute": False
    },
    # Two redistribution periods of a fifth of the run instead of ten of 1/24: the experts get
    # about 3 epochs (1.5-2 EMA windows, as at paper scale) of free training between resets.
    "long-periods": {
        "redistribute_period": 0.2
    },
    # The teachers' EMA window scaled to the run length (see `paper_scaled_ema_decay`).
    "ema-scaled": {
        "ema_decay": "paper-scaled"
    },
    # More robust weight in the final global model.
    "beta0.6": {
        "beta_final": 0.6
    },
    "beta0.8": {
        "beta_final": 0.8
    },
    # The clean budget of the mechanism diagnostic given to the natural expert: its own learning
    # rate (the paper's task-aware strategy; the reference code uses the robust one's) ...
    "natural-lr": _natural_lr,
    # ... or free phases of the diagnostic's length in the late part of the run ...
    "free-budget": _free_budget,
    # ... or both at once.
    "free-budget-lr": lambda context: {
        **_natural_lr(context),
        **_free_budget(context)
    },
    # Only the late phase, warm-started from the seed's PGD-AT run (see `_warm_start`), and PGD-AT
    # continued from the same model for the same steps.
    "warm-start": _warm_start,
    "warm-start-pgd_at": functools.partial(_warm_start, method="pgd_at"),
}
# The method of an ablation that is not a Generalist run.
ABLATION_METHODS = {"warm-start-pgd_at": "pgd_at"}


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  """One training run of a study: its directory name, method, variant and seed."""
  name: str
  method: str
  variant: str  # the method for a baseline, else the ablation's name
  seed: int


def plan_runs(seeds: Sequence[int],
              ablations: Iterable[str] = (),
              ablation_seeds: Sequence[int] | None = None) -> list[PlannedRun]:
  """The study's runs in the order they train: baselines seed by seed, then the ablations.

  Seed-major order means an interrupted study already has complete seeds to aggregate.
  """
  seeds = _unique_ints(seeds, "seeds")
  ablation_seeds = _unique_ints(ablation_seeds if ablation_seeds is not None else seeds[:1],
                                "ablation_seeds")
  runs = [
      PlannedRun(f"{method}-s{seed}", method, method, seed)
      for seed in seeds
      for method in ("natural", "pgd_at", "generalist")
  ]
  for name in ablations:
    if name not in ABLATIONS:
      raise ValueError(f"unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}.")
    method = ABLATION_METHODS.get(name, "generalist")
    runs += [PlannedRun(f"{name}-s{seed}", method, name, seed) for seed in ablation_seeds]
  return runs


def _unique_ints(values: Sequence[int], what: str) -> list[int]:
  values = [int(v) for v in values]
  if not values:
    raise ValueError(f"{what} is empty; give at least one seed.")
  if len(set(values)) != len(values):
    raise ValueError(f"{what} repeats a seed: {values}.")
  if min(values) < 0 or max(values) > MAX_SEED:
    raise ValueError(f"{what} must lie in [0, 2**32 - 1], got {values}.")
  return values


def chord_score(clean: Mapping[str, float], robust: Mapping[str, float]) -> float:
  """The chord score of `generalist` against `natural` and `pgd_at`; NaN when a gap is zero.

  >>> chord_score({"generalist": .5, "natural": .6, "pgd_at": .4},
  ...             {"generalist": .2, "natural": 0., "pgd_at": .4})
  1.0
  """
  c_gap = clean["natural"] - clean["pgd_at"]
  r_gap = robust["pgd_at"] - robust["natural"]
  if c_gap == 0 or r_gap == 0:
    return math.nan
  return ((clean["generalist"] - clean["pgd_at"]) / c_gap +
          (robust["generalist"] - robust["natural"]) / r_gap)


def spread(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
  """Mean, sample standard deviation and two-sided Student-t interval of the mean.

  With one value the deviation and interval are NaN (nothing to estimate them from).

  >>> s = spread([1.0, 2.0, 3.0])
  >>> s["mean"], s["std"], round(s["low"], 3), round(s["high"], 3)
  (2.0, 1.0, -0.484, 4.484)
  """
  values = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
  n = len(values)
  if n == 0:
    return {"n": 0, "mean": math.nan, "std": math.nan, "low": math.nan, "high": math.nan}
  mean = float(values.mean())
  if n == 1:
    return {"n": 1, "mean": mean, "std": math.nan, "low": math.nan, "high": math.nan}
  from scipy import stats  # pylint: disable=import-outside-toplevel
  std = float(values.std(ddof=1))
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
  return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


def aggregate(rows: Sequence[Mapping[str, Any]], confidence: float = 0.95) -> dict[str, Any]:
  """Per-variant means and spreads, per-seed chord scores and their interval.

  Args:
    rows: one per finished run, with `variant`, `seed`, `clean` and `robust` (fractions).
      Baseline variants are the method names of `BASELINES`.
    confidence: of the Student-t intervals.

  Returns:
    `{"variants": {variant: {"clean": spread, "robust": spread, "seeds": [...]}},
    "chord": {"per_seed": {seed: score}, **spread, "excludes_one": bool | None},
    "ablations": {variant: {"per_seed": {...}, **spread}}}`. A seed gets a chord score only when
    all three baselines of that seed are finished; an ablation is scored against the baselines of
    its own seed. `excludes_one` is None until two seeds are scored.
  """
  by_variant: dict[str, dict[int, Mapping[str, Any]]] = {}
  for row in rows:
    by_variant.setdefault(row["variant"], {})[int(row["seed"])] = row
  variants = {
      v: {
          "seeds": sorted(runs),
          "clean": spread([r["clean"] for r in runs.values()], confidence),
          "robust": spread([r["robust"] for r in runs.values()], confidence),
      } for v, runs in by_variant.items()
  }

  def scores_of(variant: str) -> dict[int, float]:
    out = {}
    for seed, row in sorted(by_variant.get(variant, {}).items()):
      base = {m: by_variant.get(m, {}).get(seed) for m in ("natural", "pgd_at")}
      if all(base.values()):
        clean = {"generalist": row["clean"], **{m: b["clean"] for m, b in base.items()}}
        robust = {"generalist": row["robust"], **{m: b["robust"] for m, b in base.items()}}
        out[seed] = chord_score(clean, robust)
    return out

  per_seed = scores_of("generalist")
  chord = {"per_seed": per_seed, **spread(list(per_seed.values()), confidence)}
  chord["excludes_one"] = (None if chord["n"] < 2 else not chord["low"] <= 1.0 <= chord["high"])
  ablations = {}
  for variant in by_variant:
    if variant not in BASELINES:
      scores = scores_of(variant)
      ablations[variant] = {"per_seed": scores, **spread(list(scores.values()), confidence)}
  return {"confidence": confidence, "variants": variants, "chord": chord, "ablations": ablations}


# A study's sweeps: run name -> a result of `gen_jax.evaluation.sweep.run`.
_Sweeps = Mapping[str, Mapping[str, Any]]


def sweep_chords(rows: Sequence[Mapping[str, Any]], sweeps: _Sweeps) -> dict[str, dict[str, Any]]:
  """Per swept run: the chord score of every mixture against the baselines of its seed.

  Args:
    rows: the finished runs (as for `aggregate`; `name`, `variant`, `seed`, `clean`, `robust`).
    sweeps: run name -> a result of `gen_jax.evaluation.sweep.run` (points with beta, clean,
      robust).

  Returns:
    run name -> {"variant", "seed", "chords": [score per point], "best_beta", "best_chord"}, for
    the swept runs whose seed has both baselines.
  """
  base = {(r["variant"], int(r["seed"])): r for r in rows}
  out = {}
  for row in rows:
    sweep = sweeps.get(row["name"])
    nat, at = base.get(("natural", int(row["seed"]))), base.get(("pgd_at", int(row["seed"])))
    if sweep is None or nat is None or at is None:
      continue
    chords = [
        chord_score({
            "generalist": p["clean"],
            "natural": nat["clean"],
            "pgd_at": at["clean"]
        }, {
            "generalist": p["robust"],
            "natural": nat["robust"],
            "pgd_at": at["robust"]
        }) for p in sweep["points"]
    ]
    best = int(np.nanargmax(chords)) if not all(math.isnan(c) for c in chords) else 0
    out[row["name"]] = {
        "variant": row["variant"],
        "seed": int(row["seed"]),
        "chords": chords,
        "best_beta": sweep["points"][best]["beta"],
        "best_chord": chords[best],
    }
  return out


def plot_study(rows: Sequence[Mapping[str, Any]],
               sweeps: _Sweeps,
               path,
               robust_name: str = "PGD-20"):
  """One figure of a study: every run, each seed's chord, the sweep curves; saves a PNG.

  Baselines and the Generalist global models are points per seed (natural, PGD-AT, Generalist);
  each seed's chord joins its natural and PGD-AT models (dashed); ablations are labelled
  crosses; each swept run adds its curve of `mix(natural, robust, beta)` (thin line). The left
  panel shows the whole plane; the right one zooms on the PGD-AT and Generalist runs, which
  crowd together when the method loses its clean lead (`zoom_window`).
  """
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  from gen_jax.evaluation import outputs  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(13, 5.5), layout="constrained")
  full, zoom = fig.subplots(1, 2)
  _draw_study(full, rows, sweeps)
  _draw_study(zoom, rows, sweeps)
  window = zoom_window(rows)
  if window is not None:
    zoom.set_xlim(window[0])
    zoom.set_ylim(window[1])
  for ax, title in ((full, "Clean / robust trade-off: every run of the study"),
                    (zoom, "Zoom: PGD-AT and Generalist runs")):
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"{robust_name} accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
  full.legend(fontsize=7, loc="best")
  return outputs.save_figure(fig, path)


def zoom_window(rows: Sequence[Mapping[str, Any]],
                margin: float = 0.25,
                least: float = 1.5) -> tuple[tuple[float, float], tuple[float, float]] | None:
  """Axis limits (in %) around the PGD-AT and Generalist (reference) runs; None without one.

  Each axis spans those runs' range widened by `margin` of it on both sides, and at least `least`
  points either side, so that a tight cluster still gets a readable window. Ablations inside the
  window show in it; one far away (such as an average of two unrelated experts) shows only in
  the full panel, so that it does not shrink the cluster back to a dot.

  >>> zoom_window([{"variant": "natural", "clean": .9, "robust": 0.},
  ...              {"variant": "pgd_at", "clean": .44, "robust": .27},
  ...              {"variant": "generalist", "clean": .46, "robust": .25},
  ...              {"variant": "no-redistribution", "clean": .3, "robust": .1}])
  ((42.5, 47.5), (23.5, 28.5))
  """
  points = [(100.0 * r["clean"], 100.0 * r["robust"])
            for r in rows
            if r["variant"] in ("pgd_at", "generalist")]
  if not points:
    return None

  def limits(values):
    low, high = min(values), max(values)
    pad = max(margin * (high - low), least)
    return (round(low - pad, 6), round(high + pad, 6))

  return limits([p[0] for p in points]), limits([p[1] for p in points])


def _draw_study(ax, rows: Sequence[Mapping[str, Any]], sweeps: _Sweeps) -> None:
  """Draws the points, chords and sweep curves of `plot_study` on one axes."""
  pct = lambda v: 100.0 * v
  style = {
      "natural": ("s", "tab:green", "natural training"),
      "pgd_at": ("^", "tab:orange", "PGD-AT"),
      "generalist": ("*", "tab:red", "Generalist (global model)"),
  }
  by_seed: dict[int, dict[str, Mapping[str, Any]]] = {}
  for row in rows:
    by_seed.setdefault(int(row["seed"]), {})[row["variant"]] = row
  for seed, variants in sorted(by_seed.items()):
    if "natural" in variants and "pgd_at" in variants:
      a, b = variants["natural"], variants["pgd_at"]
      ax.plot([pct(a["clean"]), pct(b["clean"])],
              [pct(a["robust"]), pct(b["robust"])],
              "--",
              color="gray",
              linewidth=0.8,
              label="chord (natural to PGD-AT), per seed" if seed == min(by_seed) else None)
  labelled = set()
  ablation_colors = iter([
      "tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "black",
      "tab:gray"
  ])
  colors = {}
  for row in rows:
    variant = row["variant"]
    if variant in style:
      marker, color, label = style[variant]
    else:
      colors.setdefault(variant, next(ablation_colors, "black"))
      marker, color, label = "X", colors[variant], f"Generalist, {variant}"
    ax.scatter([pct(row["clean"])], [pct(row["robust"])],
               marker=marker,
               s=140 if marker == "*" else 60,
               color=color,
               edgecolor="black" if marker == "*" else None,
               label=None if label in labelled else label,
               zorder=4)
    labelled.add(label)
    sweep = sweeps.get(row["name"])
    if sweep is not None:
      xs = [pct(p["clean"]) for p in sweep["points"]]
      ys = [pct(p["robust"]) for p in sweep["points"]]
      sweep_label = f"mix(teachers, beta) of {variant} runs"
      ax.plot(xs,
              ys,
              ".-",
              color=color,
              linewidth=0.9,
              markersize=3,
              alpha=0.6,
              label=None if sweep_label in labelled else sweep_label,
              zorder=2)
      labelled.add(sweep_label)


def to_markdown(result: Mapping[str, Any],
                robust_name: str = "PGD-20",
                sweep_chords: Mapping[str, Mapping[str, Any]] | None = None) -> str:
  """Tables of an `aggregate` result (accuracy and chord per variant), and of `sweep_chords`."""

  def pct(s):
    if s["n"] == 0:
      return "-"
    if s["n"] == 1:
      return f"{100 * s['mean']:.2f}"
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"

  lines = [
      f"| variant | seeds | clean (%) | {robust_name} (%) | chord score |",
      "|---|---|---|---|---|",
  ]
  chord_of = {"generalist": result["chord"], **result["ablations"]}
  for variant, v in result["variants"].items():
    c = chord_of.get(variant)
    chord = "-" if c is None or c["n"] == 0 else (
        f"{c['mean']:.3f}" if c["n"] == 1 else f"{c['mean']:.3f} ± {c['std']:.3f}")
    lines.append(f"| {variant} | {','.join(map(str, v['seeds']))} | {pct(v['clean'])} | "
                 f"{pct(v['robust'])} | {chord} |")
  c = result["chord"]
  if c["n"] >= 2:
    verdict = ("excludes 1" if c["excludes_one"] else "contains 1")
    lines.append("")
    lines.append(f"Chord score of the global model over {c['n']} seeds: {c['mean']:.3f} "
                 f"(std {c['std']:.3f}; {100 * result['confidence']:.0f} % interval "
                 f"[{c['low']:.3f}, {c['high']:.3f}], which {verdict}).")
  if sweep_chords:
    lines += [
        "", "| swept run | best beta | best mixture's chord | chord per beta |", "|---|---|---|---|"
    ]
    lines += [
        f"| {name} | {c['best_beta']:.2f} | {c['best_chord']:.3f} | "
        f"{', '.join(f'{v:.2f}' for v in c['chords'])} |" for name, c in sweep_chords.items()
    ]
  return "\n".join(lines)


# ------------------------------------------------------------------------ multi-norm studies
MULTINORM_METRICS = ("clean", "linf", "l2", "union")
_METRIC_NAMES = {"clean": "clean", "linf": "L-inf PGD-20", "l2": "L2 PGD-20", "union": "union"}


def multinorm_baselines(config: Any) -> dict[str, dict[str, Any]]:
  """The single-expert baselines of a multi-expert config, on its budget: variant -> overrides.

  One run per expert of `config.expert_specs`: `natural` for a clean expert, `pgd_at_<norm>`
  (or `trades_<norm>`) for an adversarial one, with that expert's attack and optimiser in the
  flat fields (`--method pgd_at --norm l2 --eps 0.5 ...`) and no expert list. The evaluation step
  of a baseline scales with its radius as the run's does (`attacks.threat.Threat.of`).
  Two experts of one norm get their role in the name (`pgd_at_robust_big`).
  """
  variants: dict[str, dict[str, Any]] = {}
  for spec in config.expert_specs:
    common = {"experts_spec": (), "expert_weights_final": ()}
    if not spec.adversarial:
      name = "natural" if "natural" not in variants else f"natural_{spec.role}"
      variants[name] = {
          "method": "natural",
          "lr_nat": spec.lr,
          "weight_decay_nat": spec.weight_decay,
          **common
      }
      continue
    method = "pgd_at" if spec.objective == "pgd" else "trades"
    name = f"{method}_{spec.norm}"
    if name in variants:
      name = f"{method}_{spec.role}"
    variants[name] = {
        "method": method,
        "norm": spec.norm,
        "eps": spec.eps,
        "step_size": spec.step_size,
        "pgd_steps": spec.steps,
        "lr_rob": spec.lr,
        "weight_decay_rob": spec.weight_decay,
        **common
    }
    if spec.eps != config.eps:
      variants[name]["eval_step_size"] = float(f"{Threat.of(config, eps=spec.eps).step_size:.10g}")
  return variants


def plan_multinorm_runs(seeds: Sequence[int],
                        baselines: Mapping[str, Mapping[str, Any]]) -> list[PlannedRun]:
  """The runs of a multi-norm study, seed by seed: each baseline of `baselines`, then the
  Generalist global model (variant `generalist`)."""
  runs = []
  for seed in _unique_ints(seeds, "seeds"):
    runs += [PlannedRun(f"{v}-s{seed}", baselines[v]["method"], v, seed) for v in baselines]
    runs.append(PlannedRun(f"generalist-s{seed}", "generalist", "generalist", seed))
  return runs


def multinorm_pairs(config: Any,
                    baselines: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str, str]]:
  """The pairs of baselines the global model is placed against, each with the figures they trade:
  `(a, b, metric_a, metric_b)`, a better in metric_a and b in metric_b. The natural model against
  each adversarial one (clean vs its norm), and adversarial models of different norms (L-inf vs
  L2, say)."""
  natural = [v for v, o in baselines.items() if o["method"] == "natural"]
  adversarial = [(v, o["norm"]) for v, o in baselines.items() if o["method"] != "natural"]
  pairs = [(n, v, "clean", norm) for n in natural[:1] for v, norm in adversarial]
  for i, (a, norm_a) in enumerate(adversarial):
    for b, norm_b in adversarial[i + 1:]:
      if norm_a != norm_b:
        pairs.append((a, b, norm_a, norm_b))
  return pairs


def pair_position(g: Mapping[str, float], a: Mapping[str, float], b: Mapping[str, float],
                  metric_a: str, metric_b: str) -> dict[str, float]:
  """Where model g sits against the pair (a, b) in the plane of (metric_a, metric_b).

  `keeps_a` is the share of a's lead in metric_a that g keeps, `keeps_b` the share of b's lead in
  metric_b; their sum `score` is 1 on the straight line from a to b and above 1 above it (the
  chord score of `chord_score` for a = natural, b = PGD-AT, metrics clean and robust). NaN where
  a gap is zero.

  >>> pair_position({"clean": .5, "linf": .2}, {"clean": .6, "linf": 0.}, {"clean": .4, "linf": .4},
  ...               "clean", "linf")
  {'keeps_a': 0.5, 'keeps_b': 0.5, 'score': 1.0}
  """
  gap_a, gap_b = a[metric_a] - b[metric_a], b[metric_b] - a[metric_b]
  keeps_a = (g[metric_a] - b[metric_a]) / gap_a if gap_a else math.nan
  keeps_b = (g[metric_b] - a[metric_b]) / gap_b if gap_b else math.nan
  return {
      "keeps_a": round(keeps_a, 12),
      "keeps_b": round(keeps_b, 12),
      "score": round(keeps_a + keeps_b, 12)
  }


def aggregate_multinorm(rows: Sequence[Mapping[str, Any]],
                        pairs: Sequence[tuple[str, str, str, str]],
                        confidence: float = 0.95) -> dict[str, Any]:
  """Per variant the mean and spread of each figure; per pair the global model's position.

  Args:
    rows: one per finished run, with `variant`, `seed` and the figures of `MULTINORM_METRICS`
      it has (fractions); the global model's variant is `generalist`.
    pairs: from `multinorm_pairs`.
    confidence: of the Student-t intervals.

  Returns:
    {"confidence", "metrics", "variants": {variant: {"seeds", metric: spread}}, "pairs": [{"a",
    "b", "metric_a", "metric_b", "per_seed": {seed: pair_position}, "score": spread}]}; a seed
    counts for a pair once its global model and both baselines are finished.
  """
  by_variant: dict[str, dict[int, Mapping[str, Any]]] = {}
  for row in rows:
    by_variant.setdefault(row["variant"], {})[int(row["seed"])] = row
  metrics = [m for m in MULTINORM_METRICS if any(m in r for r in rows)]
  variants = {
      v: {
          "seeds": sorted(runs),
          **{
              m: spread([r[m] for r in runs.values() if m in r], confidence) for m in metrics
          }
      } for v, runs in by_variant.items()
  }
  placed = []
  for a, b, metric_a, metric_b in pairs:
    per_seed = {}
    for seed, g in sorted(by_variant.get("generalist", {}).items()):
      ra, rb = by_variant.get(a, {}).get(seed), by_variant.get(b, {}).get(seed)
      if ra is not None and rb is not None:
        per_seed[seed] = pair_position(g, ra, rb, metric_a, metric_b)
    placed.append({
        "a": a,
        "b": b,
        "metric_a": metric_a,
        "metric_b": metric_b,
        "per_seed": per_seed,
        "score": spread([p["score"] for p in per_seed.values()], confidence)
    })
  return {"confidence": confidence, "metrics": metrics, "variants": variants, "pairs": placed}


def multinorm_markdown(result: Mapping[str, Any]) -> str:
  """The tables of `aggregate_multinorm`: accuracy per variant, the global model's positions."""

  def pct(s):
    if s["n"] == 0:
      return "-"
    return f"{100 * s['mean']:.2f}" + (f" ± {100 * s['std']:.2f}" if s["n"] > 1 else "")

  metrics = result["metrics"]
  lines = [
      "| model | seeds | " + " | ".join(f"{_METRIC_NAMES[m]} (%)" for m in metrics) + " |",
      "|---|---|" + "---|" * len(metrics)
  ]
  for variant, v in result["variants"].items():
    name = "generalist (global model)" if variant == "generalist" else variant
    lines.append(f"| {name} | {','.join(map(str, v['seeds']))} | " +
                 " | ".join(pct(v[m]) for m in metrics) + " |")
  if result["pairs"]:
    lines += [
        "", "Where the global model sits against each pair (a, b): the share of a's lead it "
        "keeps, the share of b's lead it keeps, and their sum (1: on the straight line from a to "
        "b; above 1: above it).", "", "| pair (a vs b) | plane | keeps a's lead | keeps b's lead "
        "| score |", "|---|---|---|---|---|"
    ]
    for p in result["pairs"]:
      if not p["per_seed"]:
        continue
      mean = {
          k: float(np.mean([s[k] for s in p["per_seed"].values()]))
          for k in ("keeps_a", "keeps_b", "score")
      }
      lines.append(f"| {p['a']} vs {p['b']} | {_METRIC_NAMES[p['metric_a']]} / "
                   f"{_METRIC_NAMES[p['metric_b']]} | {mean['keeps_a']:.3f} | "
                   f"{mean['keeps_b']:.3f} | {mean['score']:.3f} |")
  return "\n".join(lines)


def plot_multinorm(rows: Sequence[Mapping[str, Any]], pairs: Sequence[tuple[str, str, str, str]],
                   path):
  """One panel per pair of baselines, in the plane of the two figures they trade: every run as a
  point (per seed), the straight line between the pair (dashed) and the global model (star);
  saves a PNG."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  from gen_jax.evaluation import outputs  # pylint: disable=import-outside-toplevel

  pct = lambda v: 100.0 * v
  panels = list(pairs) or [("natural", "generalist", "clean", "linf")]
  cols = min(3, len(panels))
  rows_n = -(-len(panels) // cols)
  fig = Figure(figsize=(5.0 * cols, 4.4 * rows_n), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows_n, cols)).reshape(-1)
  colors = ["tab:green", "tab:orange", "tab:blue", "tab:purple", "tab:brown", "tab:pink"]
  variants = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] != "generalist"))
  color = {v: colors[i % len(colors)] for i, v in enumerate(variants)}
  for ax, (a, b, ma, mb) in zip(axes, panels):
    by_seed: dict[int, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
      by_seed.setdefault(int(row["seed"]), {})[row["variant"]] = row
    for runs in by_seed.values():
      if a in runs and b in runs and ma in runs[a] and mb in runs[b]:
        ax.plot([pct(runs[a][ma]), pct(runs[b][ma])],
                [pct(runs[a][mb]), pct(runs[b][mb])],
                "--",
                color="gray",
                linewidth=0.8)
    labelled = set()
    for row in rows:
      if ma not in row or mb not in row:
        continue
      star = row["variant"] == "generalist"
      label = "Generalist (global model)" if star else row["variant"]
      ax.scatter([pct(row[ma])], [pct(row[mb])],
                 marker="*" if star else "o",
                 s=200 if star else 50,
                 color="tab:red" if star else color[row["variant"]],
                 edgecolor="black" if star else None,
                 label=None if label in labelled else label,
                 zorder=4)
      labelled.add(label)
    ax.set_xlabel(f"{_METRIC_NAMES[ma]} accuracy (%)")
    ax.set_ylabel(f"{_METRIC_NAMES[mb]} accuracy (%)")
    ax.set_title(f"{a} vs {b}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  return outputs.save_figure(fig, path)
