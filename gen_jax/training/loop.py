"""The training loop: `train_and_evaluate(config, workdir)`.

Loads the data once into device memory, runs one jitted dispatch per batch (gather, augment,
both experts, Generalist update: `steps.make_train_step`), evaluates the models after each
`eval_every` epochs, checkpoints after every epoch, and writes the run directory through
`gen_jax.runs` (layout: see there).

Running the same command again on the same workdir resumes from the latest checkpoint; a run
that already wrote `summary.json` is not retrained. The host reads device values only at
logging steps and epoch ends.

Synopsis::

    summary = train_and_evaluate(config, "runs/pilot")
    summary["models"]["global"]["clean_acc"], summary["models"]["global"]["pgd_acc"]
"""
from __future__ import annotations

import functools
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gen_jax import checkpoint, parallel, runs
from gen_jax.config import Config, config_record
from gen_jax.evaluation.accuracy import evaluate_models
from gen_jax.training import methods
from gen_jax.training import steps as steps_lib

_STREAMS = ("init", "data", "train", "eval")
_LR_TABLE = {methods.NATURAL: "lr_nat", methods.ROBUST: "lr_rob"}


def _keys(seed: int) -> dict[str, jax.Array]:
  """Named PRNG streams split once from the root key; nothing about them is checkpointed."""
  return dict(zip(_STREAMS, jax.random.split(jax.random.key(seed), len(_STREAMS))))


def _read_totals(totals) -> dict[str, dict[str, float]]:
  """Per expert role, the epoch's mean training loss and accuracy."""
  host = jax.device_get(totals)
  return {
      role: {
          "loss": float(t["loss_sum"]) / max(int(t["count"]), 1),
          "acc": float(t["correct"]) / max(int(t["count"]), 1)
      } for role, t in host.items()
  }


def _check_finite(values: dict[str, dict[str, float]], step: int) -> None:
  bad = {
      f"{role}_{k}": v for role, m in values.items() for k, v in m.items() if not math.isfinite(v)
  }
  if bad:
    raise FloatingPointError(
        f"non-finite training metrics {bad} at step {step}. The run diverged: lower --lr-nat / "
        "--lr-rob or check the data; the last good checkpoint is kept in the workdir.")


def _evaluate(state, xs, ys, *, model, config, key, sharding, roles):
  candidates = state.models()
  return evaluate_models({r: candidates[r] for r in roles},
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


def train_and_evaluate(config: Config,
                       workdir: str | pathlib.Path,
                       *,
                       progress: bool = True,
                       max_epochs: int | None = None) -> dict[str, Any]:
  """Trains a run to the end (resuming if possible) and returns its summary.

  Args:
    config: the run's configuration (validated here, before any work).
    workdir: directory of the run's files (see `gen_jax.runs`).
    progress: show tqdm progress bars.
    max_epochs: train at most this many epochs in this call, then return after checkpointing
      (for time-boxed sessions such as Colab; the next call resumes). None: run to the end.

  Returns:
    `{"stopped_at_epoch": e}` when stopped by `max_epochs` before the end; otherwise the
    summary: `models` (per role: `clean_acc` and `pgd_acc` on the whole test split, fractions),
    `pgd` (the attack's settings), `method`, `best`, `steps`, `test_images`, `train_seconds`
    (time in training steps over all epochs, resumed ones included), `seconds` (this call's
    wall time) and `config`.
  """
  config.validate()
  workdir = pathlib.Path(workdir)
  if runs.check_config(config, workdir):
    summary = runs.read_summary(workdir)
    if summary is not None:
      print(f"{workdir} already holds a finished run; its summary:")
      return summary

  started = time.time()
  splits = runs.load_splits(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  steps_per_epoch = len(splits.train_y) // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"the training split has {len(splits.train_y)} images, fewer than one "
                     f"batch of --batch-size {config.batch_size}; lower it.")
  runs.write_config(config, workdir)
  model = runs.build_model(config, splits.num_classes)
  eval_model = runs.build_model(config, splits.num_classes, for_evaluation=True)
  keys = _keys(config.seed)
  image_shape = tuple(splits.train_x.shape[1:])

  replicated = parallel.replicated(mesh)
  batch_sharding = parallel.data_sharding(mesh)
  create = functools.partial(steps_lib.create_train_state,
                             config,
                             model,
                             keys["init"],
                             image_shape=image_shape)
  abstract = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), jax.eval_shape(create))

  manager = runs.checkpoint_manager(workdir, config)
  best_manager = runs.best_manager(workdir)
  restored = checkpoint.restore(manager, abstract)
  if restored is None:
    state = jax.jit(create, out_shardings=replicated)()
    start_epoch, best = 0, {"score": -1.0, "epoch": None}
  else:
    state, meta = restored
    start_epoch, best = int(meta["epoch"]), meta["best"]
    print(f"Resuming {workdir} from epoch {start_epoch} (step {int(state.step)}).")
  runs.truncate_metrics(workdir, start_epoch)

  tables = parallel.replicate(steps_lib.schedule_arrays(config, steps_per_epoch), mesh)
  train_x = parallel.replicate(splits.train_x, mesh)
  train_y = parallel.replicate(splits.train_y, mesh)
  step_fn = steps_lib.make_train_step(config, model, batch_sharding=batch_sharding)
  evaluate = functools.partial(_evaluate,
                               model=eval_model,
                               config=config,
                               key=keys["eval"],
                               sharding=batch_sharding)
  test_n = config.eval_test_size or len(splits.test_y)
  roles = methods.evaluated_roles(config.method)

  end_epoch = config.epochs if max_epochs is None else min(config.epochs, start_epoch + max_epochs)
  for epoch in range(start_epoch, end_epoch):
    epoch_started = time.time()
    perm = jax.random.permutation(jax.random.fold_in(keys["data"], epoch), len(splits.train_y))
    totals = parallel.replicate(steps_lib.zero_totals(config), mesh)
    bar = tqdm(range(steps_per_epoch),
               desc=f"epoch {epoch + 1}/{config.epochs}",
               disable=not progress,
               leave=False,
               dynamic_ncols=True)
    for index in bar:
      state, totals = step_fn(state, totals, train_x, train_y, perm, jnp.int32(index),
                              keys["train"], tables)
      if (index + 1) % config.log_every == 0 or index + 1 == steps_per_epoch:
        values = _read_totals(totals)
        _check_finite(values, epoch * steps_per_epoch + index)
        bar.set_postfix({f"{r}_{k}": f"{v:.3f}" for r, m in values.items() for k, v in m.items()})
    bar.close()
    train_metrics = _read_totals(totals)
    _check_finite(train_metrics, (epoch + 1) * steps_per_epoch)
    last = (epoch + 1) * steps_per_epoch - 1
    record = {
        "epoch":
            epoch + 1,
        "step":
            int(state.step),
        "train":
            train_metrics,
        "lr": {
            role: float(tables[_LR_TABLE[role]][last]) for role in config.experts
        },
        "beta":
            float(tables["beta"][last]),
        "redistributed_steps":
            int(np.asarray(tables["redistribute"][epoch * steps_per_epoch:last + 1]).sum()),
        "train_seconds":
            round(time.time() - epoch_started, 2)
    }
    if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
      record["test"] = evaluate(state, splits.test_x[:test_n], splits.test_y[:test_n], roles=roles)
      if len(splits.val_y):
        val = evaluate(state, splits.val_x, splits.val_y, roles=(methods.GLOBAL,))[methods.GLOBAL]
        record["validation"] = {methods.GLOBAL: val}
        score = val["clean_acc"] + val["pgd_acc"]
        if val["clean_acc"] >= config.select_min_clean and score > best["score"]:
          best = {"score": score, "epoch": epoch + 1, **val}
          checkpoint.save(best_manager, epoch + 1, state.global_model, {"epoch": epoch + 1, **val})
    checkpoint.save(manager, epoch + 1, state, {"epoch": epoch + 1, "best": best})
    runs.append_metrics(workdir, record)
    print(_epoch_line(record), flush=True)

  if end_epoch < config.epochs:
    manager.close()
    best_manager.close()
    return {"stopped_at_epoch": end_epoch}

  final = evaluate(state, splits.test_x, splits.test_y, roles=roles)
  summary = {
      "models": final,
      "pgd": {
          "norm": config.norm,
          "eps": config.eps,
          "step_size": config.eval_step_size,
          "steps": config.eval_pgd_steps
      },
      "method": config.method,
      "best": best,
      "steps": int(state.step),
      "test_images": int(len(splits.test_y)),
      "train_seconds": round(sum(r["train_seconds"] for r in runs.read_metrics(workdir)), 1),
      "seconds": round(time.time() - started, 1),
      "config": config_record(config)
  }
  runs.write_summary(workdir, summary)
  manager.close()
  best_manager.close()
  return summary


def _epoch_line(record: dict[str, Any]) -> str:
  parts = [f"epoch {record['epoch']}"]
  parts += [
      f"{role} loss {m['loss']:.3f} acc {m['acc']:.3f}" for role, m in record["train"].items()
  ]
  for role, v in record.get("test", {}).items():
    parts.append(f"{role} clean {v['clean_acc']:.3f} pgd {v['pgd_acc']:.3f}")
  parts.append(f"beta {record['beta']:.2f}")
  return " | ".join(parts)
