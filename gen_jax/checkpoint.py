"""Checkpoints through orbax: the only module of the project that imports orbax.

A checkpoint holds a pytree (the whole `GeneralistState`: both experts with their optimiser
states, the teachers, the global model and the step) and a small JSON record (epoch, best
score, ...). PRNG keys are not stored: every key is derived from the config's seed and the step,
so a resumed run reproduces its keys and its data order exactly.

Synopsis::

    manager = open_manager(workdir / "checkpoints", max_to_keep=2)
    save(manager, step, state, {"epoch": 3})
    state, meta = restore(manager, abstract_state)       # latest step; None if there is none
    manager.close()
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


def open_manager(directory: str | os.PathLike, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A checkpoint manager over `directory` (created if missing), keeping the newest ones."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=options,
                               item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
  """Saves `state` and `meta` at `step` and waits until they are on disk."""
  manager.save(step,
               args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                       meta=ocp.args.JsonSave(meta)),
               force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager,
            abstract_state: Any,
            step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
  """Restores the checkpoint at `step` (default: the latest) into the shape of `abstract_state`.

  Args:
    manager: from `open_manager`.
    abstract_state: a pytree of `jax.ShapeDtypeStruct` (e.g. `jax.eval_shape(create_state)`),
      with shardings where the restored arrays should be placed.
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
                               args=ocp.args.Composite(
                                   state=ocp.args.StandardRestore(abstract_state),
                                   meta=ocp.args.JsonRestore()))
  except Exception as error:  # orbax raises many types; wrap them with the culprit's path.
    raise ValueError(
        f"cannot restore checkpoint step {step} from {manager.directory}: {error}. The "
        "checkpoint is corrupt or was written by a run with another model, method or data set; "
        "use a new --workdir (nothing was overwritten).") from error
  return restored["state"], dict(restored["meta"])

