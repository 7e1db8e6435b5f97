"""Checkpoints through orbax: the only module of the project that imports orbax.

A checkpoint holds a pytree (the whole `GeneralistState`: both experts with their optimiser
states, the teachers, the global model and the step) and a small JSON record (epoch, best
score, ...). PRNG keys are not stored: every key is derived from the config's seed and the step,
so a resumed run reproduces its keys and its data order exactly.

Synopsis::

    manager = open_manager(workdir / "checkpoints", max_to_keep=2)
    save(manager, step, state, {"epoch": 3})
    state, meta = restore(manager, abstract_state)       # latest step; None if there is none
    found = restore_newest_intact(manager, abstract_state)  # falls back past damaged steps
    manager.close()

    save_model("runs/pilot/eval/mix-beta0.30", variables, {"config": ..., "beta": 0.3})
    variables = load_model("runs/pilot/eval/mix-beta0.30", abstract_variables)
    record = read_model_record("runs/pilot/eval/mix-beta0.30")

A model checkpoint (`save_model`) is one model's linen variables plus a JSON record (the run's
config, where the model came from); `experiments/evaluate.py --checkpoint` reads it.

Several processes: every process of a multi-process job calls the same functions in the same
order (orbax synchronises them; a replicated array is written once, the JSON record by process
0). A checkpoint holds whole arrays, not a device layout: restoring places them by the abstract
state's shardings, so a checkpoint written by 2 processes on 8 devices restores in 1 process on 1.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
from collections.abc import Callable
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from gen_jax import parallel


def open_manager(directory: str | os.PathLike,
                 *,
                 max_to_keep: int | None = 2,
                 cleanup: bool = False) -> ocp.CheckpointManager:
  """A checkpoint manager over `directory` (created if missing).

  Args:
    directory: where the steps live.
    max_to_keep: keep the newest this many steps; None: every step (the caller deletes them
      with `delete_steps`).
    cleanup: delete the temporary directories of saves that a killed process left unfinished.
      Only for the directory's one writer (a training run under its lock): for anyone else such
      a directory may be a save in progress.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         create=True,
                                         cleanup_tmp_directories=cleanup)
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=options,
                               item_names=("state", "meta"))


CHECKSUMS = "checksums"  # the meta entry: SHA-256 of each top-level entry of the saved state


def _host(leaf: Any) -> np.ndarray:
  """A leaf's values on this host (one copy of a replicated array, as every process has)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    leaf = leaf.addressable_data(0)
  return np.ascontiguousarray(np.asarray(jax.device_get(leaf)))


def checksums(state: Any) -> dict[str, str]:
  """SHA-256 of each top-level entry of a state (its bytes, dtypes, shapes and leaf paths).

  Saved in every checkpoint's meta record and compared after every restore, so that bytes
  damaged after the save (bit rot, a torn copy, a value overwritten with NaN) are told from a
  diverged run: the damaged checkpoint is set aside like an unreadable one and the previous
  intact one is used. Paths are rendered like `keystr`, so that a state restored as plain dicts
  (`restore_items`) hashes like the structured state it was saved from.
  """
  tree = flax.serialization.to_state_dict(state)
  if not isinstance(tree, dict):
    tree = {"": tree}
  out = {}
  for key, subtree in tree.items():
    digest = hashlib.sha256()
    flat, _ = jax.tree_util.tree_flatten_with_path(flax.serialization.to_state_dict(subtree))
    for name, leaf in sorted(
        (jax.tree_util.keystr(p, simple=True, separator="/"), leaf) for p, leaf in flat):
      values = _host(leaf)
      digest.update(f"{name}:{values.dtype}:{values.shape};".encode())
      digest.update(values.tobytes())
    out[str(key)] = digest.hexdigest()
  return out


def verify(state: Any, meta: dict[str, Any], keys: Any = None) -> None:
  """ValueError unless each top-level entry of `state` (or those of `keys`) has the checksum
  that `meta` saved for it; a meta record without checksums (an earlier version) passes."""
  saved = meta.get(CHECKSUMS)
  if not isinstance(saved, dict):
    return
  now = checksums(state)
  for key in (keys if keys is not None else now):
    if key in saved and saved[key] != now.get(key):
      raise ValueError(f"its {key} does not match the checksum saved with it: the bytes were "
                       "damaged after the save")


class DiskFull(OSError):
  """A checkpoint write failed because its disk is full; the message names the directory and the
  way out. Raised from the storage layer's own error (kept as `__cause__`)."""


def _chain(error: BaseException | None):
  """`error`, then its cause or context, and so on (each once)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _is_enospc(error: BaseException) -> bool:
  return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


def _is_disk_full(error: BaseException) -> bool:
  """Whether `error` or anything in its chain is a full disk (ENOSPC, in any wrapping)."""
  return any(_is_enospc(e) for e in _chain(error))


def disk_full_message(error: BaseException) -> str | None:
  """The one line to print for a full disk anywhere in `error`'s chain, else None.

  A `DiskFull` in the chain is reported as such even when a later error replaced it (closing the
  run's writers on the same full disk, in a `finally`, can raise again and hide it); any other
  ENOSPC names the file it was writing where the error says so.
  """
  chain = list(_chain(error))
  reported = next((e for e in chain if isinstance(e, DiskFull)), None)
  if reported is not None:
    return str(reported)
  full = [e for e in chain if _is_enospc(e)]
  if not full:
    return None
  where = next((e.filename for e in full if getattr(e, "filename", None)), None)
  return (f"the disk is full (no space left on device) while writing {where or 'a file'}. Free "
          "space there and rerun the same command: a run resumes from its last complete "
          "checkpoint.")


class _DropWriteFailureLogs(logging.Filter):
  """Drops the storage layer's error records with a traceback (orbax logs a failed write once per
  background thread, each with the whole traceback); the failure itself is raised to the caller."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and record.exc_info)


class _DropDiskFullTasks(logging.Filter):
  """Drops asyncio's "Task (or _GatheringFuture) exception was never retrieved" for a write that
  failed on a full disk: the failure was raised as `DiskFull`; the writer's other tasks and their
  gathering futures fail the same way."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    first_line = str(record.msg).split("\n", 1)[0]
    return not (first_line.endswith("exception was never retrieved") and error is not None and
                _is_disk_full(error))


_DROP_DISK_FULL_TASKS = _DropDiskFullTasks()


@contextlib.contextmanager
def _writing(directory: str | os.PathLike, what: str):
  """Runs an orbax write: a full disk becomes one `DiskFull` naming `directory` and the fix."""
  quiet, absl_logger = _DropWriteFailureLogs(), logging.getLogger("absl")
  absl_logger.addFilter(quiet)
  try:
    yield
  except Exception as error:
    if _is_disk_full(error):
      # The writer's unfinished tasks report the same failure once more when they are collected.
      logging.getLogger("asyncio").addFilter(_DROP_DISK_FULL_TASKS)  # once: same instance
      raise DiskFull(f"the disk holding {directory} is full (no space left on device) while "
                     f"saving {what}. Free space there and rerun the same command: a run resumes "
                     "from its last complete checkpoint, and the incomplete one is discarded "
                     "(nothing complete was overwritten).") from error
    raise
  finally:
    absl_logger.removeFilter(quiet)


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
  """Saves `state` and `meta` (plus the state's `checksums`) at `step` and waits until they are
  committed.

  Orbax writes the step into a temporary directory and renames it when complete, so a step is
  either wholly there or absent: this is the commit point of a training run. Saving is
  idempotent: a step that already exists (left by a run that was cut short before it could
  record the step as its own, e.g. an uncommitted best model) is replaced, so a rerun never
  stops at "Checkpoint for step N already exists".
  """
  if step in manager.all_steps():
    manager.delete(step)
  meta = {**meta, CHECKSUMS: checksums(state)}
  with _writing(manager.directory, f"the checkpoint of step {step}"):
    manager.save(step,
                 args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         meta=ocp.args.JsonSave(meta)),
                 force=True)
    manager.wait_until_finished()


def steps(manager: ocp.CheckpointManager) -> list[int]:
  """The committed steps of `manager`, oldest first."""
  return sorted(manager.all_steps())


def delete_steps(manager: ocp.CheckpointManager, keep: Any = ()) -> list[int]:
  """Deletes every committed step not in `keep`; returns the deleted steps."""
  doomed = [s for s in steps(manager) if s not in set(keep)]
  for step in doomed:
    manager.delete(step)
  return doomed


def set_aside(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
  """Renames a damaged step's directory to `<step>.damaged` (kept for inspection, invisible to
  orbax) and returns its new path, so that the step can be written afresh.

  Every process of a multi-process job calls it; process 0 renames, the others wait for it.
  """
  source = pathlib.Path(manager.directory) / str(step)
  target = source.with_name(f"{step}.damaged")
  n = 1
  while target.exists():
    n += 1
    target = source.with_name(f"{step}.damaged-{n}")
  parallel.barrier(f"gen_jax.checkpoint.set_aside.{step}.checked")
  if parallel.is_primary():
    os.rename(source, target)
  parallel.barrier(f"gen_jax.checkpoint.set_aside.{step}.renamed")
  manager.reload()
  return target


def _placed(abstract: Any) -> Any:
  """Gives every leaf without a sharding the first local device, so that a checkpoint written on
  another topology (e.g. 8 GPUs, or the 2 virtual devices of the tests) restores on this one."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def place(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
    return leaf

  return jax.tree_util.tree_map(place, abstract)


def restore(manager: ocp.CheckpointManager,
            abstract_state: Any,
            step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
  """Restores the checkpoint at `step` (default: the latest) into the shape of `abstract_state`.

  Args:
    manager: from `open_manager`.
    abstract_state: a pytree of `jax.ShapeDtypeStruct` (e.g. `jax.eval_shape(create_state)`),
      with shardings where the restored arrays should be placed (leaves without one go to the
      first local device, whatever topology wrote the checkpoint).
    step: which checkpoint; None for the latest.

  Returns:
    `(state, meta)`, or None when the directory holds no checkpoint.

  Raises:
    ValueError: the checkpoint does not match `abstract_state` (another model or method) or is
      unreadable; the message names the directory and what to do.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  try:
    restored = manager.restore(step,
                               args=ocp.args.Composite(state=ocp.args.StandardRestore(
                                   _placed(abstract_state)),
                                                       meta=ocp.args.JsonRestore()))
  except Exception as error:  # orbax raises many types; wrap them with the culprit's path.
    raise ValueError(
        f"cannot restore checkpoint step {step} from {manager.directory}: {error}. The "
        "checkpoint is corrupt or was written by a run with another model, method or data set; "
        "use a new --workdir (nothing was overwritten).") from error
  meta = restored["meta"]
  if not isinstance(meta, dict):
    raise ValueError(f"cannot restore checkpoint step {step} from {manager.directory}: its meta "
                     f"record is {type(meta).__name__}, not a JSON object. The checkpoint is "
                     "corrupt.")
  try:
    verify(restored["state"], meta)
  except ValueError as error:
    raise ValueError(f"cannot restore checkpoint step {step} from {manager.directory}: {error}. "
                     "The checkpoint is corrupt.") from error
  return restored["state"], dict(meta)


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `restore_newest_intact` found.

  Attributes:
    state: the restored pytree.
    meta: its JSON record.
    step: the step it came from.
    damaged: `(step, reason)` of every newer step that could not be used, newest first.
  """
  state: Any
  meta: dict[str, Any]
  step: int
  damaged: tuple[tuple[int, str], ...]


def _short(error: Exception, limit: int = 400) -> str:
  text = " ".join(str(error).split())
  return text if len(text) <= limit else text[:limit] + " ..."


def restore_newest_intact(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    check: Callable[[Any, dict[str, Any]], None] | None = None) -> Restored | None:
  """Restores the newest step that restores and passes `check`, trying older ones in turn.

  A preemptible machine can be killed while a file system is flushing, or a disk can damage a
  file; the previous checkpoint (`max_to_keep` >= 2) is then still intact, and falling back to
  it costs one checkpoint interval instead of the run. The caller reports `damaged`.

  Args:
    manager: from `open_manager`.
    abstract_state: as for `restore`.
    check: called with `(state, meta)`; raises ValueError when the pair is unusable (e.g. a meta
      record without the fields the caller needs).

  Returns:
    A `Restored`, or None when the directory holds no checkpoint.

  Raises:
    ValueError: no step can be used; the message names the directory and each step's reason.
  """
  tried = sorted(manager.all_steps(), reverse=True)
  if not tried:
    return None
  damaged = []
  for step in tried:
    try:
      state, meta = restore(manager, abstract_state, step)
      if check is not None:
        check(state, meta)
    except ValueError as error:
      damaged.append((step, _short(error.__cause__ or error)))
      continue
    return Restored(state, meta, step, tuple(damaged))
  (newest, reason), older = damaged[0], damaged[1:]
  also = "; nor can any older one (" + "; ".join(f"step {s}: {r}" for s, r in older) + ")"
  raise ValueError(f"cannot restore checkpoint step {newest} from {manager.directory}: {reason}"
                   f"{also if older else ''}. The checkpoint is corrupt or was written by a run "
                   "with another model, method or data set; use a new --workdir (nothing was "
                   "overwritten).")


class _DropReadOnlyNotice(logging.Filter):
  """Drops orbax's "Given directory is read only" warning: reading is all a reader means to do."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


def _read_manager(directory: str | os.PathLike) -> ocp.CheckpointManager:
  """A read-only view of a checkpoint directory whose state item can be restored in part.

  The options are those orbax would force for a read-only manager (so it warns of none of them),
  and its notice that the directory is read only is filtered out while the manager is built.
  """
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  notice, absl_logger = _DropReadOnlyNotice(), logging.getLogger("absl")
  absl_logger.addFilter(notice)
  try:
    return ocp.CheckpointManager(os.path.abspath(directory),
                                 options=options,
                                 item_handlers={
                                     "state": ocp.PyTreeCheckpointHandler(),
                                     "meta": ocp.JsonCheckpointHandler()
                                 })
  finally:
    absl_logger.removeFilter(notice)


@contextlib.contextmanager
def _reading(directory: str | os.PathLike, step: int | None):
  """`(read-only manager, step)` of `directory` (step None: the latest), closed on exit;
  `(None, None)` when nothing is saved there (no orbax "read only" warning for a fresh run)."""
  if not os.path.isdir(directory):
    yield None, None
    return
  manager = _read_manager(directory)
  try:
    step = manager.latest_step() if step is None else step
    yield (manager, step) if step is not None else (None, None)
  finally:
    manager.close()


def saved_keys(directory: str | os.PathLike, step: int | None = None) -> tuple[str, ...] | None:
  """The top-level keys of the state saved at `step` (default: the latest); None if none.

  Lets a caller pick the layout to restore into (e.g. a checkpoint of an earlier version) before
  restoring; an unreadable checkpoint gives None too (the restore then reports it).
  """
  with _reading(directory, step) as (manager, step):
    if manager is None:
      return None
    try:
      return tuple(manager.item_metadata(step)["state"].keys())
    except Exception:  # pylint: disable=broad-except  # unreadable: let the restore say why
      return None


def read_meta(directory: str | os.PathLike) -> tuple[int, dict[str, Any]] | None:
  """`(step, meta record)` of the newest checkpoint whose meta record reads, without restoring
  any array; None when there is none. For checks that must run before a resume (a run's pinned
  config and data), so that a mismatch is refused before anything is set aside or rewritten."""
  if not os.path.isdir(directory):
    return None
  manager = _read_manager(directory)
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception:  # pylint: disable=broad-except  # damaged: the resume sets it aside
        continue
      if isinstance(meta, dict):
        return step, dict(meta)
    return None
  finally:
    manager.close()


def restore_items(directory: str | os.PathLike,
                  names: Any,
                  step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
  """Restores only some top-level entries of a saved state (e.g. the models, not the optimiser).

  Each restored entry is checked against the checksum saved with it (`verify`). Without `step`,
  the newest checkpoint that restores intact is read: a damaged newer one is skipped with one
  line on stderr naming it (evaluation programs fall back as training does; only training sets
  damaged checkpoints aside).

  Args:
    directory: a checkpoint directory written through `open_manager` / `save`.
    names: a function from the saved state's top-level keys to the keys to restore (so that a
      caller can choose among layouts), or a collection of keys.
    step: which checkpoint; None for the newest intact one.

  Returns:
    `({name: subtree}, meta)` with every array on the first local device, or None when the
    directory holds no checkpoint.

  Raises:
    ValueError: unreadable checkpoint (every one, without `step`), or a requested key it does not
      hold.
  """
  if not os.path.isdir(directory):
    return None
  manager = _read_manager(directory)
  try:
    tried = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    if not tried:
      return None
    failures = []
    for candidate in tried:
      try:
        result = _restore_items_at(manager, candidate, names)
      except ValueError as error:
        failures.append((candidate, error))
        continue
      if failures:
        print(
            f"{directory}: checkpoint step(s) {[s for s, _ in failures]} damaged "
            f"({_short(failures[0][1], 200)}); read step {candidate}, the newest intact one.",
            file=sys.stderr,
            flush=True)
      return result
    raise failures[0][1]
  finally:
    manager.close()


def _restore_items_at(manager: ocp.CheckpointManager, step: int,
                      names: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  try:
    tree = manager.item_metadata(step)["state"]
    keys = list(names(tuple(tree.keys())) if callable(names) else names)
    missing = [k for k in keys if k not in tree]
    if missing:
      raise ValueError(f"it holds no {missing} (it has {sorted(tree.keys())})")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        {k: tree[k] for k in keys})
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True),
                                meta=ocp.args.JsonRestore()))
    state, meta = dict(restored["state"]), dict(restored["meta"])
    verify(state, meta, keys)
  except Exception as error:  # orbax raises many types; wrap them with the culprit's path.
    raise ValueError(f"cannot restore checkpoint step {step} from {manager.directory}: {error}. "
                     "The checkpoint is corrupt or not of a gen_jax run.") from error
  return state, meta


MODEL_RECORD = "model.json"
_MODEL_ITEM = "variables"


def save_model(directory: str | os.PathLike, variables: Any, record: dict[str,
                                                                          Any]) -> pathlib.Path:
  """Writes one model (linen variables) and its JSON `record` to a new directory.

  Args:
    directory: where to write; must not exist yet (a model already saved is never overwritten).
    variables: `{"params": ..., "batch_stats": ...}`.
    record: JSON-serialisable description; by convention `{"config": <run config record>, ...}`
      so that the data and the architecture can be rebuilt.

  Returns:
    The directory's absolute path.

  Raises:
    FileExistsError: `directory` exists (choose another path or remove it yourself).
    TypeError: `record` is not JSON-serialisable (checked before anything is written).
  """
  directory = pathlib.Path(directory).absolute()
  exists = directory.exists()
  parallel.barrier("gen_jax.checkpoint.save_model.checked")  # every process looked before writing
  if exists:
    raise FileExistsError(f"{directory} already exists; a saved model is never overwritten. "
                          "Choose another path or delete it yourself.")
  text = json.dumps(record, indent=2) + "\n"  # TypeError before anything is written.
  # Written in full under a hidden name, then renamed: a kill leaves no half-saved model under
  # the real name (a rerun saves to the same name, and removes the partial one, saying so).
  partial = partial_path(directory)
  if parallel.is_primary():
    remove_partial(partial)
  parallel.barrier("gen_jax.checkpoint.save_model.cleaned")
  # Host copies: orbax writes numpy leaves from process 0 alone (all processes call this).
  variables = jax.device_get(variables)
  checkpointer = ocp.StandardCheckpointer()
  with _writing(directory.parent, f"the model {directory.name}"):
    try:
      checkpointer.save(partial / _MODEL_ITEM, variables)
      checkpointer.wait_until_finished()
    finally:
      checkpointer.close()
    if parallel.is_primary():
      (partial / MODEL_RECORD).write_text(text)
    os.replace(partial, directory)
  parallel.barrier("gen_jax.checkpoint.save_model.recorded")
  return directory


def partial_path(directory: str | os.PathLike) -> pathlib.Path:
  """The hidden sibling `.NAME.partial` where an artefact is written before it is renamed into
  place as `directory`."""
  directory = pathlib.Path(directory)
  return directory.with_name(f".{directory.name}.partial")


def remove_partial(partial: str | os.PathLike) -> None:
  """Deletes an unfinished artefact a killed run left at `partial`, with a line saying so."""
  partial = pathlib.Path(partial)
  if partial.exists():
    shutil.rmtree(partial)
    # tqdm's write: on a line of its own even while a progress bar is drawn on stderr.
    tqdm.write(f"removed {partial}: an unfinished save that an interrupted run left behind.",
               file=sys.stderr)


def read_model_record(directory: str | os.PathLike) -> dict[str, Any]:
  """The JSON record of a model checkpoint; FileNotFoundError if `directory` holds none."""
  path = pathlib.Path(directory) / MODEL_RECORD
  if not path.is_file():
    raise FileNotFoundError(f"{directory} is not a model checkpoint (no {MODEL_RECORD}); pass a "
                            "directory written by save_model, e.g. by experiments/sweep_mix.py "
                            "--select.")
  return json.loads(path.read_text())


def load_model(directory: str | os.PathLike, abstract_variables: Any) -> Any:
  """Restores the variables of a model checkpoint into the shape of `abstract_variables`.

  Raises:
    FileNotFoundError: not a model checkpoint.
    ValueError: the stored variables do not fit `abstract_variables` (another architecture).
  """
  read_model_record(directory)
  path = pathlib.Path(directory).absolute() / _MODEL_ITEM
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(path, _placed(abstract_variables))
  except Exception as error:  # orbax raises many types; name the culprit.
    raise ValueError(f"cannot restore the model in {path}: {error}. It is corrupt or belongs to "
                     "another architecture than its model.json says.") from error
  finally:
    checkpointer.close()


def read_model_variables(directory: str | os.PathLike) -> Any:
  """The variables of a model checkpoint as saved (host numpy arrays, their own shapes).

  For callers that check the shapes themselves before using them (a warm start compares them
  with its own network); `load_model` restores into a given shape instead.

  Raises:
    FileNotFoundError: not a model checkpoint.
    ValueError: unreadable.
  """
  read_model_record(directory)
  path = pathlib.Path(directory).absolute() / _MODEL_ITEM
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(path)
  except Exception as error:  # orbax raises many types; name the culprit.
    raise ValueError(f"cannot read the model in {path}: {error}. It is corrupt.") from error
  finally:
    checkpointer.close()
