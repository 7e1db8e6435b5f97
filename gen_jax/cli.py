"""Command lines: `--preset NAME` plus one flag per `Config` field, and the shared flag parsers.

One flag style across every program: hyphenated names (`--data-dir`, `--batch-size`), with the
underscore spellings that earlier versions used still accepted. Every field of
`gen_jax.config.Config` is a flag of its own name (`--eps 0.031`, `--lr-rob 0.05`). Values are
parsed by the field's type (`none` for an optional field, `true`/`false` for booleans,
comma-separated lists for tuples), and the resulting config is validated before anything runs;
the library's `ConfigError` names a field, which the message shows as its flag. Flags are never
matched by prefix (`--epoch 5` is refused, not taken as `--epochs`): the old underscore spellings
are explicit aliases, not abbreviations.

Errors: `main_guard` prints a program's input errors as one line (`error: ...`, exit code 2).
To see the full traceback as well, add `--traceback` (every program that runs under `main_guard`
accepts it) or set the environment variable `GEN_JAX_TRACEBACK=1`.

Synopsis::

    parser = build_parser("Train Generalist.",
                          add_arguments=lambda p: p.add_argument("--workdir"))
    parser = argument_parser("Evaluate.")  # a program's own flags: no prefix matching, --traceback
    args, config = parse_config(parser, ["--preset", "pilot", "--epochs", "2"])
    add_distributed_arguments(parser)   # --coordinator, --num-processes, --process-id, ...
    initialize_distributed(args)         # first thing, before JAX touches a device
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from gen_jax import config as cfg
from gen_jax import parallel

_FIELD_TYPES = typing.get_type_hints(cfg.Config)

# `main_guard` shows the whole traceback of an error when this variable is set (not "" or "0").
TRACEBACK_ENV = "GEN_JAX_TRACEBACK"
TRACEBACK_FLAG = "--traceback"


def _base_type(annotation: Any) -> tuple[Any, bool]:
  """(type, optional) of a field annotation such as `Optional[int]` or `tuple[float, ...]`."""
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0], True
  return annotation, False


def _parser_for(name: str) -> Callable[[str], Any]:
  annotation, optional = _base_type(_FIELD_TYPES[name])

  def parse(text: str) -> Any:
    if optional and text.lower() in ("none", "null", ""):
      return None
    if annotation is bool:
      if text.lower() in ("true", "1", "yes"):
        return True
      if text.lower() in ("false", "0", "no"):
        return False
      raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    if typing.get_origin(annotation) is tuple:
      (item_type, *_) = typing.get_args(annotation)
      try:
        return tuple(item_type(part) for part in text.split(","))
      except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated {item_type.__name__} values, got {text!r}") from None
    try:
      return annotation(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"expected {'an' if annotation is int else 'a'} {annotation.__name__}, got {text!r}"
      ) from None

  parse.__name__ = getattr(annotation, "__name__", str(annotation))
  return parse


def _preset_summary(name: str) -> str:
  base = cfg.Config()
  preset = cfg.get_config(name)
  diff = [
      f"{f.name}={getattr(preset, f.name)!r}" for f in dataclasses.fields(cfg.Config)
      if getattr(preset, f.name) != getattr(base, f.name)
  ]
  return f"  {name}: " + (", ".join(diff) if diff else "the defaults below")


def argument_parser(description: str, **kwargs: Any) -> argparse.ArgumentParser:
  """An argparse parser for a program: no prefix matching of flags, and `--traceback`.

  `allow_abbrev=False`: argparse would otherwise take `--epoch 5` as `--epochs 5` (and any
  unambiguous prefix as its flag), so a mistyped flag could silently set another one. Old
  spellings of a flag must be listed as aliases. `--traceback` is read by `main_guard`.
  """
  parser = argparse.ArgumentParser(description=description, allow_abbrev=False, **kwargs)
  parser.add_argument(TRACEBACK_FLAG,
                      action="store_true",
                      help="on an error, print the full traceback before the one-line message "
                      f"(or set {TRACEBACK_ENV}=1)")
  return parser


def build_parser(
    description: str,
    preset_default: str | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.ArgumentParser:
  """An argparse parser with `--preset`, program-specific arguments and one flag per field."""
  epilog = "presets (what each sets, relative to the defaults):\n" + "\n".join(
      _preset_summary(name) for name in cfg.PRESETS)
  parser = argument_parser(description,
                           epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset",
                      default=preset_default,
                      choices=list(cfg.PRESETS),
                      required=preset_default is None,
                      help="named configuration to start from")
  if add_arguments:
    add_arguments(parser)
  group = parser.add_argument_group("config fields (override the preset)")
  for field in dataclasses.fields(cfg.Config):
    flags = [flag_of(field.name)]
    if "_" in field.name:
      flags.append(f"--{field.name}")
    group.add_argument(*flags,
                       dest=f"cfg_{field.name}",
                       type=_parser_for(field.name),
                       default=None,
                       metavar=_parser_for(field.name).__name__.upper(),
                       help=f"default {field.default!r}")
  return parser


def parse_config(parser: argparse.ArgumentParser,
                 argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, cfg.Config]:
  """Parses argv into (args, validated config); exits with a clear message on a bad value."""
  args = parser.parse_args(argv)
  overrides = {
      f.name: getattr(args, f"cfg_{f.name}")
      for f in dataclasses.fields(cfg.Config)
      if getattr(args, f"cfg_{f.name}") is not None
  }
  config = dataclasses.replace(cfg.get_config(args.preset), **overrides)
  try:
    config.validate()
  except cfg.ConfigError as error:
    parser.error(f"{flag_of(error.field)} {error.detail}")
  return args, config


def flag_of(field: str) -> str:
  """The command-line flag of a config field: `data_dir` -> `--data-dir`."""
  return "--" + field.replace("_", "-")


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags every evaluation program shares, with one name and meaning each."""
  parser.add_argument("--n",
                      type=positive_int,
                      default=None,
                      help="first N test images (default: all)")
  parser.add_argument("--eps",
                      type=linf_eps,
                      default=None,
                      help="L-inf radius in (0, 1] (default: the run's; the PGD step scales with "
                      "it)")
  parser.add_argument("--batch-size",
                      "--batch_size",
                      type=positive_int,
                      default=250,
                      help="images per compiled attack call (default 250)")
  parser.add_argument("--attack-seed",
                      "--seed",
                      type=seed_int,
                      default=None,
                      help="seed of the attacks' random starts (default: the run's seed, whose key "
                      "its training loop evaluated with, so the PGD figures agree with its "
                      "summary.json; --seed: old spelling)")


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags that join a multi-process job (several hosts), shared by every program.

  Without them a program runs as one process, unless it runs under a launcher that JAX
  detects (`srun`, `mpirun`, a Cloud TPU pod listing several workers, or
  `JAX_COORDINATOR_ADDRESS`): see `parallel.initialize_distributed`.
  """
  group = parser.add_argument_group("several processes (hosts)",
                                    "one process per host; process 0 prints and writes the files")
  group.add_argument("--coordinator",
                     default=None,
                     metavar="HOST:PORT",
                     help="process 0's address, the same for every process ('auto': let JAX "
                     "detect a TPU pod, SLURM or Open MPI job; default: $JAX_COORDINATOR_ADDRESS "
                     "or the launcher's, else a single process)")
  group.add_argument("--num-processes",
                     type=positive_int,
                     default=None,
                     help="processes in the job")
  group.add_argument("--process-id",
                     type=non_negative_int,
                     default=None,
                     help="this process's index, 0 to --num-processes - 1")
  group.add_argument("--distributed-timeout",
                     type=positive_float,
                     default=parallel.DEFAULT_TIMEOUT_SECONDS,
                     metavar="SECONDS",
                     help="how long to wait for the coordinator and the other processes "
                     f"(default {parallel.DEFAULT_TIMEOUT_SECONDS})")


def initialize_distributed(args: argparse.Namespace) -> int:
  """Joins the job that `add_distributed_arguments` describes (a no-op for one process).

  Call it before anything touches JAX devices. Returns the number of processes.
  """
  return parallel.initialize_distributed(args.coordinator,
                                         args.num_processes,
                                         args.process_id,
                                         timeout_seconds=args.distributed_timeout)


# ----------------------------------------------------------------- parsers of program flags
def positive_int(text: str) -> int:
  """An argparse type: an int >= 1."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
  return value


def non_negative_int(text: str) -> int:
  """An argparse type: an int >= 0."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0; got {value}")
  return value


def positive_float(text: str) -> float:
  """An argparse type: a finite float > 0."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
  if not 0 < value < float("inf"):
    raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {value}")
  return value


def linf_eps(text: str) -> float:
  """An argparse type: an L-inf radius, a finite number in (0, 1] (images lie in [0, 1])."""
  value = positive_float(text)
  if value > 1.0:
    raise argparse.ArgumentTypeError(
        f"must lie in (0, 1], got {value}: an L-inf radius above 1 exceeds the [0, 1] pixel range "
        "(8/255 = 0.0314 is the usual value).")
  return value


def seed_int(text: str) -> int:
  """An argparse type: a seed, an int in [0, 2**32 - 1] (`config.MAX_SEED`)."""
  value = non_negative_int(text)
  if value > cfg.MAX_SEED:
    raise argparse.ArgumentTypeError(f"must lie in [0, 2**32 - 1 = {cfg.MAX_SEED}], got {value}.")
  return value


def parsed_by(fn: Callable[[str], Any]) -> Callable[[str], Any]:
  """An argparse type from a library parser that raises ValueError (its message is kept)."""

  def parse(text: str) -> Any:
    try:
      return fn(text)
    except ValueError as error:
      raise argparse.ArgumentTypeError(str(error)) from None

  parse.__name__ = getattr(fn, "__name__", "value")
  return parse


def names_of(check: Callable[[list[str]], Any]) -> Callable[[str], Any]:
  """An argparse type for a comma-separated list of names, validated by `check`."""
  return parsed_by(lambda text: check([n.strip() for n in text.split(",") if n.strip()]))


def floats_of(check: Callable[[list[float]], Any]) -> Callable[[str], Any]:
  """An argparse type for a comma-separated list of numbers, validated by `check`."""

  def parse(text: str) -> Any:
    try:
      values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
      raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    return check(values)

  return parsed_by(parse)


def main_guard(fn: Callable[[], Any]) -> None:
  """Runs a program's `fn`: the library's errors and interruptions become one line and a code.

  Input errors, I/O errors and divergence exit 2 with "error: ..."; SIGINT/SIGTERM (after
  training saved its state, `training.loop.TrainingInterrupted`) exit 130/143 with the message
  saying how to resume; a Ctrl-C before anything was under way exits 130. With `--traceback`
  on the command line or `GEN_JAX_TRACEBACK=1` in the environment, the full traceback of such an
  error is printed before its line (the exit code stays 2). A full disk anywhere in the error's
  chain is reported as such (`checkpoint.disk_full_message`), even when closing the run's writers
  on that disk raised again and hid it. Without it, asyncio's "Event loop is
  closed" notices from the checkpoint writer's callbacks are not printed (harmless: see
  `_drop_closed_loop_callbacks`).
  """
  if not show_traceback():
    sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)
  try:
    fn()
  except (ValueError, OSError, RuntimeError, FloatingPointError) as error:
    if show_traceback():
      traceback.print_exc(file=sys.stderr)
    from gen_jax import checkpoint  # pylint: disable=import-outside-toplevel
    print(f"error: {checkpoint.disk_full_message(error) or error}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt as stopped:
    code = getattr(stopped, "exit_code", 130)
    print(str(stopped) or "stopped by SIGINT; rerun the same command to resume.", file=sys.stderr)
    sys.exit(code)


def _drop_closed_loop_callbacks(default: Callable[[Any], None]) -> Callable[[Any], None]:
  """An unraisable-exception hook that drops "Event loop is closed" from asyncio callbacks.

  The checkpoint writer's storage layer completes its futures on an asyncio loop; when a write
  fails (a full disk) or the program ends while a background write winds down, the remaining
  callbacks find that loop closed. Python prints each one as an ignored exception with its
  traceback (dozens of them), although nothing is lost: the write's own error is raised to the
  caller. Every other unraisable exception goes to `default`.
  """

  def hook(unraisable: Any) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError) and
            str(unraisable.exc_value) == "Event loop is closed"):
      default(unraisable)

  return hook


def show_traceback(argv: Sequence[str] | None = None) -> bool:
  """Whether `main_guard` prints tracebacks: `--traceback` in argv or `GEN_JAX_TRACEBACK` set."""
  argv = sys.argv[1:] if argv is None else argv
  flags = argv[:argv.index("--")] if "--" in argv else argv
  return TRACEBACK_FLAG in flags or os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0")
