"""Tests of gen_jax.evaluation.plots: training curves and the adversarial-example grid."""
import json

import jax
import numpy as np
import pytest

from gen_jax import models
from gen_jax.evaluation import ModelSet, plots


def _records(epochs=4):
  out = []
  for e in range(1, epochs + 1):
    record = {
        "epoch": e,
        "train": {
            "natural": {
                "loss": 2.0 / e,
                "acc": 0.2 * e
            },
            "robust": {
                "loss": 2.2 / e,
                "acc": 0.1 * e
            }
        },
        "lr": {
            "natural": 0.01,
            "robust": 0.01
        },
        "beta": 1.0 if e < 3 else 0.7,
    }
    if e % 2 == 0:
      record["test"] = {
          r: {
              "clean_acc": 0.5,
              "pgd_acc": 0.2
          } for r in ("natural", "robust", "global")
      }
    out.append(record)
  return out


def test_training_curves_write_a_png_and_keep_earlier_ones(tmp_path):
  path = plots.training_curves(_records(), tmp_path / "curves.png", title="run")
  assert path.read_bytes()[:4] == b"\x89PNG"
  plots.training_curves(_records(), tmp_path / "curves.png")
  assert (tmp_path / "curves.1.png").exists()
  with pytest.raises(ValueError, match="not finished an epoch"):
    plots.training_curves([], tmp_path / "none.png")


def test_examples_attack_each_model_and_record_every_prediction(tmp_path):
  model = models.create_model("smallcnn", 10)
  variables = {
      name: models.init_variables(model, jax.random.key(i), (16, 16, 1))
      for i, name in enumerate(("natural", "global"))
  }
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 5)
  result = plots.run(ModelSet(model, variables),
                     images,
                     labels,
                     key=jax.random.key(0),
                     eps=0.1,
                     step_size=0.03,
                     n=3,
                     class_names=[f"c{i}" for i in range(10)])
  json.dumps(result)  # it goes into report.json
  assert set(result["adversarial"]) == {"natural", "global"}
  assert set(result["predictions"]) == {"clean", "natural", "global"}
  assert all(len(p) == 3 for p in result["predictions"]["natural"].values())
  clean = np.asarray(result["clean"], np.float32)
  for adv in result["adversarial"].values():
    assert np.abs(np.asarray(adv, np.float32) - clean).max() <= 0.1 * 255 + 1  # 8-bit rounding
  assert plots.plot_examples(result, tmp_path / "ex.png").read_bytes()[:4] == b"\x89PNG"
  table = plots.to_markdown(result)
  assert "| natural | " in table and "vs global" in table
