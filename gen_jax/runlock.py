"""One training process per run directory: `WORKDIR/.lock`.

Two trainings on one workdir would interleave checkpoints and duplicate metric lines, so the
training loop holds this lock for its whole call (`with lock(workdir): ...`). The lock file names
its holder (PID, host, process start time, since when); a lock whose process is gone on this host
is stale and replaced, with a message; a lock of another host cannot be checked from here, so the
message says how to remove it.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import time
from collections.abc import Iterator
from typing import Any

PathLike = str | os.PathLike

LOCK_FILE = ".lock"


def _process_start(pid: int) -> str | None:
  """The start time of process `pid` (Linux /proc, in clock ticks since boot), which tells a
  live lock holder from a later process that reuses its PID; None where unavailable."""
  try:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _process_alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # it exists, under another user
  try:
    if pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
      return False  # killed, not yet reaped by its parent
  except (OSError, IndexError):
    pass
  now = _process_start(pid)
  return start is None or now is None or now == start


def _lock_holder(path: pathlib.Path) -> dict[str, Any] | None:
  try:
    holder = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _create_exclusive(path: pathlib.Path, text: str) -> None:
  """Creates `path` holding `text`, or raises FileExistsError; never a half-written lock.

  The text goes to a private temporary file that is then hard-linked to `path` (link fails if
  `path` exists), so a process killed at any instant leaves either no lock or a complete one.
  """
  temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
  with open(temporary, "w") as f:
    f.write(text)
  try:
    os.link(temporary, path)
  except FileExistsError:
    raise
  except OSError:  # a file system without hard links: exclusive create, then write
    descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(descriptor, "w") as f:
      f.write(text)
  finally:
    temporary.unlink(missing_ok=True)


def this_process() -> dict[str, Any]:
  """This process as a lock names its holder: PID, host and start time (`process_ended`)."""
  return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}


def process_ended(record: Any) -> bool:
  """Whether the process of a `this_process` record is known to have ended: it ran on this host
  and no longer runs (a later process reusing its PID does not count). A process of another
  host cannot be checked from here: False."""
  if not isinstance(record, dict) or record.get("host") != socket.gethostname():
    return False
  pid = record.get("pid")
  return isinstance(pid, int) and not _process_alive(pid, record.get("start"))


@contextlib.contextmanager
def lock(workdir: PathLike) -> Iterator[None]:
  """Holds `WORKDIR/.lock` (this process's PID, host and start time) while the block runs.

  Two trainings on one workdir would interleave checkpoints and duplicate metric lines; the
  second one is refused with the holder's PID. A lock whose process is gone (killed, machine
  rebooted; same host) is stale: it is replaced, with a message. A lock of another host cannot
  be checked from here, so the message says how to remove it. Creates `workdir` if needed; a
  directory this call created and left empty (e.g. the data failed to load) is removed again.

  Raises:
    RuntimeError: another live process holds the lock, or the workdir is not writable.
  """
  workdir = pathlib.Path(workdir)
  path = workdir / LOCK_FILE
  created = not workdir.exists()
  me = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "start": _process_start(os.getpid()),
      "since": time.strftime("%Y-%m-%d %H:%M:%S")
  }
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    while True:
      try:
        _create_exclusive(path, json.dumps(me) + "\n")
        break
      except FileExistsError:
        holder = _lock_holder(path)
        if holder is None:
          continue  # released meanwhile
        pid, host = holder.get("pid"), holder.get("host")
        if (isinstance(pid, int) and host == me["host"] and
            not _process_alive(pid, holder.get("start"))):
          if _lock_holder(path) == holder:  # still the same stale record: replace it
            print(f"Removing the stale lock {path} of process {pid} (no longer running).")
            path.unlink(missing_ok=True)
          continue
        who = (f"process {pid} on host {host} (since {holder.get('since')})"
               if pid is not None else "an unknown process (unreadable lock file)")
        raise RuntimeError(
            f"{workdir} is in use by {who}: {path} exists. Two trainings on one workdir would "
            "corrupt it; wait for that one to end. If no such process runs any more (e.g. its "
            f"machine was rebooted), delete {path} and rerun.") from None
  except OSError as error:
    raise RuntimeError(f"cannot write in {workdir} ({error.strerror or error}); training needs "
                       "a writable --workdir (a finished run is read without writing).") from error
  try:
    yield
  finally:
    if _lock_holder(path) == me:
      path.unlink(missing_ok=True)
    if created:
      with contextlib.suppress(OSError):
        workdir.rmdir()  # only succeeds if nothing was written
