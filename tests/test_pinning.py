"""A run is pinned to its config and data: a lost config.json or changed images never let a
resume continue another experiment under the same name."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from gen_jax import config as cfg
from gen_jax import runs, training


def _folder(root, per_class):
  """A 3-class image folder of distinct random 8x8 images."""
  rng = np.random.default_rng(0)
  for split, n in (("train", per_class), ("test", 4)):
    for c in range(3):
      folder = root / split / f"c{c}"
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        pixels[..., c] = 255  # the class is the brightest channel: learnable
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
  return root


def _folder_config(root):
  return dataclasses.replace(cfg.get_config("tiny"),
                             dataset="folder",
                             data_dir=str(root),
                             max_train_per_class=None,
                             max_test_per_class=None,
                             validation_size=6,
                             batch_size=16,
                             flip=False)


def test_a_lost_config_file_comes_back_from_the_run_and_other_settings_are_refused(tmp_path):
  config = cfg.get_config("tiny")
  summary = training.train_and_evaluate(config, tmp_path, progress=False)
  written = (tmp_path / "config.json").read_text()
  (tmp_path / "config.json").unlink()
  with pytest.raises(ValueError, match=r"another config \(epochs: 2 -> 3"):
    training.train_and_evaluate(dataclasses.replace(config, epochs=3), tmp_path, progress=False)
  assert json.loads((tmp_path / "config.json").read_text()) == json.loads(written)
  assert runs.read_summary(tmp_path)["models"] == summary["models"]
  # The same settings find the finished run again.
  assert training.train_and_evaluate(config, tmp_path, progress=False)["models"] == \
      summary["models"]


def test_a_config_file_edited_behind_the_runs_back_is_refused_by_the_checkpoint(tmp_path):
  config = cfg.get_config("tiny")
  training.train_and_evaluate(config, tmp_path, progress=False, max_epochs=1)
  other = dataclasses.replace(config, lr_rob=0.2)
  (tmp_path / "config.json").write_text(json.dumps(cfg.config_record(other)))
  with pytest.raises(ValueError,
                     match=r"checkpoint step 5 was trained with lr_rob = 0.05, this "
                     r"command has 0.2"):
    training.train_and_evaluate(other, tmp_path, progress=False)


def test_images_added_between_a_kill_and_the_resume_are_noticed(tmp_path):
  root = _folder(tmp_path / "data", per_class=16)
  config = _folder_config(root)  # 48 images, 6 held out: 42 train = 2 batches of 16 (+10)
  workdir = tmp_path / "run"
  training.train_and_evaluate(config, workdir, progress=False, max_epochs=1)
  for i in range(2):  # two more training images of class 0: 44, still 2 batches of 16
    Image.fromarray(np.full((8, 8, 3), 9 * i, np.uint8)).save(root / "train" / "c0" / f"x{i}.png")
  with pytest.raises(ValueError,
                     match=r"the train images changed since checkpoint step 2 was "
                     r"written \(42 -> 44 images; class 0: 14 -> 16"):
    training.train_and_evaluate(config, workdir, progress=False)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]  # nothing set aside
