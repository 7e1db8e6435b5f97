"""The mixing-weight sweep: how much of each expert should go into the deployed model.

For each beta, `gen_jax.mix(teacher_nat, teacher_rob, beta)` (beta weights the robust expert, as in
the reference code) is evaluated for clean and PGD accuracy; the experts (beta 0 and 1) and the
trained global model are evaluated on the same images with the same attack keys. Optionally the
BatchNorm statistics of every mixture are re-estimated on training images (weight interpolation
shifts the activation statistics, so averaged running statistics no longer match the averaged
weights: Jordan et al., "REPAIR", ICLR 2023).

Synopsis::

    models = ModelSet(model, {"natural": t_nat, "robust": t_rob, "global": v_global})
    result = run(models, test_x, test_y, betas=np.linspace(0, 1, 11), key=key, eps=8 / 255,
                 step_size=2 / 255)
    write_sweep(result, "runs/c10/eval")           # sweep.json, sweep.md, tradeoff.png
    choice = select_point(result["points"], parse_rule("clean>=0.88"))   # -> {"beta", ...}

    result = sweep_run(runs.restore_models("runs/c10"), select=parse_rule("clean>=0.88"))
"""
from __future__ import annotations

import functools
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gen_jax import attacks, mixing, runs
from gen_jax.data import to_float
from gen_jax.evaluation import outputs
from gen_jax.evaluation.accuracy import evaluate_models
from gen_jax.evaluation.modelset import ModelSet
from gen_jax.models.common import BN_MOMENTUM
from gen_jax.training.methods import GLOBAL, NATURAL, ROBUST

METRICS = ("clean", "robust")
DEFAULT_BETAS = tuple(round(b, 10) for b in np.linspace(0, 1, 11))
_RULE = re.compile(r"^\s*(clean|robust)\s*(>=|>)\s*([0-9]*\.?[0-9]+)\s*(%?)\s*$")


@functools.partial(jax.jit, static_argnames=("model",))
def _batch_statistics(variables, images, *, model: nn.Module):
  """Each BatchNorm layer's own mean/variance on `images` (training-mode forward pass).

  Flax updates `new = m * old + (1 - m) * batch`; solving for `batch` gives the statistics of this
  batch alone, whatever the stored `old` values are.
  """
  _, updates = model.apply(variables, to_float(images), train=True, mutable=["batch_stats"])
  return jax.tree_util.tree_map(lambda new, old: (new - BN_MOMENTUM * old) / (1.0 - BN_MOMENTUM),
                                updates["batch_stats"], variables["batch_stats"])


def recalibrate_batch_norm(model: nn.Module,
                           variables: dict[str, Any],
                           images: np.ndarray,
                           *,
                           batch_size: int = 250) -> dict[str, Any]:
  """Replaces the running BatchNorm statistics by their average over `images`.

  As PyTorch's `torch.optim.swa_utils.update_bn` (momentum None): every batch of the training
  images (no augmentation) weighs the same; the last partial batch is dropped.

  Args:
    model: the linen module.
    variables: `{"params", "batch_stats"}`; a model without BatchNorm is returned unchanged.
    images: training images (uint8 NHWC, or floats in [0, 1]), at least `batch_size` of them.
    batch_size: images per forward pass.

  Returns:
    The variables with re-estimated `batch_stats` (params untouched).
  """
  if not variables.get("batch_stats"):
    return variables
  batches = len(images) // batch_size
  if batches < 1:
    raise ValueError(f"BatchNorm recalibration needs at least batch_size={batch_size} training "
                     f"images; got {len(images)}. Lower --batch-size.")
  total = None
  for b in range(batches):
    stats = _batch_statistics(variables,
                              jnp.asarray(images[b * batch_size:(b + 1) * batch_size]),
                              model=model)
    total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
  mean_stats = jax.tree_util.tree_map(lambda t: t / batches, total)
  return {**variables, "batch_stats": mean_stats}


RECALIBRATION_MODES = ("clean", "matched")


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def _pgd_batch(variables, x, y, key, eps, step_size, *, model: nn.Module, steps: int):
  logits_fn = lambda z: model.apply(variables, z, train=False)
  return attacks.pgd(logits_fn, x, y, key=key, eps=eps, step_size=step_size, steps=steps)


def recalibrator(model: nn.Module,
                 images: np.ndarray,
                 *,
                 mode: str = "clean",
                 labels: np.ndarray | None = None,
                 key: jax.Array | None = None,
                 eps: float | None = None,
                 step_size: float | None = None,
                 steps: int | None = None,
                 batch_size: int = 250) -> Callable[[dict[str, Any], float], dict[str, Any]]:
  """Returns `(variables, beta) -> variables` with re-estimated BatchNorm statistics.

  Modes:
    "clean": the statistics of the mixture on the clean training `images`.
    "matched": `mix(stats on clean images, stats on PGD images, beta)`: the mixture's statistics
      on clean images and on adversarial images (PGD against the mixture itself, in inference
      mode, as the robust expert's training attack) weighted as Generalist weights the two experts
      whose statistics it averages (the natural one saw clean batches, the robust one adversarial
      ones). beta 0 equals "clean"; beta 1 is the statistics on adversarial images alone.

  Args:
    model: the linen module.
    images: training images (uint8 NHWC).
    mode: "clean" or "matched".
    labels, key, eps, step_size, steps: the training attack, for "matched" only.
    batch_size: images per forward pass / attack batch.

  Raises:
    ValueError: unknown mode, or "matched" without the attack's settings.
  """
  if mode not in RECALIBRATION_MODES:
    raise ValueError(f"unknown recalibration mode {mode!r}; choose from {RECALIBRATION_MODES}.")
  clean = functools.partial(recalibrate_batch_norm, model, images=images, batch_size=batch_size)
  if mode == "clean":
    return lambda variables, beta: clean(variables)
  if labels is None or key is None or eps is None or step_size is None or not steps:
    raise ValueError("matched recalibration needs labels, key, eps, step_size and steps (the "
                     "robust expert's training attack).")
  x = to_float(np.asarray(images))

  def recalibrate(variables, beta):
    attack = functools.partial(_pgd_batch,
                               variables,
                               eps=jnp.float32(eps),
                               step_size=jnp.float32(step_size),
                               model=model,
                               steps=int(steps))
    x_adv = attacks.attack_in_batches(lambda xb, yb, key: attack(xb, yb, key),
                                      x,
                                      np.asarray(labels, np.int32),
                                      key=key,
                                      batch_size=batch_size)
    on_clean = clean(variables)
    on_adv = recalibrate_batch_norm(model, variables, x_adv, batch_size=batch_size)
    stats = mixing.mix(on_clean["batch_stats"], on_adv["batch_stats"], beta)
    return {**variables, "batch_stats": stats}

  return recalibrate


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
  """Indices of the points no other point dominates (>= in both figures, > in one), by clean.

  Equal points are all on the front when one of them is.

  >>> pareto_front([(0.9, 0.1), (0.8, 0.3), (0.7, 0.2), (0.9, 0.05)])
  [1, 0]
  """
  front = []
  for i, (c, r) in enumerate(points):
    if not any((c2 >= c and r2 >= r and (c2 > c or r2 > r)) for c2, r2 in points):
      front.append(i)
  return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))


def parse_rule(text: str) -> tuple[str, float]:
  """Parses a selection rule `clean>=0.88`, `robust>=45%` into (constrained metric, threshold).

  Raises:
    ValueError: the rule is not `<clean|robust> >= <number>` (a fraction, or a percentage with %).
  """
  match = _RULE.match(text or "")
  if not match:
    raise ValueError(f"cannot read the selection rule {text!r}: write e.g. 'clean>=0.88' or "
                     "'robust>=0.45' (fractions) or 'clean>=88%'.")
  metric, op, value, percent = match.groups()
  threshold = float(value) / (100.0 if percent else 1.0)
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"the threshold of {text!r} must lie in [0, 1] (or 0-100%).")
  if op == ">":
    threshold = float(np.nextafter(threshold, 2.0))
  return metric, threshold


def select_point(points: Sequence[dict[str, float]], rule: tuple[str, float]) -> dict[str, float]:
  """The sweep point that maximises the other figure among those meeting `rule`.

  Ties go to the point with the higher constrained figure, then to the smaller beta.

  Raises:
    ValueError: no point meets the rule (the message gives the best one reached).
  """
  metric, threshold = rule
  other = "robust" if metric == "clean" else "clean"
  feasible = [p for p in points if p[metric] >= threshold]
  if not feasible:
    best = max(points, key=lambda p: p[metric])
    raise ValueError(f"no mixture reaches {metric} >= {threshold:.4f}: the best is "
                     f"{best[metric]:.4f} at beta {best['beta']:.2f}. Lower the target.")
  return max(feasible, key=lambda p: (p[other], p[metric], -p["beta"]))


def check_betas(betas: Sequence[float]) -> list[float]:
  """Validates the betas: at least one, each in [0, 1]; returned sorted and deduplicated."""
  values = sorted({round(float(b), 10) for b in betas})
  if not values or values[0] < 0.0 or values[-1] > 1.0:
    raise ValueError(f"betas must be numbers in [0, 1]; got {list(betas)}.")
  return values


def run(models: ModelSet,
        images: Any,
        labels: Any,
        *,
        key: jax.Array,
        eps: float,
        step_size: float,
        betas: Sequence[float],
        steps: int = 20,
        recalibrate: Callable[[dict[str, Any], float], dict[str, Any]] | None = None,
        recalibration: str | None = None,
        batch_size: int = 250,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Clean and PGD accuracy of `mix(models["natural"], models["robust"], beta)` for every beta.

  Args:
    models: the "natural" and "robust" teachers of a run (and its "global" model, evaluated
      alongside when present).
    images, labels: the test images (uint8 NHWC or floats in [0, 1]) and labels.
    key: PRNG key of PGD's random start (the same for every model).
    eps, step_size: the L-inf PGD attack.
    betas: mixing weights of the robust expert, in [0, 1].
    steps: PGD steps.
    recalibrate: `(variables, beta) -> variables` (from `recalibrator`); when given, every
      mixture's BatchNorm statistics are re-estimated with it before it is evaluated.
    recalibration: the name of the recalibration, recorded in the result (e.g. "clean").
    batch_size: images per batch.
    progress: optional callback told "beta=0.30" before each evaluation.

  Returns:
    {"betas", "eps", "steps", "n", "bn_recalibrated" (the recalibration's name or None),
     "points": [{"beta", "clean", "robust"}],
     "experts": {"natural", "robust"}: {"clean", "robust"}, "global": {...} or None,
     "pareto": the non-dominated points by increasing clean accuracy, each a beta of the sweep
     or "natural" / "robust" (the experts) or "global"}.

  Raises:
    ValueError: `models` lacks a natural or a robust model (a single-expert run), bad betas.
  """
  missing = [r for r in (NATURAL, ROBUST) if r not in models.variables]
  if missing:
    raise ValueError(f"the sweep mixes a natural and a robust expert; the models have no "
                     f"{missing} (they have {', '.join(models.names)}). Sweep a generalist run.")
  betas = check_betas(betas)
  evaluate = functools.partial(evaluate_models,
                               images=to_float(np.asarray(images)),
                               labels=np.asarray(labels),
                               model=models.module,
                               key=key,
                               eps=eps,
                               step_size=step_size,
                               steps=steps,
                               batch_size=batch_size)

  def figures(variables):
    result = evaluate({"m": variables})["m"]
    return {"clean": result["clean_acc"], "robust": result["pgd_acc"]}

  teacher_nat, teacher_rob = models.variables[NATURAL], models.variables[ROBUST]
  points = []
  for beta in betas:
    if progress:
      progress(f"beta={beta:.2f}")
    variables = mixing.mix(teacher_nat, teacher_rob, beta)
    if recalibrate is not None:
      variables = recalibrate(variables, beta)
    points.append({"beta": beta, **figures(variables)})
  if progress:
    progress("experts and global model")
  experts = {NATURAL: figures(teacher_nat), ROBUST: figures(teacher_rob)}
  global_figures = figures(models.variables[GLOBAL]) if GLOBAL in models.variables else None
  # The front is over everything plotted: the sweep, the two experts and the global model.
  named = [(p["beta"], p) for p in points] + [(role, f) for role, f in experts.items()]
  if global_figures is not None:
    named.append((GLOBAL, global_figures))
  front = pareto_front([(f["clean"], f["robust"]) for _, f in named])
  return {
      "betas": betas,
      "eps": float(eps),
      "steps": int(steps),
      "n": int(len(labels)),
      "bn_recalibrated": recalibration or ("yes" if recalibrate is not None else None),
      "points": points,
      "experts": experts,
      "global": global_figures,
      "pareto": [named[i][0] for i in front],
  }


def sweep_run(eval_run: runs.EvalRun,
              *,
              betas: Sequence[float] = DEFAULT_BETAS,
              n: int | None = None,
              eps: float | None = None,
              steps: int = 20,
              bn_recalibrate: str | None = None,
              recalibration_n: int = 2000,
              select: tuple[str, float] | None = None,
              seed: int = 0,
              batch_size: int = 250,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """The sweep of a training run (`runs.restore_models`), optionally saving a choice.

  Mixes the run's teachers on its first `n` test images, at the run's eps (or `eps`, the PGD step
  scaled alike); with `bn_recalibrate` ("clean" or "matched") re-estimates each mixture's
  BatchNorm statistics on the first `recalibration_n` training images (the run's own training
  attack for "matched"). With `select` (from `parse_rule`), saves the chosen mixture as a model
  checkpoint in a new directory `EVAL_DIR/mix-beta0.30[-bn-MODE]` and records it under
  `result["selected"]`; a target that no mixture reaches is recorded under
  `result["selection_error"]` (the sweep itself is still returned).
  """
  config = eval_run.config
  if config.method != "generalist":
    raise ValueError(
        f"{eval_run.source} was trained with --method {config.method}, which trains one "
        "expert only: there is nothing to mix. Sweep a generalist run.")
  eps, step_size = eval_run.attack_settings(eps)
  recalibrate = None
  if bn_recalibrate:
    train_x, train_y = eval_run.training_images(recalibration_n)
    recalibrate = recalibrator(eval_run.model,
                               train_x,
                               mode=bn_recalibrate,
                               labels=train_y,
                               key=jax.random.key(seed + 1),
                               eps=config.eps,
                               step_size=config.step_size,
                               steps=config.pgd_steps,
                               batch_size=batch_size)
  result = run(ModelSet(eval_run.model, eval_run.models),
               *eval_run.test_split(n),
               key=jax.random.key(seed),
               eps=eps,
               step_size=step_size,
               betas=betas,
               steps=steps,
               recalibrate=recalibrate,
               recalibration=bn_recalibrate,
               batch_size=batch_size,
               progress=progress)
  if select is not None:
    try:
      choice = select_point(result["points"], select)
    except ValueError as error:
      result["selection_error"] = str(error)
      return result
    variables = mixing.mix(eval_run.models[NATURAL], eval_run.models[ROBUST], choice["beta"])
    if recalibrate is not None:
      variables = recalibrate(variables, choice["beta"])
    name = f"mix-beta{choice['beta']:.2f}" + (f"-bn-{bn_recalibrate}" if recalibrate else "")
    target = runs.save_model(outputs.unique_directory(eval_run.eval_dir / name),
                             variables,
                             config,
                             source=str(eval_run.source.absolute()),
                             beta=choice["beta"],
                             bn_recalibrated=bn_recalibrate,
                             rule=f"{select[0]}>={select[1]}",
                             sweep_figures=choice)
    result["selected"] = {**choice, "rule": list(select), "checkpoint": str(target)}
  return result


def write_sweep(result: dict[str, Any], directory: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """Writes `sweep.json`, `sweep.md` and `tradeoff.png`, keeping earlier files (`outputs`)."""
  directory = pathlib.Path(directory)
  return {
      "json": outputs.write_json(directory / "sweep.json", result),
      "md": outputs.write_text(directory / "sweep.md", to_markdown(result)),
      "png": plot_tradeoff(result, directory / "tradeoff.png"),
  }


def plot_tradeoff(result: dict[str, Any], path) -> pathlib.Path:
  """Plots the sweep's (clean, robust) points, the experts and the global model; saves a PNG.

  The Pareto front is drawn as a dashed line through the non-dominated points, each sweep point is
  labelled with its beta.
  """
  # The object API with the Agg canvas: no pyplot, no display, no global backend change.
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  pct = lambda v: 100.0 * v
  fig = Figure(figsize=(6.4, 4.8), layout="constrained")
  ax = fig.subplots()
  xs = [pct(p["clean"]) for p in result["points"]]
  ys = [pct(p["robust"]) for p in result["points"]]
  label = "mix(natural, robust, beta)"
  if result["bn_recalibrated"]:
    label += f" + BN recalibrated ({result['bn_recalibrated']})"
  ax.plot(xs, ys, "o-", color="tab:blue", label=label, zorder=2)
  labels = {}  # coinciding points share one label "0.20, 0.30"
  for p, x, y in zip(result["points"], xs, ys):
    labels.setdefault((x, y), []).append(f"{p['beta']:.2f}")
  for (x, y), betas in labels.items():
    ax.annotate(", ".join(betas), (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color="tab:blue")
  front_xy = []
  for item in result["pareto"]:
    if item == "global":
      figures = result["global"]
    elif isinstance(item, str):
      figures = result["experts"][item]
    else:
      figures = next(p for p in result["points"] if p["beta"] == item)
    front_xy.append((pct(figures["clean"]), pct(figures["robust"])))
  if front_xy:
    fx, fy = zip(*sorted(front_xy))
    ax.plot(fx,
            fy,
            "--",
            color="black",
            linewidth=1.2,
            marker="o",
            markerfacecolor="none",
            markersize=11,
            label="Pareto front",
            zorder=3)
  markers = [("natural", "s", 80, "tab:green", "natural expert (EMA teacher)"),
             ("robust", "^", 90, "tab:orange", "robust expert (EMA teacher)"),
             ("global", "*", 260, "tab:red", "trained global model")]
  for role, marker, size, color, label in markers:
    figures = result["global"] if role == "global" else result["experts"][role]
    if figures is not None:
      ax.scatter([pct(figures["clean"])], [pct(figures["robust"])],
                 marker=marker,
                 s=size,
                 color=color,
                 edgecolor="black" if role == "global" else None,
                 label=label,
                 zorder=5 if role == "global" else 4)
  ax.set_xlabel("clean accuracy (%)")
  ax.set_ylabel(f"PGD-{result['steps']} accuracy (%), eps = {255 * result['eps']:.1f}/255")
  ax.set_title(f"Mixing-weight sweep ({result['n']} test images)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  return outputs.save_figure(fig, path)


def to_markdown(result: dict[str, Any]) -> str:
  """The sweep as a markdown table (percent), Pareto-front rows marked."""
  recalibrated = result["bn_recalibrated"]
  lines = [
      f"Mixing sweep: PGD-{result['steps']} at eps {result['eps']:.5f}, {result['n']} test images"
      f"{', BatchNorm recalibrated: ' + recalibrated if recalibrated else ''}.", "",
      "| model | clean | robust | Pareto |", "|---|---|---|---|"
  ]
  for p in result["points"]:
    mark = "yes" if p["beta"] in result["pareto"] else ""
    lines.append(f"| beta = {p['beta']:.2f} | {100 * p['clean']:.2f} | {100 * p['robust']:.2f} | "
                 f"{mark} |")
  for role, f in result["experts"].items():
    mark = "yes" if role in result["pareto"] else ""
    lines.append(f"| {role} expert | {100 * f['clean']:.2f} | {100 * f['robust']:.2f} | {mark} |")
  if result["global"] is not None:
    g = result["global"]
    mark = "yes" if "global" in result["pareto"] else ""
    lines.append(f"| global model | {100 * g['clean']:.2f} | {100 * g['robust']:.2f} | {mark} |")
  return "\n".join(lines) + "\n"
