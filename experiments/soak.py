"""Soak test of crash consistency: SIGKILL a training run at random moments, then compare.

    python experiments/soak.py                        # pilot, 5 kills, seed 0, runs/soak
    python experiments/soak.py --preset tiny --epochs 6 --kills 3 --seed 1

Trains `--preset` twice with `experiments/train.py`: once uninterrupted (the reference, with
the default epoch-end checkpoints) and once killed with SIGKILL `--kills` times in a row and
rerun with the same command after each kill (with `--checkpoint-every`, so that most kills
resume mid-epoch). The first kill falls right after a best model was written and before the
checkpoint that commits it (the window that once left runs that could never resume); the
others fall at seeded random moments: once the run passes a random step, after a further
random 0-2 s, so that they also land in evaluations and in checkpoint writes. The final
checkpoint, best/, summary.json and metrics.jsonl of both runs must be bitwise identical (but
for wall times and the operational config fields). Prints each kill and the work it cost (steps
retrained); exits 1 if anything differs.

The children share a persistent compilation cache under the workdir (startup in seconds, not
minutes; the compiled programs are the same). The pilot (750 steps) takes about 2 minutes
uninterrupted on an idle 2-core machine, so the soak about 6.
"""
import argparse
import json
import logging
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ROOT / "experiments" / "train.py"

# Runs in each child: experiments/train.py, with the step function wrapped to report progress
# (steps dispatched in this process, to SOAK_PROGRESS) and, with SOAK_KILL_AFTER_BEST set,
# a SIGKILL of itself right after the next best model is written.
_DRIVER = r"""
import os, runpy, signal, sys
from gen_jax import runs
from gen_jax.training import steps
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
if os.environ.get("SOAK_KILL_AFTER_BEST"):
  save_best = runs.TrainingRun.save_best
  def fatal(self, epoch, *a, **k):
    save_best(self, epoch, *a, **k)
    print(f"soak: killing myself after best/{epoch}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
  runs.TrainingRun.save_best = fatal
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _child(args, workdir, extra, log, progress, *, kill_after_best=False, cache):
  env = {
      **os.environ,
      "SOAK_PROGRESS": str(progress),
      "JAX_COMPILATION_CACHE_DIR": str(cache),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "TF_CPP_MIN_LOG_LEVEL": "3",
  }
  env.pop("SOAK_KILL_AFTER_BEST", None)
  if kill_after_best:
    env["SOAK_KILL_AFTER_BEST"] = "1"
  command = [
      sys.executable, "-c", _DRIVER,
      str(TRAIN), "--preset", args.preset, "--workdir",
      str(workdir), "--no-progress", *extra
  ]
  return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def _read_int(path):
  try:
    return int(path.read_text() or 0)
  except (OSError, ValueError):
    return 0


def _resumed_from(log):
  found = re.search(r"Resuming .* from step (\d+)", log.read_text())
  return int(found.group(1)) if found else 0


def _arrays(directory):
  from gen_jax import checkpoint
  import jax
  items, meta = checkpoint.restore_items(directory, lambda keys: list(keys))
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(items))
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}, meta


def _compare(ours, reference):
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
    if x.keys() != y.keys():
      problems.append(f"{name}: different trees")
      continue
    differing = [k for k in x if x[k].dtype != y[k].dtype or x[k].tobytes() != y[k].tobytes()]
    if differing:
      problems.append(f"{name}: {len(differing)} arrays differ, e.g. {differing[0]}")
    if x_meta.get("best", x_meta) != y_meta.get("best", y_meta):
      problems.append(f"{name}: the best-model records differ")
  return problems


def main():
  # No prefix matching: a train.py flag such as --keep (for --keep-checkpoints) would otherwise
  # be taken as soak's --keep-reference instead of passing through to train.py.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--preset", default="pilot")
  parser.add_argument("--workdir", default="runs/soak", type=pathlib.Path)
  parser.add_argument("--kills", default=5, type=int)
  parser.add_argument("--seed", default=0, type=int)
  parser.add_argument("--checkpoint-every",
                      default=10,
                      type=int,
                      help="steps between the killed run's checkpoints (0: epoch ends only)")
  parser.add_argument("--keep-reference",
                      action="store_true",
                      help="reuse a finished reference run in WORKDIR/reference")
  args, extra = parser.parse_known_args()
  rng = random.Random(args.seed)
  args.workdir.mkdir(parents=True, exist_ok=True)
  cache = args.workdir / "jax-cache"
  reference, killed = args.workdir / "reference", args.workdir / "killed"
  logs = args.workdir / "logs"
  shutil.rmtree(killed, ignore_errors=True)
  shutil.rmtree(logs, ignore_errors=True)
  logs.mkdir()
  reused = args.keep_reference and (reference / "summary.json").exists()
  if not reused:
    shutil.rmtree(reference, ignore_errors=True)
  print(
      f"soak: preset {' '.join([args.preset, *extra])}, {args.kills} SIGKILLs (seed {args.seed});"
      f" killed run with --checkpoint-every {args.checkpoint_every}, reference with the "
      "default epoch-end checkpoints",
      flush=True)

  child = _child(args,
                 reference,
                 extra,
                 logs / "reference.log",
                 logs / "reference.progress",
                 cache=cache)
  if child.wait() != 0:
    sys.exit(f"the reference run failed; see {logs / 'reference.log'}")
  summary = json.loads((reference / "summary.json").read_text())
  total = summary["steps"]
  step_seconds = summary["train_seconds"] / total
  wall = f"{summary['seconds']:.0f} s wall" if not reused else "reused"
  print(f"reference: {total} steps, {wall} ({summary['train_seconds']:.0f} s in training steps)",
        flush=True)
  metrics = [json.loads(l) for l in (reference / "metrics.jsonl").read_text().splitlines()]
  per_epoch = total // len(metrics)
  first_eval = min(r["step"] for r in metrics if "validation" in r)
  targets = sorted(rng.sample(range(first_eval + 1, total), args.kills - 1))

  flags = [*extra, "--checkpoint-every", str(args.checkpoint_every)]
  kills, attempt, started = [], 0, time.time()
  while True:
    attempt += 1
    log, progress = logs / f"attempt{attempt}.log", logs / f"attempt{attempt}.progress"
    after_best = attempt == 1 and args.kills > 0
    child = _child(args, killed, flags, log, progress, kill_after_best=after_best, cache=cache)
    target = targets[len(kills) - 1] if 0 < len(kills) < args.kills else None
    moment = ""
    if target is not None:
      base = None
      while child.poll() is None:
        if base is None and log.exists() and _read_int(progress):
          base = _resumed_from(log)
        if base is not None and base + _read_int(progress) >= target:
          delay = rng.uniform(0, 2)
          time.sleep(delay)
          moment = f"{delay:.2f} s after passing step {target}"
          child.send_signal(signal.SIGKILL)
          break
        time.sleep(0.01)
    code = child.wait()
    resumed = _resumed_from(log)
    done = resumed + _read_int(progress)
    if code == 0:
      break
    if code != -signal.SIGKILL:
      sys.exit(f"attempt {attempt} failed with exit code {code}; see {log}")
    if after_best:
      epoch = re.search(r"after best/(\d+)", log.read_text()).group(1)
      moment = f"right after best/{epoch} was written, before its checkpoint"
    kills.append({"attempt": attempt, "moment": moment, "done": done})
    if len(kills) > args.kills:
      sys.exit("more kills than planned: the run does not progress")
  # Steps retrained per kill: where the run was when killed minus where the next attempt resumed.
  attempts_logs = [logs / f"attempt{k['attempt'] + 1}.log" for k in kills]
  for kill, next_log in zip(kills, attempts_logs):
    kill["resumed"] = _resumed_from(next_log)
    kill["lost"] = max(0, kill["done"] - kill["resumed"])
  for n, kill in enumerate(kills, start=1):
    print(f"kill {n}: SIGKILL {kill['moment']} (attempt {kill['attempt']}, {kill['done']} steps "
          f"dispatched): the rerun resumed from step {kill['resumed']}, {kill['lost']} steps "
          f"lost (~{kill['lost'] * step_seconds:.1f} s of training)")
  lost = [k["lost"] for k in kills]
  print(f"the killed run finished after {attempt} attempts, {time.time() - started:.0f} s wall; "
        f"work lost per kill (steps retrained): {', '.join(map(str, lost))} (mean "
        f"{np.mean(lost) if lost else 0:.1f}; an epoch is {per_epoch} steps)")
  problems = _compare(killed, reference)
  if problems:
    print("DIFFERENT from the uninterrupted run: " + "; ".join(problems))
    sys.exit(1)
  print(f"final checkpoint (step {total}), best/, summary.json and metrics.jsonl: bitwise "
        "identical to the uninterrupted run")


if __name__ == "__main__":
  main()
