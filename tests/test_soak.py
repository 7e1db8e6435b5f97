"""experiments/soak.py's phases on the tiny preset: one kill each, and the guarantees checked.

Each test runs one phase of the soak (start-up, final evaluation, export, --select) with real
signals sent to real processes (train.py, export.py, sweep_mix.py), reruns the same command and
asserts both the soak's own verdict and, from the records and markers, that the kill landed
where it was meant to and how the child ended (a missed kill would pass the comparisons
vacuously). The reference run is trained once for the module; the children share the test
session's compilation cache, so each start-up takes seconds.
"""
import importlib.util
import json
import pathlib
import shutil
import signal

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _load_soak():
  # experiments/soak.py by path, without putting experiments/ on sys.path for other tests.
  spec = importlib.util.spec_from_file_location("soak_cli", ROOT / "experiments" / "soak.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


soak_lib = _load_soak()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A soak workdir holding the uninterrupted tiny reference run."""
  directory = tmp_path_factory.mktemp("soak")
  soak = soak_lib.Soak(directory, logs=directory / "logs-reference")
  summary, windows, reused = soak_lib.train_reference(soak, "tiny", [])
  assert not reused and summary["steps"] == 10
  assert 0 < windows["startup_after_handler"] < windows["startup"]
  return directory


def _soak(workdir, name, seed=0):
  return soak_lib.Soak(workdir, seed=seed, logs=workdir / f"logs-{name}")


def _names(record):
  """The markers the killed child passed, in order."""
  log = pathlib.Path(record["log"])
  marks = log.with_suffix(".marks").read_text().splitlines()
  return [line.split(" ")[0] for line in marks]


def _last_line(record):
  return pathlib.Path(record["log"]).read_text().strip().splitlines()[-1]


def test_kills_during_start_up_resume_to_the_uninterrupted_run(workdir):
  soak = _soak(workdir, "startup")
  records = soak_lib.soak_training(soak,
                                   "tiny", [],
                                   phases=["startup"],
                                   kills=0,
                                   phase_kills=2,
                                   checkpoint_every=10,
                                   reuse_reference=True)
  assert soak.problems == []
  term, kill = records
  assert [r["phase"] for r in records] == ["startup", "startup"]
  # SIGTERM after the handler: the one-line exit 143, before any training step.
  assert term["signum"] == signal.SIGTERM and term["code"] == 143
  assert "handler" in _names(term) and term["done"] == 0
  assert _last_line(term).startswith("stopped by SIGTERM; ")
  assert kill["signum"] == signal.SIGKILL and kill["code"] == -signal.SIGKILL and kill["done"] == 0
  assert "final-eval" not in _names(term) + _names(kill)
  assert soak_lib.compare_runs(workdir / "killed", workdir / "reference") == []


def test_a_sigterm_during_the_final_evaluation_writes_no_summary_and_the_rerun_finishes(workdir):
  soak = _soak(workdir, "final-eval")
  (record,) = soak_lib.soak_training(soak,
                                     "tiny", [],
                                     phases=["final-eval"],
                                     kills=0,
                                     phase_kills=1,
                                     checkpoint_every=10,
                                     reuse_reference=True)
  assert soak.problems == []
  assert record["signum"] == signal.SIGTERM and record["code"] == 143
  names = _names(record)
  assert names[-1] in ("final-eval", "summary") and "final-eval" in names
  assert _last_line(record).startswith("stopped by SIGTERM; training is complete (checkpoint step "
                                       "10)")
  # The rerun resumed from the final checkpoint: nothing retrained, the models evaluated anew.
  assert record["done"] == 10 and record["resumed"] == 10 and record["lost"] == 0
  assert soak_lib.compare_runs(workdir / "killed", workdir / "reference") == []


def test_an_export_killed_after_model_onnx_is_redone_whole_by_the_rerun(workdir, tmp_path):
  soak = _soak(workdir, "export")
  (record,) = soak_lib.soak_export(soak, 1)
  assert soak.problems == []
  assert record["point"] == "model.onnx" and record["code"] == -signal.SIGKILL
  assert _names(record)[-1] == "model.onnx"
  # The kill left the unfinished export under its hidden name only; the rerun said it removed it.
  assert record["partial_left"] and not record["output_left"] and record["cleaned_by_next"]
  exports = workdir / "export"
  assert sorted(p.name for p in exports.iterdir()) == ["killed", "reference"]
  assert soak_lib.compare_exports(exports / "killed", exports / "reference") == []
  # The comparison sees a changed byte, a missing file and another parity figure.
  changed = tmp_path / "changed"
  shutil.copytree(exports / "killed", changed)
  onnx = changed / "model.onnx"
  data = bytearray(onnx.read_bytes())
  data[len(data) // 2] ^= 1
  onnx.write_bytes(bytes(data))
  assert soak_lib.compare_exports(changed, exports / "reference") == ["model.onnx differs"]
  record_file = changed / "model.json"
  model = json.loads(record_file.read_text())
  model["parity"]["onnx"]["max_abs_diff"] = 1.0
  model["export_seconds"] = {"onnx": 1e6}  # a time: not compared
  record_file.write_text(json.dumps(model))
  assert "model.json differs" in soak_lib.compare_exports(changed, exports / "reference")
  onnx.unlink()
  assert soak_lib.compare_exports(changed, exports / "reference")[0].startswith("files ")


def test_a_select_killed_mid_save_leaves_no_stray_folder_and_no_second_mixture(workdir, tmp_path):
  soak = _soak(workdir, "select")
  (record,) = soak_lib.soak_select(soak, 1)
  assert soak.problems == []
  # Killed after the mixture's arrays were written, before its model.json and the rename.
  assert record["point"] == "model.json" and record["code"] == -signal.SIGKILL
  assert _names(record)[-1] == "model.json"
  assert record["partial_left"] and not record["output_left"] and record["cleaned_by_next"]
  ours, theirs = (workdir / "select" / which / "eval" for which in ("killed", "reference"))
  saved = sorted(p.name for p in ours.glob("mix-beta*"))
  assert saved == sorted(p.name for p in theirs.glob("mix-beta*")) and len(saved) == 1
  assert not [p for p in ours.iterdir() if p.name.startswith(".")]
  assert soak_lib.compare_selections(ours / saved[0], theirs / saved[0]) == []
  # The comparison sees a second mixture (the `-2` of a rerun that found the name taken).
  copy = tmp_path / "run" / "eval"
  shutil.copytree(ours, copy)
  shutil.copytree(copy / saved[0], copy / f"{saved[0]}-2")
  problems = soak_lib.compare_selections(copy / saved[0], theirs / saved[0])
  assert any(p.startswith("eval/ holds ") for p in problems), problems


def test_an_interrupt_noticed_in_a_gc_callback_is_not_an_unhandled_traceback():
  notice = (
      "Exception ignored in: <function _xla_gc_callback at 0x7f>\n"
      "Traceback (most recent call last):\n"
      '  File "jax/_src/lib/__init__.py", line 132, in _xla_gc_callback\n'
      "    def _xla_gc_callback(*args):\n"
      "    \n"
      "gen_jax.training.loop.TrainingInterrupted: stopped by SIGTERM; rerun the same command.\n")
  last = "stopped by SIGTERM; rerun the same command.\n"
  assert "Traceback" not in soak_lib._IGNORED_INTERRUPT.sub("", notice + last)
  crash = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: boom\n"
  assert "Traceback" in soak_lib._IGNORED_INTERRUPT.sub("", notice + crash + last)
