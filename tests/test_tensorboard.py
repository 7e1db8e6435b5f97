"""A run writes TensorBoard event files that read back as the metrics' curves."""
import dataclasses
import json

import pytest

from gen_jax import config as cfg
from gen_jax import runs, tensorboard, training


def _scalars(directory):
  """tag -> [(step, value)] over the event files in name order, with TensorBoard's purge rule:
  a file opened with `purge_step` p drops the earlier files' events at steps >= p."""
  loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
  curves = {}
  for path in sorted(directory.iterdir()):
    events = list(loader.EventFileLoader(str(path)).Load())
    purge = [e.step for e in events if e.HasField("file_version") and e.step]
    if purge:
      curves = {t: [(s, v) for s, v in c if s < purge[0]] for t, c in curves.items()}
    for event in events:
      for value in event.summary.value:
        scalar = value.simple_value if value.HasField("simple_value") else value.tensor.float_val[0]
        curves.setdefault(value.tag, []).append((event.step, scalar))
  return curves


def test_scalars_of_a_record_cover_training_evaluation_and_schedule():
  record = {
      "epoch": 3,
      "train": {
          "natural": {
              "loss": 1.0,
              "acc": 0.5
          }
      },
      "test": {
          "global": {
              "clean_acc": 0.6,
              "pgd_acc": 0.2
          }
      },
      "validation": {
          "global": {
              "clean_acc": 0.7,
              "pgd_acc": 0.3
          }
      },
      "lr": {
          "natural": 0.01
      },
      "beta": 0.9,
      "train_seconds": 2.0
  }
  tags = dict(tensorboard.scalars(record, images_per_epoch=100))
  assert tags == {
      "train/natural/loss": 1.0,
      "train/natural/acc": 0.5,
      "test/global/clean_acc": 0.6,
      "test/global/pgd_acc": 0.2,
      "validation/global/clean_acc": 0.7,
      "validation/global/pgd_acc": 0.3,
      "schedule/lr/natural": 0.01,
      "schedule/beta": 0.9,
      "speed/images_per_second": 50.0
  }


def test_a_run_writes_event_files_that_read_back_as_its_metrics(tmp_path):
  config = dataclasses.replace(cfg.get_config("tiny"), epochs=2)
  # One epoch, a resume, then the second: each epoch appears once in the events.
  training.train_and_evaluate(config, tmp_path, progress=False, max_epochs=1)
  training.train_and_evaluate(config, tmp_path, progress=False)
  curves = _scalars(tmp_path / tensorboard.DIRECTORY)
  records = runs.read_metrics(tmp_path)
  for role in ("natural", "robust"):
    steps, values = zip(*curves[f"train/{role}/loss"])
    assert steps == (1, 2)  # each epoch once, the retrained one not doubled
    assert values == pytest.approx([r["train"][role]["loss"] for r in records])
  assert [s for s, _ in curves["test/global/clean_acc"]] == [1, 2]
  assert curves["schedule/beta"][-1][0] == 2
  assert curves["schedule/beta"][-1][1] == pytest.approx(records[-1]["beta"])
  assert "speed/images_per_second" in curves
  json.dumps(curves)
