"""Reliability of training runs: crash consistency, fallback, lock, signals, numerics.

The end-to-end tests train the `tiny` preset (5 steps per epoch, 2 epochs). A kill is simulated
in-process by an exception that nothing in the library catches (`_Killed`), raised right after
a chosen write of the run directory; real SIGKILLs at random moments are the business of
`experiments/soak.py`, real SIGTERM / SIGINT are sent to `experiments/train.py` below. A
persistent compilation cache (the test session's) keeps each resumed run at seconds (every rerun
would otherwise recompile the same step: about 15 s each on 2 CPU cores).
"""
import dataclasses
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gen_jax import checkpoint, cli, runlock, runs, training
from gen_jax import config as cfg
from gen_jax.training import loop
from gen_jax.training import steps as steps_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = cfg.get_config("tiny")
# Mid-epoch checkpoints (steps 2, 4 | 7, 9): the reference below has them, the resumed runs
# compare against it, and `checkpoint_every` must not change what a run computes.
CHUNKED = dataclasses.replace(TINY, checkpoint_every=2)


@pytest.fixture(scope="module")
def compile_cache():
  """The test session's persistent compilation cache (tests/conftest.py sets it), which this
  module's runs and the programs it starts share with the rest of the suite."""
  return pathlib.Path(jax.config.jax_compilation_cache_dir)


def _steps(directory):
  manager = checkpoint.open_manager(directory)
  try:
    return checkpoint.steps(manager)
  finally:
    manager.close()


def _train(config, workdir, **kwargs):
  return training.train_and_evaluate(config, workdir, progress=False, **kwargs)


@pytest.fixture(scope="module")
def reference(compile_cache, tmp_path_factory):
  """An uninterrupted CHUNKED run, the result every interrupted run must reproduce bit for bit,
  and the sequence of its writes (the boundaries where a kill can fall)."""
  workdir = tmp_path_factory.mktemp("reference")
  with pytest.MonkeyPatch.context() as patch:
    hooks = _WriteHooks(patch)
    _train(CHUNKED, workdir)
  return workdir, hooks.seen


# ------------------------------------------------------------------------------- comparing
def _summary(workdir):
  summary = runs.read_summary(workdir)
  return {k: v for k, v in summary.items() if k not in ("seconds", "train_seconds", "config")}


def _metrics(workdir):
  lines = (workdir / runs.METRICS_FILE).read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if k != "train_seconds"} for l in lines]


def _arrays(directory):
  """The newest step of an orbax directory of the run, as host arrays by path."""
  items, meta = checkpoint.restore_items(directory, lambda keys: list(keys))
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(items))
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}, meta


def _assert_same_run(workdir, reference_dir):
  """Summary, metrics (but times), final checkpoint and best model equal, bit for bit."""
  assert _summary(workdir) == _summary(reference_dir)
  assert _metrics(workdir) == _metrics(reference_dir)
  for name in (runs.CHECKPOINT_DIR, runs.BEST_DIR):
    ours, our_meta = _arrays(workdir / name)
    theirs, their_meta = _arrays(reference_dir / name)
    assert ours.keys() == theirs.keys()
    for key in ours:
      assert ours[key].dtype == theirs[key].dtype and ours[key].tobytes() == theirs[key].tobytes(
      ), (name, key)
    assert (our_meta.get("best", our_meta) == their_meta.get("best", their_meta)), name
  assert sorted(os.listdir(workdir / runs.BEST_DIR)) == sorted(
      os.listdir(reference_dir / runs.BEST_DIR))
  assert not (workdir / runlock.LOCK_FILE).exists()


# --------------------------------------------------------------- kills at every write boundary
class _Killed(BaseException):
  """A simulated kill: no `except Exception` in the library or orbax can swallow it."""


class _WriteHooks:
  """Wraps every write of the run directory; records each write (a boundary) and raises
  `_Killed` right after the writes listed in `pending` (once each).

  A boundary `("torn", epoch)` kills in the middle of appending that epoch's metrics line.
  """

  def __init__(self, monkeypatch, pending=()):
    self.seen: list[tuple] = []
    self.pending = set(pending)
    real_save, real_delete = checkpoint.save, checkpoint.delete_steps
    real_append, real_summary = runs.append_metrics, runs.write_summary
    real_config = runs.write_config

    def save(manager, step, state, meta):
      real_save(manager, step, state, meta)
      self._after((pathlib.Path(str(manager.directory)).name, step))

    def delete_steps(manager, keep=()):
      deleted = real_delete(manager, keep)
      if deleted:
        self._after(("delete", pathlib.Path(str(manager.directory)).name, tuple(deleted)))
      return deleted

    def append_metrics(workdir, record):
      torn = ("torn", record["epoch"])
      self.seen.append(torn)
      if torn in self.pending:
        self.pending.discard(torn)
        with open(pathlib.Path(workdir) / runs.METRICS_FILE, "a") as f:
          f.write(json.dumps(record)[:40])
        raise _Killed(torn)
      real_append(workdir, record)
      self._after(("metrics", record["epoch"]))

    def write_summary(workdir, summary):
      real_summary(workdir, summary)
      self._after(("summary",))

    def write_config(config, workdir):
      fresh = not (pathlib.Path(workdir) / runs.CONFIG_FILE).exists()
      real_config(config, workdir)
      if fresh:
        self._after(("config",))

    monkeypatch.setattr(checkpoint, "save", save)
    monkeypatch.setattr(checkpoint, "delete_steps", delete_steps)
    monkeypatch.setattr(runs, "append_metrics", append_metrics)
    monkeypatch.setattr(runs, "write_summary", write_summary)
    monkeypatch.setattr(runs, "write_config", write_config)

  def _after(self, boundary):
    self.seen.append(boundary)
    if boundary in self.pending:
      self.pending.discard(boundary)
      raise _Killed(boundary)


# A kill at a commit point makes the rerun restore, not repeat, the writes after it (the cleanup
# of best/ and the metrics line): those boundaries are killed in chains of their own.
_CHAINS = {
    "commits": ("config", "checkpoints", "best", "summary"),
    "after-commit": ("delete", "metrics"),
    "torn-metrics-line": ("torn",),
}


@pytest.mark.parametrize("chain", list(_CHAINS))
def test_a_kill_at_every_write_boundary_resumes_to_the_uninterrupted_result(
    chain, reference, tmp_path, monkeypatch, capsys):
  reference_dir, boundaries = reference
  # Every kind of write happens: mid-epoch and epoch-end checkpoints, a best model, metrics.
  assert {("config",), ("checkpoints", 2), ("checkpoints", 5), ("best", 1), ("metrics", 1),
          ("torn", 2), ("summary",)} <= set(boundaries), boundaries
  kills = [b for b in boundaries if b[0] in _CHAINS[chain]]
  hooks = _WriteHooks(monkeypatch, pending=kills)
  workdir = tmp_path / "run"
  attempts = 0
  while True:
    attempts += 1
    assert attempts <= len(kills) + 1
    try:
      _train(CHUNKED, workdir)
      break
    except _Killed:
      assert not (workdir / runlock.LOCK_FILE).exists()
  assert not hooks.pending, f"boundaries never reached: {hooks.pending}"
  assert attempts == len(kills) + 1
  _assert_same_run(workdir, reference_dir)
  out = capsys.readouterr().out
  if chain == "commits":
    assert "no checkpoint committed them" in out  # killed between best model and checkpoint
    assert "Restored the last line(s) of" in out  # killed between checkpoint and metrics line
  if chain == "torn-metrics-line":  # the half-written line is completed from the checkpoint
    assert "Restored the last line(s) of" in out
  assert not [p for p in (workdir / runs.CHECKPOINT_DIR).iterdir() if not p.name.isdigit()]


# --------------------------------------------------------------- damaged latest checkpoint
def _damage(step_dir: pathlib.Path, kind: str) -> None:
  if kind == "garbage state":
    for f in (step_dir / "state").rglob("*"):
      if f.is_file() and f.stat().st_size > 100:
        f.write_bytes(b"garbage" * 10)
  elif kind == "truncated state":
    for f in (step_dir / "state").rglob("*"):
      if f.is_file():
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  elif kind == "no state":
    shutil.rmtree(step_dir / "state")
  elif kind == "empty meta":
    (step_dir / "meta" / "metadata").write_text("{}")
  elif kind == "garbage meta":
    (step_dir / "meta" / "metadata").write_text("{not json")
  elif kind == "no meta":
    shutil.rmtree(step_dir / "meta")
  elif kind == "list meta":
    (step_dir / "meta" / "metadata").write_text("[1, 2]")
  elif kind == "wrong step meta":
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    (step_dir / "meta" / "metadata").write_text(json.dumps({**meta, "epoch": meta["epoch"] + 1}))
  elif kind in ("flipped array bytes", "no array data"):
    for f in (step_dir / "state").rglob("*"):
      if f.is_file() and f.parent.name == "d":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data)) if kind == "flipped array bytes" else f.unlink()
  elif kind == "emptied":
    for f in list(step_dir.iterdir()):
      shutil.rmtree(f) if f.is_dir() else f.unlink()
  else:
    raise AssertionError(kind)


DAMAGE = ("garbage state", "truncated state", "no state", "empty meta", "garbage meta", "no meta",
          "list meta", "wrong step meta", "flipped array bytes", "no array data", "emptied")


def test_restore_falls_back_past_every_kind_of_damage(tmp_path):
  abstract = {
      "w": jax.ShapeDtypeStruct((4,), jnp.float32),
      "step": jax.ShapeDtypeStruct((), jnp.int32)
  }

  def check(state, meta):
    if meta.get("epoch") != int(state["step"]):
      raise ValueError("its record disagrees with its state")

  for kind in DAMAGE:
    directory = tmp_path / kind.replace(" ", "-")
    manager = checkpoint.open_manager(directory, max_to_keep=2)
    for step in (1, 2):
      checkpoint.save(manager, step, {
          "w": jnp.full((4,), float(step)),
          "step": jnp.int32(step)
      }, {"epoch": step})
    manager.close()
    _damage(directory / "2", kind)
    manager = checkpoint.open_manager(directory, max_to_keep=2)
    found = checkpoint.restore_newest_intact(manager, abstract, check)
    assert found is not None and found.step == 1, kind
    assert np.all(np.asarray(found.state["w"]) == 1.0)
    assert [s for s, _ in found.damaged] == [2], kind  # reported, with why
    _damage(directory / "1", "garbage state")
    with pytest.raises(ValueError, match=r"cannot restore checkpoint step \d from .*use a new"):
      checkpoint.restore_newest_intact(manager, abstract, check)
    manager.close()


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, capsys):
  workdir = tmp_path / "run"
  assert _train(CHUNKED, workdir, max_epochs=1) == {"stopped_at_epoch": 1}
  steps = sorted(int(p.name) for p in (workdir / runs.CHECKPOINT_DIR).iterdir())
  assert steps == [4, 5]  # a mid-epoch checkpoint and the epoch end (keep_checkpoints 2)
  _damage(workdir / runs.CHECKPOINT_DIR / "5", "empty meta")  # a KeyError before 3ce6a47
  capsys.readouterr()
  _train(CHUNKED, workdir)
  out = capsys.readouterr().out
  assert "Checkpoint step 5 is damaged (its meta record has no epoch count" in out
  assert "resumed from step 4" in out
  assert (workdir / runs.CHECKPOINT_DIR / "5.damaged").is_dir()  # kept for inspection
  _assert_same_run(workdir, reference[0])


# ------------------------------------------------------------------------------- numerics
def test_a_diverging_run_stops_naming_the_model_and_writes_nothing(compile_cache, tmp_path):
  config = dataclasses.replace(TINY, lr_rob=1e6)
  with pytest.raises(FloatingPointError, match=r"at step \d+ .*the robust expert's .*--lr-rob"):
    _train(config, tmp_path)
  assert not (tmp_path / runs.SUMMARY_FILE).exists()
  assert not _steps(tmp_path / runs.BEST_DIR) and not _steps(tmp_path / runs.CHECKPOINT_DIR)
  assert not (tmp_path / runlock.LOCK_FILE).exists()


def test_a_nan_in_epoch_two_keeps_the_epoch_one_files(compile_cache, tmp_path, monkeypatch):
  real = steps_lib.make_train_step

  def poisoned(config, model, **kwargs):
    step_fn = real(config, model, **kwargs)

    def step(state, *args):
      state, totals = step_fn(state, *args)
      if int(state.step) >= 7:  # epoch 2, batch 2 (a logging step): the robust expert goes NaN
        robust = state.experts["robust"]
        variables = {**robust.variables}
        variables["params"] = jax.tree_util.tree_map(lambda x: x * jnp.nan, variables["params"])
        experts = {**state.experts, "robust": robust.replace(variables=variables)}
        state = state.replace(experts=experts)
      return state, totals

    return step

  monkeypatch.setattr(steps_lib, "make_train_step", poisoned)
  with pytest.raises(FloatingPointError,
                     match=r"at step 7 \(epoch 2, batch 2 of 5\): the robust expert's params/"
                     r".* holds NaN .*the last checkpoint \(step 5\)"):
    _train(TINY, tmp_path)
  assert _steps(tmp_path / runs.CHECKPOINT_DIR) == [5]
  assert _steps(tmp_path / runs.BEST_DIR) == [1]
  best, _ = _arrays(tmp_path / runs.BEST_DIR)
  assert all(np.isfinite(x).all() for x in best.values())
  assert not (tmp_path / runs.SUMMARY_FILE).exists()
  assert [r["epoch"] for r in _metrics(tmp_path)] == [1]


def test_health_check_flags_nan_inf_and_explosion_by_model_and_leaf():
  variables = lambda: {
      "params": {
          "conv": {
              "kernel": jnp.linspace(-0.5, 0.5, 12).reshape(3, 4)
          }
      },
      "batch_stats": {
          "bn1": {
              "mean": jnp.zeros(4),
              "var": jnp.ones(4)
          }
      }
  }
  expert = lambda: steps_lib.ExpertState(variables=variables(), opt_state=())
  state = steps_lib.GeneralistState(step=jnp.int32(0),
                                    experts={
                                        "natural": expert(),
                                        "robust": expert()
                                    },
                                    teachers={
                                        "natural": variables(),
                                        "robust": variables()
                                    },
                                    global_model=variables())
  bounds = steps_lib.divergence_bounds(state.global_model, 1e4)
  health = jax.jit(steps_lib.model_health)
  values = jax.device_get(health(state, bounds))
  assert set(values) == {
      "natural expert", "robust expert", "natural teacher", "robust teacher", "global model"
  }
  assert all(v["finite"] and v["excess"] < 1e-3 for v in values.values())
  grow = lambda variables, f: jax.tree_util.tree_map(f, variables)
  exploded = state.replace(teachers={
      **state.teachers, "natural": grow(state.teachers["natural"], lambda x: x * 1e5 + 4.7e7)
  })
  values = jax.device_get(health(exploded, bounds))
  assert values["natural teacher"]["finite"] and values["natural teacher"]["excess"] > 1
  assert values["global model"]["excess"] < 1e-3
  with pytest.raises(
      FloatingPointError,
      match=r"the natural teacher.s (params|batch_stats)/.* reached max \|x\| = 4.7e\+07, above "
      r"its divergence bound .*--divergence-factor 10000"):
    training.loop._check_health(health,
                                exploded,
                                bounds,
                                config=TINY,
                                where="step 3",
                                saved="nothing saved")
  inf = state.replace(global_model=grow(state.global_model, lambda x: x + jnp.inf))
  with pytest.raises(FloatingPointError, match=r"the global model's .* holds inf"):
    training.loop._check_health(health, inf, bounds, config=TINY, where="step 3", saved="-")
  assert not jax.device_get(health(inf, bounds))["global model"]["finite"]


def _float_fields():
  hints = typing.get_type_hints(cfg.Config)
  return [f.name for f in dataclasses.fields(cfg.Config) if "float" in str(hints[f.name])]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_validate_refuses_nan_and_inf_in_every_float_field(value):
  fields = _float_fields()
  assert len(fields) >= 20 and {"checkpoint_minutes", "divergence_factor", "lr_rob"} <= set(fields)
  hints = typing.get_type_hints(cfg.Config)
  for name in fields:
    if "tuple" in str(hints[name]):  # a NaN among a tuple field's entries
      bad = (value,) * (4 if name in ("lr_knots", "lr_factors") else len(TINY.experts))
    else:
      bad = value
    with pytest.raises(cfg.ConfigError) as error:
      dataclasses.replace(TINY, **{name: bad}).validate()
    assert error.value.field == name


# ----------------------------------------------------------------------------------- lock
def _lock_record(pid):
  return {
      "pid": pid,
      "host": socket.gethostname(),
      "start": runlock._process_start(pid),
      "since": "earlier"
  }


def test_a_second_process_on_a_locked_workdir_is_refused(tmp_path):
  holder = os.getppid()  # alive, and not this process
  (tmp_path / runlock.LOCK_FILE).write_text(json.dumps(_lock_record(holder)))
  with pytest.raises(RuntimeError, match=rf"in use by process {holder} .*delete .*\.lock"):
    _train(TINY, tmp_path)
  assert json.loads((tmp_path / runlock.LOCK_FILE).read_text())["pid"] == holder  # untouched
  assert not (tmp_path / runs.CONFIG_FILE).exists()


def test_a_stale_lock_is_replaced_and_released(tmp_path, capsys):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  (tmp_path / runlock.LOCK_FILE).write_text(json.dumps(_lock_record(gone.pid)))
  with runlock.lock(tmp_path):
    held = json.loads((tmp_path / runlock.LOCK_FILE).read_text())
    assert held["pid"] == os.getpid()
    with pytest.raises(RuntimeError, match=f"in use by process {os.getpid()}"):
      with runlock.lock(tmp_path):
        pass
  assert f"stale lock {tmp_path / runlock.LOCK_FILE} of process {gone.pid}" in capsys.readouterr(
  ).out
  assert not (tmp_path / runlock.LOCK_FILE).exists()
  # A live PID that a later process reuses (another start time) is stale too.
  (tmp_path / runlock.LOCK_FILE).write_text(json.dumps({
      **_lock_record(os.getppid()), "start": "1"
  }))
  with runlock.lock(tmp_path):
    pass


def test_a_workdir_with_a_file_for_a_directory_is_refused_before_any_work(tmp_path):
  (tmp_path / runs.CHECKPOINT_DIR).write_text("")
  (tmp_path / runs.METRICS_FILE).write_text('{"epoch": 1}\n')
  with pytest.raises(ValueError, match=r"checkpoints should be a directory"):
    _train(TINY, tmp_path)
  assert (tmp_path / runs.METRICS_FILE).read_text() == '{"epoch": 1}\n'


# -------------------------------------------------------------------------------- signals
def _train_process(workdir, cache, log, *flags):
  """experiments/train.py on the tiny preset, sharing this module's compilation cache (and its
  two CPU devices, so that the compiled programs are the same); stderr goes to `log`."""
  env = {
      **os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "JAX_NUM_CPU_DEVICES": "2"
  }
  return subprocess.Popen([
      sys.executable,
      str(ROOT / "experiments" / "train.py"), "--preset", "tiny", "--workdir",
      str(workdir), "--no-progress", *flags
  ],
                          stdout=subprocess.PIPE,
                          stderr=open(log, "w"),
                          text=True,
                          env=env)


def _signal_when(process, ready, signum, timeout=300):
  """Sends `signum` once `ready()` holds; returns (exit code, stdout)."""
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None and not ready():
    time.sleep(0.02)
  process.send_signal(signum)
  out, _ = process.communicate(timeout=timeout)
  return process.returncode, out


@pytest.mark.slow
def test_sigterm_and_sigint_save_and_exit_with_one_line_and_the_run_resumes_exactly(
    reference, compile_cache, tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "stderr.txt"
  # With a checkpoint at every step the first appears early, and SIGTERM then lands mid-epoch.
  checkpoints = workdir / runs.CHECKPOINT_DIR
  process = _train_process(workdir, compile_cache, log, "--checkpoint-every", "1")
  code, _ = _signal_when(
      process,
      lambda: checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()),
      signal.SIGTERM)
  err = log.read_text()
  assert code == 143, err
  last = err.strip().splitlines()[-1]
  assert last.startswith("stopped by SIGTERM at step ") and "saved checkpoint step" in last, err
  assert "Traceback" not in err
  stopped_at = int(last.split("saved checkpoint step ")[1].split()[0])
  assert 0 < stopped_at < 10 and stopped_at in _steps(checkpoints)

  # Ctrl-C once the run has resumed (mid-epoch, without mid-epoch checkpoints of its own).
  process = _train_process(workdir, compile_cache, log)
  resumed = []

  def ready():
    line = process.stdout.readline()
    resumed.append(line)
    return line.startswith("Resuming")

  code, _ = _signal_when(process, ready, signal.SIGINT)
  err = log.read_text()
  assert resumed[-1].startswith(f"Resuming {workdir} from step {stopped_at} "), resumed
  assert code == 130, err
  assert err.strip().splitlines()[-1].startswith("stopped by SIGINT"), err
  assert "Traceback" not in err

  process = _train_process(workdir, compile_cache, log)
  out, _ = process.communicate(timeout=300)
  assert process.returncode == 0, log.read_text()
  assert f"Resuming {workdir} from step" in out
  _assert_same_run(workdir, reference[0])


def test_a_signal_whose_exception_was_swallowed_still_stops_the_run():
  """Python runs a signal handler wherever the interpreter is; inside a callback whose
  exceptions it only prints (JAX's `_xla_gc_callback` during start-up) the handler's exception
  is lost, and such runs used to go on and even exit 0. The signal is recorded first, and the
  loop's next safe point stops the run."""
  stop = loop._StopSignals()  # pylint: disable=protected-access
  try:
    stop._handle(signal.SIGTERM, None)  # pylint: disable=protected-access
  except loop.TrainingInterrupted:
    pass  # printed and dropped, as Python does for an exception in a gc callback
  with pytest.raises(loop.TrainingInterrupted) as stopped:
    stop.check()
  assert stopped.value.exit_code == 143
  stop = loop._StopSignals()  # pylint: disable=protected-access
  stop.check()  # no signal: nothing happens


def test_sigterm_during_start_up_never_ends_in_success(compile_cache, tmp_path):
  """A SIGTERM sent at several moments of start-up (imports, data, compilation) ends the
  process with 143 (or the default action's -15 before the handler exists), never 0."""
  for delay in (1.5, 4.0):
    workdir, log = tmp_path / f"run-{delay}", tmp_path / f"stderr-{delay}.txt"
    process = _train_process(workdir, compile_cache, log)
    time.sleep(delay)
    if process.poll() is not None:  # finished before the signal: a machine faster than this test
      continue
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=300)
    assert process.returncode in (143, -signal.SIGTERM), log.read_text()


def test_a_run_checkpointed_in_the_earlier_state_layout_resumes_exactly(reference, tmp_path):
  """Runs of the first landings saved nat, rob, teacher_nat, teacher_rob and mix, with a meta
  record of {epoch, best} only; today's loop resumes them and finishes the same run."""
  reference_dir, _ = reference
  cut = tmp_path / "cut"
  assert _train(TINY, cut, max_epochs=1) == {"stopped_at_epoch": 1}
  manager = checkpoint.open_manager(cut / runs.CHECKPOINT_DIR)
  (step,) = checkpoint.steps(manager)
  model = runs.build_model(TINY, 10)
  abstract = jax.eval_shape(
      lambda: steps_lib.create_train_state(TINY, model, jax.random.key(0), image_shape=(16, 16, 1)))
  state, meta = checkpoint.restore(manager, abstract, step)
  manager.close()
  legacy_dir = tmp_path / "legacy"
  legacy_dir.mkdir()
  for name in (runs.CONFIG_FILE, runs.METRICS_FILE):
    (legacy_dir / name).write_bytes((cut / name).read_bytes())
  shutil.copytree(cut / runs.BEST_DIR, legacy_dir / runs.BEST_DIR)
  legacy = {
      "step": state.step,
      "nat": state.experts["natural"],
      "rob": state.experts["robust"],
      "teacher_nat": state.teachers["natural"],
      "teacher_rob": state.teachers["robust"],
      "mix": state.global_model,
  }
  manager = checkpoint.open_manager(legacy_dir / runs.CHECKPOINT_DIR)
  checkpoint.save(manager, 1, legacy, {"epoch": 1, "best": meta["best"]})  # numbered by epoch
  manager.close()
  summary = _train(CHUNKED, legacy_dir)
  assert summary["models"] == runs.read_summary(reference_dir)["models"]
  assert _metrics(legacy_dir) == _metrics(reference_dir)


def test_a_full_disk_under_a_checkpoint_write_is_one_error_naming_the_directory(tmp_path):
  storage_error = ValueError("RESOURCE_EXHAUSTED: Error writing \"x/0\" in OCDBT database: "
                             "Failed to write 2145814 bytes to file 17: No space left on device "
                             "[os_error_code='28']")
  with pytest.raises(checkpoint.DiskFull, match=f"the disk holding {tmp_path} is full") as caught:
    with checkpoint._writing(tmp_path, "the checkpoint of step 5"):
      raise RuntimeError("save failed") from storage_error
  assert "rerun the same command" in str(caught.value) and "step 5" in str(caught.value)
  assert isinstance(caught.value, OSError)
  with pytest.raises(ValueError, match="another failure"):  # anything else passes unchanged
    with checkpoint._writing(tmp_path, "the checkpoint of step 5"):
      raise ValueError("another failure")


def test_only_closed_loop_notices_are_dropped_from_unraisable_exceptions():
  seen = []
  hook = cli._drop_closed_loop_callbacks(seen.append)
  closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
  hook(closed)
  hook(other)
  assert seen == [other]


@pytest.mark.slow
def test_a_full_disk_ends_a_run_with_one_line(tmp_path):
  # A 3 MB file system: the tiny run's first checkpoint (step 5) does not fit.
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs",
                            str(disk)],
                           capture_output=True,
                           text=True)
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
  try:
    done = subprocess.run([
        sys.executable,
        str(ROOT / "experiments" / "train.py"), "--preset", "tiny", "--workdir",
        str(disk / "run"), "--no-progress"
    ],
                          capture_output=True,
                          text=True,
                          timeout=600,
                          cwd=ROOT)
  finally:
    subprocess.run(["umount", str(disk)], check=False)
  assert done.returncode == 2, done.stderr[-3000:]
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1, done.stderr[-3000:]
  assert lines[0].startswith(f"error: the disk holding {disk / 'run'}")


# ----------------------------------------------------------------------- partial artefacts
def test_an_export_into_an_empty_folder_is_renamed_into_place_whole(tmp_path, monkeypatch):
  """An --out folder made beforehand (empty) used to be filled file by file: a kill after the
  first move left model.onnx without model.json, which the rerun refused as "an earlier
  export". An empty folder is now replaced by the finished export in one rename."""
  from gen_jax.export import exporter  # pylint: disable=import-outside-toplevel
  staged = tmp_path / ".out.partial"
  staged.mkdir()
  for name in exporter.EXPORT_FILES:
    (staged / name).write_text(name)
  out = tmp_path / "out"
  out.mkdir()
  real = os.replace

  def replace(source, target):  # a kill right after the first rename
    real(source, target)
    raise _Killed(target)

  monkeypatch.setattr(os, "replace", replace)
  with pytest.raises(_Killed):
    exporter._move_into_place(staged, out, overwrite=False)  # pylint: disable=protected-access
  monkeypatch.undo()
  assert sorted(p.name for p in out.iterdir()) == sorted(exporter.EXPORT_FILES)
  assert not staged.exists()


def test_evaluation_reads_past_a_damaged_checkpoint_with_one_short_line(tmp_path, capsys):
  """What evaluate.py and sweep_mix.py read (`restore_items`): a damaged newest checkpoint is
  skipped with one line naming it, not a dump of the storage layer's error, and the previous
  one is read. Every kind of damage to the stored arrays (a meta record that disagrees with its
  state is the business of training's own check, above)."""
  for kind in ("garbage state", "truncated state", "no state", "flipped array bytes",
               "no array data", "emptied"):
    directory = tmp_path / kind.replace(" ", "-")
    manager = checkpoint.open_manager(directory, max_to_keep=2)
    for step in (1, 2):
      checkpoint.save(manager, step, {"w": jnp.full((4,), float(step))}, {"epoch": step})
    manager.close()
    _damage(directory / "2", kind)
    capsys.readouterr()
    items, meta = checkpoint.restore_items(directory, ["w"])
    assert np.all(np.asarray(items["w"]) == 1.0) and meta["epoch"] == 1, kind
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 600, (kind, lines)
    assert lines[0].startswith(f"{directory}: checkpoint step(s) [2] damaged"), (kind, lines)
    assert "read step 1, the newest intact one" in lines[0], (kind, lines)


def test_a_full_disk_drops_asyncios_unretrieved_task_and_future_records_only():
  full = OSError(28, "No space left on device")
  other = ValueError("some other failure")

  def record(message, error):
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None,
                             (type(error), error, None))

  drop = checkpoint._DROP_DISK_FULL_TASKS.filter  # pylint: disable=protected-access
  for kind in ("Task", "_GatheringFuture", "Future"):
    assert not drop(record(f"{kind} exception was never retrieved\nfuture: <...>", full))
    assert drop(record(f"{kind} exception was never retrieved\nfuture: <...>", other))
  assert drop(record("Unclosed client session", full))
