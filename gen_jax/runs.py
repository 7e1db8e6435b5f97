"""The run directory: its layout, its records, and the only doors into it.

A training run owns one directory::

    WORKDIR/config.json      the config record (a rerun with another config is refused)
    WORKDIR/metrics.jsonl    one JSON line per epoch
    WORKDIR/checkpoints/     orbax: the latest full training states (resume points), by step
    WORKDIR/best/            orbax: the best global model by validation clean + PGD accuracy
    WORKDIR/summary.json     final test accuracy of the evaluated models
    WORKDIR/eval/            evaluation results (reports, sweeps, selected mixtures)
    WORKDIR/tensorboard/     TensorBoard event files: the metrics as curves (gen_jax.tensorboard)
    WORKDIR/.lock            while a training process works in it (`gen_jax.runlock`)

The training loop (`gen_jax.training.loop`) writes it through `TrainingRun` and `lock`; the
evaluation programs read it through `restore_models` and `load_model`, which restore only the
evaluated models (no optimiser state) and only the test split. A saved model (`save_model`) is
a directory of its own with a `model.json` record holding the run's config.

Crash consistency. A run can be killed at any instant (preemption, SIGKILL, power) and the same
command must then resume it and end with the same files as an uninterrupted run. The design:
the checkpoint is the one commit point. Each checkpoint's meta record holds everything the
other files derive from: the best record and every metrics line so far. Per epoch the writes
go, in this order:

    1. best/<epoch>        a new best global model, if any (a candidate until step 2)
    2. checkpoints/<step>  the state and its meta: THE commit (orbax renames a finished
                           temporary directory, so a step is wholly there or absent)
    3. best/ cleanup       older best models are deleted only now
    4. metrics.jsonl       the epoch's line appended (a convenience copy for `tail -f`)
    5. summary.json        after the last epoch, written to a temporary file and renamed

A kill between any two writes leaves a prefix of this sequence. On resume (`TrainingRun.resume`)
the newest intact checkpoint (damaged ones are set aside, older ones tried in turn) rules:
best/ keeps only the model its best record names (an uncommitted candidate of step 1 is
deleted, never left to collide: "Checkpoint for step N already exists" cannot recur) and
metrics.jsonl is rewritten to its records (a line lost between steps 2 and 4 comes back, lines
of retrained epochs go). Because keys and data order derive from the step, the retrained part
reproduces what was lost, so any prefix resumes to the same final files.

Synopsis::

    run = restore_models("runs/pilot")         # config, model, {role: variables}, test data
    run = load_model("runs/pilot/eval/mix-beta0.30")  # a saved model, same fields
    run = load_model("runs/pilot/best")        # the best global model of a run
    out = run.eval_dir                         # where its evaluation files go

    with runlock.lock(workdir):                # refuses a second training process
      run = TrainingRun(workdir, config)
      restored = run.resume(abstract_state)    # None, or (state, meta) of the newest intact
      run.save_best(epoch, variables, record)  # before the commit of that epoch
      run.commit(step, state, meta, record)    # checkpoint, best cleanup, metrics line
      run.finish(summary)
      run.close()
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from gen_jax import checkpoint, data, legacy, models, parallel, tensorboard
from gen_jax.config import Config, config_from_record, config_record
from gen_jax.experts import GLOBAL

CONFIG_FILE = "config.json"
GLOBAL_MODEL_KEY = "global_model"  # the state entry of the deployed model
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
EVAL_DIR = "eval"
MODEL_RECORD = checkpoint.MODEL_RECORD

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- config record
def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON ({error}); restore it from a copy or use a new "
                     "--workdir.") from error


def _write_atomic(path: pathlib.Path, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename: a reader (or a rerun after a
  kill) sees the old file or the new one, never a torn one."""
  temporary = path.with_name(f".{path.name}.tmp")
  with open(temporary, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)


# Fields that change how a run is operated, not what it computes: a run may resume with other
# values (e.g. a denser --checkpoint-every on a machine that is preempted more often).
RESUMABLE_CHANGES = frozenset(
    {"checkpoint_every", "checkpoint_minutes", "divergence_factor", "debug_nans"})


def check_config(config: Config, workdir: PathLike) -> bool:
  """Whether `workdir` already holds a run; ValueError if that run has another config.

  Records written before a field existed compare as holding its default; the fields of
  `RESUMABLE_CHANGES` may differ.
  """
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return False
  old = config_record(config_from_record(_read_json(path)))
  new = config_record(config)
  changed = _config_changes(old, new)
  if changed:
    details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
    raise ValueError(f"{workdir} holds a run with another config ({details}). Resuming it with new "
                     "settings would mix two experiments: use a new --workdir, or repeat the "
                     "original settings to resume. Nothing was changed.")
  return True


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """The fields (sorted) in which two config records differ in what the run computes."""
  return sorted(
      k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)


def restore_config_file(workdir: PathLike) -> bool:
  """Rewrites a lost `config.json` from the run's own records; True if it did.

  The newest readable checkpoint (its `pin`) or, for a finished run without checkpoints, the
  summary holds the config the run was trained with. Never the command line's: a run whose
  config file went missing (a partial copy, a sync tool) must not be continued with other
  settings. Process 0 writes.
  """
  workdir = pathlib.Path(workdir)
  if (workdir / CONFIG_FILE).exists() or not workdir.is_dir():
    return False
  found = checkpoint.read_meta(workdir / CHECKPOINT_DIR)
  record = (found[1].get("pin") or {}).get("config") if found else None
  source = f"checkpoint step {found[0]}" if record else None
  if record is None:
    summary = _read_json(workdir / SUMMARY_FILE) if (workdir / SUMMARY_FILE).exists() else None
    record = summary.get("config") if isinstance(summary, dict) else None
    source = SUMMARY_FILE
  if not isinstance(record, dict):
    return False
  if parallel.is_primary():
    _write_atomic(workdir / CONFIG_FILE, json.dumps(record, indent=2) + "\n")
    _note(f"{workdir / CONFIG_FILE} was missing; restored it from the run's {source}.")
  return True


def data_fingerprint(splits: "Splits") -> dict[str, Any]:
  """What a resumed run must find again: the images per class of its training and validation
  splits and a SHA-256 of every training and validation array (contents, shapes and order)."""
  digest = hashlib.sha256()
  for array in (splits.train_x, splits.train_y, splits.val_x, splits.val_y):
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
  count = lambda y: np.bincount(np.asarray(y), minlength=splits.num_classes).tolist()
  return {
      "train_per_class": count(splits.train_y),
      "validation_per_class": count(splits.val_y),
      "sha256": digest.hexdigest()
  }


def pin(config: Config, fingerprint: dict[str, Any]) -> dict[str, Any]:
  """The record every checkpoint carries so that a resume can check it is the same run."""
  return {"config": config_record(config), "data": fingerprint}


def check_pinned(workdir: PathLike, config: Config, fingerprint: dict[str, Any]) -> None:
  """ValueError, before any resume, when the newest checkpoint was trained with another config
  or other training data than this command has (first differing field, or what changed in the
  data). Checkpoints of versions that wrote no pin pass."""
  found = checkpoint.read_meta(pathlib.Path(workdir) / CHECKPOINT_DIR)
  pinned = found[1].get("pin") if found else None
  if not isinstance(pinned, dict):
    return
  step = found[0]
  changed = _config_changes(pinned.get("config", {}), config_record(config))
  if changed:
    k = changed[0]
    raise ValueError(
        f"{workdir}: checkpoint step {step} was trained with {k} = "
        f"{pinned['config'].get(k)!r}, this command has {config_record(config).get(k)!r}"
        f"{f' (and {len(changed) - 1} more fields)' if len(changed) > 1 else ''}. "
        "Repeat the run's settings to resume it, or use a new --workdir. Nothing was "
        "changed.")
  old = pinned.get("data", {})
  if old == fingerprint:
    return
  for split in ("train", "validation"):
    before, now = old.get(f"{split}_per_class"), fingerprint[f"{split}_per_class"]
    if before != now:
      diff = [f"class {c}: {b} -> {n}" for c, (b, n) in enumerate(zip(before or [], now)) if b != n]
      detail = ", ".join(diff[:3]) or f"{len(before or [])} -> {len(now)} classes"
      raise ValueError(f"{workdir}: the {split} images changed since checkpoint step {step} was "
                       f"written ({sum(before or [])} -> {sum(now)} images; {detail}). Resuming "
                       "would continue on other data under the same run: restore the data set, "
                       "or train anew in a new --workdir. Nothing was changed.")
  raise ValueError(f"{workdir}: the training or validation images changed since checkpoint step "
                   f"{step} was written (same counts per class, other contents or order: SHA-256 "
                   f"{str(old.get('sha256'))[:12]}... -> {fingerprint['sha256'][:12]}...). "
                   "Restore the data set, or train anew in a new --workdir. Nothing was changed.")


def write_config(config: Config, workdir: PathLike) -> None:
  """Creates `workdir` and records `config` there (call once the data have loaded).

  In a multi-process job only process 0 writes (the others share its file system).
  """
  if not parallel.is_primary():
    return
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / CONFIG_FILE
  if not path.exists():
    _write_atomic(path, json.dumps(config_record(config), indent=2) + "\n")


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
                                                 seed=config.seed,
                                                 class_names=ds.class_names)
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


# ------------------------------------------------------------------------------- the layout
def check_layout(workdir: PathLike) -> None:
  """Refuses a workdir whose entries have the wrong kind (e.g. `checkpoints` a file) before
  anything is read or written, so that no tool misreads it as empty and starts over."""
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {workdir} is a file, not a directory; choose another path.")
  for name, want_dir in ((CHECKPOINT_DIR, True), (BEST_DIR, True), (CONFIG_FILE, False),
                         (METRICS_FILE, False), (SUMMARY_FILE, False)):
    path = workdir / name
    if path.exists() and path.is_dir() != want_dir:
      kind = "directory" if want_dir else "file"
      raise ValueError(f"{path} should be a {kind} of the run directory but is not; move it "
                       "away (or use a new --workdir). Nothing was changed.")


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_manager(workdir: PathLike, config: Config):
  """The orbax manager of the run's resume points (steps: the global step of each state), for
  its one writer (it deletes what killed saves left behind: call it under `lock`).

  Runs of earlier versions numbered their checkpoints by epoch; an epoch-end step is at least
  its epoch number, so the newest checkpoint stays the newest when such a run resumes.
  """
  return checkpoint.open_manager(pathlib.Path(workdir) / CHECKPOINT_DIR,
                                 max_to_keep=config.keep_checkpoints,
                                 cleanup=True)


def best_manager(workdir: PathLike):
  """The orbax manager of the run's best global model (steps: epochs), for its one writer.

  It keeps every step it is given: the best model of the last commit is deleted only after the
  next checkpoint names a newer one (`TrainingRun.commit`), never when a candidate is written.
  """
  return checkpoint.open_manager(pathlib.Path(workdir) / BEST_DIR, max_to_keep=None, cleanup=True)


# --------------------------------------------------------------------------- metrics, summary
def _metrics_text(records: list[dict[str, Any]]) -> str:
  return "".join(json.dumps(r) + "\n" for r in records)


def append_metrics(workdir: PathLike, record: dict[str, Any]) -> None:
  with open(pathlib.Path(workdir) / METRICS_FILE, "a") as f:
    f.write(json.dumps(record) + "\n")


def read_metrics(workdir: PathLike,
                 *,
                 torn_tail: bool = False,
                 as_written: bool = False) -> list[dict[str, Any]]:
  """The run's per-epoch records (empty before the first epoch ends).

  Args:
    workdir: the run directory.
    torn_tail: drop an unterminated, unreadable last line (a kill while it was appended)
      instead of raising.
    as_written: records exactly as in the file; by default a line of an earlier version
      (a run begun before the role vocabulary, possibly resumed since) is given in today's form.

  Raises:
    ValueError: a line is not JSON (naming the file and the line).
  """
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  text = path.read_text()
  lines = text.splitlines()
  records = []
  for number, line in enumerate(lines, start=1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as error:
        if torn_tail and number == len(lines) and not text.endswith("\n"):
          break
        raise ValueError(f"{path} line {number} is not valid JSON ({error}); restore it from a "
                         "copy or delete the line.") from error
  return records if as_written else [legacy.upgrade_record(r) for r in records]


def write_summary(workdir: PathLike, summary: dict[str, Any]) -> None:
  _write_atomic(pathlib.Path(workdir) / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def read_summary(workdir: PathLike) -> dict[str, Any] | None:
  """The finished run's summary, or None if the run has not finished.

  Summaries of the first layout (models at the top level, robust accuracy as `pgd20_acc`) are
  returned in today's form (`legacy.upgrade_summary`): `summary["models"][role]` with `clean_acc`
  and `pgd_acc`.
  """
  path = pathlib.Path(workdir) / SUMMARY_FILE
  if not path.exists():
    return None
  try:
    summary = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON ({error}); delete it and rerun the same training "
                     "command to recompute it from the final checkpoint.") from error
  if not isinstance(summary, dict):
    raise ValueError(f"{path} holds no JSON object; delete it and rerun the same training "
                     "command to recompute it from the final checkpoint.")
  return legacy.upgrade_summary(summary)


# ------------------------------------------------------------------ writing a training run
def _check_meta(meta: dict[str, Any]) -> None:
  """ValueError unless `meta` is a checkpoint record of a training run (any version)."""
  epoch, best = meta.get("epoch"), meta.get("best")
  if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
    raise ValueError(f"its meta record has no epoch count (meta: {str(meta)[:100]})")
  if not isinstance(best, dict) or not isinstance(best.get("score"), (int, float)):
    raise ValueError(f"its meta record has no best-model record (meta: {str(meta)[:100]})")
  best_epoch = best.get("epoch")
  if best_epoch is not None and (not isinstance(best_epoch, int) or not 0 < best_epoch <= epoch):
    raise ValueError(f"its best-model record names epoch {best_epoch!r} (of {epoch} trained)")
  if "metrics" in meta:
    records = meta["metrics"]
    if (not isinstance(records, list) or
        [r.get("epoch") if isinstance(r, dict) else None for r in records] != list(
            range(1, epoch + 1))):
      raise ValueError(f"its metric records do not cover epochs 1 to {epoch}")


def _note(text: str) -> None:
  """A message about the run directory, printed by process 0 only (one copy per job)."""
  if parallel.is_primary():
    print(text)


class TrainingRun:
  """The training loop's writer of a run directory: the commit protocol of the module doc.

  One per `train_and_evaluate` call, used under `lock` (it deletes what killed processes left
  behind). It holds the two orbax managers; `close` releases them.
  """

  def __init__(self, workdir: PathLike, config: Config):
    self.workdir = pathlib.Path(workdir)
    check_layout(self.workdir)
    self.checkpoints = checkpoint_manager(self.workdir, config)
    self.best = best_manager(self.workdir)
    self.events = None

  def open_events(self, first_epoch: int, images_per_epoch: int) -> None:
    """Starts the TensorBoard copy of the metrics at `first_epoch` (the first epoch to train)."""
    if parallel.is_primary():
      self.events = tensorboard.EventWriter.open(self.workdir,
                                                 first_epoch=first_epoch,
                                                 images_per_epoch=images_per_epoch)

  def resume(
      self,
      abstract_state: Any,
      check: Callable[[Any, dict[str, Any]], None] | None = None
  ) -> tuple[Any, dict[str, Any]] | None:
    """Restores the newest intact checkpoint and brings best/ and metrics.jsonl in line with it.

    Damaged newer checkpoints are renamed `<step>.damaged` (orbax no longer sees them) and
    reported; best/ keeps only the model that the checkpoint's best record names; metrics.jsonl
    is rewritten to the checkpoint's records when it differs (a lost last line comes back).

    Args:
      abstract_state: the shape of the saved state (see `checkpoint.restore`).
      check: `(state, meta) ->` None, raising ValueError for a checkpoint the caller cannot use.

    Returns:
      `(state, meta)`, where `meta["metrics"]` holds the run's metric records up to the
      checkpoint (for a checkpoint of an earlier version, read from metrics.jsonl); None for a
      new run.

    Raises:
      ValueError: no checkpoint can be used, or metrics.jsonl holds epochs that no checkpoint
        backs (the checkpoints were deleted): both name the path and what to do.
    """

    template, convert = abstract_state, lambda state: state
    keys = checkpoint.saved_keys(self.workdir / CHECKPOINT_DIR)
    if keys is not None and legacy.STATE_KEYS <= set(keys):
      template, convert = legacy.state_template(abstract_state), functools.partial(
          legacy.from_state, like=abstract_state)
      _note(f"{self.workdir / CHECKPOINT_DIR} holds checkpoints of the earlier state layout "
            "(nat, rob, teacher_nat, teacher_rob, mix): resuming them in today's layout.")

    def check_all(state, meta):
      _check_meta(meta)
      if check is not None:
        check(convert(state), meta)

    restored = checkpoint.restore_newest_intact(self.checkpoints, template, check_all)
    if restored is None:
      records = read_metrics(self.workdir, torn_tail=True, as_written=True)
      if records:
        raise ValueError(
            f"{self.workdir / METRICS_FILE} holds {len(records)} epochs but "
            f"{self.workdir / CHECKPOINT_DIR} holds no checkpoint: they were deleted or lost. To "
            f"train the run again from the start, delete {METRICS_FILE} (or use a new --workdir).")
      self._keep_best(None)
      return None
    for step, reason in restored.damaged:
      moved = checkpoint.set_aside(self.checkpoints, step)
      _note(f"Checkpoint step {step} is damaged ({reason}); moved it to {moved} and resumed from "
            f"step {restored.step}, the newest intact checkpoint.")
    meta = dict(restored.meta)
    self._keep_best(meta["best"].get("epoch"))
    if "metrics" in meta:
      records = list(meta["metrics"])
    else:  # a checkpoint of an earlier version: the file is the only copy
      records = [
          r for r in read_metrics(self.workdir, torn_tail=True, as_written=True)
          if r["epoch"] <= meta["epoch"]
      ]
      if len(records) < meta["epoch"]:
        _note(f"Warning: {self.workdir / METRICS_FILE} lacks the lines of "
              f"{meta['epoch'] - len(records)} epochs (lost before checkpoints kept a copy).")
    path = self.workdir / METRICS_FILE
    current = path.read_text() if path.exists() else ""
    text = _metrics_text(records)
    if current != text and parallel.is_primary():  # only process 0 writes the JSON files
      if not text.startswith(current) and not current.startswith(text):
        _note(f"Rewrote {path} from checkpoint step {restored.step}: it differed from the "
              "checkpoint's copy.")
      elif len(text) > len(current):
        _note(f"Restored the last line(s) of {path} from checkpoint step {restored.step}.")
      _write_atomic(path, text)
    meta["metrics"] = records
    return convert(restored.state), meta

  def _keep_best(self, epoch: int | None) -> None:
    """Deletes the best/ models other than that of `epoch` (the committed best record)."""
    deleted = checkpoint.delete_steps(self.best, keep=() if epoch is None else (epoch,))
    if deleted:
      _note(f"Deleted best model(s) of epoch(s) {deleted} in {self.workdir / BEST_DIR}: no "
            "checkpoint committed them (they are recomputed).")
    if epoch is not None and epoch not in checkpoint.steps(self.best):
      _note(f"Warning: {self.workdir / BEST_DIR} lacks the best model of epoch {epoch} that the "
            "checkpoint records (deleted, or lost by an earlier version).")

  def save_best(self, epoch: int, variables: Any, record: dict[str, Any]) -> None:
    """Writes a best-model candidate; it counts once `commit` names its epoch as the best."""
    checkpoint.save(self.best, epoch, variables, record)

  def commit(self,
             step: int,
             state: Any,
             meta: dict[str, Any],
             record: dict[str, Any] | None = None) -> None:
    """The commit point: the checkpoint of `step` (meta with `best` and every metric record),
    then the cleanup of best/ and, at an epoch end, the epoch's metrics line (`record`).

    Every process of a multi-process job calls it (orbax writes and deletes the checkpoints
    together); only process 0 appends the metrics line.
    """
    checkpoint.save(self.checkpoints, step, state, meta)
    keep = meta["best"].get("epoch")
    checkpoint.delete_steps(self.best, keep=() if keep is None else (keep,))
    if record is not None and parallel.is_primary():
      append_metrics(self.workdir, record)
      if self.events is not None:
        self.events.write(record)

  def finish(self, summary: dict[str, Any]) -> None:
    """Writes summary.json (atomically): the run is finished (process 0 only)."""
    if parallel.is_primary():
      write_summary(self.workdir, summary)

  def close(self) -> None:
    self.checkpoints.close()
    self.best.close()
    if self.events is not None:
      self.events.close()


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

  def training_images(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` images and labels of the run's training split (all when None), loaded on demand.

    A random subset, seeded by the run's seed (`training_subset`): an image-folder split is
    stored class by class, so its first `n` rows may hold two or three classes only.
    """
    splits = load_splits(self.config)
    return training_subset(splits.train_x, splits.train_y, n, seed=self.config.seed)


def training_subset(images: np.ndarray, labels: np.ndarray, n: int | None, *,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`n` rows drawn without replacement (seeded), in a random order; all rows when `n` is None
  or at least their number. For BatchNorm recalibration and other estimates on a sample."""
  rows = np.random.default_rng(seed).permutation(len(labels))
  if n is not None:
    rows = rows[:n]
  return images[rows], labels[rows]


def check_finite_models(models: dict[str, Any], source: PathLike) -> None:
  """ValueError naming the model and the first leaf holding NaN or inf (a diverged run).

  Evaluated before any attack: a NaN model would otherwise fail later with a message about
  adversarial values, or be reported at chance accuracy as if it were a result.
  """
  for name, variables in models.items():
    flat, _ = jax.tree_util.tree_flatten_with_path(variables)
    for path, leaf in flat:
      if not np.all(np.isfinite(np.asarray(leaf))):
        where = jax.tree_util.keystr(path, simple=True, separator="/")
        raise ValueError(f"the {name} model of {source} holds NaN or inf in {where}: its run "
                         "diverged, so there is nothing to evaluate. Retrain with a lower "
                         "learning rate (--lr-nat / --lr-rob).")


def _evaluated_model_keys(keys: tuple[str, ...]) -> list[str]:
  """The saved state's keys that hold the evaluated models, in today's or the first layout."""
  if "teachers" in keys:
    return ["teachers", "global_model"]
  return [k for k in legacy.MODEL_KEYS if k in keys]


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
    teachers = items["teachers"]  # restored key-sorted: report them in the run's expert order
    available = {**{r: teachers[r] for r in config.experts if r in teachers}, **teachers}
    available[GLOBAL] = items["global_model"]
  else:
    available = legacy.evaluated_models(items, config.experts)
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


# ------------------------------------------------------------------- warm start (--init-from)
def _leaf_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
      jax.tree_util.keystr(path, simple=True, separator="/"):
          (tuple(np.shape(leaf)), getattr(leaf, "dtype", None)) for path, leaf in flat
  }


def _check_init_shapes(flag: str, source: Any, abstract: Any, num_classes: int) -> None:
  """ValueError naming the first leaf of `source` that does not fit this run's network."""
  have, want = _leaf_shapes(source), _leaf_shapes(abstract)
  missing = [k for k in want if k not in have]
  extra = [k for k in have if k not in want]
  if missing or extra:
    raise ValueError(f"{flag}: its variables do not fit this run's network (missing "
                     f"{missing[:1] or 'nothing'}, unexpected {extra[:1] or 'nothing'}): it was "
                     "trained with another architecture; pass its --model or another --init-from.")
  wrong = [k for k in want if have[k][0] != want[k][0]]
  if not wrong:
    return
  if all(have[k][0][:-1] == want[k][0][:-1] and want[k][0][-1] == num_classes for k in wrong):
    raise ValueError(f"{flag}: it was trained for {have[wrong[0]][0][-1]} classes; this run's "
                     f"data set has {num_classes} ({wrong[0]} has shape {have[wrong[0]][0]}, "
                     f"this run needs {want[wrong[0]][0]}). Start from a model of the same "
                     "classes.")
  raise ValueError(f"{flag}: its {wrong[0]} has shape {have[wrong[0]][0]}, this run's network "
                   f"needs {want[wrong[0]][0]} (another width, image size or number of "
                   "channels). Start from a model trained on images of this shape.")


def load_init(path: PathLike, config: Config, abstract_variables: Any, *,
              num_classes: int) -> tuple[Any, dict[str, Any]]:
  """The variables a run starts from (`--init-from PATH`) and a record of where they came from.

  PATH is one of: a run directory (the global model of its latest checkpoint, which for a
  `natural` or `pgd_at` run is its EMA teacher, the model its summary reports); the `best/`
  directory of a run; a saved model (`save_model`: a mixture saved by `sweep_mix.py --select`,
  an `export.py --from-torch` import). Its network (`model` of its config) must be this run's,
  and its variables must have the shapes of `abstract_variables`; the variables come back as host
  arrays in the dtypes of `abstract_variables`.

  Args:
    path: the source.
    config: the run's config (its `model` is compared with the source's).
    abstract_variables: `jax.eval_shape` of the run's initial variables.
    num_classes: the run's number of classes (named in the error when only they differ).

  Returns:
    `(variables, record)`, record: `path` (absolute), `kind` (run, best or model), `model`, and
    `step` (run) or `epoch` (best).

  Raises:
    FileNotFoundError: PATH is none of the three.
    ValueError: another network, other shapes, NaN/inf, or an unreadable checkpoint; one line
      naming `--init-from PATH` and both sides.
  """
  path = pathlib.Path(path)
  flag = f"--init-from {path}"
  where: dict[str, Any] = {}
  if (path / CONFIG_FILE).is_file():
    source_config, kind = read_config(path), "run"
    restored = checkpoint.restore_items(path / CHECKPOINT_DIR, [GLOBAL_MODEL_KEY])
    if restored is None:
      raise FileNotFoundError(f"{flag}: that run holds no checkpoint yet; let it finish an "
                              "epoch first.")
    variables, where = restored[0][GLOBAL_MODEL_KEY], {"step": restored[1].get("step")}
  elif (path / MODEL_RECORD).is_file():
    record = _read_json(path / MODEL_RECORD)
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
      raise ValueError(f"{flag}: {path / MODEL_RECORD} holds no config record; it was not "
                       "written by gen_jax.runs.save_model.")
    source_config, kind = config_from_record(record["config"]), "model"
    variables = checkpoint.read_model_variables(path)
  elif path.name == BEST_DIR and (path.parent / CONFIG_FILE).is_file():
    source_config, kind = read_config(path.parent), "best"
    restored = checkpoint.restore_items(path, lambda keys: keys)
    if restored is None:
      raise FileNotFoundError(f"{flag}: that best/ directory holds no model yet.")
    variables, where = restored[0], {"epoch": restored[1].get("epoch")}
  else:
    raise FileNotFoundError(
        f"{flag}: not a run directory (no {CONFIG_FILE}), a run's {BEST_DIR}/ directory or a "
        f"saved model (no {MODEL_RECORD}); pass one of these.")
  if source_config.model != config.model:
    raise ValueError(f"{flag} holds a {source_config.model} network; this run trains a "
                     f"{config.model} (--model). Pass --model {source_config.model} or start "
                     "from a model of this architecture.")
  _check_init_shapes(flag, variables, abstract_variables, num_classes)
  check_finite_models({"--init-from": variables}, path)
  variables = jax.tree_util.tree_map(lambda v, a: np.asarray(v, a.dtype), variables,
                                     abstract_variables)
  return variables, {
      "path": str(path.absolute()),
      "kind": kind,
      "model": source_config.model,
      **where
  }
