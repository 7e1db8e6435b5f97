"""Scale-out: the same result on 1, 2 or 8 devices and on two processes (gen_jax.parallel).

The device-count tests run this file as a script in fresh interpreters (`jax_num_cpu_devices`
can only be set before JAX starts): each worker trains a few Generalist steps on one fixed
sequence of global batches and evaluates, and the tests compare what the workers saved. The
two-process test starts `experiments/train.py` twice on localhost (CPU collectives through
gloo) and compares the run with a one-process run of the same global batches.
"""
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ROOT / "experiments" / "train.py"
DEVICE_COUNTS = (1, 2, 8)
EVAL_SIZES = (37, 50)  # neither a multiple of the evaluation batch (20) nor of 2 or 8 devices
EVAL_BATCH = 20
# XLA's CPU collectives can deadlock when many virtual devices share a few cores and Eigen's
# thread pool runs out of threads (seen with 8 devices on 2 cores: "Expected 8 threads to join
# the rendezvous"); single-threaded Eigen per device avoids it.
SINGLE_THREADED_EIGEN = "--xla_cpu_multi_thread_eigen=false"
# The programs of this module are compared only with each other, so they compile at XLA's backend
# optimization level 0, which halves their compile time (tests/conftest.py explains the trade).
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def _env(*xla_flags: str, **extra) -> dict[str, str]:
  """The environment of this module's programs: XLA_FLAGS plus FAST_COMPILE_FLAG and `xla_flags`."""
  inherited = [
      f for f in os.environ.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_backend_optimization_level")  # the suite's level (conftest.py)
  ]
  flags = " ".join([*inherited, FAST_COMPILE_FLAG, *xla_flags])
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
  env.pop("JAX_NUM_CPU_DEVICES", None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ---------------------------------------------------------------------- the device-count worker
def _worker_config():
  from gen_jax import config as cfg  # pylint: disable=g-import-not-at-top
  # Flips and crops on, so that the augmentation's randomness is part of the comparison.
  return dataclasses.replace(cfg.get_config("tiny"), batch_size=16, flip=True, crop_padding=2)


def _nearest_mean_model(train_x, train_y, num_classes):
  """A linear nearest-class-mean classifier of the digits: varied predictions, partly robust."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Linear(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train=False):
      del train
      return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))

  x = train_x.reshape(len(train_x), -1).astype(np.float32) / 255.0
  means = np.stack([x[train_y == c].mean(0) for c in range(num_classes)])
  variables = {
      "params": {
          "Dense_0": {
              "kernel": means.T.astype(np.float32),
              "bias": (-0.5 * (means**2).sum(1)).astype(np.float32)
          }
      }
  }
  return Linear(num_classes), variables


def _device_worker(devices: int, out: pathlib.Path) -> None:
  """Trains 3 Generalist steps on `devices` virtual CPU devices, evaluates; saves the results."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", devices)
  from gen_jax import parallel, runs  # pylint: disable=g-import-not-at-top
  from gen_jax.attacks.threat import Threat  # pylint: disable=g-import-not-at-top
  from gen_jax.evaluation.accuracy import evaluate_models  # pylint: disable=g-import-not-at-top
  from gen_jax.training import steps as steps_lib  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == devices, jax.devices()
  config = _worker_config()
  splits = runs.load_splits(config)
  model = runs.build_model(config, splits.num_classes)
  mesh = parallel.make_mesh()
  sharding = parallel.data_sharding(mesh)
  state = steps_lib.create_train_state(config,
                                       model,
                                       jax.random.key(0),
                                       image_shape=splits.train_x.shape[1:])
  state = parallel.replicate(state, mesh)
  tables = parallel.replicate(steps_lib.schedule_arrays(config, 4), mesh)
  totals = parallel.replicate(steps_lib.zero_totals(config), mesh)
  step_fn = steps_lib.make_train_step(config, model)
  order = np.random.default_rng(0).permutation(len(splits.train_y))
  b = config.batch_size
  for i in range(3):
    images, labels = parallel.global_batch((splits.train_x, splits.train_y),
                                           order[i * b:(i + 1) * b], sharding)
    state, totals = step_fn(state, totals, images, labels, jax.random.key(1), tables)
  named = steps_lib.named_models(state)
  leaves = {
      f"{name}/{jax.tree_util.keystr(path)}": np.asarray(leaf) for name, variables in named.items()
      for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
  }
  np.savez(out / f"models-{devices}.npz", **leaves)

  eval_model = runs.build_model(config, splits.num_classes, for_evaluation=True)
  linear, linear_variables = _nearest_mean_model(splits.train_x, splits.train_y, splits.num_classes)
  linear_variables = parallel.replicate(linear_variables, mesh)
  accuracies = {}
  for n in EVAL_SIZES:
    x, y = splits.test_x[:n], splits.test_y[:n]
    accuracies[f"linear-{n}"] = evaluate_models({"linear": linear_variables},
                                                x,
                                                y,
                                                model=linear,
                                                key=jax.random.key(2),
                                                threat=Threat("linf", 0.1, 0.04, 5),
                                                batch_size=EVAL_BATCH,
                                                sharding=sharding)
    accuracies[f"trained-{n}"] = evaluate_models(state.models(),
                                                 x,
                                                 y,
                                                 model=eval_model,
                                                 key=jax.random.key(2),
                                                 threat=Threat.of(config),
                                                 batch_size=EVAL_BATCH,
                                                 sharding=sharding)
  (out / f"accuracy-{devices}.json").write_text(json.dumps(accuracies))


@pytest.fixture(scope="module")
def device_runs(tmp_path_factory):
  """The workers' results for 1, 2 and 8 devices (run concurrently) and their wall time."""
  out = tmp_path_factory.mktemp("devices")
  started = time.time()
  workers = [
      subprocess.Popen([sys.executable, __file__, "devices",
                        str(n), str(out)],
                       cwd=ROOT,
                       env=_env(SINGLE_THREADED_EIGEN),
                       stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT,
                       text=True) for n in DEVICE_COUNTS
  ]
  for n, worker in zip(DEVICE_COUNTS, workers):
    output, _ = worker.communicate(timeout=900)
    assert worker.returncode == 0, f"the {n}-device worker failed:\n{output[-4000:]}"
  return out, time.time() - started


@pytest.mark.slow
def test_training_steps_are_the_same_on_1_2_and_8_devices(device_runs):
  out, _ = device_runs
  models = {n: dict(np.load(out / f"models-{n}.npz")) for n in DEVICE_COUNTS}
  one = models[1]
  assert {name.split("/")[0] for name in one} >= {
      "natural expert", "robust expert", "natural teacher", "robust teacher", "global model"
  }
  for n in DEVICE_COUNTS[1:]:
    assert models[n].keys() == one.keys()
    for name, value in one.items():
      # Reduction order differs with the device count: float tolerance, not bits. A batch
      # statistic, augmentation or attack start drawn per device would differ by far more.
      np.testing.assert_allclose(models[n][name],
                                 value,
                                 rtol=1e-4,
                                 atol=1e-5,
                                 err_msg=f"{name} on {n} devices")


@pytest.mark.slow
def test_evaluation_counts_are_identical_on_1_2_and_8_devices(device_runs):
  out, _ = device_runs
  results = {n: json.loads((out / f"accuracy-{n}.json").read_text()) for n in DEVICE_COUNTS}
  for n in DEVICE_COUNTS[1:]:
    assert results[n] == results[1], f"{n} devices: {results[n]} != 1 device: {results[1]}"
  for size in EVAL_SIZES:  # the linear model makes the comparison informative
    linear = results[1][f"linear-{size}"]["linear"]
    assert 0 < linear["pgd_acc"] < linear["clean_acc"] <= 1, linear
    count = linear["clean_acc"] * size
    assert abs(count - round(count)) < 1e-9  # counts over exactly `size` images, no padding


# --------------------------------------------------------------------------------- small units
def test_cluster_environment_sees_launchers_of_several_processes():
  from gen_jax import parallel  # pylint: disable=g-import-not-at-top
  slurm = {
      "SLURM_JOB_ID": "7",
      "SLURM_STEP_NODELIST": "node[01-02]",
      "SLURM_PROCID": "1",
      "SLURM_LOCALID": "0"
  }
  assert parallel.cluster_environment({}) is None
  assert parallel.cluster_environment({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: alone
  assert parallel.cluster_environment({**slurm, "SLURM_NTASKS": "2"}) == "SLURM"
  assert parallel.cluster_environment({"TPU_WORKER_HOSTNAMES": "a,b"}) == "Cloud TPU pod"
  assert parallel.cluster_environment({"TPU_WORKER_HOSTNAMES": "a"}) is None  # a single host
  assert parallel.cluster_environment({"JAX_COORDINATOR_ADDRESS": "h:1"
                                      }) == ("JAX_COORDINATOR_ADDRESS")


def test_initialize_distributed_alone_is_a_no_op_and_bad_flags_name_the_fix():
  import jax  # pylint: disable=g-import-not-at-top

  from gen_jax import parallel  # pylint: disable=g-import-not-at-top
  assert parallel.initialize_distributed(environ={}) == 1
  assert parallel.initialize_distributed(num_processes=1, environ={}) == 1
  assert not jax.distributed.is_initialized()
  cases = [
      (dict(num_processes=2, process_id=0), "needs --coordinator HOST:PORT"),
      (dict(coordinator="localhost:1234", num_processes=2), "needs --process-id"),
      (dict(coordinator="localhost", num_processes=2, process_id=0), "is not HOST:PORT"),
      (dict(coordinator="localhost:1234", num_processes=2, process_id=2), r"not in \[0, 2\)"),
      (dict(coordinator="localhost:1234", num_processes=0, process_id=0), "must be >= 1"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      parallel.initialize_distributed(**kwargs, environ={})
  assert not jax.distributed.is_initialized()


def test_local_positions_follow_the_devices_of_this_process():
  from gen_jax import parallel  # pylint: disable=g-import-not-at-top

  class TwoBlocks:  # this process holds rows 8:12 and 24:28 of 32 (a non-contiguous layout)

    def addressable_devices_indices_map(self, shape):
      assert shape == (32,)
      return {"d1": (slice(24, 28),), "d0": (slice(8, 12),)}

  np.testing.assert_array_equal(parallel.local_positions(TwoBlocks(), 32),
                                [8, 9, 10, 11, 24, 25, 26, 27])


def test_global_batch_is_the_rows_laid_out_over_the_devices():
  import jax  # pylint: disable=g-import-not-at-top

  from gen_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  x = np.arange(40, dtype=np.uint8).reshape(10, 2, 2, 1)
  y = np.arange(10, dtype=np.int32)
  rows = np.array([7, 1, 4, 0, 9, 3])
  images, labels = parallel.global_batch((x, y), rows, parallel.data_sharding(mesh))
  np.testing.assert_array_equal(images, x[rows])
  np.testing.assert_array_equal(labels, y[rows])
  assert images.sharding == parallel.data_sharding(mesh)
  assert len({s.device for s in images.addressable_shards}) == jax.device_count()
  with pytest.raises(ValueError, match="not divisible by the 2 devices"):
    parallel.check_batch_size(5, mesh)


def _load(path: pathlib.Path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_program_accepts_the_multi_process_flags():
  flags = ["--coordinator", "10.0.0.1:1234", "--num-processes", "4", "--process-id", "3"]
  train = _load(ROOT / "experiments" / "train.py")
  from gen_jax import cli  # pylint: disable=g-import-not-at-top
  parser = cli.build_parser("t", add_arguments=train._add_arguments)  # pylint: disable=protected-access
  parsed = [
      cli.parse_config(parser, ["--preset", "tiny", *flags])[0],
      _load(ROOT / "experiments" / "evaluate.py")._parse(["--workdir", "w", *flags]),  # pylint: disable=protected-access
      _load(ROOT / "experiments" / "sweep_mix.py")._parse(["--workdir", "w", *flags]),  # pylint: disable=protected-access
  ]
  for args in parsed:
    assert (args.coordinator, args.num_processes, args.process_id) == ("10.0.0.1:1234", 4, 3)
    assert args.distributed_timeout == 300


def test_an_unreachable_coordinator_stops_with_a_message_instead_of_training_alone(tmp_path):
  port = _free_port()  # nothing listens there
  result = subprocess.run([
      sys.executable,
      str(TRAIN), "--preset", "tiny", "--workdir",
      str(tmp_path / "run"), "--no-progress", "--coordinator", f"127.0.0.1:{port}",
      "--num-processes", "2", "--process-id", "1", "--distributed-timeout", "2"
  ],
                          cwd=ROOT,
                          env=_env(),
                          capture_output=True,
                          text=True,
                          timeout=300,
                          check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert f"cannot reach the coordinator 127.0.0.1:{port} (process 0 of the job)" in result.stderr
  assert "--process-id 0" in result.stderr and "Not training alone" in result.stderr
  assert "epoch" not in result.stdout and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ two processes
# Runs experiments/train.py (argv[1:]) for one epoch of its run, then exits: `max_epochs=1`.
_FIRST_EPOCH_ONLY = r"""
import runpy, sys
from gen_jax import training
train = training.train_and_evaluate
def first_epoch(*args, **kwargs):
  train(*args, max_epochs=1, **kwargs)
  sys.exit(0)
training.train_and_evaluate = first_epoch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _state(workdir: pathlib.Path) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top

  from gen_jax import checkpoint  # pylint: disable=g-import-not-at-top
  items, meta = checkpoint.restore_items(workdir / "checkpoints", lambda keys: keys)
  assert meta["epoch"] == 2, meta
  return {
      jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(items)
  }


def _metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 1.5 to 2.5 minutes on 2 busy CPU cores: three tiny trainings
def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(tmp_path):
  """Two processes x 1 device train epoch 1 of the tiny preset; one process on 1 device resumes
  their checkpoint for epoch 2; the run equals one process on 2 devices (same global batches)."""
  # The programs share the test session's compilation cache (tests/conftest.py sets it).
  flags = ["--preset", "tiny", "--no-progress"]
  one, two = tmp_path / "one", tmp_path / "two"
  coordinator = f"127.0.0.1:{_free_port()}"
  start = lambda argv, devices: subprocess.Popen(argv,
                                                 cwd=ROOT,
                                                 env=_env(JAX_NUM_CPU_DEVICES=devices),
                                                 stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT,
                                                 text=True)
  reference = start([sys.executable, str(TRAIN), *flags, "--workdir", str(one)], 2)
  job = [
      start([
          sys.executable, "-c", _FIRST_EPOCH_ONLY,
          str(TRAIN), *flags, "--workdir",
          str(two), "--coordinator", coordinator, "--num-processes", "2", "--process-id",
          str(i), "--distributed-timeout", "120"
      ], 1) for i in (0, 1)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in (reference, *job)]
  for p, output in zip((reference, *job), outputs):
    assert p.returncode == 0, output[-4000:]
  assert "epoch 1 |" in outputs[1] and "epoch" not in outputs[2]  # process 0 alone prints
  assert [r["epoch"] for r in _metrics(two)] == [1] and not (two / "summary.json").exists()

  resumed = subprocess.run(
      [sys.executable, str(TRAIN), *flags, "--workdir",
       str(two)],
      cwd=ROOT,
      env=_env(JAX_NUM_CPU_DEVICES=1),
      capture_output=True,
      text=True,
      timeout=600,
      check=False)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  assert "Resuming" in resumed.stdout and "epoch 2 |" in resumed.stdout

  expected, got = _state(one), _state(two)
  assert got.keys() == expected.keys()
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
  for mine, theirs in zip(_metrics(two), _metrics(one), strict=True):
    for role, figures in theirs["train"].items():
      for k, v in figures.items():
        assert mine["train"][role][k] == pytest.approx(v, rel=1e-5), (mine["epoch"], role, k)
    assert mine["test"] == theirs["test"] and mine["validation"] == theirs["validation"]
  summary = lambda w: json.loads((w / "summary.json").read_text())
  assert summary(two)["models"] == summary(one)["models"]


# --------------------------------------------------------------------------------------- main
if __name__ == "__main__":
  if sys.argv[1] == "devices":
    _device_worker(int(sys.argv[2]), pathlib.Path(sys.argv[3]))
