"""Pictures of a run: training curves from `metrics.jsonl`, and adversarial examples per model.

`training_curves` draws, per epoch, the experts' training loss and accuracy, the clean and PGD
accuracy of every evaluated model (natural teacher, robust teacher, global model), and β with the
learning rates. `examples` (an analysis of the robustness report, `run(models, images, labels,
...)` like the others) attacks a few test images against each model and records every model's
prediction on every image; `plot_examples` draws them as a grid: the clean image, then for each
model its adversarial image and the perturbation amplified to the full grey range.

Synopsis::

    training_curves(runs.read_metrics("runs/pilot"), "runs/pilot/eval/curves.png")
    result = run(ModelSet(model, variables), images, labels, key=key, eps=8 / 255,
                 step_size=2 / 255, class_names=names)
    plot_examples(result, "runs/pilot/eval/examples.png")

Figures use matplotlib's object API with the Agg canvas (no pyplot, no display) and never
overwrite an earlier file (`outputs.save_figure`).
"""
from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from gen_jax.data import to_float
from gen_jax.evaluation import catalogue, outputs
from gen_jax.evaluation.modelset import ModelSet

_ROLE_COLOURS = {"natural": "tab:green", "robust": "tab:orange", "global": "tab:red"}


def _colour(name: str, index: int) -> str:
  return _ROLE_COLOURS.get(name, f"C{index % 10}")


def training_curves(records: Sequence[Mapping[str, Any]],
                    path: str | pathlib.Path,
                    title: str = "") -> pathlib.Path:
  """Four panels over the epochs of a run; saves a PNG.

  Args:
    records: the run's per-epoch records (`gen_jax.runs.read_metrics`).
    path: where to write the PNG (an earlier file is kept, see `outputs`).
    title: figure title (e.g. the run directory).

  Raises:
    ValueError: no records (the run has not finished an epoch yet).
  """
  if not records:
    raise ValueError("no epoch records to plot: the run has not finished an epoch yet.")
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  epochs = [r["epoch"] for r in records]
  fig = Figure(figsize=(11, 7.5), layout="constrained")
  (ax_loss, ax_train), (ax_test, ax_sched) = fig.subplots(2, 2)
  experts = list(records[0].get("train", {}))
  for i, role in enumerate(experts):
    ax_loss.plot(epochs, [r["train"][role]["loss"] for r in records],
                 color=_colour(role, i),
                 label=f"{role} expert")
    ax_train.plot(epochs, [100 * r["train"][role]["acc"] for r in records],
                  color=_colour(role, i),
                  label=f"{role} expert" + (" (adversarial batches)" if role == "robust" else ""))
  ax_loss.set_title("training loss")
  ax_train.set_title("training accuracy (%)")
  evaluated = [r for r in records if "test" in r]
  roles = list(evaluated[0]["test"]) if evaluated else []
  for i, role in enumerate(roles):
    xs = [r["epoch"] for r in evaluated]
    colour = _colour(role, i)
    ax_test.plot(xs, [100 * r["test"][role]["clean_acc"] for r in evaluated],
                 "o-",
                 color=colour,
                 label=f"{role} clean")
    ax_test.plot(xs, [100 * r["test"][role]["pgd_acc"] for r in evaluated],
                 "s--",
                 color=colour,
                 label=f"{role} PGD")
  ax_test.set_title("test accuracy (%): clean (solid), PGD (dashed)")
  ax_sched.plot(epochs, [r["beta"] for r in records], color="black", label="β (robust weight)")
  ax_lr = ax_sched.twinx()
  for i, role in enumerate(experts):
    ax_lr.plot(epochs, [r["lr"][role] for r in records if "lr" in r],
               ":",
               color=_colour(role, i),
               label=f"lr {role}")
  ax_lr.set_ylabel("learning rate")
  ax_sched.set_title("β and learning rates")
  for ax in (ax_loss, ax_train, ax_test, ax_sched):
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
  ax_lr.legend(fontsize=7, loc="lower left")
  if title:
    fig.suptitle(title)
  return outputs.save_figure(fig, path)


def run(models: ModelSet,
        images: Any,
        labels: Any,
        *,
        key: jax.Array,
        eps: float,
        step_size: float,
        batch_size: int = 250,
        progress: Callable[[str], None] | None = None,
        n: int = 6,
        attack: str = "pgd20",
        class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """A few test images, each model's PGD image of them, and every model's prediction on each.

  Args:
    models: the models; each is attacked on its own (white-box).
    images, labels: the points; the first `n` are used.
    key: PRNG key of the attack's random start.
    eps, step_size: the L-inf attack.
    batch_size: images per compiled attack call (at most `n`).
    progress: optional callback told the attacked model's name.
    n: how many images.
    attack: the catalogue attack (default PGD-20).
    class_names: label names for the captions (default: the label numbers).

  Returns:
    {"eps", "attack", "labels", "class_names", "clean": [n, H, W, C] uint8 images,
     "adversarial": {attacked model: uint8 images}, "predictions": {attacked model or "clean":
     {predicting model: [n] labels}}}: JSON-serialisable (nested lists). The images are stored
    rounded to 8 bits for the picture; the predictions are those on the exact images.
  """
  x = to_float(np.asarray(images))[:n]
  y = np.asarray(labels).astype(np.int32)[:n]
  fns = models.logits_fns()
  predict = jax.jit(lambda fn, z: fn(z).argmax(-1))
  adversarial = {}
  for i, (name, fn) in enumerate(fns.items()):
    if progress:
      progress(f"examples: {attack} against {name}")
    x_adv, _ = catalogue.run_attack(attack,
                                    fn,
                                    x,
                                    y,
                                    key=jax.random.fold_in(key, i),
                                    eps=eps,
                                    step_size=step_size,
                                    batch_size=min(batch_size, len(y)))
    adversarial[name] = x_adv
  predictions = {
      source: {
          name: np.asarray(predict(fn, z)).tolist() for name, fn in fns.items()
      } for source, z in {
          "clean": x,
          **adversarial
      }.items()
  }
  names = list(class_names) if class_names is not None else [
      str(c) for c in range(int(y.max()) + 1)
  ]
  return {
      "eps": float(eps),
      "attack": attack,
      "labels": y.tolist(),
      "class_names": names,
      "clean": _as_uint8(x),
      "adversarial": {
          name: _as_uint8(a) for name, a in adversarial.items()
      },
      "predictions": predictions,
  }


def _as_uint8(images: np.ndarray) -> list:
  return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8).tolist()


def plot_examples(result: Mapping[str, Any], path: str | pathlib.Path) -> pathlib.Path:
  """The grid of `run`: per image, the clean image and, per model, its adversarial image and
  perturbation (amplified: eps maps to white), captioned with every model's prediction."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  clean = np.asarray(result["clean"], np.float32) / 255.0
  names = list(result["adversarial"])
  label_of = lambda c: result["class_names"][c] if c < len(result["class_names"]) else str(c)
  cols = 1 + 2 * len(names)
  rows = clean.shape[0]
  fig = Figure(figsize=(1.7 * cols, 1.9 * rows), layout="constrained")
  axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
  eps = result["eps"]

  def show(ax, image, caption):
    image = np.clip(image, 0.0, 1.0)
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(caption, fontsize=6)

  def caption(source, i):
    preds = result["predictions"][source]
    return "\n".join(f"{m}: {label_of(preds[m][i])}" for m in names)

  for i in range(rows):
    truth = label_of(result["labels"][i])
    show(axes[i, 0], clean[i], f"clean (true: {truth})\n" + caption("clean", i))
    for j, name in enumerate(names):
      adv = np.asarray(result["adversarial"][name][i], np.float32) / 255.0
      show(axes[i, 1 + 2 * j], adv, f"{result['attack']} vs {name}\n" + caption(name, i))
      delta = (adv - clean[i]) / (2 * eps) + 0.5
      show(axes[i, 2 + 2 * j], delta, f"perturbation vs {name}\n(x{0.5 / eps:.0f})")
  fig.suptitle(
      f"{result['attack']} at eps {255 * eps:.1f}/255: each model's own adversarial "
      "images; captions give every model's prediction",
      fontsize=9)
  return outputs.save_figure(fig, path, dpi=110)


def to_markdown(result: Mapping[str, Any]) -> str:
  """How many of the shown images each model still classifies right under each attack."""
  names = list(result["adversarial"])
  labels = result["labels"]
  lines = [
      f"{len(labels)} test images (`examples.png`): correct predictions of each model (rows) on "
      f"the clean images and on each model's {result['attack']} images (columns).", "",
      "| model | clean | " + " | ".join(f"vs {m}" for m in names) + " |",
      "|---|---|" + "---|" * len(names)
  ]
  for m in names:
    cells = [
        sum(p == t
            for p, t in zip(result["predictions"][source][m], labels))
        for source in ["clean", *names]
    ]
    lines.append(f"| {m} | " + " | ".join(f"{c}/{len(labels)}" for c in cells) + " |")
  return "\n".join(lines) + "\n"
