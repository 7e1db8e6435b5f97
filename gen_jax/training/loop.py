"""The training loop: `train_and_evaluate(config, workdir)`.

Loads the data once into host memory, feeds each global batch to one jitted dispatch (augment,
both experts, Generalist update: `steps.make_train_step`), evaluates the models after each
`eval_every` epochs, checkpoints after every epoch (and every `checkpoint_every` steps or
`checkpoint_minutes` minutes), and writes the run directory through `gen_jax.runs` (layout and
the commit protocol that makes any kill resumable: see there).

Devices and hosts: the batch is split over every device of every process (`gen_jax.parallel`),
and each process reads only its own rows of it; the result does not depend on the device count.
In a multi-process job every process runs this loop, process 0 alone holds the lock, prints and
writes the JSON files, and all of them write the orbax checkpoints together.

Running the same command again on the same workdir resumes from the newest intact checkpoint,
also in the middle of an epoch: the data order derives from (data key, epoch) and each step's
key from the state's step, and the epoch's running metric sums are in the checkpoint, so a
resumed run ends bit for bit where an uninterrupted one does. A run that already wrote
`summary.json` is not retrained. The host reads device values only at logging steps,
checkpoints and epoch ends.

Reliability:
  * one process per workdir (`runlock.lock`);
  * SIGTERM / SIGINT (preemption, Ctrl-C) save a checkpoint at the next step boundary and raise
    `TrainingInterrupted` (one line; `experiments/train.py` exits 143 / 130);
  * numerics: at every logging step and before anything is saved, every model (both experts,
    the teachers, the global model: parameters and BatchNorm statistics) must be finite and
    within `divergence_factor` of its initial magnitude, and the training losses finite;
    otherwise `FloatingPointError` names the step, the model and the quantity, and nothing of
    that state is written (no checkpoint, no best model, no summary). `debug_nans` turns on
    JAX's own NaN checking (`jax.debug_nans`) for the call.

Synopsis::

    summary = train_and_evaluate(config, "runs/pilot")
    summary["models"]["global"]["clean_acc"], summary["models"]["global"]["pgd_acc"]
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import pathlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gen_jax import checkpoint, models, parallel, runlock, runs
from gen_jax.attacks.threat import Threat
from gen_jax.config import Config, config_record
from gen_jax.evaluation.accuracy import evaluate_models
from gen_jax import experts
from gen_jax.training import steps as steps_lib

_STREAMS = ("init", "data", "train", "eval")
# `on_epoch(epoch, record)` of `train_and_evaluate`: told of each epoch as it is committed.
EpochFn = Callable[[int, dict[str, Any]], None]


class TrainingInterrupted(KeyboardInterrupt):
  """SIGINT or SIGTERM stopped `train_and_evaluate`; `str(error)` is a one-line message.

  A KeyboardInterrupt, so that code which already handles Ctrl-C (notebooks, scripts) handles
  it. `exit_code` is the shell's convention, 128 + the signal number (130 SIGINT, 143 SIGTERM).
  """

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 128 + int(self.signum)


class _StopSignals:
  """SIGINT and SIGTERM handlers for one call (the previous handlers come back afterwards).

  While `deferred` (the epoch loop) a first signal only records itself in `signum`; the loop
  checkpoints at the next step boundary and raises `TrainingInterrupted`. Elsewhere (loading,
  compiling, the final evaluation) nothing is unsaved, so the handler raises at once, as it
  does for a second signal (the user insists). `note` says where a rerun resumes. Stateful by
  nature: a signal handler reaches the loop only through shared state. Handlers can only be
  installed in the main thread; elsewhere signals keep their previous behaviour.
  """

  def __init__(self):
    self.signum: int | None = None
    self.deferred = False
    self.note = "rerun the same command to resume from the last checkpoint."
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "_StopSignals":
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> bool:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    return False

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is None:
      self.signum = signum
      if self.deferred:
        return
      raise self._interrupted(signum, "")
    raise self._interrupted(signum, " (second signal)")

  def _interrupted(self, signum: int, again: str) -> TrainingInterrupted:
    return TrainingInterrupted(signum, f"stopped by {signal.Signals(signum).name}{again}; "
                               f"{self.note}")

  def check(self) -> None:
    """Raises `TrainingInterrupted` if a signal arrived while not deferred.

    Python runs a handler between bytecodes of whatever runs then; when that is a callback
    whose exceptions Python only prints (e.g. JAX's `_xla_gc_callback` during start-up), the
    handler's exception is lost. The signal is recorded first, so the next call of this method
    (at the loop's safe points: after loading, after creating the state, around the final
    evaluation) stops the run all the same.
    """
    if self.signum is not None and not self.deferred:
      raise self._interrupted(self.signum, "")


def _agree(stop: _StopSignals,
           step_due: Any = False,
           clock_due: Any = False,
           sync: bool = True) -> bool:
  """Whether to checkpoint (and, on a signal, stop) at this step boundary.

  One process decides alone, at every step. In a multi-process job every process must take the
  same collective save: a checkpoint due by the step count is due everywhere, but a signal that
  one process received or a timed checkpoint that one clock made due is shared only at `sync`
  points (logging steps and epoch ends, where the host waits for the devices anyway), through
  one tiny all-gather; a signal received elsewhere is adopted here so that all stop together.
  """
  if not sync and jax.process_count() > 1:
    return bool(step_due)
  signum, clock_due = parallel.process_max([stop.signum or 0, bool(clock_due)])
  if signum and stop.signum is None:
    stop.signum = signum
  return bool(signum or step_due or clock_due)


def stream_keys(seed: int) -> dict[str, jax.Array]:
  """A run's named PRNG streams (init, data, train, eval), split once from the root key of
  `seed`; nothing about them is checkpointed. Programs that must attack with the keys of a run's
  own figures (e.g. `gen_jax.finetune`) take its `eval` stream."""
  return dict(zip(_STREAMS, jax.random.split(jax.random.key(seed), len(_STREAMS))))


def epoch_order(data_key: jax.Array, epoch: int, n: int) -> np.ndarray:
  """The order of the `n` training examples in `epoch` (host indices), the same on every
  process: a run's data order, which a resumed run and `gen_jax.finetune` reproduce."""
  return np.asarray(jax.random.permutation(jax.random.fold_in(data_key, epoch), n))


def _read_totals(totals) -> dict[str, dict[str, float]]:
  """Per expert role, the epoch's mean training loss and accuracy."""
  host = jax.device_get(totals)
  return {
      role: {
          "loss": float(t["loss_sum"]) / max(int(t["count"]), 1),
          "acc": float(t["correct"]) / max(int(t["count"]), 1)
      } for role, t in host.items()
  }


def _totals_record(totals) -> dict[str, dict[str, Any]]:
  """The running sums as JSON (exact: a float32 is exactly a double, and JSON keeps doubles)."""
  return {
      role: {
          k: np.asarray(v).item() for k, v in t.items()
      } for role, t in jax.device_get(totals).items()
  }


def _totals_from_record(record: dict[str, dict[str, Any]], config: Config):
  zero = steps_lib.zero_totals(config)
  return {
      role: {
          k: jnp.asarray(record[role][k], v.dtype) for k, v in fields.items()
      } for role, fields in zero.items()
  }


def _check_position(state, meta: dict[str, Any], *, config: Config, steps_per_epoch: int) -> None:
  """ValueError unless a checkpoint's record places its state in this run (see `runs.resume`)."""
  epoch, index = meta["epoch"], meta.get("index", 0)
  if not isinstance(index, int) or not 0 <= index < steps_per_epoch:
    raise ValueError(f"its record holds batch index {index!r} (of {steps_per_epoch} per epoch)")
  if epoch > config.epochs or (index and epoch >= config.epochs):
    raise ValueError(f"its record places it in epoch {epoch + 1} of a {config.epochs}-epoch run")
  if index:
    totals = meta.get("totals")
    zero = steps_lib.zero_totals(config)
    if not isinstance(totals, dict) or any(not isinstance(totals.get(role), dict) or any(
        not isinstance(totals[role].get(k), (int, float))
        for k in fields)
                                           for role, fields in zero.items()):
      raise ValueError("its record lacks the epoch's running metric sums")
  step = int(jax.device_get(state.step))
  if step != epoch * steps_per_epoch + index:
    raise ValueError(f"its state is at step {step}, but its record places it at epoch {epoch}, "
                     f"batch {index} of {steps_per_epoch} per epoch (did the training data "
                     "change?)")


def _lr_flags(name: str) -> str:
  if experts.NATURAL in name:
    return "--lr-nat"
  if experts.ROBUST in name:
    return "--lr-rob"
  return "--lr-nat / --lr-rob"


def _diagnose(variables, bounds, factor: float) -> str:
  """The first leaf of a model that is not finite or exceeds its bound, in words (host side:
  only called once a model has failed the cheap device check)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(variables))
  limits = jax.tree_util.tree_leaves(jax.device_get(bounds))
  for (path, leaf), limit in zip(flat, limits):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    x = np.asarray(leaf, np.float32)
    if np.isnan(x).any():
      return f"{name} holds NaN ({np.isnan(x).mean():.0%} of its values)"
    if np.isinf(x).any():
      return f"{name} holds inf"
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > float(limit):
      return (f"{name} reached max |x| = {peak:.3g}, above its divergence bound "
              f"{float(limit):.3g} (--divergence-factor {factor:g} x max(1, its largest |x| at "
              "initialisation); if that is healthy growth, not a divergence, rerun the same "
              "command with a larger --divergence-factor, or 0, to resume)")
  return "a value is not finite or exceeds its bound"


def _check_health(health_fn, state, bounds, *, config: Config, where: str, saved: str) -> None:
  """FloatingPointError naming the model and the quantity unless every model is healthy."""
  values = jax.device_get(health_fn(state, bounds))
  named = steps_lib.named_models(state)  # experts first: where a divergence starts
  bad = [n for n in named if not (bool(values[n]["finite"]) and float(values[n]["excess"]) <= 1.0)]
  if not bad:
    return
  detail = _diagnose(named[bad[0]], bounds, config.divergence_factor)
  others = f" (also failing: {', '.join(bad[1:])})" if len(bad) > 1 else ""
  raise FloatingPointError(
      f"the run diverged at {where}: the {bad[0]}'s {detail}{others}. Nothing of this state was "
      f"saved; {saved}. Train again in a new --workdir with a lower {_lr_flags(bad[0])} (or "
      "check the data).")


def _check_finite(values: dict[str, dict[str, float]], *, where: str, saved: str) -> None:
  bad = [(role, k, v) for role, m in values.items() for k, v in m.items() if not math.isfinite(v)]
  if bad:
    role, k, v = bad[0]
    raise FloatingPointError(
        f"the run diverged at {where}: the {role} expert's training {k} is {v}. Nothing of "
        f"this state was saved; {saved}. Train again in a new --workdir with a lower "
        f"{_lr_flags(role)} (or check the data).")


@contextlib.contextmanager
def _debug_nans(enabled: bool):
  """JAX's own NaN checking for the block when `enabled` (it re-runs a failing jitted function
  op by op and raises at the first operation that made a NaN; slow, for diagnosis)."""
  if not enabled:
    yield
    return
  with jax.debug_nans(True):
    yield


def _evaluate(state, xs, ys, *, model, config, key, sharding, roles):
  """Clean and PGD accuracy of the models `roles` of `state` on (xs, ys), by the engine.

  A single-expert method's global model is its teacher (`steps.generalist_update`), so when both
  are asked for the teacher is attacked once and its figures are the global model's too: the
  engine's answers depend only on the variables, the images and the key, all the same here.
  """
  candidates = state.models()
  aliases = {}
  if config.method != experts.MULTI_EXPERT_METHOD and experts.GLOBAL in roles:
    (teacher,) = state.teachers
    if teacher in roles:
      aliases[experts.GLOBAL] = teacher
  figures = evaluate_models({r: candidates[r] for r in roles if r not in aliases},
                            xs,
                            ys,
                            model=model,
                            key=key,
                            threat=Threat.of(config),
                            batch_size=config.eval_batch_size,
                            sharding=sharding)
  figures.update({alias: dict(figures[source]) for alias, source in aliases.items()})
  return {r: figures[r] for r in roles}


def _final_figures(records: list[dict[str, Any]], epochs: int,
                   whole_split: bool) -> dict[str, Any] | None:
  """The summary's figures when the last epoch's record already holds them, else None.

  The last epoch is always evaluated (`eval_every` or not), on the loop's `test_n` test images,
  by the same engine with the same key on the same state as the final evaluation. When that
  was the whole test split (`whole_split`), evaluating again would repeat the same attack on
  every image (a large share of a run's time when the test split is large), so its figures are
  the summary's. A run resumed after its last epoch reads them from the record its checkpoint
  kept.
  """
  last = records[-1] if records else {}
  if whole_split and last.get("epoch") == epochs and "test" in last:
    return last["test"]
  return None


def _warm_start(config: Config, model, key, image_shape,
                num_classes: int) -> tuple[Any, dict[str, Any]]:
  """The variables of `--init-from` (None without it) and `{"init_from": record}` of where
  they came from (`runs.load_init`; empty without it), which every checkpoint's meta carries on
  and the summary reports."""
  if not config.init_from:
    return None, {}
  abstract = jax.eval_shape(lambda: models.init_variables(model, key, image_shape))
  variables, record = runs.load_init(config.init_from, config, abstract, num_classes=num_classes)
  return variables, {"init_from": record}


def _finished(config: Config, workdir: pathlib.Path) -> dict[str, Any] | None:
  if runs.check_config(config, workdir):
    summary = runs.read_summary(workdir)
    if summary is not None:
      if parallel.is_primary():
        print(f"{workdir} already holds a finished run; its summary:")
      return summary
  return None


def train_and_evaluate(config: Config,
                       workdir: str | pathlib.Path,
                       *,
                       progress: bool = True,
                       max_epochs: int | None = None,
                       on_epoch: EpochFn | None = None) -> dict[str, Any]:
  """Trains a run to the end (resuming if possible) and returns its summary.

  Args:
    config: the run's configuration (validated here, before any work).
    workdir: directory of the run's files (see `gen_jax.runs`).
    progress: show tqdm progress bars.
    max_epochs: train at most this many epochs in this call, then return after checkpointing
      (for time-boxed sessions such as Colab; the next call resumes). None: run to the end.
    on_epoch: called as `on_epoch(epoch, record)` after each epoch that this call trains, once
      its checkpoint is committed: `epoch` counts from 1 and `record` is the epoch's line of
      metrics.jsonl (`record["validation"]["global"]` holds the global model's validation
      `clean_acc` and `pgd_acc` on evaluated epochs). For a caller that follows a run as it
      trains (e.g. `gen_jax.tune` reports to a hyperparameter search and prunes). Epochs trained
      by an earlier call are not replayed (read `runs.read_metrics`). An exception it raises
      stops the run at that epoch, which is saved: calling again resumes after it. In a
      multi-process job every process calls it.

  Returns:
    `{"stopped_at_epoch": e}` when stopped by `max_epochs` before the end; otherwise the
    summary: `models` (per role: `clean_acc` and `pgd_acc` on the whole test split, fractions),
    `pgd` (the attack's settings), `method`, `best`, `steps`, `test_images`, `train_seconds`
    (time in training steps over all epochs, resumed ones included), `seconds` (this call's
    wall time) and `config`.

  Raises:
    TrainingInterrupted: SIGINT or SIGTERM (a checkpoint was saved first where training had
      progressed; the message says so).
    FloatingPointError: the run diverged (see the module doc); nothing of it was saved.
    RuntimeError: another process trains in `workdir`, or it is not writable.
    ValueError: a bad config, another run's workdir, damaged files (each names the path).
  """
  config.validate()
  workdir = pathlib.Path(workdir)
  runs.check_layout(workdir)
  runs.restore_config_file(workdir)  # a lost config.json comes back from the run, not the flags
  finished = _finished(config, workdir)
  if finished is not None:
    return finished
  # Every process of a multi-host job shares the workdir; the first one holds the lock.
  lock = runlock.lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, _StopSignals() as stop, _debug_nans(config.debug_nans):
    finished = _finished(config, workdir)  # another process may have finished it meanwhile
    if finished is not None:
      return finished
    return _train(config,
                  workdir,
                  progress=progress and parallel.is_primary(),
                  max_epochs=max_epochs,
                  stop=stop,
                  on_epoch=on_epoch)


def _train(config: Config, workdir: pathlib.Path, *, progress: bool, max_epochs: int | None,
           stop: _StopSignals, on_epoch: EpochFn | None) -> dict[str, Any]:
  started = time.time()
  splits = runs.load_splits(config)
  stop.check()
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  steps_per_epoch = len(splits.train_y) // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"the training split has {len(splits.train_y)} images, fewer than one "
                     f"batch of --batch-size {config.batch_size}; lower it.")
  # The checkpoints pin the config and the data: a resume on other settings or other images
  # is refused here, before anything is set aside or rewritten.
  pinned = runs.pin(config, runs.data_fingerprint(splits))
  runs.check_pinned(workdir, config, pinned["data"])
  model = runs.build_model(config, splits.num_classes)
  keys = stream_keys(config.seed)
  image_shape = tuple(splits.train_x.shape[1:])
  warm_start = functools.partial(_warm_start, config, model, keys["init"], image_shape,
                                 splits.num_classes)
  # A fresh run reads its --init-from source before anything is written, so that a wrong source
  # leaves no run directory behind; a resumed run needs it no more (its checkpoint says where it
  # started).
  start_from, origin = (None, {}) if checkpoint.saved_keys(workdir / runs.CHECKPOINT_DIR) \
      else warm_start()
  runs.write_config(config, workdir)
  eval_model = runs.build_model(config, splits.num_classes, for_evaluation=True)

  replicated = parallel.replicated(mesh)
  batch_sharding = parallel.data_sharding(mesh)
  create = functools.partial(steps_lib.create_train_state,
                             config,
                             model,
                             keys["init"],
                             image_shape=image_shape)
  abstract = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), jax.eval_shape(create))
  # Bounds of the divergence check: from the initial weights, which every model starts from.
  bounds = jax.jit(
      lambda: steps_lib.divergence_bounds(create().global_model, config.divergence_factor),
      out_shardings=replicated)()
  health_fn = jax.jit(steps_lib.model_health)

  run = runs.TrainingRun(workdir, config)
  try:
    restored = run.resume(
        abstract, functools.partial(_check_position, config=config,
                                    steps_per_epoch=steps_per_epoch))
    if restored is None:
      if config.init_from and start_from is None:  # every checkpoint found was damaged
        start_from, origin = warm_start()
      state = jax.jit(lambda v: create(variables=v), out_shardings=replicated)(start_from)
      meta = {"epoch": 0, "index": 0, "best": {"score": -1.0, "epoch": None}, "metrics": []}
      if origin and parallel.is_primary():
        print(
            f"Starting every model from {origin['init_from']['path']} "
            f"({origin['init_from']['kind']}).",
            flush=True)
    else:
      state, meta = restored
      origin = {"init_from": meta["init_from"]} if "init_from" in meta else {}
    stop.check()
    start_epoch, start_index = meta["epoch"], meta.get("index", 0)
    best, records = meta["best"], meta["metrics"]
    saved_step = start_epoch * steps_per_epoch + start_index
    if restored is not None:
      place = (f"the end of epoch {start_epoch}" if not start_index else
               f"epoch {start_epoch + 1}, batch {start_index} of {steps_per_epoch}")
      if parallel.is_primary():
        print(f"Resuming {workdir} from step {saved_step} ({place}).", flush=True)
    run.open_events(first_epoch=start_epoch + 1,
                    images_per_epoch=steps_per_epoch * config.batch_size)

    tables = parallel.replicate(steps_lib.schedule_arrays(config, steps_per_epoch), mesh)
    # The training set stays on the host: each step every process reads only the rows of the
    # global batch that its devices hold (`parallel.global_batch`).
    train_arrays = (splits.train_x, splits.train_y)
    step_fn = steps_lib.make_train_step(config, model)
    evaluate = functools.partial(_evaluate,
                                 model=eval_model,
                                 config=config,
                                 key=keys["eval"],
                                 sharding=batch_sharding)
    test_n = config.eval_test_size or len(splits.test_y)
    roles = experts.evaluated_roles(config.method, config.experts)
    checkpoint_dir = workdir / runs.CHECKPOINT_DIR

    def saved_note() -> str:
      if saved_step == 0 and restored is None and not records:
        return "no checkpoint had been written yet"
      return f"the last checkpoint (step {saved_step}) and best/ are intact"

    def where(step: int) -> str:
      epoch, index = divmod(step - 1, steps_per_epoch)
      return f"step {step} (epoch {epoch + 1}, batch {index + 1} of {steps_per_epoch})"

    def interrupted(step: int) -> TrainingInterrupted:
      return TrainingInterrupted(
          stop.signum, f"stopped by {signal.Signals(stop.signum).name} at {where(step)}; saved "
          f"checkpoint step {step} in {checkpoint_dir}: rerun the same command to resume.")

    end_epoch = config.epochs if max_epochs is None else min(config.epochs, start_epoch +
                                                             max_epochs)
    last_commit = time.monotonic()
    stop.note = (f"nothing new to save (last checkpoint: step {saved_step}); rerun the same "
                 "command to resume.")
    stop.deferred = True
    for epoch in range(start_epoch, end_epoch):
      first = start_index if epoch == start_epoch else 0
      carried = meta.get("epoch_seconds", 0.0) if first else 0.0
      epoch_started = time.time() - carried
      # The epoch's order, identical on every process (indices only, on the host).
      order = epoch_order(keys["data"], epoch, len(splits.train_y))
      totals = (_totals_from_record(meta["totals"], config)
                if first else steps_lib.zero_totals(config))
      totals = parallel.replicate(totals, mesh)
      bar = tqdm(range(first, steps_per_epoch),
                 desc=f"epoch {epoch + 1}/{config.epochs}",
                 disable=not progress,
                 leave=False,
                 dynamic_ncols=True)
      for index in bar:
        step = epoch * steps_per_epoch + index + 1
        try:
          rows = order[index * config.batch_size:(index + 1) * config.batch_size]
          images, labels = parallel.global_batch(train_arrays, rows, batch_sharding)
          state, totals = step_fn(state, totals, images, labels, keys["train"], tables)
        except FloatingPointError as error:  # only under --debug-nans
          raise FloatingPointError(
              f"--debug-nans: {error}, in the training step to {where(step)}. Nothing of this "
              f"state was saved; {saved_note()}.") from error
        if (index + 1) % config.log_every == 0 or index + 1 == steps_per_epoch:
          _check_health(health_fn,
                        state,
                        bounds,
                        config=config,
                        where=where(step),
                        saved=saved_note())
          values = _read_totals(totals)
          _check_finite(values, where=where(step), saved=saved_note())
          bar.set_postfix({f"{r}_{k}": f"{v:.3f}" for r, m in values.items() for k, v in m.items()})
        if index + 1 == steps_per_epoch:
          break  # the epoch end commits (and honours a stop request after it)
        step_due = config.checkpoint_every and step % config.checkpoint_every == 0
        clock_due = (config.checkpoint_minutes and
                     time.monotonic() - last_commit >= 60 * config.checkpoint_minutes)
        if _agree(stop, step_due, clock_due, sync=(index + 1) % config.log_every == 0):
          _check_health(health_fn,
                        state,
                        bounds,
                        config=config,
                        where=where(step),
                        saved=saved_note())
          _check_finite(_read_totals(totals), where=where(step), saved=saved_note())
          run.commit(
              step, state, {
                  "epoch": epoch,
                  "index": index + 1,
                  "step": step,
                  "best": best,
                  "metrics": records,
                  "totals": _totals_record(totals),
                  "epoch_seconds": round(time.time() - epoch_started, 2),
                  "pin": pinned,
                  **origin
              })
          saved_step, last_commit = step, time.monotonic()
          stop.note = (f"saved nothing since checkpoint step {saved_step}; rerun the same "
                       "command to resume.")
          if stop.signum is not None:
            bar.close()
            raise interrupted(step)
      bar.close()
      step = (epoch + 1) * steps_per_epoch
      train_metrics = _read_totals(totals)
      _check_finite(train_metrics, where=where(step), saved=saved_note())
      last = step - 1
      record = {
          "epoch":
              epoch + 1,
          "step":
              step,
          "train":
              train_metrics,
          "lr": {
              role: float(tables["experts"][role]["lr"][last]) for role in config.experts
          },
          "beta":
              float(tables["beta"][last]),
          "weights":
              dict(zip(config.experts,
                       np.asarray(tables["weights"][last]).tolist())),
          "redistributed_steps":
              int(np.asarray(tables["redistribute"][epoch * steps_per_epoch:last + 1]).sum()),
          "train_seconds":
              round(time.time() - epoch_started, 2)
      }
      # Checked before anything of this state is evaluated, reported or saved.
      _check_health(health_fn, state, bounds, config=config, where=where(step), saved=saved_note())
      if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
        record["test"] = evaluate(state,
                                  splits.test_x[:test_n],
                                  splits.test_y[:test_n],
                                  roles=roles)
        if len(splits.val_y):
          val = evaluate(state, splits.val_x, splits.val_y, roles=(experts.GLOBAL,))[experts.GLOBAL]
          record["validation"] = {experts.GLOBAL: val}
          score = val["clean_acc"] + val["pgd_acc"]
          if val["clean_acc"] >= config.select_min_clean and score > best["score"]:
            best = {"score": score, "epoch": epoch + 1, **val}
            run.save_best(epoch + 1, state.global_model, {"epoch": epoch + 1, **val})
      records = records + [record]
      run.commit(
          step, state, {
              "epoch": epoch + 1,
              "index": 0,
              "step": step,
              "best": best,
              "metrics": records,
              "pin": pinned,
              **origin
          }, record)
      saved_step, last_commit = step, time.monotonic()
      stop.note = (f"saved nothing since checkpoint step {saved_step}; rerun the same command "
                   "to resume.")
      if parallel.is_primary():
        print(_epoch_line(record), flush=True)
      if on_epoch is not None:
        on_epoch(epoch + 1, record)
      if _agree(stop):
        raise interrupted(step)
    stop.deferred = False
    if _agree(stop):  # arrived after the last check: the last commit holds all
      raise interrupted(saved_step)
    stop.check()

    if end_epoch < config.epochs:
      return {"stopped_at_epoch": end_epoch}

    stop.note = (f"training is complete (checkpoint step {saved_step}): rerun the same command "
                 "to evaluate the models and write summary.json.")
    _check_health(health_fn,
                  state,
                  bounds,
                  config=config,
                  where="the end of training",
                  saved=saved_note())
    final = _final_figures(records, config.epochs, test_n >= len(splits.test_y))
    if final is None:
      final = evaluate(state, splits.test_x, splits.test_y, roles=roles)
    stop.check()  # a signal during the final evaluation: no summary (the rerun evaluates again)
    summary = {
        "models": final,
        "pgd": dataclasses.asdict(Threat.of(config)),
        "method": config.method,
        **origin, "best": best,
        "steps": int(state.step),
        "test_images": int(len(splits.test_y)),
        "train_seconds": round(sum(r["train_seconds"] for r in records), 1),
        "seconds": round(time.time() - started, 1),
        "config": config_record(config)
    }
    run.finish(summary)
    return summary
  finally:
    stop.deferred = False
    run.close()


def _epoch_line(record: dict[str, Any]) -> str:
  parts = [f"epoch {record['epoch']}"]
  parts += [
      f"{role} loss {m['loss']:.3f} acc {m['acc']:.3f}" for role, m in record["train"].items()
  ]
  for role, v in record.get("test", {}).items():
    parts.append(f"{role} clean {v['clean_acc']:.3f} pgd {v['pgd_acc']:.3f}")
  parts.append(f"beta {record['beta']:.2f}")
  return " | ".join(parts)
