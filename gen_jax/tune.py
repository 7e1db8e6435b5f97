"""Hyperparameter search: an Optuna study whose trials are ordinary run directories.

The study maximises two objectives, the validation clean accuracy and the validation PGD
accuracy of the global model at the last epoch (the figures the training loop selects `best/`
by, on the held-out validation split: never the test split). Each trial trains one config, the
study's base config (a preset and its flags) with the trial's values of the searched fields, by
the project's own loop (`training.train_and_evaluate`) in `WORKDIR/trials/<number>`, so a
trial is a run directory like any other: it resumes after a kill, is never retrained once
finished, and `evaluate.py`, `sweep_mix.py` and `export.py` read it.

Sampler: multi-objective TPE (`optuna.samplers.TPESampler`, MOTPE: Ozaki et al. 2020), not
NSGA-II. A trial costs a whole training run, so a study has tens of trials, not the hundreds
that NSGA-II's generations need (its first population of 50 is random search); TPE models the
front from its first ten random trials on, and its "constant liar" lets several workers sample
at once without proposing the same point. Each new trial's sampler is seeded by the study's
`sampler_seed` and the number of new trials before it, so concurrent workers never share a seed,
and a study resumed after a kill samples what an uninterrupted one would have sampled.

The search space is data (`Knob`: range and scale per config field): `DEFAULT_SPACE` holds the
knobs that shape Generalist's trade-off (both experts' learning rate and weight decay, β_final,
the β start, the EMA decay, the redistribution start, period and duty cycle, the training PGD
steps), and a JSON file overrides it (`parse_space`). The config has no learning-rate multiple of
the natural expert: `lr_nat` and `lr_rob` are independent fields, so the space searches both (a
ratio would be the same search in other coordinates). Both ends of every range must pass
`Config.validate`; a bad range is refused before any trial runs, naming the field.

Pruning (`prune_reason`): Optuna's pruners serve single-objective studies only, and a
scalarisation (clean + PGD, say) would prune exactly the extreme trials of a front (the most
robust, the cleanest). A trial is pruned at an epoch when its validation figures there are
below the median of the completed trials' figures at that epoch in BOTH objectives: the median
rule generalised to two objectives, which never stops a trial that trades one figure for the
other. The figures of each epoch are user attributes of the trial (`validation`: epoch ->
[clean, PGD]), since `Trial.report` takes one number; a pruned trial ends PRUNED and counts as
spent, never as finished.

Several workers (processes, hosts) share one study through its storage: a SQLite file on one
machine, a server database (PostgreSQL, MySQL) or an Optuna journal file on a shared file system
for several hosts. `trials` is the study's budget of trial slots: a worker stops when every slot
is taken, and one that draws a slot beyond the budget (two workers asked at once) gives it up at
once (`ended: surplus`), so the study never trains more than its budget. A trial whose worker
was killed (SIGKILL, a lost host) stays RUNNING in the storage; the next worker to look fails it
and queues a retry with the same parameters in the same directory (`retry_of`), which resumes
from the run's checkpoint. It knows the trial is orphaned when its worker process on this host
has ended (`runlock.process_ended`), or, for a worker of another host, when the trial's heartbeat
(`alive_at`, written every `heartbeat` seconds) is older than three periods (clocks must agree).
A worker stopped by SIGTERM or Ctrl-C queues the retry itself before it exits. Each trial's run
directory keeps its own lock (`runlock`), so no two processes ever train one directory.

Synopsis::

    space = load_space("space.json", config)            # DEFAULT_SPACE without a file
    storage = open_storage(default_storage("runs/tune"))  # sqlite:///.../runs/tune/tune.db
    study = open_study(storage, "pilot", base=config, space=space)
    run_trials(study, storage, base=config, space=space, workdir="runs/tune", trials=30)
    result = report(study, "runs/tune", base=config, space=space,
                    select=sweep.parse_rule("clean>=0.97"))   # tune.json, tune.md, tune.png

References:
  Ozaki, Tanigaki, Watanabe & Onishi, "Multiobjective Tree-Structured Parzen Estimator for
  Computationally Expensive Optimization Problems", GECCO 2020.
  Akiba, Sano, Yanase, Ohta & Koyama, "Optuna: A Next-generation Hyperparameter Optimization
  Framework", KDD 2019.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import socket
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from gen_jax import checkpoint, runlock, runs, training
from gen_jax.config import Config, ConfigError, config_from_record, config_record
from gen_jax.evaluation import outputs, sweep
from gen_jax.study import chord_score

PathLike = runs.PathLike

OBJECTIVES = ("clean", "robust")  # validation clean and PGD accuracy of the global model
TRIALS_DIR = "trials"
FRONT_DIR = "front"
BASELINES = ("natural", "pgd_at")  # WORKDIR/<method>: the chord's ends in the report
STUDY_RECORD = "gen_jax"  # the study's user attribute holding its base config and space
_DIRECTIONS = ["maximize", "maximize"]
_LIVE = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
_GIVEN_UP = ("surplus", "duplicate")  # trials that never held a slot

# ---------------------------------------------------------------------------- search space
SCALES = ("log", "linear", "int")


@dataclasses.dataclass(frozen=True)
class Knob:
  """The range of one searched config field: [low, high] on a log, linear or integer scale."""
  low: float
  high: float
  scale: str = "linear"

  def suggest(self, trial: optuna.Trial, name: str) -> Any:
    """The trial's value of the field (sampled, or the fixed value of a queued retry)."""
    if self.scale == "int":
      return trial.suggest_int(name, int(self.low), int(self.high))
    return trial.suggest_float(name, float(self.low), float(self.high), log=self.scale == "log")

  def record(self) -> dict[str, Any]:
    return {"low": self.low, "high": self.high, "scale": self.scale}


# The knobs of Generalist's trade-off. Ranges are wide enough for every preset (the pilot's lr
# 0.05, CIFAR-10's 0.01, the WideResNet's 0.1); EMA decay 0.99-0.9999 is a time constant of
# 100 to 10,000 steps.
DEFAULT_SPACE: dict[str, Knob] = {
    "lr_nat": Knob(2e-3, 0.2, "log"),
    "lr_rob": Knob(2e-3, 0.2, "log"),
    "weight_decay_nat": Knob(1e-5, 1e-2, "log"),
    "weight_decay_rob": Knob(1e-5, 1e-2, "log"),
    "beta_final": Knob(0.1, 0.9),
    "beta_start": Knob(0.3, 0.9),
    "ema_decay": Knob(0.99, 0.9999),
    "redistribute_start": Knob(0.4, 0.9),
    "redistribute_period": Knob(0.02, 0.2),
    "redistribute_duty": Knob(0.1, 0.5),
    "pgd_steps": Knob(3, 10, "int"),
}
# What a space may search: how the experts train and collaborate. Not the data, the validation
# split, the evaluation attack (eps, eval_*: the figures every trial is compared on), the model
# or the budget (epochs, batch size): set those on the command line for the whole study.
TUNABLE = frozenset(DEFAULT_SPACE) | {"momentum", "step_size", "trades_beta"}
_INT_FIELDS = frozenset({"pgd_steps"})
_COLLABORATION = frozenset({"beta_final", "beta_start"})
_REDISTRIBUTION = frozenset({"redistribute_start", "redistribute_period", "redistribute_duty"})
_NATURAL_EXPERT = frozenset({"lr_nat", "weight_decay_nat"})
_ADVERSARIAL_EXPERT = frozenset({"lr_rob", "weight_decay_rob", "pgd_steps", "step_size"})


def inert_fields(config: Config) -> dict[str, str]:
  """The tunable fields that the run of `config` ignores, each with the reason."""
  inert = {}
  single = config.method != "generalist"
  for name in _COLLABORATION | _REDISTRIBUTION:
    if single:
      inert[name] = f"--method {config.method} trains one expert: there is no mixing"
  if not single and not config.redistribute:
    inert.update({n: "--redistribute is false" for n in _REDISTRIBUTION})
  if config.expert_weights_final:
    inert["beta_final"] = "--expert-weights-final sets the final weights"
  if config.method == "natural":
    inert.update({n: "--method natural trains no adversarial expert" for n in _ADVERSARIAL_EXPERT})
  if config.method in ("pgd_at", "trades"):
    inert.update({n: f"--method {config.method} trains no natural expert" for n in _NATURAL_EXPERT})
  if not config.uses_trades:
    inert["trades_beta"] = "no expert trains with TRADES"
  return inert


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_space(record: Any,
                base: Config,
                *,
                fixed: Collection[str] = (),
                source: str = "the space") -> dict[str, Knob]:
  """The search space of a JSON record, checked against the study's base config.

  The record maps config fields to ranges, `{"lr_nat": {"low": 0.01, "high": 0.1, "scale":
  "log"}}` (scale `log`, `linear` (default) or `int`), on top of `DEFAULT_SPACE`; `null`
  removes a field (the base config's value stays), and `"base": "none"` starts from an empty
  space instead of the default. Fields set on the command line (`fixed`) and fields the base
  config's method ignores are left out of the default space and refused in the record.

  Raises:
    ValueError: a field that is not tunable, a malformed range, or an end that `Config.validate`
      refuses; the message names `source`, the field and the fix. Nothing has run yet.
  """
  if not isinstance(record, dict):
    raise ValueError(f"{source} must hold a JSON object of field: range, got {record!r}.")
  start = record.get("base", "default")
  if start not in ("default", "none"):
    raise ValueError(f"{source}: \"base\" must be \"default\" (extend the default space) or "
                     f"\"none\" (an empty one), got {start!r}.")
  inert = inert_fields(base)
  space = {} if start == "none" else {
      k: v for k, v in DEFAULT_SPACE.items() if k not in fixed and k not in inert
  }
  fields = {f.name for f in dataclasses.fields(Config)}
  for name, value in record.items():
    if name == "base":
      continue
    if name not in TUNABLE:
      what = "a config field the search may vary" if name in fields else "a config field"
      raise ValueError(f"{source}: {name!r} is not {what}. Tunable: {', '.join(sorted(TUNABLE))}; "
                       f"set the others on the command line for the whole study.")
    if value is None:
      space.pop(name, None)
      continue
    if name in fixed:
      raise ValueError(f"{source}: {name} is also set on the command line ({_flag(name)}); "
                       "drop one of the two.")
    if name in inert:
      raise ValueError(f"{source}: {name} has no effect in this study ({inert[name]}); "
                       "remove it from the space.")
    space[name] = _knob(name, value, source)
  for name, knob in space.items():
    _check_ends(name, knob, base, source)
  if not space:
    raise ValueError(f"{source} searches no field; name at least one (e.g. \"lr_rob\": "
                     "{\"low\": 0.005, \"high\": 0.05, \"scale\": \"log\"}).")
  return space


def _knob(name: str, value: Any, source: str) -> Knob:
  where = f"{source}: {name}"
  if not isinstance(value, dict):
    raise ValueError(f"{where} must be {{\"low\": ..., \"high\": ..., \"scale\": ...}} or null, "
                     f"got {value!r}.")
  unknown = sorted(set(value) - {"low", "high", "scale"})
  if unknown:
    raise ValueError(f"{where} has unknown keys {unknown}; a range has low, high and scale.")
  default_scale = "int" if name in _INT_FIELDS else "linear"
  scale = value.get("scale", default_scale)
  if scale not in SCALES:
    raise ValueError(f"{where}: scale must be one of {', '.join(SCALES)}, got {scale!r}.")
  if (scale == "int") != (name in _INT_FIELDS):
    want = "int" if name in _INT_FIELDS else "log or linear"
    raise ValueError(f"{where}: {name} takes scale {want}, got {scale!r}.")
  low, high = value.get("low"), value.get("high")
  if not _number(low) or not _number(high):
    raise ValueError(f"{where} needs finite numbers low and high, got {low!r} and {high!r}.")
  if scale == "int" and (low != int(low) or high != int(high)):
    raise ValueError(f"{where}: an int range needs whole numbers, got {low} and {high}.")
  if not low < high:
    raise ValueError(f"{where}: low {low} must be below high {high} (to fix the value instead, "
                     f"remove it from the space and pass {_flag(name)} {low}).")
  if scale == "log" and low <= 0:
    raise ValueError(f"{where}: a log scale needs low > 0, got {low}; raise low or use "
                     "scale linear.")
  return Knob(
      int(low) if scale == "int" else float(low),
      int(high) if scale == "int" else float(high), scale)


def _check_ends(name: str, knob: Knob, base: Config, source: str) -> None:
  """Every field is checked by an interval in `Config.validate`, so both ends passing means the
  whole range does."""
  for end in ("low", "high"):
    value = getattr(knob, end)
    try:
      dataclasses.replace(base, **{name: value}).validate()
    except ConfigError as error:
      raise ValueError(f"{source}: {name} {end} {value!r} is refused by the config: "
                       f"{_flag(error.field)} {error.detail} Give a range that {_flag(name)} "
                       "accepts.") from None


def load_space(path: PathLike | None, base: Config, *,
               fixed: Collection[str] = ()) -> dict[str, Knob]:
  """`parse_space` of a JSON file (None: the default space); ValueError naming the file."""
  if path is None:
    return parse_space({}, base, fixed=fixed, source="the default space")
  path = pathlib.Path(path)
  try:
    record = json.loads(path.read_text())
  except FileNotFoundError:
    raise ValueError(f"--space {path}: no such file.") from None
  except json.JSONDecodeError as error:
    raise ValueError(f"--space {path} is not valid JSON ({error}).") from None
  return parse_space(record, base, fixed=fixed, source=f"--space {path}")


def space_record(space: Mapping[str, Knob]) -> dict[str, dict[str, Any]]:
  return {name: knob.record() for name, knob in space.items()}


def check_base(base: Config) -> None:
  """ValueError unless `base` holds out a validation split, on which trials are compared."""
  if not base.validation_size:
    raise ValueError("--validation-size is 0: the trials are compared on the validation split, "
                     "so hold one out (e.g. --validation-size 1000, or 0.1 of the training set).")


def trial_config(base: Config, params: Mapping[str, Any]) -> Config:
  """The config a trial trains: `base` with the trial's values (validated)."""
  return dataclasses.replace(base, **params).validate()


# ------------------------------------------------------------------------- storage and study
def default_storage(workdir: PathLike) -> str:
  """`sqlite:///WORKDIR/tune.db` (absolute): no server, one machine, any number of workers."""
  return f"sqlite:///{(pathlib.Path(workdir) / 'tune.db').absolute()}"


def open_storage(url: str, *, must_exist: bool = False) -> optuna.storages.BaseStorage:
  """The study storage of `url`: an SQLAlchemy URL (`sqlite:///PATH`, `postgresql://...`,
  `mysql+pymysql://...`) or the path of an Optuna journal file (no `://`: `runs/tune.log`).

  SQLite waits up to a minute for a lock, so that several workers on one machine share a file.

  Raises:
    ValueError: the storage cannot be opened (the message names it), or with `must_exist` its
      file does not exist.
  """
  if "://" not in url:
    path = pathlib.Path(url)
    if must_exist and not path.is_file():
      raise ValueError(f"--storage {url}: no such journal file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))
  kwargs = {}
  if url.startswith("sqlite:///"):
    path = pathlib.Path(url[len("sqlite:///"):])
    if must_exist and not path.is_file():
      raise ValueError(f"--storage {url}: no such database file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}}
  error = None
  for attempt in range(5):  # workers that start together race to create the tables
    try:
      return RDBStorage(url, **kwargs)
    except ImportError as failure:  # the database's driver
      raise ValueError(
          f"--storage {url}: {failure}; install the database's Python driver.") from None
    except Exception as failure:  # SQLAlchemy's and alembic's many errors
      error = failure
      time.sleep(0.5 * (attempt + 1))
  raise ValueError(f"--storage {url}: cannot open it ({type(error).__name__}: "
                   f"{str(error).splitlines()[0] if str(error) else ''}).")


def _study_record(base: Config, space: Mapping[str, Knob]) -> dict[str, Any]:
  return {
      "base_config": config_record(base),
      "space": space_record(space),
      "objectives": OBJECTIVES
  }


def open_study(storage: optuna.storages.BaseStorage, name: str, *, base: Config,
               space: Mapping[str, Knob]) -> optuna.Study:
  """Creates the study `name`, or joins it when its record (base config and space) is this one.

  Raises:
    ValueError: the study exists with another base config, another space or other objectives
      (the first difference named), or was not made by this module.
  """
  record = _study_record(base, space)
  try:
    study = optuna.create_study(storage=storage, study_name=name, directions=_DIRECTIONS)
    study.set_user_attr(STUDY_RECORD, record)
    return study
  except optuna.exceptions.DuplicatedStudyError:
    study = optuna.load_study(study_name=name, storage=storage)
  found = _wait_for_record(study)
  old = config_from_record(found["base_config"])
  changed = sorted(k for k, v in config_record(old).items()
                   if v != record["base_config"].get(k) and k not in runs.RESUMABLE_CHANGES)
  if changed:
    k = changed[0]
    more = f" (and {len(changed) - 1} more fields)" if len(changed) > 1 else ""
    raise ValueError(f"study {name!r} was created with {k} = {getattr(old, k)!r}, this command has "
                     f"{getattr(base, k)!r}{more}. Repeat the study's preset and flags to add "
                     "trials to it, or choose another --study-name. Nothing was changed.")
  if found["space"] != record["space"]:
    diff = sorted(set(found["space"]) ^ set(record["space"])) or sorted(
        k for k in record["space"] if found["space"][k] != record["space"][k])
    raise ValueError(f"study {name!r} searches another space (first difference: {diff[0]}: "
                     f"{found['space'].get(diff[0])} there, {record['space'].get(diff[0])} here). "
                     "Pass the study's --space file, or choose another --study-name.")
  return study


def _wait_for_record(study: optuna.Study, seconds: float = 30.0) -> dict[str, Any]:
  """The study's record; a worker that just created the study writes it a moment later."""
  deadline = time.monotonic() + seconds
  while True:
    found = study.user_attrs.get(STUDY_RECORD)
    if isinstance(found, dict) and {"base_config", "space"} <= set(found):
      return found
    if time.monotonic() > deadline:
      raise ValueError(f"study {study.study_name!r} holds no gen_jax record (base config, space): "
                       "it was not made by experiments/tune.py; choose another --study-name.")
    time.sleep(0.5)


def load_study(storage: optuna.storages.BaseStorage,
               name: str) -> tuple[optuna.Study, Config, dict[str, Knob]]:
  """An existing study with its base config and space (for the report)."""
  try:
    study = optuna.load_study(study_name=name, storage=storage)
  except KeyError:
    names = optuna.get_all_study_names(storage)
    raise ValueError(f"the storage holds no study {name!r} (it holds: "
                     f"{', '.join(names) or 'none'}).") from None
  found = _wait_for_record(study, seconds=0.0)
  space = {k: Knob(v["low"], v["high"], v["scale"]) for k, v in found["space"].items()}
  return study, config_from_record(found["base_config"]), space


def make_sampler(seed: int,
                 slot_rank: int,
                 *,
                 startup_trials: int = 10) -> optuna.samplers.TPESampler:
  """Multi-objective TPE, seeded by the study's seed and the slot's rank (see the module doc)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    return optuna.samplers.TPESampler(n_startup_trials=startup_trials,
                                      multivariate=True,
                                      constant_liar=True,
                                      seed=(seed * 1_000_003 + slot_rank) % 2**32)


# ------------------------------------------------------------------------------------ pruning
@dataclasses.dataclass(frozen=True)
class Pruning:
  """When to prune: never in the first `warmup_epochs` epochs, and only once `min_trials`
  completed trials have figures at the epoch (`enabled` False: never)."""
  enabled: bool = True
  warmup_epochs: int = 0
  min_trials: int = 5


def prune_reason(point: Sequence[float], peers: Sequence[Sequence[float]], *, epoch: int,
                 pruning: Pruning) -> str | None:
  """Why a trial at validation figures `point` (clean, PGD) after `epoch` should stop, or None.

  `peers` are the completed trials' figures at the same epoch. The trial stops when it is below
  their median in both figures (see the module doc).

  >>> prune_reason((0.5, 0.1), [(0.9, 0.3), (0.8, 0.2), (0.4, 0.5)], epoch=2,
  ...              pruning=Pruning(min_trials=3))
  'epoch 2: clean 0.5000 < median 0.8000 and PGD 0.1000 < median 0.3000 of 3 completed trials'
  >>> prune_reason((0.95, 0.1), [(0.9, 0.3), (0.8, 0.2), (0.4, 0.5)], epoch=2,
  ...              pruning=Pruning(min_trials=3)) is None
  True
  """
  if not pruning.enabled or epoch <= pruning.warmup_epochs or len(peers) < pruning.min_trials:
    return None
  clean = statistics.median(p[0] for p in peers)
  robust = statistics.median(p[1] for p in peers)
  if point[0] < clean and point[1] < robust:
    return (f"epoch {epoch}: clean {point[0]:.4f} < median {clean:.4f} and PGD {point[1]:.4f} < "
            f"median {robust:.4f} of {len(peers)} completed trials")
  return None


def _figures(trial: FrozenTrial) -> dict[int, tuple[float, float]]:
  """The validation figures a trial reported, by epoch."""
  found = trial.user_attrs.get("validation") or {}
  return {int(e): (float(v[0]), float(v[1])) for e, v in found.items()}


def _history(run_dir: pathlib.Path) -> dict[int, tuple[float, float]]:
  """The global model's validation figures per epoch in a run directory (empty for a new one)."""
  history = {}
  for record in runs.read_metrics(run_dir, torn_tail=True):
    val = (record.get("validation") or {}).get("global")
    if val is not None:
      history[int(record["epoch"])] = (float(val["clean_acc"]), float(val["pgd_acc"]))
  return history


# ------------------------------------------------------------------- trials: slots and recovery
def slot_of(trial: FrozenTrial) -> int:
  """The number of the trial whose run directory `trial` trains (its own, or its original's)."""
  return int(trial.user_attrs.get("slot", trial.number))


def _fresh(trial: FrozenTrial) -> bool:
  return "retry_of" not in trial.user_attrs


def _given_up(trial: FrozenTrial) -> bool:
  return trial.user_attrs.get("ended") in _GIVEN_UP


def _slots(trials: Sequence[FrozenTrial]) -> set[int]:
  return {slot_of(t) for t in trials if not _given_up(t)}


def run_dir_of(workdir: PathLike, slot: int) -> pathlib.Path:
  return pathlib.Path(workdir) / TRIALS_DIR / str(slot)


def _trial_id(storage, study: optuna.Study, number: int) -> int:
  return storage.get_trial_id_from_study_id_trial_number(
      storage.get_study_id_from_name(study.study_name), number)


def _requeue(study: optuna.Study, trial: FrozenTrial, slot: int) -> None:
  """Queues a retry of `trial`: the same parameters, the same run directory."""
  study.enqueue_trial(dict(trial.params),
                      user_attrs={
                          "slot": slot,
                          "retry_of": trial.number,
                          "run_dir": f"{TRIALS_DIR}/{slot}"
                      })


def orphan_reason(trial: FrozenTrial, *, grace: float, now: float | None = None) -> str | None:
  """Why a RUNNING trial has no worker any more, or None while it may still have one.

  A worker of this host is asked directly; one of another host counts as gone once its last
  heartbeat (or, before the first, the trial's start) is older than `grace` seconds.
  """
  worker = trial.user_attrs.get("worker")
  if runlock.process_ended(worker):
    return f"its worker (process {worker['pid']} on this host) has ended"
  if isinstance(worker, dict) and worker.get("host") == socket.gethostname():
    return None  # alive here: a late heartbeat (a busy storage) is no reason to take it over
  now = time.time() if now is None else now
  alive = trial.user_attrs.get("alive_at")
  if alive is None and trial.datetime_start is not None:
    alive = trial.datetime_start.timestamp()
  if alive is not None and now - float(alive) > grace:
    return f"no heartbeat for {now - float(alive):.0f} s (more than {grace:.0f} s)"
  return None


def recover(study: optuna.Study,
            storage: optuna.storages.BaseStorage,
            *,
            grace: float,
            log: Callable[[str], None] = print) -> list[int]:
  """Fails the RUNNING trials whose worker is gone and queues a retry of each (same parameters,
  same directory: it resumes from the run's checkpoint); returns their numbers.

  A slot that holds another live trial (a retry queued already) gets no second retry. When two
  workers recover at once, the one whose state change the storage takes queues the retry.
  """
  recovered = []
  trials = study.get_trials(deepcopy=False)
  for trial in trials:
    if trial.state != TrialState.RUNNING:
      continue
    reason = orphan_reason(trial, grace=grace)
    if reason is None:
      continue
    try:
      trial_id = _trial_id(storage, study, trial.number)
      storage.set_trial_user_attr(trial_id, "ended", f"interrupted: {reason}")
      storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, optuna.exceptions.StorageInternalError):
      continue  # another worker took it first
    slot = slot_of(trial)
    others = [
        t for t in trials if t.number != trial.number and slot_of(t) == slot and t.state in _LIVE
    ]
    if not others:
      _requeue(study, trial, slot)
    recovered.append(trial.number)
    log(f"trial {trial.number} was running, but {reason}: "
        f"{'queued a retry in' if not others else 'a retry exists for'} {TRIALS_DIR}/{slot}.")
  return recovered


@contextlib.contextmanager
def _heartbeat(trial: optuna.Trial, interval: float):
  """Writes `alive_at` (the time) on the trial every `interval` seconds while the block runs."""
  stop = threading.Event()
  trial.set_user_attr("alive_at", time.time())

  def beat():
    warned = False
    while not stop.wait(interval):
      try:
        trial.set_user_attr("alive_at", time.time())
      except Exception as error:  # a storage hiccup must not stop the training
        if not warned:
          print(
              f"warning: trial {trial.number}: cannot write its heartbeat ({error}); another "
              "worker may take it for orphaned.",
              file=sys.stderr)
          warned = True

  thread = threading.Thread(target=beat, name=f"tune-heartbeat-{trial.number}", daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()


# --------------------------------------------------------------------------------- the worker
def run_trials(study: optuna.Study,
               storage: optuna.storages.BaseStorage,
               *,
               base: Config,
               space: Mapping[str, Knob],
               workdir: PathLike,
               trials: int,
               pruning: Pruning = Pruning(),
               sampler_seed: int = 0,
               startup_trials: int = 10,
               heartbeat: float = 60.0,
               progress: bool = True,
               log: Callable[[str], None] = print) -> dict[str, int]:
  """Runs trials of `study` until its `trials` slots are taken; returns what this worker did.

  Before each trial the worker recovers orphaned trials (`recover`); it then takes a queued retry
  or samples a new trial, trains it in `WORKDIR/trials/<slot>` and tells the study its final
  validation figures (COMPLETE), that it was pruned (PRUNED), or that it diverged (FAIL, a
  finished slot: those parameters do not train). Any other error or a stop (SIGTERM, Ctrl-C)
  queues a retry of the trial and is raised.

  Returns:
    `{"complete", "pruned", "diverged", "resumed"}`: counts of this worker's trials.
  """
  workdir = pathlib.Path(workdir)
  done = {"complete": 0, "pruned": 0, "diverged": 0, "resumed": 0}
  while True:
    recover(study, storage, grace=3 * heartbeat, log=log)
    current = study.get_trials(deepcopy=False)
    waiting = any(t.state == TrialState.WAITING for t in current)
    taken = _slots(current)
    if len(taken) >= trials and not waiting:
      return done
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      trial = study.ask()
    outcome = _run_trial(study,
                         trial,
                         base=base,
                         space=space,
                         workdir=workdir,
                         trials=trials,
                         pruning=pruning,
                         sampler=functools.partial(make_sampler,
                                                   sampler_seed,
                                                   startup_trials=startup_trials),
                         heartbeat=heartbeat,
                         progress=progress,
                         log=log)
    if outcome == "surplus":
      return done
    if outcome in done:
      done[outcome] += 1


def _holds_slot(trial: FrozenTrial) -> bool:
  """Whether a trial finished its slot or is a retry queued or running for it. The original of
  a retry does not count while RUNNING: its stopped worker queues the retry before it marks the
  original failed."""
  if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
    return True
  return trial.state in (TrialState.WAITING, TrialState.RUNNING) and not _fresh(trial)


def _give_up(study: optuna.Study, trial: optuna.Trial, why: str) -> None:
  trial.set_user_attr("ended", why)
  study.tell(trial, state=TrialState.FAIL)


def _run_trial(study: optuna.Study, trial: optuna.Trial, *, base: Config, space: Mapping[str, Knob],
               workdir: pathlib.Path, trials: int, pruning: Pruning,
               sampler: Callable[[int], optuna.samplers.BaseSampler], heartbeat: float,
               progress: bool, log: Callable[[str], None]) -> str:
  """One trial from `study.ask()` to `study.tell`; returns its outcome.

  `sampler(rank)` is the sampler of the slot of that rank among the study's fresh trials (Optuna
  samples at `suggest`, after the rank is known: concurrent workers never share a seed).
  """
  attrs = trial.user_attrs
  everyone = study.get_trials(deepcopy=False)
  if "retry_of" not in attrs:
    # The study's slots are its first `trials` fresh trials by number (numbers are unique, so
    # every worker agrees); one beyond them came from two workers asking at once.
    rank = sum(1 for t in everyone if _fresh(t) and not _given_up(t) and t.number < trial.number)
    if rank >= trials:
      _give_up(study, trial, "surplus")
      return "surplus"
    slot = trial.number
    study.sampler = sampler(rank)
  else:
    slot = int(attrs["slot"])
    if any(t.number < trial.number and slot_of(t) == slot and _holds_slot(t) for t in everyone):
      _give_up(study, trial, "duplicate")  # another retry of the slot came first
      return "duplicate"
  params = {name: knob.suggest(trial, name) for name, knob in space.items()}
  run_dir = run_dir_of(workdir, slot)
  trial.set_user_attr("slot", slot)
  trial.set_user_attr("run_dir", f"{TRIALS_DIR}/{slot}")
  trial.set_user_attr("worker", runlock.this_process())
  shown = ", ".join(f"{k}={v:.4g}" for k, v in params.items())
  again = f", resuming trial {attrs['retry_of']}" if "retry_of" in attrs else ""
  log(f"trial {trial.number}{again}: {shown} -> {run_dir}")
  try:
    with _heartbeat(trial, heartbeat):  # stopped before the trial's state changes below
      values = _train(study, trial, trial_config(base, params), run_dir, pruning, progress)
  except optuna.TrialPruned as pruned:
    study.tell(trial, state=TrialState.PRUNED)
    log(f"trial {trial.number} pruned: {pruned}")
    return "pruned"
  except FloatingPointError as error:
    _give_up(study, trial, f"diverged: {error}")
    log(f"trial {trial.number} diverged (FAIL): {error}")
    return "diverged"
  except BaseException:
    # Stopped (SIGTERM, Ctrl-C) or an error outside the parameters' control: the slot is not
    # lost. The retry is queued before this trial fails, so a kill in between leaves an orphan
    # whose slot already holds its retry.
    with contextlib.suppress(Exception):
      _requeue(study, trial, slot)
      _give_up(study, trial, "interrupted: stopped or failed; a retry is queued")
    raise
  study.tell(trial, values)
  log(f"trial {trial.number} complete: validation clean {values[0]:.4f}, PGD {values[1]:.4f}")
  return "resumed" if "retry_of" in attrs else "complete"


def _train(study: optuna.Study, trial: optuna.Trial, config: Config, run_dir: pathlib.Path,
           pruning: Pruning, progress: bool) -> list[float]:
  """Trains (or resumes, or reads) the trial's run; returns its last validation figures."""
  history = _history(run_dir)

  def publish_and_check(epoch: int) -> None:
    trial.set_user_attr("validation", {str(e): list(v) for e, v in sorted(history.items())})
    if epoch >= config.epochs:
      return  # the last epoch's figures are the trial's result
    peers = [
        f[epoch]
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if epoch in (f := _figures(t))
    ]
    reason = prune_reason(history[epoch], peers, epoch=epoch, pruning=pruning)
    if reason is not None:
      raise optuna.TrialPruned(reason)

  if history:  # figures of epochs trained before a kill; the run may already say stop
    publish_and_check(max(history))

  def on_epoch(epoch: int, record: dict[str, Any]) -> None:
    val = (record.get("validation") or {}).get("global")
    if val is not None:
      history[epoch] = (float(val["clean_acc"]), float(val["pgd_acc"]))
      publish_and_check(epoch)

  summary = training.train_and_evaluate(config, run_dir, progress=progress, on_epoch=on_epoch)
  history.update(_history(run_dir))
  if config.epochs not in history:
    raise ValueError(f"{run_dir} finished without validation figures of its last epoch; its "
                     "config holds out no validation split.")
  trial.set_user_attr("validation", {str(e): list(v) for e, v in sorted(history.items())})
  final = summary["models"]["global"]
  trial.set_user_attr("test", {"clean": final["clean_acc"], "robust": final["pgd_acc"]})
  trial.set_user_attr("train_seconds", summary.get("train_seconds"))
  return list(history[config.epochs])


# --------------------------------------------------------------------------------- the report
def _trial_record(trial: FrozenTrial) -> dict[str, Any]:
  figures = _figures(trial)
  end = trial.datetime_complete
  record = {
      "number": trial.number,
      "slot": slot_of(trial),
      "state": trial.state.name,
      "params": dict(trial.params),
      "values": dict(zip(OBJECTIVES, trial.values)) if trial.values else None,
      "validation": {
          str(e): dict(zip(OBJECTIVES, v)) for e, v in sorted(figures.items())
      },
      "test": trial.user_attrs.get("test"),
      "run_dir": trial.user_attrs.get("run_dir", f"{TRIALS_DIR}/{slot_of(trial)}"),
      "started": trial.datetime_start.isoformat() if trial.datetime_start else None,
      "completed": end.isoformat() if end else None,
      "seconds": (
          (end - trial.datetime_start).total_seconds() if end and trial.datetime_start else None),
      "train_seconds": trial.user_attrs.get("train_seconds"),
  }
  for key in ("retry_of", "ended"):
    if key in trial.user_attrs:
      record[key] = trial.user_attrs[key]
  return record


def select_trial(points: Sequence[Mapping[str, Any]], rule: sweep.Rule) -> Mapping[str, Any]:
  """The trial that maximises the other figure among those meeting `rule` (as the sweep's
  `select_point`); ties go to the higher constrained figure, then the lower trial number.

  Raises:
    ValueError: no trial meets the rule (the message gives the best one reached).
  """
  other = "robust" if rule.metric == "clean" else "clean"
  feasible = [p for p in points if rule.met_by(p[rule.metric])]
  if not feasible:
    if not points:
      raise ValueError("no trial has completed yet.")
    best = max(points, key=lambda p: p[rule.metric])
    raise ValueError(f"no trial reaches {rule.metric} {rule.op} {rule.threshold:.4f}: the best is "
                     f"{best[rule.metric]:.4f} (trial {best['trial']}). Lower the target.")
  return max(feasible, key=lambda p: (p[other], p[rule.metric], -p["trial"]))


_COMPARABLE = ("dataset", "data_dir", "image_size", "max_train_per_class", "validation_size",
               "seed", "model", "norm", "eps", "eval_pgd_steps", "eval_step_size")


def find_baselines(workdir: PathLike,
                   base: Config) -> tuple[dict[str, dict[str, float]], list[str]]:
  """The chord's ends: the finished `natural` and `pgd_at` runs in `WORKDIR/natural` and
  `WORKDIR/pgd_at`, by the global model's validation figures at their last epoch (the trials'
  own objectives). A run on other data, another validation split or another attack than the
  study's is left out. Returns `({method: {"clean", "robust"}}, notes on what was left out)`.
  """
  found, notes = {}, []
  for method in BASELINES:
    path = pathlib.Path(workdir) / method
    if not (path / runs.CONFIG_FILE).is_file():
      continue
    config = runs.read_config(path)
    differs = [k for k in _COMPARABLE if getattr(config, k) != getattr(base, k)]
    history = _history(path)
    if config.method != method:
      notes.append(f"{path} holds a {config.method} run, not {method}: left out.")
    elif differs:
      notes.append(f"{path} differs from the study in {differs[0]} ({getattr(config, differs[0])!r}"
                   f" vs {getattr(base, differs[0])!r}): its figures are not comparable; left out.")
    elif runs.read_summary(path) is None or config.epochs not in history:
      notes.append(f"{path} has not finished (or has no validation figures): left out.")
    else:
      found[method] = dict(zip(OBJECTIVES, history[config.epochs]))
  return found, notes


def collect(study: optuna.Study, workdir: PathLike, *, base: Config,
            space: Mapping[str, Knob]) -> dict[str, Any]:
  """The study as `tune.json` holds it: every trial, the counts, the Pareto front (by the last
  epoch's validation figures, one trial per slot) and the baselines found."""
  trials = [_trial_record(t) for t in study.get_trials(deepcopy=False)]
  complete = {}
  for t in trials:
    if t["state"] == "COMPLETE" and t["slot"] not in complete:
      complete[t["slot"]] = t
  points = [{"trial": t["number"], "slot": t["slot"], **t["values"]} for t in complete.values()]
  front = [points[i] for i in sweep.pareto_front([(p["clean"], p["robust"]) for p in points])]
  baselines, notes = find_baselines(workdir, base)
  if set(baselines) == set(BASELINES):
    for p in front:
      score = chord_score({
          "generalist": p["clean"],
          **{
              k: v["clean"] for k, v in baselines.items()
          }
      }, {
          "generalist": p["robust"],
          **{
              k: v["robust"] for k, v in baselines.items()
          }
      })
      p["chord"] = None if math.isnan(score) else score  # NaN: the baselines coincide
  states = [t["state"] for t in trials]
  return {
      "study": study.study_name,
      "objectives": {
          "clean": "validation clean accuracy of the global model, last epoch",
          "robust": f"validation PGD-{base.eval_pgd_steps} accuracy of the global model, last "
                    "epoch"
      },
      "base_config": config_record(base),
      "space": space_record(space),
      "counts": {
          "slots": len(_slots(study.get_trials(deepcopy=False))),
          **{
              s.name.lower(): states.count(s.name) for s in TrialState
          }
      },
      "trials": trials,
      "points": points,
      "front": front,
      "baselines": baselines,
      "baseline_notes": notes,
  }


def save_front(result: dict[str, Any], workdir: PathLike, extra: Sequence[Mapping[str, Any]] = ()):
  """Saves each front trial's final global model as `WORKDIR/front/trial-<slot>` (a model of
  `runs.save_model`: `evaluate.py --checkpoint` and `export.py --checkpoint` read it) and records
  its path in the front entry. A model saved by an earlier report is kept."""
  by_slot = {t["slot"]: t for t in result["trials"] if t["state"] == "COMPLETE"}
  for point in [*result["front"], *extra]:
    target = pathlib.Path(workdir) / FRONT_DIR / f"trial-{point['slot']}"
    if not (target / runs.MODEL_RECORD).is_file():
      run_dir = pathlib.Path(workdir) / by_slot[point["slot"]]["run_dir"]
      config = runs.read_config(run_dir)
      restored = checkpoint.restore_items(run_dir / runs.CHECKPOINT_DIR, [runs.GLOBAL_MODEL_KEY])
      if restored is None or restored[1].get("epoch") != config.epochs:
        raise ValueError(f"{run_dir} holds no checkpoint of its last epoch; rerun the study's "
                         "command to finish it.")
      runs.save_model(target,
                      restored[0][runs.GLOBAL_MODEL_KEY],
                      config,
                      source=str(run_dir.absolute()),
                      study=result["study"],
                      trial=point["trial"],
                      params=by_slot[point["slot"]]["params"],
                      validation={k: point[k] for k in OBJECTIVES})
    point["model"] = str(target)


def to_markdown(result: Mapping[str, Any]) -> str:
  """The Pareto front (and the baselines, the selection) as markdown, in percent."""
  counts = result["counts"]
  names = list(result["space"])
  chord = any("chord" in p for p in result["front"])
  lines = [
      f"Study {result['study']}: {counts['slots']} trial slots; {counts['complete']} complete, "
      f"{counts['pruned']} pruned, {counts['fail']} failed (retried, diverged or given up), "
      f"{counts['running']} running, {counts['waiting']} waiting. Objectives: "
      f"{result['objectives']['clean']}; {result['objectives']['robust']}.", "",
      "| trial | run | clean (%) | PGD (%) |" + (" chord |" if chord else "") +
      "".join(f" {n} |" for n in names) + " model |",
      "|---|---|---|---|" + ("---|" if chord else "") + "---|" * len(names) + "---|"
  ]
  params = {t["number"]: t["params"] for t in result["trials"]}
  for p in result["front"]:
    values = "".join(f" {params[p['trial']].get(n, float('nan')):.4g} |" for n in names)
    lines.append(f"| {p['trial']} | {TRIALS_DIR}/{p['slot']} | {100 * p['clean']:.2f} | "
                 f"{100 * p['robust']:.2f} |" +
                 (f" {_number_text(p['chord'])} |" if chord else "") + values +
                 f" {p.get('model', '')} |")
  lines.append("")
  for method, f in result["baselines"].items():
    lines.append(f"Baseline {method}: clean {100 * f['clean']:.2f} %, PGD "
                 f"{100 * f['robust']:.2f} % (validation, last epoch).")
  lines.extend(result["baseline_notes"])
  if "selected" in result:
    s = result["selected"]
    lines.append(f"Selected ({s['rule']}): trial {s['trial']}, clean {100 * s['clean']:.2f} %, "
                 f"PGD {100 * s['robust']:.2f} %: {s['model']}.")
  return "\n".join(lines).rstrip() + "\n"


def _number_text(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def plot_front(result: Mapping[str, Any], path: PathLike, *, base: Config) -> pathlib.Path:
  """Every completed trial, the last figures of the pruned ones, the Pareto front and the chord
  of the baselines, in the style of the sweep's `tradeoff.png`; saves a PNG."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  pct = lambda v: 100.0 * v
  fig = Figure(figsize=(6.4, 4.8), layout="constrained")
  ax = fig.subplots()
  points = result["points"]
  ax.scatter([pct(p["clean"]) for p in points], [pct(p["robust"]) for p in points],
             color="tab:blue",
             label="trial (last epoch)",
             zorder=2)
  labels = {}  # coinciding trials share one label "0, 1, 2"
  for p in points:
    labels.setdefault((pct(p["clean"]), pct(p["robust"])), []).append(str(p["trial"]))
  for xy, numbers in labels.items():
    ax.annotate(", ".join(numbers),
                xy,
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color="tab:blue")
  pruned = [t for t in result["trials"] if t["state"] == "PRUNED" and t["validation"]]
  if pruned:
    last = [t["validation"][max(t["validation"], key=int)] for t in pruned]
    ax.scatter([pct(v["clean"]) for v in last], [pct(v["robust"]) for v in last],
               marker="x",
               color="gray",
               label="pruned (last validation)",
               zorder=2)
  sweep.draw_front(ax, [(pct(p["clean"]), pct(p["robust"])) for p in result["front"]])
  baselines = result["baselines"]
  if set(baselines) == set(BASELINES):
    ends = [baselines["natural"], baselines["pgd_at"]]
    ax.plot([pct(f["clean"]) for f in ends], [pct(f["robust"]) for f in ends],
            ":",
            color="gray",
            label="chord: natural to PGD-AT",
            zorder=1)
  markers = {"natural": ("s", 80, "tab:green"), "pgd_at": ("^", 90, "tab:orange")}
  for method, f in baselines.items():
    marker, size, color = markers[method]
    ax.scatter([pct(f["clean"])], [pct(f["robust"])],
               marker=marker,
               s=size,
               color=color,
               label=f"{method} baseline",
               zorder=4)
  eps = f"{255 * base.eps:.1f}/255" if base.norm == "linf" else f"{base.eps:g} ({base.norm})"
  ax.set_xlabel("validation clean accuracy (%)")
  ax.set_ylabel(f"validation PGD-{base.eval_pgd_steps} accuracy (%), eps = {eps}")
  ax.set_title(f"Study {result['study']} ({len(points)} completed trials)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  return outputs.save_figure(fig, path)


def report(study: optuna.Study,
           workdir: PathLike,
           *,
           base: Config,
           space: Mapping[str, Knob],
           select: sweep.Rule | None = None) -> dict[str, Any]:
  """Writes `WORKDIR/tune.json`, `tune.md` and `tune.png` and saves the front's models.

  With `select`, the chosen trial is recorded under `result["selected"]` (its model saved too);
  a rule no trial meets is recorded under `result["selection_error"]` and the files are still
  written. Earlier report files are kept (`tune.1.json`, ...).
  """
  workdir = pathlib.Path(workdir)
  result = collect(study, workdir, base=base, space=space)
  extra = []
  if select is not None:
    try:
      choice = dict(select_trial(result["points"], select))
      extra = [choice]
    except ValueError as error:
      result["selection_error"] = str(error)
  save_front(result, workdir, extra)
  if extra:
    result["selected"] = {**extra[0], "rule": str(select)}
  outputs.write_json(workdir / "tune.json", result)
  outputs.write_text(workdir / "tune.md", to_markdown(result))
  plot_front(result, workdir / "tune.png", base=base)
  return result
