"""A run is pinned to its config and data, and its checkpoints to their bytes: a lost
config.json or changed images never let a resume continue another experiment under the same
name, and a checkpoint damaged after its save is told from a diverged run."""
import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from gen_jax import config as cfg
from gen_jax import checkpoint, runs, training
from gen_jax.training import steps as steps_lib


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


@pytest.mark.slow
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


def _flip_one_bit(x):
  """`x` with the lowest bit of its first element flipped (a float32 one ulp away)."""
  bits = np.array(x).view(np.uint32).copy()
  bits.reshape(-1)[0] ^= 1
  return jnp.asarray(bits.view(np.float32))


def _damage(run_dir, config, step, kind="nan"):
  """Overwrites the global model of checkpoint `step` with NaN (`kind="nan"`), or flips one bit
  of one of its values (`kind="one-bit"`), keeping its meta record (and the checksums in it):
  bytes damaged after the save, as bit rot or a bad copy would."""
  model = runs.build_model(config, 10)
  abstract = jax.eval_shape(lambda: steps_lib.create_train_state(
      config, model, jax.random.key(0), image_shape=(16, 16, 1)))
  manager = checkpoint.open_manager(run_dir / "checkpoints", max_to_keep=None)
  state, meta = checkpoint.restore(manager, abstract, step)
  if kind == "nan":
    damaged = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), state.global_model)
  else:
    leaves, treedef = jax.tree_util.tree_flatten(state.global_model)
    first = next(i for i, x in enumerate(leaves) if x.dtype == jnp.float32)
    leaves[first] = _flip_one_bit(leaves[first])
    damaged = jax.tree_util.tree_unflatten(treedef, leaves)
  state = state.replace(global_model=damaged)
  manager.delete(step)
  manager.save(step,
               args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                       meta=ocp.args.JsonSave(meta)),
               force=True)
  manager.wait_until_finished()
  manager.close()


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
  """(config, the summary of its uninterrupted 3-epoch run, a run of it stopped after epoch 2)."""
  root = tmp_path_factory.mktemp("three-epochs")
  config = dataclasses.replace(cfg.get_config("tiny"), epochs=3)
  full = training.train_and_evaluate(config, root / "full", progress=False)
  training.train_and_evaluate(config, root / "cut", progress=False, max_epochs=2)  # steps 5, 10
  return config, full, root / "cut"


@pytest.mark.parametrize("kind", ["nan", "one-bit"])
def test_a_checkpoint_damaged_after_its_save_is_set_aside_and_the_previous_one_used(
    three_epochs, tmp_path, kind):
  config, full, stopped = three_epochs
  cut = tmp_path / "cut"
  shutil.copytree(stopped, cut)
  _damage(cut, config, 10, kind)
  # Evaluation reads the newest intact checkpoint (with a line naming the damaged one).
  shutil.copytree(cut, tmp_path / "copy")
  evaluated = runs.restore_models(tmp_path / "copy")
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(evaluated.models["global"]))
  # Training sets it aside, resumes from step 5, and ends where the uninterrupted run ended
  # (before checksums, the NaN model was reported as a diverged run and a one-bit flip was
  # resumed from silently).
  resumed = training.train_and_evaluate(config, cut, progress=False)
  assert resumed["models"] == full["models"]
  assert (cut / "checkpoints" / "10.damaged").exists()


def test_checksums_cover_every_entry_and_catch_one_changed_value():
  state = {"a": {"w": np.arange(4.0, dtype=np.float32)}, "b": np.zeros(2, np.int32)}
  sums = checkpoint.checksums(state)
  assert set(sums) == {"a", "b"}
  checkpoint.verify(state, {"checksums": sums})
  flipped = {"a": {"w": np.array([0.0, 1.0, 2.0, 3.0000002], np.float32)}, "b": state["b"]}
  with pytest.raises(ValueError, match="its a does not match the checksum"):
    checkpoint.verify(flipped, {"checksums": sums})
  checkpoint.verify(flipped, {"checksums": sums}, keys=["b"])  # only the entries restored
  checkpoint.verify(flipped, {})  # a checkpoint of an earlier version: nothing to compare
