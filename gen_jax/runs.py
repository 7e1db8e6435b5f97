"""The run directory: its layout, its records, and the only doors into it.

A training run owns one directory::

    WORKDIR/config.json      the config record (a rerun with another config is refused)
    WORKDIR/metrics.jsonl    one JSON line per epoch
    WORKDIR/checkpoints/     orbax: the latest full training states (resume points)
    WORKDIR/best/            orbax: the best global model by validation clean + PGD accuracy
    WORKDIR/summary.json     final test accuracy of the evaluated models
    WORKDIR/eval/            evaluation results (reports, sweeps, selected mixtures)

The training loop (`gen_jax.training.loop`) writes it through this module; the evaluation
programs read it through `restore_models` and `load_model`, which restore only the evaluated
models (no optimiser state) and only the test split. A saved model (`save_model`) is a
directory of its own with a `model.json` record holding the run's config.

Synopsis::

    run = restore_models("runs/pilot")         # config, model, {role: variables}, test data
    run = load_model("runs/pilot/eval/mix-beta0.30")  # a saved model, same fields
    run = load_model("runs/pilot/best")        # the best global model of a run
    out = run.eval_dir                         # where its evaluation files go
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any

import jax
import numpy as np

from gen_jax import checkpoint, data, models
from gen_jax.config import Config, config_from_record, config_record
from gen_jax.training.methods import GLOBAL, NATURAL, ROBUST

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
EVAL_DIR = "eval"
MODEL_RECORD = checkpoint.MODEL_RECORD

PathLike = str | os.PathLike

# Checkpoints written before the role vocabulary (gen_jax 0.1.0 at its first landings) name the
# evaluated models teacher_nat, teacher_rob and mix; they are read under today's names.
_LEGACY_MODEL_KEYS = {"teacher_nat": NATURAL, "teacher_rob": ROBUST, "mix": GLOBAL}


# ----------------------------------------------------------------------------- config record
def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON ({error}); restore it from a copy or use a new "
                     "--workdir.") from error


def check_config(config: Config, workdir: PathLike) -> bool:
  """Whether `workdir` already holds a run; ValueError if that run has another config.

  Records written before a field existed compare as holding its default.
  """
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return False
  old = config_record(config_from_record(_read_json(path)))
  new = config_record(config)
  changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  if changed:
    details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
    raise ValueError(f"{workdir} holds a run with another config ({details}). Resuming it with new "
                     "settings would mix two experiments: use a new --workdir, or repeat the "
                     "original settings to resume. Nothing was changed.")
  return True


def write_config(config: Config, workdir: PathLike) -> None:
  """Creates `workdir` and records `config` there (call once the data have loaded)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / CONFIG_FILE
  if not path.exists():
    path.write_text(json.dumps(config_record(config), indent=2) + "\n")


def read_config(workdir: PathLike) -> Config:
  """The validated config of the run in `workdir`."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{workdir} holds no training run (no {CONFIG_FILE}); train one with "
                            "experiments/train.py --workdir first.")
  return config_from_record(_read_json(path))


# ------------------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class Splits:
  """Host arrays of a run: training, validation (model selection) and test."""
  train_x: np.ndarray
  train_y: np.ndarray
  val_x: np.ndarray
  val_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]


def load_splits(config: Config) -> Splits:
  """Loads the data set and holds out the validation split (stratified, seeded)."""
  ds = data.load_dataset(config.dataset,
                         data_dir=config.data_dir,
                         image_size=config.image_size,
                         max_per_class=config.max_train_per_class,
                         max_test_per_class=config.max_test_per_class)
  size = config.validation_size
  size = int(size) if size >= 1 else float(size)
  if size:
    tx, ty, vx, vy = data.train_validation_split(ds.train_images,
                                                 ds.train_labels,
                                                 validation_size=size,
                                                 seed=config.seed)
  else:
    tx, ty, vx, vy = ds.train_images, ds.train_labels, ds.train_images[:0], ds.train_labels[:0]
  return Splits(tx, ty.astype(np.int32), vx, vy.astype(np.int32), ds.test_images,
                ds.test_labels.astype(np.int32), ds.num_classes, tuple(ds.class_names))


def build_model(config: Config, num_classes: int, *, for_evaluation: bool = False):
  """The run's network; for evaluation always in float32, whatever the training dtype."""
  dtype = "float32" if for_evaluation else config.compute_dtype
  return models.create_model(config.model,
                             num_classes,
                             dtype=models.COMPUTE_DTYPES[dtype],
                             conv_impl=config.conv_impl)


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_manager(workdir: PathLike, config: Config):
  """The orbax manager of the run's resume points."""
  return checkpoint.open_manager(pathlib.Path(workdir) / CHECKPOINT_DIR,
                                 max_to_keep=config.keep_checkpoints)


def best_manager(workdir: PathLike):
  """The orbax manager of the run's best global model."""
  return checkpoint.open_manager(pathlib.Path(workdir) / BEST_DIR, max_to_keep=1)


# --------------------------------------------------------------------------- metrics, summary
def append_metrics(workdir: PathLike, record: dict[str, Any]) -> None:
  with open(pathlib.Path(workdir) / METRICS_FILE, "a") as f:
    f.write(json.dumps(record) + "\n")


def read_metrics(workdir: PathLike) -> list[dict[str, Any]]:
  """The run's per-epoch records (empty before the first epoch ends)."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  records = []
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as error:
        raise ValueError(f"{path} line {number} is not valid JSON ({error}).") from error
  return records


def truncate_metrics(workdir: PathLike, epoch: int) -> None:
  """Drops metric lines of epochs after `epoch` (the restored checkpoint's; they are re-run)."""
  path = pathlib.Path(workdir) / METRICS_FILE
  records = read_metrics(workdir)
  kept = [r for r in records if r["epoch"] <= epoch]
  if len(kept) != len(records):
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def write_summary(workdir: PathLike, summary: dict[str, Any]) -> None:
  (pathlib.Path(workdir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def read_summary(workdir: PathLike) -> dict[str, Any] | None:
  """The finished run's summary, or None if the run has not finished.

  Summaries of earlier versions (models at the top level, robust accuracy as `pgd20_acc`) are
  returned in today's form: `summary["models"][role]` with `clean_acc` and `pgd_acc`.
  """
  path = pathlib.Path(workdir) / SUMMARY_FILE
  if not path.exists():
    return None
  summary = _read_json(path)
  if "models" not in summary:
    moved = {}
    for role in (NATURAL, ROBUST, GLOBAL):
      if role in summary:
        figures = summary.pop(role)
        moved[role] = {
            ("pgd_acc" if re.fullmatch(r"pgd\d+_acc", k) else k): v for k, v in figures.items()
        }
    summary["models"] = moved
  return summary


# ---------------------------------------------------------------------- evaluation: models
@dataclasses.dataclass(frozen=True)
class EvalRun:
  """What an evaluation needs of a run or a saved model.

  Attributes:
    config: the run's config.
    model: the float32 network.
    models: name -> linen variables (roles for a run; one name for a saved model).
    test_x: uint8 test images; test_y: int32 labels.
    num_classes: number of classes.
    eval_dir: the default directory for evaluation files.
    source: the run directory or model checkpoint it came from.
  """
  config: Config
  model: Any
  models: dict[str, Any]
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  eval_dir: pathlib.Path
  source: pathlib.Path

  def test_split(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` test images and labels (all when None or more than there are)."""
    n = min(n or len(self.test_y), len(self.test_y))
    return self.test_x[:n], self.test_y[:n]

  def attack_settings(self, eps: float | None = None) -> tuple[float, float]:
    """(eps, PGD step) of an evaluation: the run's, or `eps` with the step scaled alike."""
    eps = eps or self.config.eps
    return eps, self.config.eval_step_size * eps / self.config.eps

  def training_images(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` images and labels of the run's training split (loaded on demand)."""
    splits = load_splits(self.config)
    return splits.train_x[:n], splits.train_y[:n]


def check_finite_models(models: dict[str, Any], source: PathLike) -> None:
  """ValueError naming the model and the first leaf holding NaN or inf (a diverged run).

  Evaluated before any attack: a NaN model would otherwise fail later with a message about
  adversarial values, or be reported at chance accuracy as if it were a result.
  """
  for name, variables in models.items():
    flat, _ = jax.tree_util.tree_flatten_with_path(variables)
    for path, leaf in flat:
      if not np.all(np.isfinite(np.asarray(leaf))):
        where = "/".join(str(getattr(p, "key", p)) for p in path)
        raise ValueError(f"the {name} model of {source} holds NaN or inf in {where}: its run "
                         "diverged, so there is nothing to evaluate. Retrain with a lower "
                         "learning rate (--lr-nat / --lr-rob).")


def _evaluated_model_keys(keys: tuple[str, ...]) -> list[str]:
  """The saved state's keys that hold the evaluated models, in today's or the legacy layout."""
  if "teachers" in keys:
    return ["teachers", "global_model"]
  return [k for k in _LEGACY_MODEL_KEYS if k in keys]


def _test_data(config: Config):
  splits = load_splits(config)
  return splits.test_x, splits.test_y, splits.num_classes


def restore_models(workdir: PathLike, roles: tuple[str, ...] | None = None) -> EvalRun:
  """The evaluated models of a run (latest checkpoint), its float32 network and its test split.

  Only the teachers and the global model are read from the checkpoint: no optimiser state.

  Args:
    workdir: a run directory of `experiments/train.py`.
    roles: which models (default: every model the run has, e.g. natural, robust, global).

  Raises:
    FileNotFoundError: `workdir` holds no run or no checkpoint yet.
    ValueError: a role the run does not have.
  """
  workdir = pathlib.Path(workdir)
  config = read_config(workdir)
  restored = checkpoint.restore_items(workdir / CHECKPOINT_DIR, _evaluated_model_keys)
  if restored is None:
    raise FileNotFoundError(f"{workdir}/{CHECKPOINT_DIR} holds no checkpoint yet: let the run "
                            "finish at least one epoch.")
  items = restored[0]
  if "teachers" in items:
    available = {**items["teachers"], GLOBAL: items["global_model"]}
  else:
    available = {_LEGACY_MODEL_KEYS[k]: v for k, v in items.items()}
    available = {r: available[r] for r in (NATURAL, ROBUST, GLOBAL) if r in available}
    # Legacy single-expert runs also saved the untrained expert's teacher.
    available = {r: v for r, v in available.items() if r == GLOBAL or r in config.experts}
  chosen = roles or tuple(available)
  missing = [r for r in chosen if r not in available]
  if missing:
    raise ValueError(f"{workdir} (method {config.method}) has no {missing} model; it has "
                     f"{', '.join(available)}.")
  chosen_models = {r: available[r] for r in chosen}
  check_finite_models(chosen_models, workdir)
  test_x, test_y, num_classes = _test_data(config)
  return EvalRun(config=config,
                 model=build_model(config, num_classes, for_evaluation=True),
                 models=chosen_models,
                 test_x=test_x,
                 test_y=test_y,
                 num_classes=num_classes,
                 eval_dir=workdir / EVAL_DIR,
                 source=workdir)


def save_model(directory: PathLike, variables: Any, config: Config, **record: Any) -> pathlib.Path:
  """Saves one model with its record (the run's config plus `record`) in a new directory.

  A model already saved is never overwritten (FileExistsError); `load_model` reads it back.
  """
  return checkpoint.save_model(directory, jax.device_get(variables), {
      "config": config_record(config),
      **record
  })


def load_model(path: PathLike) -> EvalRun:
  """A saved model (`save_model`, e.g. by `sweep_mix.py --select`) or a run's `best/` directory.

  Evaluation files of `WORKDIR/best` go to `WORKDIR/eval/best` (the orbax directory stays its
  own); those of a saved model to `PATH/eval`.

  Raises:
    FileNotFoundError: `path` is neither kind, or holds no checkpoint yet.
    ValueError: the stored variables do not fit the recorded architecture.
  """
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"--checkpoint {path}: no such directory.")
  if (path / MODEL_RECORD).is_file():
    record = _read_json(path / MODEL_RECORD)
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
      raise ValueError(f"{path / MODEL_RECORD} holds no config record; it was not written by "
                       "gen_jax.runs.save_model.")
    config = config_from_record(record["config"])
    kind = "model"
  elif (path / CONFIG_FILE).is_file():
    raise FileNotFoundError(
        f"{path} is a run directory, not a saved model: evaluate it with "
        f"--workdir {path}, or its best model with --checkpoint {path / BEST_DIR}.")
  elif path.name != BEST_DIR and (path.parent / CONFIG_FILE).is_file():
    raise FileNotFoundError(
        f"{path} is the {path.name}/ directory of a run, not a saved model: evaluate the run with "
        f"--workdir {path.parent}, or its best model with --checkpoint {path.parent / BEST_DIR}.")
  elif (path.parent / CONFIG_FILE).is_file():
    config, kind = read_config(path.parent), "best"
  else:
    raise FileNotFoundError(
        f"{path} is neither a model checkpoint (no {MODEL_RECORD}) nor the {BEST_DIR}/ "
        f"directory of a training run (no {CONFIG_FILE} next to it).")
  test_x, test_y, num_classes = _test_data(config)
  model = build_model(config, num_classes, for_evaluation=True)
  abstract = jax.eval_shape(
      lambda: models.init_variables(model, jax.random.key(0), tuple(test_x.shape[1:])))
  if kind == "model":
    variables, name, out = checkpoint.load_model(path, abstract), path.name, path / EVAL_DIR
  else:
    manager = checkpoint.open_manager(path, max_to_keep=1)
    restored = checkpoint.restore(manager, abstract)
    manager.close()
    if restored is None:
      raise FileNotFoundError(f"{path} holds no checkpoint yet.")
    variables, meta = restored
    name, out = f"global (best, epoch {meta.get('epoch')})", path.parent / EVAL_DIR / BEST_DIR
  check_finite_models({name: variables}, path)
  return EvalRun(config=config,
                 model=model,
                 models={name: variables},
                 test_x=test_x,
                 test_y=test_y,
                 num_classes=num_classes,
                 eval_dir=out,
                 source=path)
