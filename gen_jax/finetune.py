"""Generalist's mechanism in isolation: a robust model, its clean fine-tune, and their mixtures.

The global model of Generalist is a weight-space mixture of a robust expert and a natural expert
that, after every redistribution, restarts from the (mostly robust) global weights and trains on
clean images for the free steps of a period. This module measures that mechanism without the
schedule around it: a trained robust model (the final model of a PGD-AT run) is fine-tuned on
clean images for K steps at a constant learning rate η, and `mix(fine-tuned, robust, β)` is
evaluated for several β. A mixture above the straight line between natural training and PGD-AT
(chord score above 1, `study.chord_score`) says the mechanism can beat the trade-off with that
clean budget; whether a Generalist schedule gives its natural expert that budget is a separate
question (the study's variants ask it).

The fine-tune is natural training started from the robust model: the project's one jitted step
(`training.make_train_step` of a `method="natural"` config: the same augmentation, SGD with
momentum 0.9 and the natural expert's weight decay), momentum starting at zero, a constant
learning rate, and the data order of the robust run's seed. The fine-tuned model is the raw
expert after K steps, not its EMA teacher, which would lag behind the K steps being measured.

Mixtures and the two baselines (the natural and the PGD-AT run's final models) are evaluated
by the one correctness engine (`evaluate`: `evaluation.evaluate_models`) with the robust run's
evaluation key, batch size and threat model, as a run's final summary is: every model of a seed
meets the same per-example keys, and β = 1 is exactly the PGD-AT baseline.

Synopsis::

    config = runs.read_config("study/pgd_at-s0")
    splits = runs.load_splits(config)
    robust, _ = runs.load_init("study/pgd_at-s0", config, abstract, num_classes=10)
    for k, tuned in finetune(config, robust, splits, lr=0.02, at_steps=(50, 200, 800)):
      figures = evaluate_mixtures(config, tuned, robust, splits, betas=(0.0, 0.5))
    table = summarize(points, baselines)   # best chord per (lr, steps), over seeds
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gen_jax import checkpoint, mixing, parallel, runs, study
from gen_jax.attacks.threat import Threat
from gen_jax.config import Config
from gen_jax.evaluation import sweep
from gen_jax.evaluation.accuracy import evaluate_models
from gen_jax.training import steps as steps_lib
from gen_jax.training.loop import epoch_order, stream_keys
from gen_jax.experts import NATURAL

Variables = Any


def finetune_config(config: Config, *, lr: float, total_steps: int, steps_per_epoch: int) -> Config:
  """The config of a clean fine-tune of `config`'s network: method natural, constant `lr`.

  Enough epochs to hold `total_steps`; everything else (data, network, weight decay, momentum,
  augmentation, seed) is the source run's.
  """
  if not lr > 0 or not math.isfinite(lr):
    raise ValueError(f"the fine-tuning learning rate must be a positive number, got {lr}.")
  if total_steps < 1:
    raise ValueError(f"the fine-tune needs at least one step, got {total_steps}.")
  return dataclasses.replace(config,
                             method=NATURAL,
                             lr_nat=float(lr),
                             lr_knots=(0.0, 1.0),
                             lr_factors=(1.0, 1.0),
                             epochs=-(-total_steps // steps_per_epoch),
                             experts_spec=(),
                             expert_weights_final=(),
                             init_from=None).validate()


def finetune(config: Config,
             variables: Variables,
             splits: runs.Splits,
             *,
             lr: float,
             at_steps: Sequence[int],
             checkpoint_dir: str | pathlib.Path | None = None) -> Iterator[tuple[int, Variables]]:
  """Fine-tunes `variables` on clean training images; yields `(k, variables)` at each k.

  Args:
    config: the source run's config (network, data, optimiser settings, seed).
    variables: the model to start from (host or device arrays).
    splits: the run's data (`runs.load_splits(config)`): the training split is used.
    lr: the constant learning rate.
    at_steps: the step counts to yield at, increasing.
    checkpoint_dir: where the state is saved at each k (an orbax directory of its own), so
      that a rerun yields the saved ones without training and continues after the last.

  Yields:
    `(k, raw natural expert's variables after k steps)` for every k of `at_steps`, in order.
  """
  at_steps = [int(k) for k in at_steps]
  if not at_steps or at_steps != sorted(set(at_steps)) or at_steps[0] < 1:
    raise ValueError(f"at_steps must increase from 1 or more, got {at_steps}.")
  steps_per_epoch = len(splits.train_y) // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"the training split has {len(splits.train_y)} images, fewer than one batch "
                     f"of {config.batch_size}.")
  tuned = finetune_config(config, lr=lr, total_steps=at_steps[-1], steps_per_epoch=steps_per_epoch)
  mesh = parallel.make_mesh()
  replicated, batch_sharding = parallel.replicated(mesh), parallel.data_sharding(mesh)
  model = runs.build_model(tuned, splits.num_classes)
  keys = stream_keys(tuned.seed)
  create = jax.jit(lambda v: steps_lib.create_train_state(
      tuned, model, keys["init"], image_shape=tuple(splits.train_x.shape[1:]), variables=v),
                   out_shardings=replicated)
  manager = None if checkpoint_dir is None else checkpoint.open_manager(checkpoint_dir,
                                                                        max_to_keep=None)
  try:
    saved = [] if manager is None else [k for k in checkpoint.steps(manager) if k in at_steps]
    state = create(variables)
    abstract = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), state)
    for k in saved:
      state, _ = checkpoint.restore(manager, abstract, step=k)
      yield k, _copy(state.experts[NATURAL].variables)
    step = saved[-1] if saved else 0
    todo = [k for k in at_steps if k > step]
    if not todo:
      return
    tables = parallel.replicate(steps_lib.schedule_arrays(tuned, steps_per_epoch), mesh)
    step_fn = steps_lib.make_train_step(tuned, model)
    totals = parallel.replicate(steps_lib.zero_totals(tuned), mesh)
    order, order_epoch = None, None
    while todo:
      epoch, index = divmod(step, steps_per_epoch)
      if epoch != order_epoch:  # the training loop's data order of this seed
        order = epoch_order(keys["data"], epoch, len(splits.train_y))
        order_epoch = epoch
      rows = order[index * tuned.batch_size:(index + 1) * tuned.batch_size]
      images, labels = parallel.global_batch((splits.train_x, splits.train_y), rows, batch_sharding)
      state, totals = step_fn(state, totals, images, labels, keys["train"], tables)
      step += 1
      if step == todo[0]:
        todo.pop(0)
        if manager is not None:
          checkpoint.save(manager, step, state, {"step": step, "lr": float(lr)})
        yield step, _copy(state.experts[NATURAL].variables)
  finally:
    if manager is not None:
      manager.close()


def _copy(tree: Variables) -> Variables:
  """Fresh buffers: the next training step donates (frees) the state's own."""
  return jax.tree_util.tree_map(jnp.copy, tree)


BN_MODES = ("mixed",) + sweep.RECALIBRATION_MODES


def recalibrator(config: Config,
                 splits: runs.Splits,
                 mode: str,
                 *,
                 n: int = 2000) -> Callable[[Variables, float], Variables] | None:
  """How a mixture's BatchNorm statistics are set; None for "mixed" (averaged as the weights).

  "clean" and "matched" re-estimate them on `n` training images drawn at random (seeded by the
  run's seed), as `sweep_mix.py --bn-recalibrate` does (`evaluation.sweep.recalibrator`), in
  batches of the training batch size (the batches whose statistics BatchNorm saw in training);
  the matched mode attacks with the run's training threat and a key of its own.
  """
  if mode not in BN_MODES:
    raise ValueError(f"unknown BatchNorm mode {mode!r}; choose from {BN_MODES}.")
  if mode == "mixed":
    return None
  images, labels = runs.training_subset(splits.train_x, splits.train_y, n, seed=config.seed)
  return sweep.recalibrator(runs.build_model(config, splits.num_classes, for_evaluation=True),
                            images,
                            mode=mode,
                            labels=labels,
                            key=jax.random.fold_in(stream_keys(config.seed)["eval"], 1),
                            eps=config.eps,
                            step_size=config.step_size,
                            steps=config.pgd_steps,
                            batch_size=min(config.batch_size, len(labels)))


def evaluate_mixtures(
    config: Config,
    tuned: Variables,
    robust: Variables,
    splits: runs.Splits,
    *,
    betas: Sequence[float],
    recalibrate: Callable[[Variables, float], Variables] | None = None) -> list[dict[str, float]]:
  """Clean and PGD accuracy of `mix(tuned, robust, β)` for each β, on the whole test split.

  The attack is the run's final evaluation (`config`'s eps, evaluation step size and steps, its
  evaluation key and batch size: `evaluate`), so β = 1 is the robust model's own figure (with
  `recalibrate` None: BatchNorm statistics averaged as the weights are).

  Args:
    recalibrate: `(variables, β) -> variables` applied to each mixture (`recalibrator`).

  Returns:
    `[{"beta", "clean", "robust"}]` in the order of `betas` (fractions).
  """
  candidates = {f"{b:g}": mixing.mix(tuned, robust, float(b)) for b in betas}
  if recalibrate is not None:
    candidates = {name: recalibrate(v, float(name)) for name, v in candidates.items()}
  results = evaluate(config, candidates, splits)
  return [dict(beta=float(b), **results[f"{b:g}"]) for b in betas]


def evaluate(config: Config, candidates: Mapping[str, Variables],
             splits: runs.Splits) -> dict[str, dict[str, float]]:
  """`{name: {"clean", "robust"}}` of each model on the whole test split, by the one engine.

  The threat is `Threat.of(config)` (the run's final PGD), the key the run's evaluation key
  (`training.loop.stream_keys(seed)["eval"]`, per-example keys inside the engine) and the batch
  size `config.eval_batch_size`: a run's final summary measured by the same code gives the same
  figures, and every model of a seed (baselines and mixtures) meets the same perturbation keys.
  """
  mesh = parallel.make_mesh()
  results = evaluate_models(parallel.replicate(dict(candidates), mesh),
                            splits.test_x,
                            splits.test_y,
                            model=runs.build_model(config, splits.num_classes, for_evaluation=True),
                            key=stream_keys(config.seed)["eval"],
                            threat=Threat.of(config),
                            batch_size=config.eval_batch_size,
                            sharding=parallel.data_sharding(mesh))
  return {name: {"clean": r["clean_acc"], "robust": r["pgd_acc"]} for name, r in results.items()}


def chord(point: Mapping[str, float], baselines: Mapping[str, Mapping[str, float]]) -> float:
  """The chord score of one `{"clean", "robust"}` point against `{"natural": {...}, "pgd_at":
  {...}}` of the same seed (`study.chord_score`)."""
  return study.chord_score(
      {
          "generalist": point["clean"],
          **{
              m: baselines[m]["clean"] for m in ("natural", "pgd_at")
          }
      }, {
          "generalist": point["robust"],
          **{
              m: baselines[m]["robust"] for m in ("natural", "pgd_at")
          }
      })


def chord_key(point: Mapping[str, Any]) -> float:
  """Orders points by chord score, an undefined (NaN) score last."""
  return -math.inf if math.isnan(point["chord"]) else point["chord"]


def bn_mode(point: Mapping[str, Any]) -> str:
  """A point's BatchNorm mode; "mixed" for points written before the mode was recorded."""
  return point.get("bn", "mixed")


def summarize(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per (BatchNorm mode, lr, steps): the best mixture of each seed and the best fixed β.

  Args:
    points: `{"seed", "lr", "steps", "beta", "clean", "robust", "chord"}` rows, with "bn" (the
      BatchNorm mode of `BN_MODES`; "mixed" when absent).

  Returns:
    One row per (bn, lr, steps), in that order: `bn`, `lr`, `steps`, `best` (the spread over
    seeds of each seed's best chord, `study.spread`, with `betas` the β that gave it per seed:
    optimistic, since β is chosen on the test figures), `mixture` (the same over the proper
    mixtures, β < 1: `best` is never below 1, since β = 1 is the PGD-AT model itself, while a
    proper mixture can fall below the line), `fixed` (the β whose chord averages highest over
    the seeds, and that spread: one β for every seed, the less biased estimate), and the seeds.
  """
  cells: dict[tuple[str, float, int], dict[int, list[Mapping[str, Any]]]] = {}
  for p in points:
    cell = (bn_mode(p), float(p["lr"]), int(p["steps"]))
    cells.setdefault(cell, {}).setdefault(int(p["seed"]), []).append(p)
  rows = []
  for (bn, lr, k), by_seed in sorted(cells.items(),
                                     key=lambda c: (BN_MODES.index(c[0][0]),) + c[0][1:]):
    seeds = sorted(by_seed)
    best = {s: max(by_seed[s], key=chord_key) for s in seeds}
    proper = {s: [p for p in by_seed[s] if float(p["beta"]) < 1.0] for s in seeds}
    best_proper = {s: max(proper[s], key=chord_key) for s in seeds if proper[s]}
    proper_chords = ([p["chord"] for p in best_proper.values()]
                     if len(best_proper) == len(seeds) else [math.nan])
    betas = sorted({float(p["beta"]) for s in seeds for p in by_seed[s]})
    fixed = []
    for b in betas:
      at_b = [p for s in seeds for p in by_seed[s] if float(p["beta"]) == b]
      if len(at_b) == len(seeds):
        fixed.append((float(np.mean([p["chord"] for p in at_b])), b, at_b))
    _, fixed_beta, fixed_points = max(fixed, key=lambda t: -math.inf if math.isnan(t[0]) else t[0])
    rows.append({
        "bn": bn,
        "lr": lr,
        "steps": k,
        "seeds": seeds,
        "best": {
            **study.spread([best[s]["chord"] for s in seeds]), "betas": [
                best[s]["beta"] for s in seeds
            ],
            "clean": float(np.mean([best[s]["clean"] for s in seeds])),
            "robust": float(np.mean([best[s]["robust"] for s in seeds]))
        },
        "mixture": {
            **study.spread(proper_chords), "betas": [
                best_proper[s]["beta"] if s in best_proper else math.nan for s in seeds
            ]
        },
        "fixed": {
            **study.spread([p["chord"] for p in fixed_points]), "beta": fixed_beta,
            "clean": float(np.mean([p["clean"] for p in fixed_points])),
            "robust": float(np.mean([p["robust"] for p in fixed_points]))
        }
    })
  return rows


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """The table of `summarize`: per (BatchNorm mode, lr, steps) the best chord per seed (β = 1,
  the PGD-AT model, included), the best proper mixture's (β < 1) and the best fixed β."""

  def interval(s):
    if s["n"] < 2:
      return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} ± {s['std']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"

  lines = [
      "| BatchNorm | lr | steps | seeds | best chord per seed | its β | best with β < 1 | its β | "
      "best fixed β | its chord | its clean / PGD (%) |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  ]
  for r in rows:
    b, m, f = r["best"], r["mixture"], r["fixed"]
    lines.append(f"| {r['bn']} | {r['lr']:g} | {r['steps']} | {','.join(map(str, r['seeds']))} | "
                 f"{interval(b)} | {', '.join(f'{x:g}' for x in b['betas'])} | {interval(m)} | "
                 f"{', '.join(f'{x:g}' for x in m['betas'])} | {f['beta']:g} | "
                 f"{interval(f)} | {100 * f['clean']:.2f} / {100 * f['robust']:.2f} |")
  return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]],
         points: Sequence[Mapping[str, Any]],
         baselines: Mapping[int, Mapping[str, Mapping[str, float]]],
         path: str | pathlib.Path,
         robust_name: str = "PGD-20") -> pathlib.Path:
  """The diagnostic's figure; saves a PNG.

  Left: the best proper mixture's chord score per seed (β < 1; mean and the seeds' spread)
  against the clean budget K, one line per learning rate and BatchNorm mode, with the line at 1
  (where β = 1, the PGD-AT model, always is). Right: the plane of the
  first seed: its natural and PGD-AT models, their chord, and the mixtures
  `mix(fine-tuned, robust, β)` of each K at the learning rate and mode whose best chord is highest.
  """
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  from gen_jax.evaluation import outputs  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(13, 5.5), layout="constrained")
  budget, plane = fig.subplots(1, 2)
  for bn, lr in sorted({(r["bn"], r["lr"]) for r in rows},
                       key=lambda c: (BN_MODES.index(c[0]), c[1])):
    mine = [
        r for r in rows if (r["bn"], r["lr"]) == (bn, lr) and not math.isnan(r["mixture"]["mean"])
    ]
    ks = [r["steps"] for r in mine]
    means = [r["mixture"]["mean"] for r in mine]
    stds = [0.0 if r["mixture"]["n"] < 2 else r["mixture"]["std"] for r in mine]
    budget.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=f"lr {lr:g}, BatchNorm {bn}")
  budget.axhline(1.0, color="k", linestyle="--", linewidth=1, label="the natural / PGD-AT line")
  if any(not math.isnan(r["mixture"]["mean"]) for r in rows):
    budget.set_xscale("log")
  else:  # every chord undefined: the baselines have no clean or no robust gap
    budget.text(0.5,
                0.5,
                "no chord score: the baselines' gap is zero",
                ha="center",
                transform=budget.transAxes)
  budget.set_xlabel("clean fine-tuning steps K")
  budget.set_ylabel("best chord score of mix(fine-tuned, robust, β), β < 1")
  budget.set_title("Best mixture against the clean budget\n(mean ± sd over seeds)")
  budget.grid(True, alpha=0.3)
  budget.legend(fontsize=8)

  seed = min(baselines)
  base = baselines[seed]
  best_row = max(rows, key=lambda r: chord_key({"chord": r["mixture"]["mean"]}))
  best_bn, best_lr = best_row["bn"], best_row["lr"]
  nat, at = base["natural"], base["pgd_at"]
  plane.plot([100 * nat["clean"], 100 * at["clean"]], [100 * nat["robust"], 100 * at["robust"]],
             "k--",
             linewidth=1,
             label="chord natural / PGD-AT")
  plane.plot(100 * nat["clean"], 100 * nat["robust"], "gs", label="natural")
  plane.plot(100 * at["clean"], 100 * at["robust"], "rs", label="PGD-AT (β = 1)")
  for k in sorted({int(p["steps"]) for p in points}):
    curve = sorted((p for p in points if p["seed"] == seed and p["lr"] == best_lr and
                    int(p["steps"]) == k and bn_mode(p) == best_bn),
                   key=lambda p: p["beta"])
    if curve:
      plane.plot([100 * p["clean"] for p in curve], [100 * p["robust"] for p in curve],
                 marker=".",
                 label=f"K = {k}")
  plane.set_xlabel("clean accuracy (%)")
  plane.set_ylabel(f"{robust_name} accuracy (%)")
  plane.set_title(f"Seed {seed}, lr {best_lr:g}, BatchNorm {best_bn}:\nmixtures from β = 0 "
                  "(fine-tuned) to 1 (robust)")
  plane.grid(True, alpha=0.3)
  plane.legend(fontsize=8)
  return outputs.save_figure(fig, path)
