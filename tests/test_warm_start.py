"""Warm start (`--init-from`): a run starts every model from a trained one, and says so."""
import dataclasses

import jax
import numpy as np
import pytest

from gen_jax import config as cfg
from gen_jax import models, runs, training


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  """A finished one-epoch tiny PGD-AT run: the model to start from."""
  workdir = tmp_path_factory.mktemp("source") / "run"
  config = dataclasses.replace(cfg.get_config("tiny"), method="pgd_at", epochs=1)
  training.train_and_evaluate(config, workdir, progress=False)
  return workdir


def _global_model(workdir):
  return runs.restore_models(workdir, roles=("global",)).models["global"]


def _close(a, b):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)


def test_every_model_starts_from_the_source_and_the_run_records_it(source_run, tmp_path):
  # Learning rate 0: the experts' parameters stay what they started as, so the saved state shows
  # the start. (BatchNorm statistics move with the data, so only the parameters are compared.)
  config = dataclasses.replace(cfg.get_config("tiny"),
                               epochs=2,
                               lr_nat=0.0,
                               lr_rob=0.0,
                               init_from=str(source_run))
  source = _global_model(source_run)
  assert training.train_and_evaluate(config, tmp_path / "warm", progress=False, max_epochs=1) == {
      "stopped_at_epoch": 1
  }
  summary = training.train_and_evaluate(config, tmp_path / "warm", progress=False)  # resumed
  assert summary["init_from"]["path"] == str(source_run.absolute())
  assert summary["init_from"]["kind"] == "run"
  assert runs.read_config(tmp_path / "warm").init_from == str(source_run)
  restored = runs.restore_models(tmp_path / "warm")
  for role in ("natural", "robust", "global"):
    _close(restored.models[role]["params"], source["params"])
  # Random initial weights are far from the source (the comparison can fail).
  random = models.init_variables(restored.model, jax.random.key(config.seed), (16, 16, 1))
  with pytest.raises(AssertionError):
    _close(random["params"], source["params"])


def test_best_and_saved_models_are_sources_too(source_run, tmp_path):
  config = dataclasses.replace(cfg.get_config("tiny"), init_from=str(source_run / "best"))
  model = models.create_model(config.model, num_classes=10)
  abstract = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), (16, 16, 1)))
  best, record = runs.load_init(source_run / "best", config, abstract, num_classes=10)
  assert record["kind"] == "best" and record["epoch"] == 1
  _close(best, next(iter(runs.load_model(source_run / "best").models.values())))
  saved = runs.save_model(tmp_path / "saved", best, config, origin="test")
  again, record = runs.load_init(saved, config, abstract, num_classes=10)
  assert record["kind"] == "model"
  _close(again, best)


def test_another_architecture_or_class_count_is_refused_before_anything_is_written(
    source_run, tmp_path):
  other = dataclasses.replace(cfg.get_config("tiny"),
                              model="preactresnet18",
                              init_from=str(source_run))
  with pytest.raises(ValueError,
                     match=r"--init-from .* holds a smallcnn network; this run trains "
                     r"a preactresnet18"):
    training.train_and_evaluate(other, tmp_path / "other", progress=False)
  assert not (tmp_path / "other" / "config.json").exists()

  config = cfg.get_config("tiny")
  model = models.create_model(config.model, num_classes=10)
  five = models.create_model(config.model, num_classes=5)
  saved = runs.save_model(tmp_path / "five",
                          models.init_variables(five, jax.random.key(0), (16, 16, 1)), config)
  abstract = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), (16, 16, 1)))
  with pytest.raises(ValueError, match="trained for 5 classes; this run's data set has 10"):
    runs.load_init(saved, config, abstract, num_classes=10)
  with pytest.raises(FileNotFoundError, match="--init-from .*: not a run directory"):
    runs.load_init(tmp_path, config, abstract, num_classes=10)
  with pytest.raises(cfg.ConfigError, match="init_from is empty"):
    dataclasses.replace(config, init_from=" ").validate()
