"""Soak test of crash consistency: kill training, export and --select at random moments, compare.

    python experiments/soak.py                        # pilot, every phase, seed 0, runs/soak
    python experiments/soak.py --preset tiny --epochs 6 --kills 3 --seed 1
    python experiments/soak.py --preset tiny --phases export,select --phase-kills 4

Trains `--preset` once uninterrupted with `experiments/train.py` (the reference, with the
default epoch-end checkpoints) and once more in WORKDIR/killed, killed again and again and rerun
with the same command after each kill (with `--checkpoint-every`, so that most kills resume
mid-epoch), until an attempt finishes. Then exports the reference's best/ with
`experiments/export.py` and selects a mixture of a copy of it with `experiments/sweep_mix.py
--select`, each once uninterrupted and once killed and rerun alike. `--phases` (default all)
chooses where the kills fall, in this order:

  startup     `--phase-kills` kills before the first training step (launch to the end of
              start-up: imports, data, the config, the state created or restored, the first
              compilations); SIGTERM and SIGKILL in turn, SIGTERM first.
  train       `--kills` SIGKILLs while training: the first right after a best model was
              written and before the checkpoint that commits it (the window that once left runs
              that could never resume), the others at seeded random moments (once the run
              passes a random step, after a further random 0-2 s, so that they also land in
              evaluations and in checkpoint writes).
  final-eval  `--phase-kills` kills after the last training step and before summary.json is
              written (the final evaluation of the test split); SIGTERM and SIGKILL in turn.
  export      `--phase-kills` SIGKILLs of the export: right after model.onnx was written (the
              case that once left a folder the rerun called "an earlier export"), then at a
              random moment, right before model.json is written, right before the rename, and
              at random moments after that.
  select      `--phase-kills` SIGKILLs of `sweep_mix.py --select clean>=0 --betas 0,0.5,1
              --n 100 --pgd-steps 5`: right after the mixture's variables were written (before
              its model.json), then at a random moment, right before the rename, and at random
              moments after that. (export.py and sweep_mix.py install no signal handler: there
              SIGTERM is the default action, a kill like SIGKILL.)

How each kill is placed. The children run the programs through this file (`--soak-child`),
which wraps a few library functions to append markers to a file as they pass points of the
program (with the time) and, at a point named by SOAK_KILL_AT, to SIGKILL themselves there, or
at the point named by SOAK_HOLD to wait there (up to 5 minutes) for the soak's signal. A
start-up kill is sent a seeded random delay after launch (SIGKILL) or after the signal handler
was installed (SIGTERM; before it, SIGTERM is the default action, a kill like SIGKILL), shorter
than the reference's start-up; the child holds at the end of start-up (`TrainingRun.
open_events`, just before the epoch loop whose first step compiles the training step; a signal
there is the training loop's business), so a kill never lands after it. A final-evaluation kill
is sent a seeded random delay, shorter than the reference's final evaluation, after the loop
calls its end-of-training health check; the child holds before summary.json is written. An
export or select kill at a named point is the child's own SIGKILL there; at a random moment it
is sent a seeded random delay after launch, shorter than the reference's time to the rename of
the finished `.NAME.partial` folder, where the child holds. The markers then say where each kill
landed, and a kill that did not land in its phase is a failure. A child still running 10 s
after a SIGTERM is released from its hold, so that a lost signal shows as what it does (the run
goes on and exits 0: a failure) instead of a wait.

After every kill the same command runs again (and is killed again, until the phase's kills are
spent). Checked: exit -9 after SIGKILL; after SIGTERM exit 143, the last line "stopped by
SIGTERM; ..." and no traceback; no training step (start-up kills) and no summary.json
(final-evaluation kills) before the kill; the final checkpoint, best/, summary.json and
metrics.jsonl of the killed run bitwise identical to the reference's (but for wall times and the
operational config fields); after each export or select kill no export folder or saved mixture
but a complete one equal to the uninterrupted one; a line "removed .NAME.partial: an unfinished
save ..." from the rerun that found one (the last rerun at least: an earlier one may be killed
before it gets there), and no such line where there was none; at the end the export equal to
the uninterrupted export (the file list and every byte, but for model.json's export_seconds),
the --select output (eval/: sweep.json, sweep.md, tradeoff.png and the saved mixture, with the
run's path replaced, the mixture's arrays compared, not orbax's randomly named files) equal to
the uninterrupted one, and no hidden temporary folder left. Prints each kill, where it landed
and the work it cost; exits 1 if anything differs.

The children share a persistent compilation cache ($JAX_COMPILATION_CACHE_DIR, else under the
workdir: start-up in seconds, not minutes; the compiled programs are the same). The default soak
of the pilot took 14 minutes on a 2-core machine shared with other work (load about 7): the
reference 6 of them (about 2 on an idle machine), the killed run's 10 attempts 7, export and
select half a minute each. `--preset tiny` takes about 2 minutes there.
"""
import argparse
import json
import logging
import os
import pathlib
import random
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ROOT / "experiments" / "train.py"
EXPORT = ROOT / "experiments" / "export.py"
SWEEP = ROOT / "experiments" / "sweep_mix.py"
PHASES = ("startup", "train", "final-eval", "export", "select")
SELECT_FLAGS = ("--select", "clean>=0", "--betas", "0,0.5,1", "--n", "100", "--pgd-steps", "5")
PARTIAL = ".partial"
CHILD_FLAG = "--soak-child"
HOLD_SECONDS = 300
# A child still running this long after the soak's SIGTERM is released from its hold (the file
# SOAK_MARKS + RELEASE), to show what it does with the signal: stop at its next safe point, or
# (a lost signal) go on.
RELEASE, RELEASE_AFTER = ".release", 10.0
# Named kill points of export and select, in the order the kills take them (None: a random
# moment); later kills are random moments.
EXPORT_POINTS = ("model.onnx", None, "model.json", "rename")
SELECT_POINTS = ("model.json", None, "rename")
_NAMES = {signal.SIGKILL: "SIGKILL", signal.SIGTERM: "SIGTERM"}


# --------------------------------------------------------------------------- in each child
def _child_main(program, argv):
  """Runs `program` (a path) with `argv` as `python program argv` would, with the soak's hooks.

  SOAK_MARKS: the file of markers; SOAK_PROGRESS: the file of the count of training steps
  dispatched in this process; SOAK_KILL_AT: the point where to SIGKILL itself; SOAK_HOLD: the
  point where to wait for the soak's signal.
  """
  marks, kill_at, hold = (os.environ.get(k) for k in ("SOAK_MARKS", "SOAK_KILL_AT", "SOAK_HOLD"))

  def point(name, detail=""):
    with open(marks, "a") as f:
      f.write(f"{name} {time.time():.3f} {detail}\n")
    if name == kill_at:
      print(f"soak: killing myself at {name} {detail}", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    if name == hold:
      deadline = time.monotonic() + HOLD_SECONDS
      while time.monotonic() < deadline and not os.path.exists(f"{marks}{RELEASE}"):
        time.sleep(0.05)

  point("launched")
  # The moments of a saved model or an export: its model.json written (after the arrays or the
  # export's files), its finished `.NAME.partial` folder renamed into place.
  replace, write_text = os.replace, pathlib.Path.write_text

  def replacing(source, target, *args, **kwargs):
    if os.fspath(source).endswith(PARTIAL):
      point("rename")
    return replace(source, target, *args, **kwargs)

  def writing(self, *args, **kwargs):
    if self.name == "model.json":
      point("model.json")
    return write_text(self, *args, **kwargs)

  os.replace, pathlib.Path.write_text = replacing, writing
  name = pathlib.Path(program).name
  if name == TRAIN.name:
    _train_hooks(point)
  elif name == EXPORT.name:
    from gen_jax.export import onnx_graph
    save = onnx_graph.save

    def saved(*args, **kwargs):
      out = save(*args, **kwargs)
      point("model.onnx")
      return out

    onnx_graph.save = saved
  sys.argv = [program, *argv]
  sys.path[0] = str(pathlib.Path(program).parent)
  runpy.run_path(program, run_name="__main__")


def _train_hooks(point):
  """Training steps counted (SOAK_PROGRESS); points: the signal handler installed ("handler"),
  the end of start-up ("startup-end"), a best model written ("best"), the final evaluation
  begun ("final-eval"), summary.json about to be written ("summary")."""
  from gen_jax import runs
  from gen_jax.training import loop, steps
  progress = os.environ["SOAK_PROGRESS"]
  make = steps.make_train_step

  def counted(*args, **kwargs):
    step_fn, count = make(*args, **kwargs), [0]

    def step(*a):
      out = step_fn(*a)
      count[0] += 1
      with open(progress, "w") as f:
        f.write(str(count[0]))
      return out

    return step

  steps.make_train_step = counted
  enter, check = loop._StopSignals.__enter__, loop._check_health  # pylint: disable=protected-access
  open_events, save_best, finish = (runs.TrainingRun.open_events, runs.TrainingRun.save_best,
                                    runs.TrainingRun.finish)

  def entered(self):
    out = enter(self)
    point("handler")
    return out

  def opening(self, *args, **kwargs):
    point("startup-end")
    return open_events(self, *args, **kwargs)

  def best(self, epoch, *args, **kwargs):
    save_best(self, epoch, *args, **kwargs)
    point("best", f"best/{epoch}")

  def checking(*args, **kwargs):
    if kwargs.get("where") == "the end of training":
      point("final-eval")
    return check(*args, **kwargs)

  def finishing(self, *args, **kwargs):
    point("summary")
    return finish(self, *args, **kwargs)

  loop._StopSignals.__enter__, loop._check_health = entered, checking  # pylint: disable=protected-access
  runs.TrainingRun.open_events, runs.TrainingRun.save_best = opening, best
  runs.TrainingRun.finish = finishing


# ----------------------------------------------------------------------------- the parent
class Soak:
  """One soak: the children's environment, the logs, the seeded random draws, the problems."""

  def __init__(self, workdir, *, seed=0, cache=None, logs=None):
    self.workdir = pathlib.Path(workdir).absolute()
    self.rng = random.Random(seed)
    self.logs = pathlib.Path(logs) if logs else self.workdir / "logs"
    self.cache = pathlib.Path(cache or os.environ.get("JAX_COMPILATION_CACHE_DIR") or
                              self.workdir / "jax-cache")
    self.problems: list[str] = []
    self._count = 0

  def launch(self, program, argv, name, *, kill_at=None, hold=None):
    """Starts `program argv` as a child through `_child_main`; returns its `Child`."""
    self.logs.mkdir(parents=True, exist_ok=True)
    self._count += 1
    stem = self.logs / f"{self._count:02d}-{name}"
    log, marks, progress = (stem.with_suffix(s) for s in (".log", ".marks", ".progress"))
    env = {
        **os.environ,
        "SOAK_MARKS": str(marks),
        "SOAK_PROGRESS": str(progress),
        "JAX_COMPILATION_CACHE_DIR": str(self.cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    for key, value in (("SOAK_KILL_AT", kill_at), ("SOAK_HOLD", hold)):
      env.pop(key, None)
      if value:
        env[key] = value
    launched = time.time()
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
      child = subprocess.Popen([
          sys.executable,
          str(pathlib.Path(__file__).resolve()), CHILD_FLAG,
          str(program), *map(str, argv)
      ],
                               stdout=out,
                               stderr=subprocess.STDOUT,
                               env=env)
    return Child(child, launched, log, marks, progress)

  def problem(self, text):
    self.problems.append(text)
    print(f"PROBLEM: {text}", flush=True)


# Python's notice for the run's TrainingInterrupted raised while a garbage-collection callback
# (jax's `_xla_gc_callback`) ran: Python can only print it, and the run still honours the signal
# (exit 143, its one line last), so the notice is not an unhandled traceback (README: Tests).
_IGNORED_INTERRUPT = re.compile(
    r"Exception ignored in: [^\n]*\nTraceback \(most recent call last\):\n"
    r"(?:[ \t][^\n]*\n|\n)*?[\w.]*TrainingInterrupted: [^\n]*\n")


class Child:
  """A running child and its files."""

  def __init__(self, process, launched, log, marks, progress):
    self.process, self.launched = process, launched
    self.log, self.marks_file, self.progress_file = log, marks, progress

  def marks(self):
    """Markers passed, in order: [(name, time, detail)]."""
    try:
      lines = self.marks_file.read_text().splitlines()
    except OSError:
      return []
    out = []
    for line in lines:
      name, at, *detail = line.split(" ", 2)
      out.append((name, float(at), detail[0] if detail else ""))
    return out

  def mark(self, name):
    """The time the child passed `name` (the first time), or None."""
    return next((at for n, at, _ in self.marks() if n == name), None)

  def steps(self):
    try:
      return int(self.progress_file.read_text() or 0)
    except (OSError, ValueError):
      return 0

  def output(self):
    return self.log.read_text(errors="replace")

  def resumed_from(self):
    found = re.search(r"Resuming .* from step (\d+)", self.output())
    return int(found.group(1)) if found else 0

  def signal_in_window(self, signum, *, after, delay, hold):
    """Sends `signum` `delay` seconds after the child passed the point `after` (None: after its
    launch), or as soon as it reaches `hold`, whichever comes first. Returns the seconds after
    `after` at which it was sent, or None if the child ended before."""
    start = self.launched if after is None else None
    while self.process.poll() is None:
      if start is None:
        start = self.mark(after)
      if start is not None and (time.time() >= start + delay or self.mark(hold) is not None):
        self.process.send_signal(signum)
        sent = time.time() - start
        try:
          self.process.wait(timeout=RELEASE_AFTER)
        except subprocess.TimeoutExpired:
          pathlib.Path(f"{self.marks_file}{RELEASE}").touch()
        return sent
      time.sleep(0.01)
    return None

  def check_exit(self, signum):
    """What is wrong with the way the child ended after `signum` (None: nothing)."""
    try:
      code = self.process.wait(timeout=HOLD_SECONDS)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()
      return f"still running {HOLD_SECONDS} s after {_NAMES[signum]} (killed)"
    if signum == signal.SIGKILL:
      return None if code == -signal.SIGKILL else f"exit code {code} after SIGKILL"
    lines = self.output().strip().splitlines()
    last = lines[-1] if lines else ""
    if code != 128 + signal.SIGTERM:
      return f"exit code {code} after SIGTERM (expected 143); last line {last!r}"
    if not last.startswith("stopped by SIGTERM"):
      return f"exit code 143 but the last line is {last!r}, not 'stopped by SIGTERM ...'"
    if "Traceback" in _IGNORED_INTERRUPT.sub("", self.output()):
      return "a traceback in the output after SIGTERM"
    return None


def _window(child, first, last):
  """Seconds between the points `first` (None: launch) and `last` of a finished child."""
  start = child.launched if first is None else child.mark(first)
  end = child.mark(last)
  if start is None or end is None:
    raise RuntimeError(f"the reference never passed {first or 'launch'} and {last}; see "
                       f"{child.log}")
  return max(end - start, 0.0)


def _landed(child):
  """Where a killed child was: its last marker and when it passed it, after launch."""
  marks = child.marks()
  if not marks:
    return "before its first marker"
  name, at, _ = marks[-1]
  return f"last marker {name!r} at {at - child.launched:.2f} s"


# ------------------------------------------------------------------------ the training run
def train_reference(soak, preset, extra, *, reuse=False):
  """The uninterrupted reference run (reused if asked and finished); returns its summary and the
  windows of its start-up and final evaluation (seconds)."""
  reference = soak.workdir / "reference"
  windows_file = soak.workdir / "reference-windows.json"
  if reuse and (reference / "summary.json").exists() and windows_file.exists():
    return json.loads(
        (reference / "summary.json").read_text()), json.loads(windows_file.read_text()), True
  shutil.rmtree(reference, ignore_errors=True)
  child = soak.launch(TRAIN, ["--preset", preset, "--workdir", reference, "--no-progress", *extra],
                      "reference")
  if child.process.wait() != 0:
    sys.exit(f"the reference run failed; see {child.log}")
  windows = {
      "startup": _window(child, None, "startup-end"),
      "startup_after_handler": _window(child, "handler", "startup-end"),
      "final_eval": _window(child, "final-eval", "summary"),
  }
  windows_file.write_text(json.dumps(windows) + "\n")
  return json.loads((reference / "summary.json").read_text()), windows, False


def plan_training_kills(soak, phases, *, kills, phase_kills, windows, targets):
  """The killed run's kills in order: dicts of phase, signum and where they are placed."""
  plan = []
  signals = (signal.SIGTERM, signal.SIGKILL)
  if "startup" in phases:
    for k in range(phase_kills):
      signum = signals[k % 2]
      # Before the handler SIGTERM is the default action (a kill like SIGKILL); after it, the
      # handler's one-line exit 143 is what is checked.
      after, window = ((None, windows["startup"]) if signum == signal.SIGKILL else
                       ("handler", windows["startup_after_handler"]))
      plan.append({
          "phase": "startup",
          "signum": signum,
          "after": after,
          "delay": soak.rng.uniform(0, window),
          "hold": "startup-end"
      })
  if "train" in phases and kills > 0:
    plan.append({"phase": "train", "signum": signal.SIGKILL, "kill_at": "best"})
    plan += [{"phase": "train", "signum": signal.SIGKILL, "target": t} for t in targets]
  if "final-eval" in phases:
    for k in range(phase_kills):
      plan.append({
          "phase": "final-eval",
          "signum": signals[k % 2],
          "after": "final-eval",
          "delay": soak.rng.uniform(0, windows["final_eval"]),
          "hold": "summary"
      })
  return plan


def _train_kill(child, kill, rng):
  """Delivers one planned training kill to a running child; returns a description of the
  moment (or None if the child ended first)."""
  if "kill_at" in kill:
    child.process.wait()
    return "right after best/{} was written, before its checkpoint".format(
        next((d.split("/")[-1] for n, _, d in child.marks() if n == "best"), "?"))
  if "target" in kill:
    base = None
    while child.process.poll() is None:
      if base is None and child.steps():
        base = child.resumed_from()
      if base is not None and base + child.steps() >= kill["target"]:
        delay = rng.uniform(0, 2)
        time.sleep(delay)
        child.process.send_signal(signal.SIGKILL)
        return f"{delay:.2f} s after passing step {kill['target']}"
      time.sleep(0.01)
    return None
  sent = child.signal_in_window(kill["signum"],
                                after=kill["after"],
                                delay=kill["delay"],
                                hold=kill["hold"])
  if sent is None:
    return None
  since = "launch" if kill["after"] is None else {
      "handler": "the signal handler was installed",
      "final-eval": "the final evaluation began"
  }[kill["after"]]
  return f"{sent:.2f} s after {since}"


def _check_training_kill(child, kill, workdir):
  """What is wrong with where a training kill landed and how the child ended (None: nothing)."""
  wrong = child.check_exit(kill["signum"])
  if wrong:
    return wrong
  names = [n for n, _, _ in child.marks()]
  if kill["phase"] == "startup":
    if child.steps() or "final-eval" in names:
      return f"a start-up kill landed after {child.steps()} training steps"
    if kill["signum"] == signal.SIGTERM and "handler" not in names:
      return "a SIGTERM meant for after the handler landed before it"
  if kill["phase"] == "final-eval":
    if "final-eval" not in names:
      return "a final-evaluation kill landed before the final evaluation"
    if (workdir / "summary.json").exists():
      return "summary.json was written although the final evaluation was killed"
  return None


def soak_training(soak,
                  preset,
                  extra,
                  *,
                  phases,
                  kills,
                  phase_kills,
                  checkpoint_every,
                  reuse_reference=False):
  """The reference and the killed run of `phases` (startup, train, final-eval); returns the
  record of each kill (phase, signal, moment, landed, exit code, steps done and lost)."""
  summary, windows, reused = train_reference(soak, preset, extra, reuse=reuse_reference)
  reference, killed = soak.workdir / "reference", soak.workdir / "killed"
  shutil.rmtree(killed, ignore_errors=True)
  total = summary["steps"]
  step_seconds = summary["train_seconds"] / total
  wall = f"{summary['seconds']:.0f} s wall" if not reused else "reused"
  print(
      f"reference: {total} steps, {wall} ({summary['train_seconds']:.0f} s in training steps; "
      f"start-up {windows['startup']:.1f} s, final evaluation {windows['final_eval']:.1f} s)",
      flush=True)
  metrics = [json.loads(l) for l in (reference / "metrics.jsonl").read_text().splitlines()]
  per_epoch = total // len(metrics)
  first_eval = min(r["step"] for r in metrics if "validation" in r)
  targets = sorted(soak.rng.sample(range(first_eval + 1, total), max(kills - 1, 0)))
  plan = plan_training_kills(soak,
                             phases,
                             kills=kills,
                             phase_kills=phase_kills,
                             windows=windows,
                             targets=targets)
  if not plan:
    return []
  argv = [
      "--preset", preset, "--workdir", killed, "--no-progress", *extra, "--checkpoint-every",
      checkpoint_every
  ]
  records, started, attempts = [], time.time(), []
  for attempt, kill in enumerate([*plan, None], start=1):
    child = soak.launch(TRAIN,
                        argv,
                        f"killed-attempt{attempt}",
                        kill_at=kill and kill.get("kill_at"),
                        hold=kill and kill.get("hold"))
    attempts.append(child)
    if kill is None:
      if child.process.wait() != 0:
        soak.problem(f"the last attempt failed with exit code {child.process.returncode}; see "
                     f"{child.log}")
      break
    moment = _train_kill(child, kill, soak.rng)
    if moment is None:
      soak.problem(f"attempt {attempt} ended (exit code {child.process.wait()}) before its "
                   f"{kill['phase']} kill; see {child.log}")
      break
    wrong = _check_training_kill(child, kill, killed)
    if wrong:
      soak.problem(f"{kill['phase']} kill (attempt {attempt}): {wrong}; see {child.log}")
    records.append({
        **kill, "attempt": attempt,
        "moment": moment,
        "landed": _landed(child),
        "code": child.process.returncode,
        "done": child.resumed_from() + child.steps(),
        "log": child.log
    })
  # Steps retrained per kill: where the run was when killed minus where the next attempt resumed.
  for record, rerun in zip(records, attempts[1:]):
    record["resumed"] = rerun.resumed_from()
    record["lost"] = max(0, record["done"] - record["resumed"])
  for n, r in enumerate(records, start=1):
    print(f"kill {n} ({r['phase']}): {_NAMES[r['signum']]} {r['moment']} (attempt "
          f"{r['attempt']}, {r['landed']}, exit {r['code']}, {r['done']} steps dispatched): the "
          f"rerun resumed from step {r['resumed']}, {r['lost']} steps lost "
          f"(~{r['lost'] * step_seconds:.1f} s of training)")
  lost = [r["lost"] for r in records if r["phase"] == "train"]
  print(f"the killed run finished after {len(records) + 1} attempts, {time.time() - started:.0f} s "
        f"wall; work lost per training kill (steps retrained): {', '.join(map(str, lost))} (mean "
        f"{np.mean(lost) if lost else 0:.1f}; an epoch is {per_epoch} steps)")
  if not (killed / "summary.json").exists():
    soak.problem("the killed run never finished")
    return records
  problems = compare_runs(killed, reference)
  for p in problems:
    soak.problem(f"the killed run differs from the uninterrupted one: {p}")
  if not problems:
    print(
        f"final checkpoint (step {total}), best/, summary.json and metrics.jsonl: bitwise "
        "identical to the uninterrupted run",
        flush=True)
  return records


def _arrays(directory):
  from gen_jax import checkpoint
  import jax
  items, meta = checkpoint.restore_items(directory, lambda keys: list(keys))
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(items))
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}, meta


def _differing(x, y):
  """Keys of two dicts of arrays whose dtype or bytes differ (None: different key sets)."""
  if x.keys() != y.keys():
    return None
  return [k for k in x if x[k].dtype != y[k].dtype or x[k].tobytes() != y[k].tobytes()]


def compare_runs(ours, reference):
  """The differences between two finished run directories (empty: bitwise identical)."""
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only managers
  from gen_jax import runs
  problems = []
  volatile = {"seconds", "train_seconds", "config"}
  a, b = runs.read_summary(ours), runs.read_summary(reference)
  if {
      k: v for k, v in a.items() if k not in volatile
  } != {
      k: v for k, v in b.items() if k not in volatile
  }:
    problems.append("summary.json differs")
  config_a, config_b = ({
      k: v for k, v in s["config"].items() if k not in runs.RESUMABLE_CHANGES
  } for s in (a, b))
  if config_a != config_b:
    problems.append("the configs differ")
  strip = lambda workdir: [{
      k: v for k, v in r.items() if k != "train_seconds"
  } for r in runs.read_metrics(workdir)]
  if strip(ours) != strip(reference):
    problems.append("metrics.jsonl differs")
  for name in (runs.CHECKPOINT_DIR, runs.BEST_DIR):
    x, x_meta = _arrays(ours / name)
    y, y_meta = _arrays(reference / name)
    differing = _differing(x, y)
    if differing is None:
      problems.append(f"{name}: different trees")
      continue
    if differing:
      problems.append(f"{name}: {len(differing)} arrays differ, e.g. {differing[0]}")
    if x_meta.get("best", x_meta) != y_meta.get("best", y_meta):
      problems.append(f"{name}: the best-model records differ")
  return problems


# -------------------------------------------------------------------- export and --select
def _output_phase(soak, phase, program, argv_of, output_of, points, kills, compare):
  """Runs `program` once uninterrupted into the reference output and `kills` times killed and
  rerun into the killed one (until an attempt finishes); returns the record of each kill.

  `argv_of(which)` is the command line for "reference" or "killed"; `output_of(which)` the
  folder (renamed into place from its `.NAME.partial` sibling) that a kill must leave absent or
  complete, known once the reference has run; `compare(ours, reference)` lists the differences
  of two complete outputs.
  """
  child = soak.launch(program, argv_of("reference"), f"{phase}-reference")
  if child.process.wait() != 0:
    soak.problem(f"the uninterrupted {phase} failed; see {child.log}")
    return []
  if child.mark("rename") is None:
    soak.problem(f"the uninterrupted {phase} renamed no {PARTIAL} folder into place: it writes "
                 "its output where a kill can leave it half done")
    window = time.time() - child.launched
  else:
    window = _window(child, None, "rename")
  reference, target = output_of("reference"), output_of("killed")
  partial = target.with_name(f".{target.name}{PARTIAL}")
  print(f"{phase} reference: {reference}, {window:.1f} s from launch to the rename", flush=True)
  records, stray = [], False  # stray: a partial folder is there as the attempt starts
  for attempt in range(1, kills + 2):
    kill = attempt <= kills
    point = points[attempt - 1] if kill and attempt <= len(points) else None
    child = soak.launch(program,
                        argv_of("killed"),
                        f"{phase}-attempt{attempt}",
                        kill_at=point,
                        hold="rename" if kill and point is None else None)
    moment = f"at the point {point!r}" if point else None
    if kill and point is None:
      sent = child.signal_in_window(signal.SIGKILL,
                                    after=None,
                                    delay=soak.rng.uniform(0, window),
                                    hold="rename")
      moment = None if sent is None else f"{sent:.2f} s after launch"
    code = child.process.wait()
    # An attempt that finds a stray folder says that it removes it (unless killed before that).
    cleaned = f"removed {partial}: an unfinished save" in child.output()
    if cleaned and not stray:
      soak.problem(f"{phase} attempt {attempt} says it removed {partial}, which was not there")
    if records:
      records[-1]["cleaned_by_next"] = cleaned
    if not kill:
      if code != 0:
        soak.problem(f"the {phase} rerun failed with exit code {code}; see {child.log}")
      elif stray and not cleaned:
        soak.problem(f"the {phase} rerun found the stray {partial} and did not say that it "
                     "removed it")
      break
    if moment is None or code != -signal.SIGKILL:
      soak.problem(f"{phase} attempt {attempt}: exit code {code} instead of a SIGKILL; see "
                   f"{child.log}")
      break
    left = target.exists()
    if left:  # only a complete output may be there
      differences = compare(target, reference)
      if differences:
        soak.problem(f"the killed {phase} left {target} incomplete or different: "
                     f"{'; '.join(differences)}")
    stray = partial.exists()
    records.append({
        "phase": phase,
        "signum": signal.SIGKILL,
        "attempt": attempt,
        "point": point,
        "moment": moment,
        "landed": _landed(child),
        "code": code,
        "output_left": left,
        "partial_left": stray,
        "cleaned_by_next": None,
        "log": child.log
    })
  for n, r in enumerate(records, start=1):
    left = " and ".join([partial.name] * r["partial_left"] + [target.name] * r["output_left"])
    rerun = ("the rerun said it removed it"
             if r["cleaned_by_next"] else "the rerun found no stray folder"
             if not r["partial_left"] else "the rerun did not get as far as removing it")
    print(f"{phase} kill {n}: SIGKILL {r['moment']} (attempt {r['attempt']}, {r['landed']}, exit "
          f"{r['code']}): left {left or 'nothing'}; {rerun}")
  leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(".")]
  if leftovers:
    soak.problem(f"hidden leftovers beside {target}: {leftovers}")
  if not target.exists():
    soak.problem(f"the {phase} never completed {target}")
    return records
  differences = compare(target, reference)
  for d in differences:
    soak.problem(f"the {phase} differs from the uninterrupted one: {d}")
  if not differences:
    print(
        f"{phase}: {target} complete and equal to the uninterrupted {reference}; no hidden "
        f"folder beside it",
        flush=True)
  return records


def compare_exports(ours, reference):
  """Differences of two export folders: file lists and bytes, but model.json's export times."""
  ours, reference = pathlib.Path(ours), pathlib.Path(reference)
  names = sorted(p.name for p in ours.iterdir())
  expected = sorted(p.name for p in reference.iterdir())
  if names != expected:
    return [f"files {names} instead of {expected}"]
  problems = []
  for name in names:
    a, b = (ours / name).read_bytes(), (reference / name).read_bytes()
    if name == "model.json":
      a, b = ({k: v for k, v in json.loads(x).items() if k != "export_seconds"} for x in (a, b))
    if a != b:
      problems.append(f"{name} differs")
  return problems


def _model_arrays(directory):
  import jax
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  try:
    tree = checkpointer.restore(pathlib.Path(directory).absolute() / "variables")
  finally:
    checkpointer.close()
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def compare_selections(ours, reference):
  """Differences of two saved mixtures of --select and the eval/ folders that hold them: the
  entries, sweep.json, sweep.md, tradeoff.png, the mixture's model.json (each with its run's
  path replaced) and its arrays (orbax's files have random names and timestamps)."""
  ours, reference = pathlib.Path(ours), pathlib.Path(reference)
  problems = []
  names = sorted(p.name for p in ours.parent.iterdir())
  expected = sorted(p.name for p in reference.parent.iterdir())
  if names != expected:
    problems.append(f"eval/ holds {names} instead of {expected}")
  if not (ours / "model.json").is_file():
    return problems + [f"{ours} holds no model.json"]
  text = lambda path, run: path.read_text().replace(str(run.absolute()), "RUN")
  # The mixture lives in RUN/eval/NAME.
  run_a, run_b = ours.parent.parent, reference.parent.parent
  if text(ours / "model.json", run_a) != text(reference / "model.json", run_b):
    problems.append(f"{ours.name}/model.json differs")
  differing = _differing(_model_arrays(ours), _model_arrays(reference))
  if differing is None or differing:
    problems.append(f"{ours.name}: the arrays differ")
  for name in sorted(set(names) & set(expected)):
    a, b = ours.parent / name, reference.parent / name
    if name.endswith((".json", ".md")):
      if text(a, run_a) != text(b, run_b):
        problems.append(f"{name} differs")
    elif a.is_file() and a.read_bytes() != b.read_bytes():
      problems.append(f"{name} differs")
  return problems


def soak_export(soak, kills):
  """Exports of the reference's best/: one uninterrupted, one killed `kills` times."""
  folder = soak.workdir / "export"
  shutil.rmtree(folder, ignore_errors=True)
  source = soak.workdir / "reference" / "best"
  return _output_phase(soak, "export", EXPORT,
                       lambda which: ["--checkpoint", source, "--out", folder / which],
                       lambda which: folder / which, EXPORT_POINTS, kills, compare_exports)


def soak_select(soak, kills):
  """`sweep_mix.py --select` of two copies of the reference run: one uninterrupted, one killed
  `kills` times; compares the saved mixtures and the eval/ folders."""
  folder = soak.workdir / "select"
  shutil.rmtree(folder, ignore_errors=True)
  for which in ("reference", "killed"):
    shutil.copytree(soak.workdir / "reference",
                    folder / which,
                    ignore=shutil.ignore_patterns("eval", ".lock"))

  def output_of(which):  # the name of the mixture that the uninterrupted --select saved
    saved = sorted(p.name for p in (folder / "reference" / "eval").glob("mix-beta*"))
    if len(saved) != 1:
      raise RuntimeError(f"the uninterrupted --select saved {saved}, not one mixture")
    return folder / which / "eval" / saved[0]

  return _output_phase(soak, "select", SWEEP,
                       lambda which: ["--workdir", folder / which, *SELECT_FLAGS], output_of,
                       SELECT_POINTS, kills, compare_selections)


# ------------------------------------------------------------------------------------ main
def _phases(text):
  names = [p.strip() for p in text.split(",") if p.strip()]
  unknown = [p for p in names if p not in PHASES]
  if unknown or not names:
    raise argparse.ArgumentTypeError(f"unknown phase {unknown[0] if unknown else text!r}; choose "
                                     f"from {', '.join(PHASES)}")
  return names


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == [CHILD_FLAG]:
    _child_main(argv[1], argv[2:])
    return
  # No prefix matching: a train.py flag such as --keep (for --keep-checkpoints) would otherwise
  # be taken as soak's --keep-reference instead of passing through to train.py.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--preset", default="pilot")
  parser.add_argument("--workdir", default="runs/soak", type=pathlib.Path)
  parser.add_argument("--phases",
                      default=",".join(PHASES),
                      type=_phases,
                      help=f"where to kill, comma-separated (default {','.join(PHASES)})")
  parser.add_argument("--kills", default=5, type=int, help="SIGKILLs while training (default 5)")
  parser.add_argument("--phase-kills",
                      default=2,
                      type=int,
                      help="kills in each other phase (default 2)")
  parser.add_argument("--seed", default=0, type=int)
  parser.add_argument("--checkpoint-every",
                      default=10,
                      type=int,
                      help="steps between the killed run's checkpoints (0: epoch ends only)")
  parser.add_argument("--keep-reference",
                      action="store_true",
                      help="reuse a finished reference run in WORKDIR/reference")
  args, extra = parser.parse_known_args(argv)
  soak = Soak(args.workdir, seed=args.seed)
  soak.workdir.mkdir(parents=True, exist_ok=True)
  shutil.rmtree(soak.logs, ignore_errors=True)
  phases = args.phases
  print(
      f"soak: preset {' '.join([args.preset, *extra])}, phases {','.join(phases)} (seed "
      f"{args.seed}): {args.kills} SIGKILLs while training, {args.phase_kills} kills in each other "
      f"phase; killed run with --checkpoint-every {args.checkpoint_every}, reference with the "
      "default epoch-end checkpoints",
      flush=True)
  soak_training(soak,
                args.preset,
                extra,
                phases=phases,
                kills=args.kills,
                phase_kills=args.phase_kills,
                checkpoint_every=args.checkpoint_every,
                reuse_reference=args.keep_reference)
  if "export" in phases:
    soak_export(soak, args.phase_kills)
  if "select" in phases:
    soak_select(soak, args.phase_kills)
  if soak.problems:
    print(f"FAILED: {len(soak.problems)} problem(s); the first: {soak.problems[0]}")
    sys.exit(1)
  print("soak: every guarantee held")


if __name__ == "__main__":
  main()
