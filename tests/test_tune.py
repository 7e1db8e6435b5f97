"""Tests of the hyperparameter search (gen_jax.tune, experiments/tune.py) on the tiny preset.

The end-to-end tests run experiments/tune.py as subprocesses on a SQLite study: one killed with
SIGKILL in the middle of its second trial and run again, two workers sharing one study. The
bookkeeping (a stop's retry, an orphaned trial, a surplus draw) is also checked in-process with
a stand-in for the training loop that writes the figures a trial's parameters name, so that
each case takes milliseconds.
"""
import dataclasses
import importlib.util
import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from gen_jax import checkpoint, cli, runlock, runs, tune
from gen_jax import config as cfg
from gen_jax import study as study_lib
from gen_jax.evaluation import sweep
from gen_jax.training.loop import TrainingInterrupted

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Two fields whose values reach the training step as arrays (learning-rate and beta tables), so
# that every trial reuses the same compiled programs.
SPACE = {
    "base": "none",
    "lr_nat": {
        "low": 0.02,
        "high": 0.1,
        "scale": "log"
    },
    "beta_final": {
        "low": 0.3,
        "high": 0.7
    }
}
_TRIAL_LINE = re.compile(r"^trial (\d+)(?:, resuming trial \d+)?: .* -> (.+)$", re.M)


def _space_file(tmp_path, record=None) -> pathlib.Path:
  path = tmp_path / "space.json"
  path.write_text(json.dumps(SPACE if record is None else record))
  return path


def _command(workdir, space, *flags):
  return [
      sys.executable,
      str(ROOT / "experiments" / "tune.py"), "--preset", "tiny", "--study-name", "s", "--workdir",
      str(workdir), "--space",
      str(space), "--no-progress", *flags
  ]


def _load(workdir) -> optuna.Study:
  return optuna.load_study(study_name="s", storage=tune.default_storage(workdir))


def _sampled(space, rank: int) -> dict:
  """The parameters the sampler draws for the slot of `rank` when it has no history to model."""
  study = optuna.create_study(directions=["maximize", "maximize"],
                              sampler=tune.make_sampler(0, rank))
  trial = study.ask()
  return {name: knob.suggest(trial, name) for name, knob in space.items()}


def _last_validation(run_dir) -> list[float]:
  val = runs.read_metrics(run_dir)[-1]["validation"]["global"]
  return [val["clean_acc"], val["pgd_acc"]]


@pytest.mark.programs_compile_fast
# ------------------------------------------------------------------------- end to end (slow)
@pytest.mark.slow
def test_a_study_killed_in_its_second_trial_resumes_to_the_same_finished_trials(tmp_path):
  workdir, space_file = tmp_path / "w", _space_file(tmp_path)
  # A mid-epoch checkpoint (step 3 of 5 per epoch), so that the kill lands inside trial 1's
  # training with most of it still to run.
  base = dataclasses.replace(cfg.get_config("tiny"), checkpoint_every=3)
  space = tune.load_space(space_file, base)
  command = _command(workdir, space_file, "--trials", "3", "--checkpoint-every", "3")
  with open(tmp_path / "first.log", "w") as log:
    first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    checkpoints = workdir / tune.TRIALS_DIR / "1" / runs.CHECKPOINT_DIR
    while first.poll() is None and not (checkpoints.is_dir() and
                                        any(p.name.isdigit() for p in checkpoints.iterdir())):
      time.sleep(0.02)
    first.kill()
    first.wait()
  assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
  killed = _load(workdir).get_trials()
  assert [t.state for t in killed] == [TrialState.COMPLETE, TrialState.RUNNING]
  assert killed[1].user_attrs["worker"]["pid"] == first.pid
  finished_0 = workdir / tune.TRIALS_DIR / "0" / runs.SUMMARY_FILE
  stamp = finished_0.stat().st_mtime_ns

  second = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  assert f"Resuming {workdir / tune.TRIALS_DIR / '1'} from step" in second.stdout
  assert "trial 1 was running, but its worker" in second.stdout
  trials = _load(workdir).get_trials()
  assert [t.state for t in trials
         ] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
  retry = trials[2]
  assert retry.user_attrs["retry_of"] == 1 and tune.slot_of(retry) == 1
  assert retry.params == killed[1].params
  assert trials[1].user_attrs["ended"].startswith("interrupted")
  # Slots 0, 1 (resumed in its own directory) and 3; trial 0 was not touched again.
  assert sorted(p.name for p in (workdir / tune.TRIALS_DIR).iterdir()) == ["0", "1", "3"]
  assert finished_0.stat().st_mtime_ns == stamp
  complete = [t for t in trials if t.state == TrialState.COMPLETE]
  for trial in complete:
    run_dir = tune.run_dir_of(workdir, tune.slot_of(trial))
    assert runs.read_summary(run_dir) is not None
    assert trial.values == _last_validation(run_dir)
    assert runs.read_config(run_dir) == tune.trial_config(base, trial.params)
  # The same parameter sets as an uninterrupted study: each slot's draw depends on its rank only.
  assert [t.params for t in complete] == [_sampled(space, rank) for rank in range(3)]
  _check_report(workdir, base, space, complete)


def _baseline(workdir, base, method, clean, robust):
  """A finished run directory of `method` whose last epoch's validation figures are these."""
  run_dir = workdir / method
  run_dir.mkdir()
  config = dataclasses.replace(base, method=method)
  (run_dir / runs.CONFIG_FILE).write_text(json.dumps(cfg.config_record(config)))
  figures = {"clean_acc": clean, "pgd_acc": robust}
  for epoch in range(1, config.epochs + 1):
    runs.append_metrics(run_dir, {"epoch": epoch, "validation": {"global": figures}})
  runs.write_summary(run_dir, {"models": {"global": figures}})


def _check_report(workdir, base, space, complete):
  """The report of a finished study: files, front, baselines' chord, saved and selected models."""
  _baseline(workdir, base, "natural", 0.95, 0.0)
  _baseline(workdir, base, "pgd_at", 0.05, 0.05)
  result = tune.report(_load(workdir),
                       workdir,
                       base=base,
                       space=space,
                       select=sweep.parse_rule("clean>=0"))
  written = json.loads((workdir / "tune.json").read_text())
  assert [t["state"] for t in written["trials"]] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
  assert written["trials"][2]["retry_of"] == 1 and written["counts"]["slots"] == 3
  points = {p["trial"]: (p["clean"], p["robust"]) for p in written["points"]}
  assert points == {t.number: tuple(t.values) for t in complete}
  on_front = {p["trial"] for p in written["front"]}
  dominated = lambda a: any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in points.values())
  assert on_front == {n for n, v in points.items() if not dominated(v)}
  assert set(written["baselines"]) == {"natural", "pgd_at"}
  for p in written["front"]:
    expected = study_lib.chord_score({
        "generalist": p["clean"],
        "natural": 0.95,
        "pgd_at": 0.05
    }, {
        "generalist": p["robust"],
        "natural": 0.0,
        "pgd_at": 0.05
    })
    assert p["chord"] == pytest.approx(expected)
    model = runs.load_model(p["model"])  # what evaluate.py --checkpoint and export.py read
    trial = next(t for t in complete if t.number == p["trial"])
    assert model.config == tune.trial_config(base, trial.params)
    final, _ = checkpoint.restore_items(
        tune.run_dir_of(workdir, tune.slot_of(trial)) / runs.CHECKPOINT_DIR,
        [runs.GLOBAL_MODEL_KEY])
    for a, b in zip(jax.tree_util.tree_leaves(final[runs.GLOBAL_MODEL_KEY]),
                    jax.tree_util.tree_leaves(next(iter(model.models.values())))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  chosen = written["selected"]
  assert chosen["trial"] in on_front and chosen["model"] == result["selected"]["model"]
  assert chosen["robust"] == max(v[1] for v in points.values())
  assert (workdir / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "Baseline natural: clean 95.00 %" in (workdir / "tune.md").read_text()


@pytest.mark.programs_compile_fast
@pytest.mark.slow
def test_two_workers_share_a_study_without_running_a_trial_twice(tmp_path):
  workdir, space_file = tmp_path / "w", _space_file(tmp_path)
  command = _command(workdir, space_file, "--trials", "4", "--epochs", "1")
  logs = [tmp_path / f"worker{i}.log" for i in range(2)]
  workers = []
  for path in logs:
    with open(path, "w") as log:
      workers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
  for worker, path in zip(workers, logs):
    assert worker.wait(timeout=600) == 0, path.read_text()[-3000:]
  trained = [m for path in logs for m in _TRIAL_LINE.findall(path.read_text())]
  run_dirs = [run_dir for _, run_dir in trained]
  assert len(run_dirs) == 4 and len(set(run_dirs)) == 4, trained
  trials = _load(workdir).get_trials()
  complete = [t for t in trials if t.state == TrialState.COMPLETE]
  assert len(complete) == 4 and len({tune.slot_of(t) for t in complete}) == 4
  assert len({tuple(sorted(t.params.items())) for t in complete}) == 4  # four configurations
  # A draw beyond the budget (both workers asking at once) is given up before it trains.
  assert all(
      t.user_attrs.get("ended") == "surplus" and not t.params
      for t in trials
      if t.state != TrialState.COMPLETE)
  assert sorted(run_dirs) == sorted(
      str(tune.run_dir_of(workdir, tune.slot_of(t))) for t in complete)
  for trial in complete:
    assert trial.values == _last_validation(tune.run_dir_of(workdir, tune.slot_of(trial)))
  assert "already holds a finished run" not in "".join(p.read_text() for p in logs)


def test_a_trial_below_both_medians_is_pruned_and_not_counted_as_finished(tmp_path):
  base = dataclasses.replace(cfg.get_config("tiny"), epochs=2)
  space = tune.parse_space(SPACE, base)
  storage = tune.open_storage(tune.default_storage(tmp_path))
  study = tune.open_study(storage, "s", base=base, space=space)
  # Two completed trials that reached 90 % in both figures at every epoch.
  for lr in (0.03, 0.05):
    study.add_trial(
        optuna.trial.create_trial(state=TrialState.COMPLETE,
                                  values=[0.9, 0.9],
                                  params={
                                      "lr_nat": lr,
                                      "beta_final": 0.5
                                  },
                                  distributions={
                                      "lr_nat": FloatDistribution(0.02, 0.1, log=True),
                                      "beta_final": FloatDistribution(0.3, 0.7)
                                  },
                                  user_attrs={"validation": {
                                      "1": [0.9, 0.9],
                                      "2": [0.9, 0.9]
                                  }}))
  done = tune.run_trials(study,
                         storage,
                         base=base,
                         space=space,
                         workdir=tmp_path,
                         trials=3,
                         pruning=tune.Pruning(min_trials=2),
                         progress=False,
                         log=lambda line: None)
  assert done == {"complete": 0, "pruned": 1, "diverged": 0, "resumed": 0}
  trial = study.get_trials()[2]
  assert trial.state == TrialState.PRUNED and trial.values is None
  clean, robust = trial.user_attrs["validation"]["1"]
  assert clean < 0.9 and robust < 0.9 and list(trial.user_attrs["validation"]) == ["1"]
  # Stopped after its first epoch: saved (so it could resume), never finished.
  run_dir = tune.run_dir_of(tmp_path, 2)
  assert [r["epoch"] for r in runs.read_metrics(run_dir)] == [1]
  assert runs.read_summary(run_dir) is None
  assert _last_validation(run_dir) == [clean, robust]
  result = tune.collect(study, tmp_path, base=base, space=space)
  assert result["counts"]["pruned"] == 1 and result["counts"]["complete"] == 2
  assert [p["trial"] for p in result["points"]] == [0, 1]
  assert "2 complete, 1 pruned" in tune.to_markdown(result)
  # The study's slots are taken: a rerun trains nothing.
  assert tune.run_trials(study,
                         storage,
                         base=base,
                         space=space,
                         workdir=tmp_path,
                         trials=3,
                         log=lambda line: None)["pruned"] == 0


def test_the_pruning_rule_needs_both_figures_below_the_medians():
  peers = [(0.8, 0.3), (0.6, 0.5), (0.7, 0.4)]
  rule = tune.Pruning(min_trials=3)
  assert tune.prune_reason((0.65, 0.35), peers, epoch=3, pruning=rule).startswith("epoch 3:")
  # A trial that trades one figure for the other may end on the front: it runs on.
  assert tune.prune_reason((0.9, 0.1), peers, epoch=3, pruning=rule) is None
  assert tune.prune_reason((0.1, 0.45), peers, epoch=3, pruning=rule) is None
  assert tune.prune_reason((0.7, 0.35), peers, epoch=3, pruning=rule) is None  # on the median
  assert tune.prune_reason((0.1, 0.1), peers[:2], epoch=3, pruning=rule) is None  # too few
  assert tune.prune_reason((0.1, 0.1),
                           peers,
                           epoch=3,
                           pruning=tune.Pruning(warmup_epochs=3, min_trials=3)) is None
  assert tune.prune_reason((0.1, 0.1), peers, epoch=3, pruning=tune.Pruning(enabled=False)) is None


# ----------------------------------------------------------- bookkeeping with a stand-in loop
def _stand_in(monkeypatch, *, stop_at=None):
  """Replaces the training loop: epoch e's figures are (lr_nat, beta_final) of the trial, written
  to metrics.jsonl as the loop writes them; SIGTERM at epoch `stop_at`. Returns the run
  directories it was called on."""
  calls = []

  def train(config, workdir, *, progress, on_epoch):
    del progress
    workdir = pathlib.Path(workdir)
    calls.append(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    figures = {"clean_acc": config.lr_nat, "pgd_acc": config.beta_final}
    for epoch in range(len(runs.read_metrics(workdir)) + 1, config.epochs + 1):
      if epoch == stop_at:
        raise TrainingInterrupted(signal.SIGTERM, "stopped by SIGTERM")
      record = {"epoch": epoch, "validation": {"global": figures}}
      runs.append_metrics(workdir, record)
      on_epoch(epoch, record)
    return {"models": {"global": figures}, "train_seconds": 0.0}

  monkeypatch.setattr(tune.training, "train_and_evaluate", train)
  return calls


def _study(tmp_path):
  base = dataclasses.replace(cfg.get_config("tiny"), epochs=2)
  space = tune.parse_space(SPACE, base)
  storage = tune.open_storage(tune.default_storage(tmp_path))
  study = tune.open_study(storage, "s", base=base, space=space)
  run = lambda trials: tune.run_trials(study,
                                       storage,
                                       base=base,
                                       space=space,
                                       workdir=tmp_path,
                                       trials=trials,
                                       log=lambda line: None)
  return study, storage, run


def test_a_stopped_trial_queues_its_retry_which_resumes_in_its_directory(tmp_path, monkeypatch):
  study, _, run = _study(tmp_path)
  calls = _stand_in(monkeypatch, stop_at=2)
  with pytest.raises(TrainingInterrupted):
    run(2)
  stopped, retry = study.get_trials()
  assert stopped.state == TrialState.FAIL and stopped.user_attrs["ended"].startswith("interrupted")
  assert retry.state == TrialState.WAITING
  assert (retry.user_attrs["slot"], retry.user_attrs["retry_of"]) == (0, 0)
  calls = _stand_in(monkeypatch)
  assert run(2) == {"complete": 1, "pruned": 0, "diverged": 0, "resumed": 1}
  assert calls == [tmp_path / "trials" / "0", tmp_path / "trials" / "2"]
  trials = study.get_trials()
  assert [t.state for t in trials[1:]] == [TrialState.COMPLETE, TrialState.COMPLETE]
  assert trials[1].params == stopped.params
  for trial in trials[1:]:  # the stand-in's figures are the trial's own parameters
    assert trial.values == [trial.params["lr_nat"], trial.params["beta_final"]]
    assert sorted(trial.user_attrs["validation"]) == ["1", "2"]
  calls = _stand_in(monkeypatch)
  assert run(2)["complete"] == 0 and calls == []  # finished trials are never retrained


def test_an_orphaned_trial_is_retried_and_a_draw_beyond_the_budget_given_up(tmp_path, monkeypatch):
  study, storage, run = _study(tmp_path)
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  # A trial whose worker on this host was killed: still RUNNING in the storage.
  orphan = study.ask()
  orphan.suggest_float("lr_nat", 0.02, 0.1, log=True)
  orphan.suggest_float("beta_final", 0.3, 0.7)
  orphan.set_user_attr("worker", {**runlock.this_process(), "pid": gone.pid, "start": None})
  calls = _stand_in(monkeypatch)
  assert run(1) == {"complete": 0, "pruned": 0, "diverged": 0, "resumed": 1}
  assert calls == [tmp_path / "trials" / "0"]
  first, retry = study.get_trials()
  assert first.state == TrialState.FAIL and "has ended" in first.user_attrs["ended"]
  assert retry.state == TrialState.COMPLETE and retry.params == first.params
  # Two workers asked at once: the draw beyond the study's one slot never trains.
  extra = study.ask()
  assert tune._run_trial(study,
                         extra,
                         base=cfg.get_config("tiny"),
                         space={},
                         workdir=tmp_path,
                         trials=1,
                         pruning=tune.Pruning(),
                         sampler=tune.make_sampler,
                         heartbeat=60.0,
                         progress=False,
                         log=lambda line: None) == "surplus"
  given_up = study.get_trials()[-1]
  assert given_up.state == TrialState.FAIL and given_up.user_attrs["ended"] == "surplus"
  assert not given_up.params and run(1)["complete"] == 0 and calls == [tmp_path / "trials" / "0"]
  # A worker of another host is known by its heartbeat only.
  elsewhere = optuna.trial.create_trial(state=TrialState.RUNNING,
                                        user_attrs={
                                            "worker": {
                                                "pid": 1,
                                                "host": "elsewhere"
                                            },
                                            "alive_at": 1000.0
                                        })
  assert tune.orphan_reason(elsewhere, grace=180, now=1100.0) is None
  assert "no heartbeat for 300 s" in tune.orphan_reason(elsewhere, grace=180, now=1300.0)
  here = optuna.trial.create_trial(state=TrialState.RUNNING,
                                   user_attrs={
                                       "worker": runlock.this_process(),
                                       "alive_at": 1000.0
                                   })
  assert tune.orphan_reason(here, grace=180, now=1300.0) is None  # alive: asked, not guessed


def test_a_retry_queued_while_its_original_is_still_marked_running_trains(tmp_path, monkeypatch):
  # A stopped worker queues the retry, then fails the original: another worker may take the
  # retry in between. It must train, not be given up as a duplicate of the original.
  study, _, run = _study(tmp_path)
  original = study.ask()
  original.suggest_float("lr_nat", 0.02, 0.1, log=True)
  original.suggest_float("beta_final", 0.3, 0.7)
  original.set_user_attr("worker", runlock.this_process())  # alive: not an orphan
  tune._requeue(study, study.get_trials()[0], 0)
  calls = _stand_in(monkeypatch)
  assert run(1) == {"complete": 0, "pruned": 0, "diverged": 0, "resumed": 1}
  assert calls == [tmp_path / "trials" / "0"]
  assert study.get_trials()[1].state == TrialState.COMPLETE


# ------------------------------------------------------------------------- refused before work
@pytest.mark.parametrize("record,fixed,message", [
    ({
        "lr_nat": {
            "low": -0.1,
            "high": 0.1
        }
    }, (), r"lr_nat low -0\.1 is refused by the config: "
     r"--lr-nat must be >= 0"),
    ({
        "beta_final": {
            "low": 0.2,
            "high": 1.5
        }
    }, (), r"beta_final high 1\.5 is refused by the "
     r"config: --beta-final must lie in \[0, 1\]"),
    ({
        "redistribute_period": {
            "low": 0.0,
            "high": 0.1
        }
    }, (), r"redistribute_period low 0\.0 .* "
     r"must lie in \(0, 1\]"),
    ({
        "eps": {
            "low": 0.01,
            "high": 0.1
        }
    }, (), r"'eps' is not a config field the search may vary"),
    ({
        "lr_rob": {
            "low": 0,
            "high": 0.1,
            "scale": "log"
        }
    }, (), r"lr_rob: a log scale needs low > 0"),
    ({
        "pgd_steps": {
            "low": 2,
            "high": 8,
            "scale": "log"
        }
    }, (), r"pgd_steps takes scale int"),
    ({
        "pgd_steps": {
            "low": 2.5,
            "high": 8
        }
    }, (), r"pgd_steps: an int range needs whole numbers"),
    ({
        "ema_decay": {
            "low": 0.999,
            "high": 0.99
        }
    }, (), r"ema_decay: low 0\.999 must be below high"),
    ({
        "lr_nat": {
            "low": 0.01,
            "high": 0.1
        }
    }, ("lr_nat",), r"lr_nat is also set on the command "
     r"line \(--lr-nat\)"),
    ({
        "lr_nat": {
            "low": 0.01,
            "hi": 0.1
        }
    }, (), r"lr_nat has unknown keys \['hi'\]"),
    ({
        "base": "none"
    }, (), r"searches no field"),
])
def test_an_invalid_space_is_refused_naming_the_field(record, fixed, message):
  with pytest.raises(ValueError, match=message):
    tune.parse_space(record, cfg.get_config("tiny"), fixed=fixed)


def test_the_default_space_leaves_out_what_the_method_ignores():
  tiny = cfg.get_config("tiny")
  assert list(tune.parse_space({}, tiny)) == list(tune.DEFAULT_SPACE)
  assert "lr_nat" not in tune.parse_space({}, tiny, fixed=("lr_nat",))
  pgd_at = dataclasses.replace(tiny, method="pgd_at")
  assert set(tune.parse_space({},
                              pgd_at)) == {"lr_rob", "weight_decay_rob", "ema_decay", "pgd_steps"}
  with pytest.raises(ValueError, match=r"beta_final has no effect in this study \(--method pgd_at"):
    tune.parse_space({"beta_final": {"low": 0.2, "high": 0.8}}, pgd_at)


def test_the_program_refuses_a_bad_space_or_another_study_before_training(
    tmp_path, monkeypatch, capsys):
  spec = importlib.util.spec_from_file_location("program_tune", ROOT / "experiments" / "tune.py")
  program = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(program)
  bad = _space_file(tmp_path, {"beta_final": {"low": 0.2, "high": 1.5}})

  def refusal(*argv):
    monkeypatch.setattr(sys, "argv", ["tune.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
      cli.main_guard(program.main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(err)
    return err[-1]

  workdir = tmp_path / "w"
  line = refusal("--preset", "tiny", "--study-name", "s", "--trials", "2", "--workdir",
                 str(workdir), "--space", str(bad))
  assert line.startswith(f"error: --space {bad}: beta_final high 1.5 is refused by the config")
  assert not workdir.exists()  # no storage, no trial
  # A study exists: joining it with other settings is refused, naming the field.
  base = cfg.get_config("tiny")
  storage = tune.open_storage(tune.default_storage(workdir))
  tune.open_study(storage, "s", base=base, space=tune.parse_space(SPACE, base))
  line = refusal("--preset", "tiny", "--study-name", "s", "--trials", "2", "--workdir",
                 str(workdir), "--space", str(_space_file(tmp_path)), "--lr-rob", "0.02")
  assert "study 's' was created with lr_rob = 0.05, this command has 0.02" in line
  line = refusal("--preset", "tiny", "--study-name", "s", "--trials", "2", "--workdir",
                 str(workdir))
  assert "study 's' searches another space" in line
  assert not (workdir / tune.TRIALS_DIR).exists()
  assert "--report reads the study's own settings; drop --preset" in refusal(
      "--report", "--preset", "tiny", "--study-name", "s", "--workdir", str(workdir))
