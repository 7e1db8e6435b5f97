"""The training loop: `train_and_evaluate(config, workdir)`.

Loads the data once into device memory, runs one jitted dispatch per batch (gather, augment,
both experts, Generalist update), evaluates the three models after each epoch, checkpoints, and
writes the run's files:

    workdir/config.json      the config (a rerun with another config is refused)
    workdir/metrics.jsonl    one line per epoch
    workdir/checkpoints/     orbax: the latest full state (resume point)
    workdir/best/            orbax: the best global model by validation clean + PGD accuracy
    workdir/summary.json     final test accuracy of both teachers and the global model

Running the same command again on the same workdir resumes from the latest checkpoint; a run
that already wrote `summary.json` is not retrained. The host reads device values only at
logging steps and epoch ends.

Synopsis::

    summary = train_and_evaluate(config, "runs/pilot")
    summary["global"]["clean_acc"], summary["global"]["pgd20_acc"]
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gen_jax import checkpoint, data, models, parallel
from gen_jax.config import Config
from gen_jax.evaluation.accuracy import evaluate_models
from gen_jax.training import steps as steps_lib

_STREAMS = ("init", "data", "train", "eval")


def _keys(seed: int) -> dict[str, jax.Array]:
  """Named PRNG streams split once from the root key; nothing about them is checkpointed."""
  return dict(zip(_STREAMS, jax.random.split(jax.random.key(seed), len(_STREAMS))))


def _config_record(config: Config) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(config)))


def _prepare_workdir(config: Config, workdir: pathlib.Path) -> None:
  """Creates the workdir, or checks that an existing one belongs to this very config."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "config.json"
  record = _config_record(config)
  if path.exists():
    old = json.loads(path.read_text())
    changed = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
    if changed:
      details = ", ".join(f"{k}: {old.get(k)!r} -> {record.get(k)!r}" for k in changed[:6])
      raise ValueError(
          f"{workdir} holds a run with another config ({details}). Resuming it with new "
          "settings would mix two experiments: use a new --workdir, or repeat the original "
          "settings to resume. Nothing was changed.")
  else:
    path.write_text(json.dumps(record, indent=2) + "\n")


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


def build_model(config: Config, num_classes: int):
  dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
  return models.create_model(config.model, num_classes, dtype=dtype, conv_impl=config.conv_impl)


def _epoch_train_step(state, totals, train_x, train_y, perm, index, key, tables, *, model, config,
                      batch_sharding):
  """Gathers batch `index` of this epoch's permutation, then runs `steps.train_step`."""
  batch = config.batch_size
  idx = jax.lax.dynamic_slice_in_dim(perm, index * batch, batch)
  images = jax.lax.with_sharding_constraint(train_x[idx], batch_sharding)
  labels = jax.lax.with_sharding_constraint(train_y[idx], batch_sharding)
  step_key = jax.random.fold_in(key, state.step)
  state, metrics = steps_lib.train_step(state,
                                        images,
                                        labels,
                                        step_key,
                                        tables,
                                        model=model,
                                        config=config)
  totals = jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), totals, metrics)
  return state, totals


def _state_factory(config: Config, model, image_shape):
  """The zero-argument initialiser of a run's state (its key comes from the config's seed)."""
  return functools.partial(steps_lib.create_train_state,
                           config,
                           model,
                           _keys(config.seed)["init"],
                           image_shape=image_shape)


def _zero_totals(config: Config) -> dict[str, dict[str, jax.Array]]:
  return {
      role: {
          "loss_sum": jnp.zeros((), jnp.float32),
          "correct": jnp.zeros((), jnp.int32),
          "count": jnp.zeros((), jnp.int32)
      } for role in config.experts
  }


def _read_totals(totals) -> dict[str, float]:
  host = jax.device_get(totals)
  out = {}
  for role, t in host.items():
    count = max(int(t["count"]), 1)
    out[f"{role}_loss"] = float(t["loss_sum"]) / count
    out[f"{role}_acc"] = float(t["correct"]) / count
  return out


def _check_finite(values: dict[str, float], step: int) -> None:
  bad = {k: v for k, v in values.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"non-finite training metrics {bad} at step {step}. The run diverged: lower --lr_nat / "
        "--lr_rob or check the data; the last good checkpoint is kept in the workdir.")


def _evaluate(state, xs, ys, *, model, config, key, sharding, roles=None):
  candidates = state.models()
  chosen = {r: candidates[r] for r in (roles or candidates)}
  return evaluate_models(chosen,
                         xs,
                         ys,
                         model=model,
                         key=key,
                         eps=config.eps,
                         step_size=config.eval_step_size,
                         steps=config.eval_pgd_steps,
                         batch_size=config.eval_batch_size,
                         norm=config.norm,
                         sharding=sharding)


def _roles(config: Config) -> tuple[str, ...]:
  return {
      "generalist": ("natural", "robust", "global"),
      "natural": ("natural", "global"),
      "pgd_at": ("robust", "global"),
      "trades": ("robust", "global")
  }[config.method]


def train_and_evaluate(config: Config,
                       workdir: str | pathlib.Path,
                       *,
                       progress: bool = True,
                       max_epochs: int | None = None) -> dict[str, Any]:
  """Trains a run to the end (resuming if possible) and returns its summary.

  Args:
    config: the run's configuration (validated here, before any work).
    workdir: directory of the run's files (see the module docstring).
    progress: show tqdm progress bars.
    max_epochs: train at most this many epochs in this call, then return after checkpointing
      (for time-boxed sessions such as Colab; the next call resumes). None: run to the end.

  Returns:
    `{"stopped_at_epoch": e}` when stopped by `max_epochs` before the end; otherwise the
    summary: per model (`natural`, `robust`, `global`) its `clean_acc` and `pgd20_acc` on
    the test split (fractions), plus `config`, `best`, `steps`, `train_seconds` (time in
    training steps over all epochs, resumed ones included) and `seconds` (this call's wall time).
  """
  config.validate()
  workdir = pathlib.Path(workdir)
  summary_path = workdir / "summary.json"
  _prepare_workdir(config, workdir)
  if summary_path.exists():
    print(f"{workdir} already holds a finished run; its summary:")
    return json.loads(summary_path.read_text())

  started = time.time()
  splits = load_splits(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  steps_per_epoch = len(splits.train_y) // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"the training split has {len(splits.train_y)} images, fewer than one "
                     f"batch of --batch_size {config.batch_size}; lower it.")
  total_steps = steps_per_epoch * config.epochs
  model = build_model(config, splits.num_classes)
  # Attacks for evaluation always run in float32, whatever the training compute dtype.
  eval_model = build_model(dataclasses.replace(config, compute_dtype="float32"), splits.num_classes)
  keys = _keys(config.seed)
  image_shape = tuple(splits.train_x.shape[1:])

  replicated = parallel.replicated(mesh)
  batch_sharding = parallel.data_sharding(mesh)
  create = _state_factory(config, model, image_shape)
  abstract = jax.eval_shape(create)
  abstract = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)

  manager = checkpoint.open_manager(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
  best_manager = checkpoint.open_manager(workdir / "best", max_to_keep=1)
  restored = checkpoint.restore(manager, abstract)
  if restored is None:
    state = jax.jit(create, out_shardings=replicated)()
    start_epoch, best = 0, {"score": -1.0, "epoch": None}
  else:
    state, meta = restored
    start_epoch, best = int(meta["epoch"]), meta["best"]
    print(f"Resuming {workdir} from epoch {start_epoch} (step {int(state.step)}).")
  _truncate_metrics(workdir / "metrics.jsonl", start_epoch)

  tables = parallel.replicate(steps_lib.schedule_arrays(config, steps_per_epoch), mesh)
  train_x = parallel.replicate(splits.train_x, mesh)
  train_y = parallel.replicate(splits.train_y, mesh)
  epoch_step = jax.jit(functools.partial(_epoch_train_step,
                                         model=model,
                                         config=config,
                                         batch_sharding=batch_sharding),
                       donate_argnums=(0, 1))
  eval_key = keys["eval"]
  evaluate = functools.partial(_evaluate,
                               model=eval_model,
                               config=config,
                               key=eval_key,
                               sharding=batch_sharding)
  test_n = config.eval_test_size or len(splits.test_y)
  roles = _roles(config)

  end_epoch = config.epochs if max_epochs is None else min(config.epochs, start_epoch + max_epochs)
  for epoch in range(start_epoch, end_epoch):
    epoch_started = time.time()
    perm = jax.random.permutation(jax.random.fold_in(keys["data"], epoch), len(splits.train_y))
    totals = parallel.replicate(_zero_totals(config), mesh)
    bar = tqdm(range(steps_per_epoch),
               desc=f"epoch {epoch + 1}/{config.epochs}",
               disable=not progress,
               leave=False,
               dynamic_ncols=True)
    for index in bar:
      state, totals = epoch_step(state, totals, train_x, train_y, perm, jnp.int32(index),
                                 keys["train"], tables)
      if (index + 1) % config.log_every == 0 or index + 1 == steps_per_epoch:
        values = _read_totals(totals)
        _check_finite(values, epoch * steps_per_epoch + index)
        bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
    bar.close()
    train_metrics = _read_totals(totals)
    _check_finite(train_metrics, (epoch + 1) * steps_per_epoch)
    last = (epoch + 1) * steps_per_epoch - 1
    record = {
        "epoch":
            epoch + 1,
        "step":
            int(state.step),
        **train_metrics, "lr_nat":
            float(tables["lr_nat"][last]),
        "lr_rob":
            float(tables["lr_rob"][last]),
        "beta":
            float(tables["beta"][last]),
        "redistributed_steps":
            int(np.asarray(tables["redistribute"][epoch * steps_per_epoch:last + 1]).sum()),
        "train_seconds":
            round(time.time() - epoch_started, 2)
    }
    is_eval_epoch = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
    if is_eval_epoch:
      test = evaluate(state, splits.test_x[:test_n], splits.test_y[:test_n], roles=roles)
      record["test"] = test
      if len(splits.val_y):
        val = evaluate(state, splits.val_x, splits.val_y, roles=("global",))["global"]
        record["val_global"] = val
        score = val["clean_acc"] + val["pgd_acc"]
        if val["clean_acc"] >= config.select_min_clean and score > best["score"]:
          best = {"score": score, "epoch": epoch + 1, **val}
          checkpoint.save(best_manager, epoch + 1, state.mix, {"epoch": epoch + 1, **val})
    checkpoint.save(manager, epoch + 1, state, {"epoch": epoch + 1, "best": best})
    with open(workdir / "metrics.jsonl", "a") as f:
      f.write(json.dumps(record) + "\n")
    print(_epoch_line(record), flush=True)

  if end_epoch < config.epochs:
    manager.close()
    best_manager.close()
    return {"stopped_at_epoch": end_epoch}

  final = evaluate(state, splits.test_x, splits.test_y, roles=roles)
  summary = {
      role: {
          "clean_acc": v["clean_acc"],
          f"pgd{config.eval_pgd_steps}_acc": v["pgd_acc"]
      } for role, v in final.items()
  }
  epochs_run = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  summary.update(method=config.method,
                 best=best,
                 steps=int(state.step),
                 test_images=int(len(splits.test_y)),
                 train_seconds=round(sum(r["train_seconds"] for r in epochs_run), 1),
                 seconds=round(time.time() - started, 1),
                 config=_config_record(config))
  summary_path.write_text(json.dumps(summary, indent=2) + "\n")
  manager.close()
  best_manager.close()
  return summary


def _epoch_line(record: dict[str, Any]) -> str:
  parts = [f"epoch {record['epoch']}"]
  parts += [
      f"{k} {record[k]:.3f}" for k in ("nat_loss", "nat_acc", "rob_loss", "rob_acc") if k in record
  ]
  for role, v in record.get("test", {}).items():
    parts.append(f"{role} clean {v['clean_acc']:.3f} pgd {v['pgd_acc']:.3f}")
  parts.append(f"beta {record['beta']:.2f}")
  return " | ".join(parts)


def _truncate_metrics(path: pathlib.Path, epoch: int) -> None:
  """Drops metric lines of epochs after the restored checkpoint (they will be re-run)."""
  if not path.exists():
    return
  lines = [l for l in path.read_text().splitlines() if l.strip()]
  kept = [l for l in lines if json.loads(l)["epoch"] <= epoch]
  if len(kept) != len(lines):
    path.write_text("".join(l + "\n" for l in kept))


def config_from_record(record: dict[str, Any]) -> Config:
  """Rebuilds a validated `Config` from its JSON record (`config.json`, a model checkpoint)."""
  record = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}
  return Config(**record).validate()


def config_record(config: Config) -> dict[str, Any]:
  """The JSON record of a config (what `config.json` holds)."""
  return _config_record(config)


def _read_run_config(workdir: pathlib.Path) -> Config:
  path = workdir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{workdir} holds no training run (no config.json); train one with "
                            "experiments/train.py --workdir first.")
  return config_from_record(json.loads(path.read_text()))


def _eval_model(config: Config, splits: Splits):
  return build_model(dataclasses.replace(config, compute_dtype="float32"), splits.num_classes)


def restore_run(workdir: str | pathlib.Path):
  """Loads a run's config, data splits, float32 model and latest state for evaluation.

  Returns:
    `(config, splits, model, state)`.

  Raises:
    FileNotFoundError: `workdir` holds no run (no config.json) or no checkpoint yet.
  """
  workdir = pathlib.Path(workdir)
  config = _read_run_config(workdir)
  splits = load_splits(config)
  model = _eval_model(config, splits)
  create = _state_factory(config, model, tuple(splits.train_x.shape[1:]))
  manager = checkpoint.open_manager(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
  restored = checkpoint.restore(manager, jax.eval_shape(create))
  manager.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint yet: let the run finish "
                            "at least one epoch.")
  return config, splits, model, restored[0]


def restore_model_checkpoint(path: str | pathlib.Path):
  """Loads one saved model for evaluation: a model checkpoint or a run's `best/` directory.

  Args:
    path: a directory written by `checkpoint.save_model` (e.g. by `experiments/sweep_mix.py
      --select`; its `model.json` holds the run's config), or `WORKDIR/best` of a training run
      (the best global model; the config is read from `WORKDIR/config.json`).

  Returns:
    `(config, splits, model, variables, name)`: the float32 model, its linen variables and a
    short name for reports.

  Raises:
    FileNotFoundError: `path` is neither kind, or holds no checkpoint yet.
  """
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"--checkpoint {path}: no such directory.")
  if (path / checkpoint.MODEL_RECORD).is_file():
    record = checkpoint.read_model_record(path)
    config = config_from_record(record["config"])
    kind = "model"
  elif (path.parent / "config.json").is_file():
    config, kind = _read_run_config(path.parent), "best"
  else:
    raise FileNotFoundError(
        f"{path} is neither a model checkpoint (no {checkpoint.MODEL_RECORD}) nor the best/ "
        "directory of a training run (no config.json next to it).")
  splits = load_splits(config)
  model = _eval_model(config, splits)
  abstract = jax.eval_shape(
      lambda: models.init_variables(model, jax.random.key(0), tuple(splits.train_x.shape[1:])))
  if kind == "model":
    return config, splits, model, checkpoint.load_model(path, abstract), path.name
  manager = checkpoint.open_manager(path, max_to_keep=1)
  restored = checkpoint.restore(manager, abstract)
  manager.close()
  if restored is None:
    raise FileNotFoundError(f"{path} holds no checkpoint yet.")
  return config, splits, model, restored[0], f"best (epoch {restored[1].get('epoch')})"
