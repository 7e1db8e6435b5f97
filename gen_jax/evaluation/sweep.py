"""The mixing-weight sweep: how much of each expert should go into the deployed model.

Two experts (`run`): a line of betas. N experts (`run_simplex`, Generalist++ runs with natural,
L-inf and L2 experts, say): a coarse grid over the weight simplex, each mixture evaluated for
clean accuracy, PGD-20 under each norm and their union, with one trade-off panel per pair of
figures (clean vs L-inf, clean vs L2, L-inf vs L2, clean vs union). `sweep_run` picks the form
from the run's number of experts.

For each beta, `gen_jax.mix(teacher_nat, teacher_rob, beta)` (beta weights the robust expert, as in
the reference code) is evaluated for clean and PGD accuracy; the experts (beta 0 and 1) and the
trained global model are evaluated on the same images with the same attack keys. Every figure is
the correctness engine's (`evaluation.engine`, per-example keys): `sweep_run` uses the run's own
evaluation key by default, so beta = 1 (exactly the robust teacher) and the global model show
the PGD figures of the run's `summary.json` when the sweep's attack is the run's evaluation.
Optionally the BatchNorm statistics of every mixture are re-estimated on training images (weight
interpolation shifts the activation statistics, so averaged running statistics no longer match the
averaged weights: Jordan et al., "REPAIR", ICLR 2023).

Synopsis::

    models = ModelSet(model, {"natural": t_nat, "robust": t_rob, "global": v_global})
    result = run(models, test_x, test_y, betas=np.linspace(0, 1, 11), key=key, eps=8 / 255,
                 step_size=2 / 255)
    write_sweep(result, "runs/c10/eval")           # sweep.json, sweep.md, tradeoff.png
    choice = select_point(result["points"], parse_rule("clean>=0.88"))   # -> {"beta", ...}

    result = sweep_run(runs.restore_models("runs/c10"), select=parse_rule("clean>=0.88"))

    grid = simplex_grid(3, 0.25)                   # 15 weight vectors, each summing to 1
    result = run_simplex(models3, test_x, test_y, roles=("natural", "robust_linf", "robust_l2"),
                         key=key, eps=8 / 255, step_size=2 / 255, l2_eps=0.5, grid_step=0.25)
"""
from __future__ import annotations

import functools
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gen_jax import attacks, mixing, runs
from gen_jax.attacks.threat import Threat
from gen_jax.data import to_float
from gen_jax.evaluation import catalogue, engine, outputs, report
from gen_jax.evaluation.modelset import ModelSet
from gen_jax.models.common import BN_MOMENTUM
from gen_jax.experts import GLOBAL, NATURAL, ROBUST

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


def draw_front(ax: Any, xy: Sequence[tuple[float, float]]) -> None:
  """Draws a Pareto front (points in the plot's units) as the dashed, ringed line of
  `tradeoff.png`, by clean accuracy; nothing when `xy` is empty. The search's plot shares it."""
  if not xy:
    return
  fx, fy = zip(*sorted(xy))
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


class Rule(NamedTuple):
  """A selection rule: the `metric` (clean or robust) must exceed `threshold` (`strict`, `>`) or
  reach it (`>=`). `str(rule)` writes it back as `clean>=0.88`."""
  metric: str
  threshold: float
  strict: bool = False

  @property
  def op(self) -> str:
    return ">" if self.strict else ">="

  def met_by(self, value: float) -> bool:
    """Whether a figure meets the rule, with its operator as written."""
    return value > self.threshold if self.strict else value >= self.threshold

  def __str__(self) -> str:
    return f"{self.metric}{self.op}{self.threshold:g}"


def parse_rule(text: str) -> Rule:
  """Parses a selection rule `clean>=0.88`, `clean>0.97`, `robust>=45%` into a `Rule`.

  `>` is strict (a mixture at exactly the threshold does not meet it) and `>=` is not.

  Raises:
    ValueError: the rule is not `<clean|robust> >= <number>` or `... > <number>` (a fraction, or
      a percentage with %), or it can never be met (`> 1`).
  """
  match = _RULE.match(text or "")
  if not match:
    raise ValueError(f"cannot read the selection rule {text!r}: write e.g. 'clean>=0.88' or "
                     "'robust>=0.45' (fractions) or 'clean>=88%'.")
  metric, op, value, percent = match.groups()
  threshold = float(value) / (100.0 if percent else 1.0)
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"the threshold of {text!r} must lie in [0, 1] (or 0-100%).")
  if op == ">" and threshold >= 1.0:
    raise ValueError(f"the rule {text!r} can never be met: no accuracy exceeds 1 (write "
                     f"'{metric}>=1' for a perfect score).")
  return Rule(metric, threshold, strict=op == ">")


def select_point(points: Sequence[dict[str, float]],
                 rule: Rule | tuple[str, float]) -> dict[str, float]:
  """The sweep point that maximises the other figure among those meeting `rule`.

  `rule` is a `Rule` (from `parse_rule`) or a pair (metric, threshold), read as `>=`. Ties go to
  the point with the higher constrained figure, then to the smaller beta.

  Raises:
    ValueError: no point meets the rule (the message gives the best one reached).
  """
  rule = Rule(*rule)
  metric = rule.metric
  other = "robust" if metric == "clean" else "clean"
  feasible = [p for p in points if rule.met_by(p[metric])]
  if not feasible:
    best = max(points, key=lambda p: p[metric])
    raise ValueError(f"no mixture reaches {metric} {rule.op} {rule.threshold:.4f}: the best is "
                     f"{best[metric]:.4f} at beta {best['beta']:.2f}. Lower the target.")
  return max(feasible, key=lambda p: (p[other], p[metric], -p["beta"]))


def check_betas(betas: Sequence[float]) -> list[float]:
  """Validates the betas: at least one, each in [0, 1]; returned sorted and deduplicated."""
  values = sorted({round(float(b), 10) for b in betas})
  # NaN compares false with everything, so it would pass the range test and sort anywhere.
  if not values or not all(np.isfinite(values)) or values[0] < 0.0 or values[-1] > 1.0:
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
        norm: str = "linf",
        recalibrate: Callable[[dict[str, Any], float], dict[str, Any]] | None = None,
        recalibration: str | None = None,
        batch_size: int = 250,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Clean and PGD accuracy of `mix(models["natural"], models["robust"], beta)` for every beta.

  Args:
    models: the "natural" and "robust" teachers of a run (and its "global" model, evaluated
      alongside when present).
    images, labels: the test images (uint8 NHWC or floats in [0, 1]) and labels.
    key: the evaluation key (`engine.correctness`: per example, the same for every model).
    eps, step_size: the PGD attack's radius and step.
    betas: mixing weights of the robust expert, in [0, 1].
    steps: PGD steps.
    norm: the PGD attack's norm, "linf" or "l2".
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
  x, y = to_float(np.asarray(images)), np.asarray(labels)
  threat = Threat(norm, float(eps), float(step_size), int(steps))

  def figures(variables):
    one = ModelSet(models.module, {"m": variables}, fast_ops=models.fast_ops)
    correct = engine.correctness(one, x, y, threats=[threat], key=key, batch_size=batch_size)["m"]
    return {
        "clean": float(np.mean(correct[engine.CLEAN])),
        "robust": float(np.mean(correct[threat]))
    }

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
              select: Rule | tuple[str, float] | None = None,
              seed: int | None = None,
              batch_size: int = 250,
              progress: Callable[[str], None] | None = None,
              grid_step: float = 0.25) -> dict[str, Any]:
  """The sweep of a training run (`runs.restore_models`), optionally saving a choice.

  A run of more than two experts gets `run_simplex` instead (grid step `grid_step`, PGD-20 of
  each norm; `betas`, `steps` and `select` are for two experts; BatchNorm recalibration "clean"
  only).

  Mixes the run's teachers on its first `n` test images, at the run's eps (or `eps`, the PGD step
  scaled alike); with `bn_recalibrate` ("clean" or "matched") re-estimates each mixture's
  BatchNorm statistics on the first `recalibration_n` training images (the run's own training
  attack for "matched"). With `select` (from `parse_rule`), saves the chosen mixture as a model
  checkpoint in a new directory `EVAL_DIR/mix-beta0.30[-bn-MODE]` and records it under
  `result["selected"]`; a target that no mixture reaches is recorded under
  `result["selection_error"]` (the sweep itself is still returned). The attack key is
  `engine.attack_key(seed)`, by default of the run's own seed (the key of its `summary.json`).
  """
  config = eval_run.config
  seed = config.seed if seed is None else seed
  if config.method != "generalist":
    raise ValueError(
        f"{eval_run.source} was trained with --method {config.method}, which trains one "
        "expert only: there is nothing to mix. Sweep a generalist run.")
  if len(config.experts) > 2:
    return _simplex_run(eval_run,
                        grid_step=grid_step,
                        n=n,
                        eps=eps,
                        bn_recalibrate=bn_recalibrate,
                        recalibration_n=recalibration_n,
                        select=select,
                        seed=seed,
                        batch_size=batch_size,
                        progress=progress)
  threat = Threat.of(eval_run.config, eps=eps)
  eps, step_size = threat.eps, threat.step_size
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
               key=engine.attack_key(seed),
               eps=eps,
               step_size=step_size,
               betas=betas,
               steps=steps,
               norm=threat.norm,
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
                             rule=str(Rule(*select)),
                             sweep_figures=choice)
    result["selected"] = {**choice, "rule": str(Rule(*select)), "checkpoint": str(target)}
  return result


def write_sweep(result: dict[str, Any], directory: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """Writes `sweep.json`, `sweep.md` and `tradeoff.png` (for a simplex sweep `simplex.json`,
  `simplex.md` and `simplex.png`), keeping earlier files (`outputs`)."""
  directory = pathlib.Path(directory)
  if result.get("kind") == "simplex":
    return {
        "json": outputs.write_json(directory / "simplex.json", result),
        "md": outputs.write_text(directory / "simplex.md", simplex_markdown(result)),
        "png": plot_simplex(result, directory / "simplex.png"),
    }
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
  draw_front(ax, front_xy)
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


# ------------------------------------------------------------------------ N experts: the simplex
def simplex_grid(n: int, step: float) -> list[tuple[float, ...]]:
  """Every weight vector of `n` experts whose weights are multiples of `step` and sum to 1.

  In lexicographic order of the integer parts, the vertices (one expert alone) included.

  >>> simplex_grid(3, 0.5)[:4]
  [(0.0, 0.0, 1.0), (0.0, 0.5, 0.5), (0.0, 1.0, 0.0), (0.5, 0.0, 0.5)]

  Raises:
    ValueError: `n` < 1, or `step` not 1/k for an integer k >= 1.
  """
  k = round(1.0 / step) if step > 0 else 0
  if n < 1 or k < 1 or abs(k * step - 1.0) > 1e-9:
    raise ValueError(f"simplex_grid needs n >= 1 experts and a step 1/k (0.5, 0.25, 0.2, ...); "
                     f"got n={n}, step={step}.")

  def parts(total, slots):
    if slots == 1:
      yield (total,)
      return
    for first in range(total + 1):
      for rest in parts(total - first, slots - 1):
        yield (first,) + rest

  return [tuple(round(p / k, 10) for p in c) for c in parts(k, n)]


def _simplex_figures(table: dict[str, Any], name: str) -> dict[str, float]:
  """{"clean", "linf", "l2", "union"} of one model of an attack table (those it holds)."""
  row = table["models"][name]
  figures = {"clean": row["clean"]["accuracy"]}
  for norm, attack in catalogue.NORM_ATTACKS.items():
    if attack in row:
      figures[norm] = row[attack]["accuracy"]
  if "union" in table:
    figures["union"] = table["union"]["models"][name]["accuracy"]
  return figures


def run_simplex(models: ModelSet,
                images: Any,
                labels: Any,
                *,
                roles: Sequence[str],
                key: jax.Array,
                eps: float,
                step_size: float,
                l2_eps: float | None = None,
                l2_step_size: float | None = None,
                grid_step: float = 0.25,
                recalibrate: Callable[[dict[str, Any], float], dict[str, Any]] | None = None,
                recalibration: str | None = None,
                batch_size: int = 250,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Clean, per-norm PGD-20 and union accuracy of `mix_many(teachers, w)` over a simplex grid.

  Every mixture, the experts' teachers and the global model are evaluated on the same images with
  the same attack keys (`report.attack_table`: "clean", L-inf "pgd20" at `eps`, and with
  `l2_eps` L2 "pgd20-l2" and the union of the two).

  Args:
    models: the run's teachers (those of `roles`) and, when present, its "global" model.
    images, labels: the test images (uint8 NHWC or floats in [0, 1]) and labels.
    roles: the experts to mix, in weight order (`Config.experts`).
    key: PRNG key of the attacks (the same for every model).
    eps, step_size: the L-inf PGD-20 attack.
    l2_eps, l2_step_size: the L2 PGD-20 attack (None: L-inf only, no union).
    grid_step: the grid's spacing (1/k; 0.25 gives 15 mixtures of three experts).
    recalibrate: `(variables, beta) -> variables` re-estimating BatchNorm statistics ("clean"
      mode of `recalibrator`; beta is unused there).
    recalibration: its name, recorded in the result.
    batch_size: images per batch.
    progress: optional callback told "w=0.50/0.25/0.25" before each evaluation.

  Returns:
    {"kind": "simplex", "roles", "grid_step", "eps", "l2_eps", "steps", "n", "metrics",
     "bn_recalibrated", "points": [{"weights": {role: w}, "clean", "linf", ["l2", "union"]}],
     "experts": {role: figures}, "global": figures or None, "pareto": indices of the points
     that no other point beats in both clean and the last robust figure (union, else linf)}.

  Raises:
    ValueError: a role the models lack, fewer than two roles, a bad grid step.
  """
  roles = list(roles)
  missing = [r for r in roles if r not in models.variables]
  if missing or len(roles) < 2:
    raise ValueError(f"the simplex sweep mixes two or more experts; the models have no "
                     f"{missing or roles} (they have {', '.join(models.names)}).")
  grid = simplex_grid(len(roles), grid_step)
  attack_names = ("clean", "pgd20") + (("pgd20-l2",) if l2_eps else ())
  table = functools.partial(report.attack_table,
                            images=to_float(np.asarray(images)),
                            labels=np.asarray(labels),
                            key=key,
                            eps=eps,
                            step_size=step_size,
                            attacks=attack_names,
                            batch_size=batch_size,
                            l2_eps=l2_eps,
                            l2_step_size=l2_step_size)

  def figures(variables):
    return _simplex_figures(
        table(ModelSet(models.module, {"m": variables}, fast_ops=models.fast_ops)), "m")

  teachers = [models.variables[r] for r in roles]
  points = []
  for weights in grid:
    if progress:
      progress("w=" + "/".join(f"{w:.2f}" for w in weights))
    variables = mixing.mix_many(teachers, list(weights))
    if recalibrate is not None:
      variables = recalibrate(variables, None)
    points.append({"weights": dict(zip(roles, weights)), **figures(variables)})
  if progress:
    progress("experts and global model")
  experts = {r: figures(models.variables[r]) for r in roles}
  global_figures = figures(models.variables[GLOBAL]) if GLOBAL in models.variables else None
  metrics = [m for m in ("clean", "linf", "l2", "union") if m in points[0]]
  robust = "union" if "union" in metrics else "linf"
  return {
      "kind": "simplex",
      "roles": roles,
      "grid_step": float(grid_step),
      "eps": float(eps),
      "l2_eps": None if l2_eps is None else float(l2_eps),
      "steps": 20,
      "n": int(len(labels)),
      "metrics": metrics,
      "bn_recalibrated": recalibration or ("yes" if recalibrate is not None else None),
      "points": points,
      "experts": experts,
      "global": global_figures,
      "pareto": pareto_front([(p["clean"], p[robust]) for p in points]),
  }


def _simplex_run(eval_run: runs.EvalRun, *, grid_step, n, eps, bn_recalibrate, recalibration_n,
                 select, seed, batch_size, progress) -> dict[str, Any]:
  """`sweep_run` for a run of more than two experts (see there)."""
  if select is not None:
    raise ValueError("--select chooses a beta between two experts; this run has "
                     f"{len(eval_run.config.experts)} ({', '.join(eval_run.config.experts)}). "
                     "Read the simplex sweep and save a mixture with gen_jax.mix_many.")
  if bn_recalibrate not in (None, "clean"):
    raise ValueError(f"--bn-recalibrate {bn_recalibrate} weighs clean and PGD images by beta, "
                     "which two experts define; a run of more experts takes 'clean' only.")
  config = eval_run.config
  threat = Threat.of(config, eps=eps)
  l2 = Threat.of(config, norm="l2") if config.norm == "linf" else None
  recalibrate = None
  if bn_recalibrate:
    train_x, _ = eval_run.training_images(recalibration_n)
    recalibrate = recalibrator(eval_run.model, train_x, mode="clean", batch_size=batch_size)
  return run_simplex(ModelSet(eval_run.model, eval_run.models),
                     *eval_run.test_split(n),
                     roles=config.experts,
                     key=engine.attack_key(seed),
                     eps=threat.eps,
                     step_size=threat.step_size,
                     l2_eps=l2.eps if l2 else None,
                     l2_step_size=l2.step_size if l2 else None,
                     grid_step=grid_step,
                     recalibrate=recalibrate,
                     recalibration=bn_recalibrate,
                     batch_size=batch_size,
                     progress=progress)


_METRIC_LABELS = {"clean": "clean", "linf": "L-inf PGD-20", "l2": "L2 PGD-20", "union": "union"}


def _simplex_pairs(metrics: Sequence[str]) -> list[tuple[str, str]]:
  pairs = [("clean", m) for m in ("linf", "l2") if m in metrics]
  if "l2" in metrics:
    pairs.append(("linf", "l2"))
  if "union" in metrics:
    pairs.append(("clean", "union"))
  return pairs


def plot_simplex(result: dict[str, Any], path) -> pathlib.Path:
  """One trade-off panel per pair of figures (clean vs L-inf, clean vs L2, L-inf vs L2, clean vs
  union): every grid mixture (coloured by the first expert's weight, labelled with its weights),
  the experts' teachers and the global model; saves a PNG."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  pct = lambda v: 100.0 * v
  pairs = _simplex_pairs(result["metrics"])
  cols = min(2, len(pairs))
  rows = -(-len(pairs) // cols)
  fig = Figure(figsize=(6.0 * cols, 4.8 * rows), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
  roles = result["roles"]
  colour = [p["weights"][roles[0]] for p in result["points"]]
  markers = ["s", "^", "v", "D", "P", "X"]
  for ax, (mx, my) in zip(axes, pairs):
    points = ax.scatter([pct(p[mx]) for p in result["points"]],
                        [pct(p[my]) for p in result["points"]],
                        c=colour,
                        cmap="viridis",
                        vmin=0.0,
                        vmax=1.0,
                        s=30,
                        zorder=3,
                        label="mix_many(teachers, w)")
    labels = {}  # coinciding points share one label "0/1/0, 0.25/0.75/0"
    for p in result["points"]:
      labels.setdefault(
          (pct(p[mx]), pct(p[my])),
          []).append("/".join(f"{w:.2f}".rstrip("0").rstrip(".") for w in p["weights"].values()))
    for xy, names in labels.items():
      ax.annotate(", ".join(names),
                  xy,
                  textcoords="offset points",
                  xytext=(3, 3),
                  fontsize=6,
                  color="dimgray")
    for i, role in enumerate(roles):
      f = result["experts"][role]
      ax.scatter([pct(f[mx])], [pct(f[my])],
                 marker=markers[i % len(markers)],
                 s=80,
                 edgecolor="black",
                 facecolor="none",
                 label=f"{role} teacher",
                 zorder=4)
    if result["global"] is not None:
      g = result["global"]
      ax.scatter([pct(g[mx])], [pct(g[my])],
                 marker="*",
                 s=260,
                 color="tab:red",
                 edgecolor="black",
                 label="trained global model",
                 zorder=5)
    ax.set_xlabel(f"{_METRIC_LABELS[mx]} accuracy (%)")
    ax.set_ylabel(f"{_METRIC_LABELS[my]} accuracy (%)")
    ax.grid(True, alpha=0.3)
  for ax in axes[len(pairs):]:
    ax.set_visible(False)
  axes[0].legend(fontsize=7, loc="best")
  fig.colorbar(points, ax=list(axes[:len(pairs)]), label=f"weight of {roles[0]}", shrink=0.6)
  l2 = f", L2 eps {result['l2_eps']:g}" if result["l2_eps"] else ""
  fig.suptitle(f"Simplex sweep over {', '.join(roles)} (step {result['grid_step']:g}; "
               f"L-inf eps {result['eps']:.4g}{l2}; {result['n']} test images)")
  return outputs.save_figure(fig, path)


def simplex_markdown(result: dict[str, Any]) -> str:
  """The simplex sweep as a markdown table (percent), Pareto rows (clean vs union) marked."""
  metrics, roles = result["metrics"], result["roles"]
  recalibrated = result["bn_recalibrated"]
  l2 = f", L2 eps {result['l2_eps']:g}" if result["l2_eps"] else ""
  lines = [
      f"Simplex sweep of {', '.join(roles)}: grid step {result['grid_step']:g}, PGD-"
      f"{result['steps']} at L-inf eps {result['eps']:.5f}{l2}, {result['n']} test images"
      f"{', BatchNorm recalibrated: ' + recalibrated if recalibrated else ''}.", "", "| weights (" +
      ", ".join(roles) + ") | " + " | ".join(_METRIC_LABELS[m] for m in metrics) + " | Pareto |",
      "|---|" + "---|" * (len(metrics) + 1)
  ]
  for i, p in enumerate(result["points"]):
    mark = "yes" if i in result["pareto"] else ""
    lines.append("| " + ", ".join(f"{w:.2f}" for w in p["weights"].values()) + " | " +
                 " | ".join(f"{100 * p[m]:.2f}" for m in metrics) + f" | {mark} |")
  for role, f in result["experts"].items():
    lines.append(f"| {role} teacher | " + " | ".join(f"{100 * f[m]:.2f}" for m in metrics) + " | |")
  if result["global"] is not None:
    g = result["global"]
    lines.append("| global model | " + " | ".join(f"{100 * g[m]:.2f}" for m in metrics) + " | |")
  return "\n".join(lines) + "\n"
