"""The mixing-weight sweep: how much of each expert should go into the deployed model.

A sweep mixes a run's expert teachers at every point of a grid of mixing weights and evaluates each
mixture beside the teachers and the trained global model, on the same images with the same attack
keys (`run`). One implementation serves every number of experts N; only the grid and the view
differ:

* N = 2 (the classic Generalist): the grid is a line of betas, beta weighting the robust expert
  (`gen_jax.mix(teacher_nat, teacher_rob, beta)`, as in the reference code), and each mixture gets
  clean accuracy and PGD accuracy under the run's attack ("robust"). The plot is the clean/robust
  trade-off line labelled by beta, with its Pareto front (`tradeoff.png`); `select_point` picks a
  beta by a rule such as `clean>=0.88`.
* N >= 3 (Generalist++: natural, L-inf and L2 experts, say): the grid covers the weight simplex
  (`simplex_grid`, `mix_many(teachers, w)`), and each mixture gets clean accuracy, PGD under each
  norm and their per-example union. The plot has one trade-off panel per pair of figures
  (`simplex.png`).

Both share the result dict, the Pareto front (over every evaluated model: clean against the last
figure, "robust" or the union), the markdown table (`to_markdown`), the plot (`plot`) and the files
(`write_sweep`); `sweep_run` sets a training run's sweep up from its config.

Every figure is the correctness engine's (`evaluation.engine`, per-example keys): `sweep_run` uses
the run's own evaluation key by default, so beta = 1 (exactly the robust teacher) and the global
model show the PGD figures of the run's `summary.json` when the sweep's attack is the run's
evaluation. Optionally the BatchNorm statistics of every mixture are re-estimated on training
images (weight interpolation shifts the activation statistics, so averaged running statistics no
longer match the averaged weights: Jordan et al., "REPAIR", ICLR 2023).

Synopsis::

    models = ModelSet(model, {"natural": t_nat, "robust": t_rob, "global": v_global})
    result = run(models, test_x, test_y, key=key, betas=np.linspace(0, 1, 11),
                 threats={"robust": Threat("linf", 8 / 255, 2 / 255, 20)})
    write_sweep(result, "runs/c10/eval")           # sweep.json, sweep.md, tradeoff.png
    choice = select_point(result["points"], parse_rule("clean>=0.88"))   # -> {"beta", ...}

    result = sweep_run(runs.restore_models("runs/c10"), select=parse_rule("clean>=0.88"))

    grid = simplex_grid(3, 0.25)                   # 15 weight vectors, each summing to 1
    result = run(models3, test_x, test_y, key=key, roles=("natural", "robust_linf", "robust_l2"),
                 grid_step=0.25, threats={"linf": Threat("linf", 8 / 255, 2 / 255, 20),
                                          "l2": Threat("l2", 0.5, 0.125, 20)})
    write_sweep(result, "runs/c10-multinorm/eval")  # simplex.json, simplex.md, simplex.png
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gen_jax import attacks, mixing, runs
from gen_jax.attacks.threat import Threat
from gen_jax.data import to_float
from gen_jax.evaluation import engine, outputs, report
from gen_jax.evaluation.modelset import ModelSet
from gen_jax.models.common import BN_MOMENTUM
from gen_jax.experts import GLOBAL, NATURAL, ROBUST

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


# --------------------------------------------------------------------------------------- the grid
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


def _grid(roles: Sequence[str], betas: Sequence[float], grid_step: float) -> list[dict[str, Any]]:
  """The sweep's points before evaluation: {"beta"} per beta for two experts (the line), else
  {"weights": {role: w}} per vector of `simplex_grid`."""
  if len(roles) == 2:
    return [{"beta": beta} for beta in check_betas(betas)]
  return [{"weights": dict(zip(roles, w))} for w in simplex_grid(len(roles), grid_step)]


def _mixture(teachers: Sequence[Any], point: Mapping[str, Any]) -> Any:
  """The variables of a grid point: `mix(nat, rob, beta)` on the line (the reference's formula,
  and what `--select` saves), `mix_many(teachers, w)` on the simplex."""
  if "beta" in point:
    return mixing.mix(*teachers, point["beta"])
  return mixing.mix_many(teachers, list(point["weights"].values()))


def _name(point: Mapping[str, Any], short: bool = False) -> str:
  """A grid point as the table names it ("beta = 0.30", "0.50, 0.25, 0.25") or, `short`, as the
  plot labels it ("0.30", "0.5/0.25/0")."""
  if "beta" in point:
    return f"{point['beta']:.2f}" if short else f"beta = {point['beta']:.2f}"
  if short:
    return "/".join(f"{w:.2f}".rstrip("0").rstrip(".") for w in point["weights"].values())
  return ", ".join(f"{w:.2f}" for w in point["weights"].values())


def _entries(result: Mapping[str, Any]) -> list[tuple[Any, str, dict[str, float]]]:
  """(label, name, figures) of every evaluated model in table order: each mixture (labelled by its
  beta on the line, its index on the simplex), each expert (its role), the global model."""
  rows = [(p.get("beta", i), _name(p), p) for i, p in enumerate(result["points"])]
  rows += [(role, f"{role} expert", f) for role, f in result["experts"].items()]
  if result["global"] is not None:
    rows.append((GLOBAL, "global model", result["global"]))
  return rows


# ------------------------------------------------------------------------------------ the sweep
def run(models: ModelSet,
        images: Any,
        labels: Any,
        *,
        key: jax.Array,
        threats: Mapping[str, Threat],
        roles: Sequence[str] = (NATURAL, ROBUST),
        betas: Sequence[float] = DEFAULT_BETAS,
        grid_step: float = 0.25,
        recalibrate: Callable[[dict[str, Any], float | None], dict[str, Any]] | None = None,
        recalibration: str | None = None,
        batch_size: int = 250,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Clean and attacked accuracy of the experts' mixture at every point of the weight grid.

  Args:
    models: the teachers of `roles` and, when present, the "global" model (evaluated alongside).
    images, labels: the test images (uint8 NHWC or floats in [0, 1]) and labels.
    key: the evaluation key (`engine.correctness`: per example, the same for every model).
    threats: figure name -> attack, e.g. {"robust": the run's attack} on the line, {"linf": ...,
      "l2": ...} on the simplex; with several, their per-example union is a figure too.
    roles: the experts to mix, in weight order (`Config.experts`): two give the line of `betas`
      (robust weights in [0, 1]), more the simplex grid of spacing `grid_step` (1/k).
    recalibrate: `(variables, beta) -> variables` (from `recalibrator`; beta None on the simplex);
      when given, every mixture's BatchNorm statistics are re-estimated with it.
    recalibration: the name of the recalibration, recorded in the result (e.g. "clean").
    batch_size: images per batch.
    progress: optional callback told each point's name ("beta = 0.30") before its evaluation.

  Returns:
    {"kind": "line" or "simplex", "roles", "betas" (line) or "grid_step" (simplex), "metrics"
     ("clean", the threats' names, "union" with several), "eps" and "steps" (the first threat's),
     "l2_eps" (the "l2" threat's or None), "threats" (name -> `Threat.record()`), "n",
     "bn_recalibrated" (the recalibration's name or None), "points": [{"beta" or "weights": {role:
     w}, and the metrics}], "experts": {role: figures}, "global": figures or None, "pareto": the
     models no other beats in clean and the last metric, by increasing clean accuracy: a point's
     beta (line) or index (simplex), an expert's role, "global"}.

  Raises:
    ValueError: fewer than two roles or one the models lack, no threat, bad betas or grid step.
  """
  roles = list(roles)
  missing = [r for r in roles if r not in models.variables]
  if missing or len(roles) < 2:
    raise ValueError(f"the sweep mixes two or more experts; the models have no "
                     f"{missing or roles} (they have {', '.join(models.names)}). Sweep a "
                     "generalist run.")
  if not threats:
    raise ValueError("the sweep needs at least one threat (figure name -> Threat).")
  grid = _grid(roles, betas, grid_step)
  x, y = to_float(np.asarray(images)), np.asarray(labels)
  names, threat_list = list(threats), list(threats.values())
  metrics = ["clean", *names] + (["union"] if len(names) > 1 else [])

  def figures(variables):
    one = ModelSet(models.module, {"m": variables}, fast_ops=models.fast_ops)
    correct = engine.correctness(one, x, y, threats=threat_list, key=key, batch_size=batch_size)
    hits = {name: correct["m"][threat] for name, threat in threats.items()}
    out = {"clean": float(np.mean(correct["m"][engine.CLEAN]))}
    out.update((name, float(np.mean(h))) for name, h in hits.items())
    if "union" in metrics:
      out["union"] = report.union_accuracy(hits)["accuracy"]
    return out

  teachers = [models.variables[r] for r in roles]
  points = []
  for point in grid:
    if progress:
      progress(_name(point))
    variables = _mixture(teachers, point)
    if recalibrate is not None:
      variables = recalibrate(variables, point.get("beta"))
    points.append({**point, **figures(variables)})
  if progress:
    progress("experts and global model")
  line = len(roles) == 2
  grid_spec = {"betas": [p["beta"] for p in grid]} if line else {"grid_step": float(grid_step)}
  first, l2 = threat_list[0], threats.get("l2")
  result = {
      "kind": "line" if line else "simplex",
      "roles": roles,
      **grid_spec,
      "metrics": metrics,
      "norm": first.norm,
      "eps": float(first.eps),
      "l2_eps": None if l2 is None else float(l2.eps),
      "steps": int(first.steps),
      "threats": {
          name: t.record() for name, t in threats.items()
      },
      "n": int(len(labels)),
      "bn_recalibrated": recalibration or ("yes" if recalibrate is not None else None),
      "points": points,
      "experts": {
          r: figures(models.variables[r]) for r in roles
      },
      "global": figures(models.variables[GLOBAL]) if GLOBAL in models.variables else None,
  }
  # The front is over everything evaluated: the mixtures, the experts and the global model.
  entries = _entries(result)
  front = pareto_front([(f["clean"], f[metrics[-1]]) for _, _, f in entries])
  result["pareto"] = [entries[i][0] for i in front]
  return result


def sweep_run(eval_run: runs.EvalRun,
              *,
              betas: Sequence[float] = DEFAULT_BETAS,
              n: int | None = None,
              eps: float | None = None,
              steps: int | None = None,
              bn_recalibrate: str | None = None,
              recalibration_n: int = 2000,
              select: Rule | tuple[str, float] | None = None,
              seed: int | None = None,
              batch_size: int = 250,
              progress: Callable[[str], None] | None = None,
              grid_step: float = 0.25) -> dict[str, Any]:
  """The sweep of a training run (`runs.restore_models`), optionally saving a choice.

  Mixes the run's teachers (`Config.experts`, in order) on its first `n` test images, attacked by
  the run's own evaluation threat (`Threat.of(config)`: its eval PGD steps, eps and step; `eps`
  another radius, the step scaled alike; `steps` other PGD steps), so that its figures are the
  run's `summary.json` figures for the same model and images: two experts along
  `betas`, under the run's own attack ("robust"); more over the simplex grid of `grid_step`, under
  L-inf PGD and, for an L-inf run with an L2 expert, L2 PGD at that expert's radius ("linf",
  "l2", "union"). With `bn_recalibrate` ("clean", or "matched" for two experts: it weighs clean
  and PGD images by beta) re-estimates each mixture's BatchNorm statistics on the first
  `recalibration_n` training images (the run's own training attack for "matched"). With `select`
  (from `parse_rule`; two experts), saves the chosen mixture as a model checkpoint in a new
  directory `EVAL_DIR/mix-beta0.30[-bn-MODE]` and records it under `result["selected"]`; a target
  that no mixture reaches is recorded under `result["selection_error"]` (the sweep itself is
  still returned). The attack key is `engine.attack_key(seed)`, by default of the run's own seed
  (the key of its `summary.json`).
  """
  config = eval_run.config
  seed = config.seed if seed is None else seed
  if config.method != "generalist":
    raise ValueError(
        f"{eval_run.source} was trained with --method {config.method}, which trains one "
        "expert only: there is nothing to mix. Sweep a generalist run.")
  roles = config.experts
  line = len(roles) == 2
  if select is not None and not line:
    raise ValueError("--select chooses a beta between two experts; this run has "
                     f"{len(roles)} ({', '.join(roles)}). Read the simplex sweep and save a "
                     "mixture with gen_jax.mix_many.")
  if bn_recalibrate not in (None, "clean") and not line:
    raise ValueError(f"--bn-recalibrate {bn_recalibrate} weighs clean and PGD images by beta, "
                     "which two experts define; a run of more experts takes 'clean' only.")
  threat = Threat.of(config, eps=eps)
  steps = threat.steps if steps is None else steps  # the L2 threat gets the same steps
  threat = dataclasses.replace(threat, steps=steps)
  threats = {"robust": threat} if line else {threat.norm: threat}
  l2 = None if line or threat.norm != "linf" else Threat.of(config, norm="l2")
  if l2 is not None:
    threats["l2"] = dataclasses.replace(l2, steps=steps)
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
               threats=threats,
               roles=roles,
               betas=betas,
               grid_step=grid_step,
               recalibrate=recalibrate,
               recalibration=bn_recalibrate,
               batch_size=batch_size,
               progress=progress)
  if select is None:
    return result
  try:
    choice = select_point(result["points"], select)
  except ValueError as error:
    result["selection_error"] = str(error)
    return result
  variables = _mixture([eval_run.models[r] for r in roles], choice)
  if recalibrate is not None:
    variables = recalibrate(variables, choice["beta"])
  name = f"mix-beta{choice['beta']:.2f}" + (f"-bn-{bn_recalibrate}" if recalibrate else "")
  rule = str(Rule(*select))
  target = runs.save_model(outputs.unique_directory(eval_run.eval_dir / name),
                           variables,
                           config,
                           source=str(eval_run.source.absolute()),
                           beta=choice["beta"],
                           bn_recalibrated=bn_recalibrate,
                           rule=rule,
                           sweep_figures=choice)
  result["selected"] = {**choice, "rule": rule, "checkpoint": str(target)}
  return result


# ------------------------------------------------------------------------- files, table and plot
_FILES = {
    "line": ("sweep.json", "sweep.md", "tradeoff.png"),
    "simplex": ("simplex.json", "simplex.md", "simplex.png"),
}


def write_sweep(result: dict[str, Any], directory: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """Writes the result (JSON), its table (`to_markdown`) and its plot (`plot`): `sweep.json`,
  `sweep.md` and `tradeoff.png` for two experts, `simplex.json`, `simplex.md` and `simplex.png`
  for more; earlier files are kept (`outputs`)."""
  directory = pathlib.Path(directory)
  json_name, md_name, png_name = _FILES[result["kind"]]
  return {
      "json": outputs.write_json(directory / json_name, result),
      "md": outputs.write_text(directory / md_name, to_markdown(result)),
      "png": plot(result, directory / png_name),
  }


def _label(result: Mapping[str, Any], metric: str) -> str:
  """A metric as the table heads it: "clean", "robust", "L-inf PGD-20", "L2 PGD-20", "union"."""
  return {"linf": "L-inf PGD-{}", "l2": "L2 PGD-{}"}.get(metric, metric).format(result["steps"])


def _radius(result: Mapping[str, Any]) -> str:
  """The first attack's norm and radius as a reader writes them: "L-inf eps 8/255" or
  "L2 eps 0.5" (a sweep written before "norm" was recorded is L-inf)."""
  if result.get("norm", "linf") == "l2":
    return f"L2 eps {result['eps']:g}"
  return f"L-inf eps {255 * result['eps']:.3g}/255"


def _axis_label(result: Mapping[str, Any], metric: str) -> str:
  if metric == "robust":  # the line's one attack, with its radius
    return f"PGD-{result['steps']} accuracy (%), {_radius(result)}"
  return f"{_label(result, metric)} accuracy (%)"


def _pairs(metrics: Sequence[str]) -> list[tuple[str, str]]:
  """The plot's panels: clean against each attack's figure, each pair of attacks' figures (L-inf
  vs L2), clean against the union. The line's one panel is clean vs robust."""
  attacked = [m for m in metrics if m not in ("clean", "union")]
  pairs = [("clean", m) for m in attacked] + list(itertools.combinations(attacked, 2))
  return pairs + ([("clean", "union")] if "union" in metrics else [])


# The line's two experts in colour; the simplex's teachers hollow, one shape each.
_LINE_EXPERTS = (("s", 80, "tab:green"), ("^", 90, "tab:orange"))
_SIMPLEX_MARKERS = ("s", "^", "v", "D", "P", "X")


def plot(result: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
  """Draws the sweep's trade-off, the experts and the global model; saves a PNG.

  Two experts: the clean/robust line of the mixtures, each point labelled with its beta, and the
  Pareto front as a dashed line through the non-dominated models. More: one panel per pair of
  figures (clean vs L-inf, clean vs L2, L-inf vs L2, clean vs union), the mixtures coloured by
  the first expert's weight and labelled with their weights.
  """
  # The object API with the Agg canvas: no pyplot, no display, no global backend change.
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  line = result["kind"] == "line"
  pct = lambda v: 100.0 * v
  roles, points = result["roles"], result["points"]
  pairs = _pairs(result["metrics"])
  cols = min(2, len(pairs))
  rows = -(-len(pairs) // cols)
  fig = Figure(figsize=(6.4, 4.8) if line else (6.0 * cols, 4.8 * rows), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
  for ax, (mx, my) in zip(axes, pairs):
    xs, ys = [pct(p[mx]) for p in points], [pct(p[my]) for p in points]
    if line:
      label = f"mix({', '.join(roles)}, beta)"
      if result["bn_recalibrated"]:
        label += f" + BN recalibrated ({result['bn_recalibrated']})"
      ax.plot(xs, ys, "o-", color="tab:blue", label=label, zorder=2)
    else:
      mixtures = ax.scatter(xs,
                            ys,
                            c=[p["weights"][roles[0]] for p in points],
                            cmap="viridis",
                            vmin=0.0,
                            vmax=1.0,
                            s=30,
                            zorder=3,
                            label="mix_many(teachers, w)")
    labels = {}  # coinciding points share one label "0.20, 0.30"
    for p, xy in zip(points, zip(xs, ys)):
      labels.setdefault(xy, []).append(_name(p, short=True))
    for xy, names in labels.items():
      ax.annotate(", ".join(names),
                  xy,
                  textcoords="offset points",
                  xytext=(4, 4) if line else (3, 3),
                  fontsize=7 if line else 6,
                  color="tab:blue" if line else "dimgray")
    if line:
      front = [f for item, _, f in _entries(result) if item in result["pareto"]]
      draw_front(ax, [(pct(f[mx]), pct(f[my])) for f in front])
    for i, role in enumerate(roles):
      if line:
        marker, size, color = _LINE_EXPERTS[i]
        style = dict(marker=marker, s=size, color=color, label=f"{role} expert (EMA teacher)")
      else:
        style = dict(marker=_SIMPLEX_MARKERS[i % len(_SIMPLEX_MARKERS)],
                     s=80,
                     edgecolor="black",
                     facecolor="none",
                     label=f"{role} teacher")
      f = result["experts"][role]
      ax.scatter([pct(f[mx])], [pct(f[my])], zorder=4, **style)
    if result["global"] is not None:
      g = result["global"]
      ax.scatter([pct(g[mx])], [pct(g[my])],
                 marker="*",
                 s=260,
                 color="tab:red",
                 edgecolor="black",
                 label="trained global model",
                 zorder=5)
    ax.set_xlabel(_axis_label(result, mx))
    ax.set_ylabel(_axis_label(result, my))
    ax.grid(True, alpha=0.3)
  axes[0].legend(fontsize=8 if line else 7, loc="best")
  if line:
    axes[0].set_title(f"Mixing-weight sweep ({result['n']} test images)")
  else:
    for ax in axes[len(pairs):]:
      ax.set_visible(False)
    fig.colorbar(mixtures, ax=list(axes[:len(pairs)]), label=f"weight of {roles[0]}", shrink=0.6)
    l2 = f", L2 eps {result['l2_eps']:g}" if result["l2_eps"] else ""
    fig.suptitle(f"Simplex sweep over {', '.join(roles)} (step {result['grid_step']:g}; "
                 f"{_radius(result)}{l2}; {result['n']} test images)")
  return outputs.save_figure(fig, path)


def to_markdown(result: dict[str, Any]) -> str:
  """The sweep as a markdown table (percent): a row per mixture, expert and the global model, those
  on the Pareto front marked."""
  metrics, roles, recalibrated = result["metrics"], result["roles"], result["bn_recalibrated"]
  if result["kind"] == "line":
    title, first = f"Mixing sweep: PGD-{result['steps']} at {_radius(result)}", "model"
  else:
    l2 = f", L2 eps {result['l2_eps']:g}" if result["l2_eps"] else ""
    title = (f"Simplex sweep of {', '.join(roles)}: grid step {result['grid_step']:g}, PGD-"
             f"{result['steps']} at {_radius(result)}{l2}")
    first = f"weights ({', '.join(roles)})"
  lines = [
      f"{title}, {result['n']} test images"
      f"{', BatchNorm recalibrated: ' + recalibrated if recalibrated else ''}.", "",
      f"| {first} | " + " | ".join(_label(result, m) for m in metrics) + " | Pareto |",
      "|---|" + "---|" * (len(metrics) + 1)
  ]
  for label, name, figures in _entries(result):
    mark = "yes" if label in result["pareto"] else ""
    lines.append(f"| {name} | " + " | ".join(f"{100 * figures[m]:.2f}" for m in metrics) +
                 f" | {mark} |")
  if result.get("threats"):  # sweeps written before the threats were recorded lack them
    lines += [
        "", "Threats: " +
        "; ".join(f"{name}: {t['name']}" for name, t in result["threats"].items()) + "."
    ]
  return "\n".join(lines) + "\n"
