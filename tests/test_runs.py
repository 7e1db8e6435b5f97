"""Tests of gen_jax.runs: the run directory's records and the evaluation doors into it."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gen_jax import checkpoint, models, runs, training
from gen_jax import config as cfg


def test_config_record_round_trip_and_records_of_earlier_versions(tmp_path):
  config = dataclasses.replace(cfg.get_config("tiny"), eps=0.1)
  record = cfg.config_record(config)
  assert cfg.config_from_record(record) == config
  older = {k: v for k, v in record.items() if k != "eval_test_size"}  # written before the field
  assert cfg.config_from_record(older) == config
  (tmp_path / "config.json").write_text(json.dumps(older))
  assert runs.check_config(config, tmp_path)  # same run: resumable
  with pytest.raises(ValueError, match="another config.*eps"):
    runs.check_config(dataclasses.replace(config, eps=0.2), tmp_path)
  with pytest.raises(cfg.ConfigError, match="warmup_epochs"):
    cfg.config_from_record({**record, "warmup_epochs": 5})
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    runs.check_config(config, tmp_path)


def test_a_data_error_leaves_no_config_behind(tmp_path):
  # A run whose data fail to load records nothing, so the corrected command is not refused.
  bad = dataclasses.replace(cfg.get_config("tiny"), dataset="folder", data_dir=str(tmp_path / "x"))
  with pytest.raises(ValueError, match="does not exist"):
    training.train_and_evaluate(bad, tmp_path / "run", progress=False)
  assert not (tmp_path / "run" / "config.json").exists()


def test_read_summary_turns_earlier_summaries_into_todays_form(tmp_path):
  assert runs.read_summary(tmp_path) is None
  (tmp_path / "summary.json").write_text(
      json.dumps({
          "global": {
              "clean_acc": 0.5,
              "pgd20_acc": 0.25
          },
          "natural": {
              "clean_acc": 0.6,
              "pgd20_acc": 0.0
          },
          "method": "natural",
          "steps": 10
      }))
  summary = runs.read_summary(tmp_path)
  assert summary["models"] == {
      "natural": {
          "clean_acc": 0.6,
          "pgd_acc": 0.0
      },
      "global": {
          "clean_acc": 0.5,
          "pgd_acc": 0.25
      }
  }
  assert summary["steps"] == 10 and "global" not in summary


def _variables(value):
  model = models.create_model("smallcnn", 10)
  v = models.init_variables(model, jax.random.key(0), (16, 16, 1))
  return jax.tree_util.tree_map(lambda a: jnp.full_like(a, value), v)


def test_metrics_of_earlier_versions_read_in_todays_form_and_plot(tmp_path):
  """A run begun before the role vocabulary and resumed since holds both kinds of lines."""
  from gen_jax.evaluation import plots  # pylint: disable=import-outside-toplevel
  legacy = {
      "epoch": 1,
      "step": 74,
      "nat_loss": 1.9,
      "nat_acc": 0.28,
      "rob_loss": 2.2,
      "rob_acc": 0.18,
      "lr_nat": 0.05,
      "lr_rob": 0.04,
      "beta": 0.75,
      "redistributed_steps": 0,
      "train_seconds": 18.9,
      "test": {
          "global": {
              "clean_acc": 0.4,
              "pgd_acc": 0.2
          }
      },
      "val_global": {
          "clean_acc": 0.38,
          "pgd_acc": 0.19
      }
  }
  today = {
      "epoch": 2,
      "step": 148,
      "train": {
          "natural": {
              "loss": 1.7,
              "acc": 0.35
          },
          "robust": {
              "loss": 2.1,
              "acc": 0.2
          }
      },
      "lr": {
          "natural": 0.05,
          "robust": 0.04
      },
      "beta": 0.5,
      "weights": {
          "natural": 0.5,
          "robust": 0.5
      },
      "redistributed_steps": 0,
      "train_seconds": 17.0
  }
  (tmp_path / runs.METRICS_FILE).write_text(json.dumps(legacy) + "\n" + json.dumps(today) + "\n")
  first, second = runs.read_metrics(tmp_path)
  assert second == today
  assert first == {
      "epoch": 1,
      "step": 74,
      "train": {
          "natural": {
              "loss": 1.9,
              "acc": 0.28
          },
          "robust": {
              "loss": 2.2,
              "acc": 0.18
          }
      },
      "lr": {
          "natural": 0.05,
          "robust": 0.04
      },
      "weights": {
          "natural": 0.25,
          "robust": 0.75
      },
      "beta": 0.75,
      "redistributed_steps": 0,
      "train_seconds": 18.9,
      "test": {
          "global": {
              "clean_acc": 0.4,
              "pgd_acc": 0.2
          }
      },
      "validation": {
          "global": {
              "clean_acc": 0.38,
              "pgd_acc": 0.19
          }
      }
  }
  assert runs.read_metrics(tmp_path, as_written=True)[0] == legacy  # the resume path's view
  single = {
      "epoch": 1,
      "step": 10,
      "rob_loss": 2.0,
      "rob_acc": 0.3,
      "lr_nat": 0.1,
      "lr_rob": 0.1,
      "beta": 1.0
  }
  (tmp_path / runs.METRICS_FILE).write_text(json.dumps(single) + "\n")
  upgraded, = runs.read_metrics(tmp_path)
  assert upgraded["train"] == {"robust": {"loss": 2.0, "acc": 0.3}}
  assert upgraded["lr"] == {"robust": 0.1} and upgraded["weights"] == {"robust": 1.0}
  (tmp_path / runs.METRICS_FILE).write_text(json.dumps(legacy) + "\n" + json.dumps(today) + "\n")
  assert plots.training_curves(runs.read_metrics(tmp_path), tmp_path / "curves.png").exists()


def test_restore_models_reads_the_legacy_checkpoint_layout(tmp_path):
  """Runs written before the role vocabulary (teacher_nat, teacher_rob, mix) still evaluate."""
  config = cfg.get_config("tiny")
  (tmp_path / "config.json").write_text(json.dumps(cfg.config_record(config)))
  legacy = {
      "step": jnp.int32(7),
      "nat": {
          "variables": _variables(9.0)
      },
      "rob": {
          "variables": _variables(9.0)
      },
      "teacher_nat": _variables(1.0),
      "teacher_rob": _variables(2.0),
      "mix": _variables(3.0),
  }
  manager = checkpoint.open_manager(tmp_path / "checkpoints")
  checkpoint.save(manager, 1, legacy, {"epoch": 1})
  manager.close()
  run = runs.restore_models(tmp_path)
  assert list(run.models) == ["natural", "robust", "global"]
  for role, value in (("natural", 1.0), ("robust", 2.0), ("global", 3.0)):
    leaves = jax.tree_util.tree_leaves(run.models[role])
    assert all(np.all(np.asarray(leaf) == value) for leaf in leaves)
  assert run.eval_dir == tmp_path / "eval" and len(run.test_y) == len(run.test_x) > 0
  only = runs.restore_models(tmp_path, ("global",))
  assert list(only.models) == ["global"]
  with pytest.raises(ValueError, match="has no"):
    runs.restore_models(tmp_path, ("teacher",))


def test_a_diverged_model_is_refused_before_any_attack(tmp_path):
  config = cfg.get_config("tiny")
  (tmp_path / "config.json").write_text(json.dumps(cfg.config_record(config)))
  broken = _variables(1.0)
  broken["params"]["linear"]["kernel"] = broken["params"]["linear"]["kernel"].at[0, 0].set(jnp.nan)
  state = {"teacher_nat": _variables(1.0), "teacher_rob": _variables(1.0), "mix": broken}
  manager = checkpoint.open_manager(tmp_path / "checkpoints")
  checkpoint.save(manager, 1, state, {"epoch": 1})
  manager.close()
  with pytest.raises(ValueError, match="global model of .* NaN or inf in params/linear/kernel"):
    runs.restore_models(tmp_path)


def test_load_model_names_the_wrong_directory_kind(tmp_path):
  config = cfg.get_config("tiny")
  (tmp_path / "config.json").write_text(json.dumps(cfg.config_record(config)))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(FileNotFoundError, match="checkpoints/ directory of a run.*--workdir"):
    runs.load_model(tmp_path / "checkpoints")
  with pytest.raises(FileNotFoundError, match="is a run directory.*--workdir"):
    runs.load_model(tmp_path)
  saved = tmp_path / "saved"
  saved.mkdir()
  (saved / "model.json").write_text("{garbage")
  with pytest.raises(ValueError, match="saved/model.json is not valid JSON"):
    runs.load_model(saved)
  (saved / "model.json").write_text("[]")
  with pytest.raises(ValueError, match="holds no config record"):
    runs.load_model(saved)


def test_an_unwritable_output_directory_fails_before_the_work(tmp_path):
  from gen_jax.evaluation import outputs  # pylint: disable=import-outside-toplevel
  (tmp_path / "file").write_text("")
  with pytest.raises(PermissionError, match="cannot write results to .*file/eval.*--out"):
    outputs.ensure_writable(tmp_path / "file" / "eval")
  assert outputs.ensure_writable(tmp_path / "ok") == tmp_path / "ok"
  assert list((tmp_path / "ok").iterdir()) == []  # the probe is removed
