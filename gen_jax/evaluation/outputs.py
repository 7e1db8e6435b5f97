"""Writing evaluation files without ever losing an earlier result.

Every file the evaluation programs write goes through `write_text` / `write_json` / `save_figure`:
when the target exists, the earlier file is first renamed to `name.1.ext` (`name.2.ext`, ... : the
smallest free number), so a second evaluation of the same run keeps the first one's figures.

Synopsis::

    write_json(run / "eval" / "report.json", report)   # an older report.json -> report.1.json
    unique_directory(run / "eval" / "mix-beta0.30")     # mix-beta0.30, or mix-beta0.30-2, ...
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any


def keep_previous(path: str | pathlib.Path) -> pathlib.Path | None:
  """Renames an existing `path` to the first free `stem.N.suffix`; returns the new name."""
  path = pathlib.Path(path)
  if not path.exists():
    return None
  n = 1
  while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
    n += 1
  path.rename(kept)
  return kept


def write_text(path: str | pathlib.Path, text: str) -> pathlib.Path:
  """Writes `text` to `path` (parents created), keeping an existing file as `stem.N.suffix`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  keep_previous(path)
  path.write_text(text)
  return path


def write_json(path: str | pathlib.Path, obj: Any) -> pathlib.Path:
  """`write_text` of `obj` as indented JSON; TypeError before anything is renamed or written."""
  return write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def save_figure(figure: Any, path: str | pathlib.Path, dpi: int = 130) -> pathlib.Path:
  """Saves a `matplotlib.figure.Figure` as PNG at `path`, keeping an existing file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  keep_previous(path)
  figure.savefig(path, dpi=dpi)
  return path


def ensure_writable(directory: str | pathlib.Path) -> pathlib.Path:
  """Creates `directory` if needed and checks that files can be written there.

  Called before the expensive work, so a read-only output directory fails in a second with its
  path, not after an hour of attacks.

  Raises:
    PermissionError: the directory cannot be created or written (the message names it).
  """
  directory = pathlib.Path(directory)
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-test-{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as error:
    raise PermissionError(
        f"cannot write results to {directory} ({error.strerror or error}); "
        "choose a writable directory with --out or fix its permissions.") from error
  return directory


def unique_directory(path: str | pathlib.Path) -> pathlib.Path:
  """`path` if it does not exist yet, else the first free `path-2`, `path-3`, ..."""
  path = pathlib.Path(path)
  n = 2
  candidate = path
  while candidate.exists():
    candidate = path.with_name(f"{path.name}-{n}")
    n += 1
  return candidate
