"""The one place speed is measured: training steps, attacks and single convolutions.

Prints one JSON line per measurement (and appends it to `--out` if given) with `what`, `model`,
`batch`, `backend`, `devices`, `images_per_second`, `seconds_per_step` (median of `--repeats`
timed repetitions after `--warmup` untimed ones), `compile_seconds`, `peak_memory_bytes` (the
device's peak where the backend reports it, else null), and more context: the XLA memory plan of
the compiled program, the process's peak RSS, the CPU seconds per step (robust to other
processes sharing the machine), model FLOPs and the load average at the time.

What is timed (`--what`):
  natural_step     the natural expert alone (method "natural"): augment + SGD step.
  robust_step      the robust expert alone (method "pgd_at"): PGD-k in inference mode + SGD step.
  generalist_step  the whole per-batch Generalist work: both experts, EMA teachers, global mix.
  pgd20            attacks.pgd (`--pgd-steps`, default 20 for this one; step 2/255, random start).
  apgd_ce          attacks.apgd with the CE loss (`--pgd-steps`, default 100: the reference's).
  autoattack       attacks.autoattack, version 'standard' (or the stages of `--aa-attacks`).
  conv             one convolution layer's forward + both gradients, XLA vs the custom VJP.

The three attack targets are timed as a user runs them: the whole attack over `--n` images
(default: one batch) in batches of `--batch-size` (`attacks.attack_in_batches`, the last batch
padded; AutoAttack batches itself), L-inf eps 8/255, against the network in inference mode in
float32, evaluated through `gen_jax.evaluation.ModelSet`. `images_per_second` is N over the
seconds of the whole attack. The labels are the model's own predictions (`"labels":
"predictions"`), so every point starts robust: with random labels most points would start
misclassified, and AutoAttack (and torchattacks' APGD) attack only the others. AutoAttack's later
stages still run only on the points its earlier stages did not fool (`stage_robust_accuracy` says
how many were left; `--aa-attacks apgd-t` times one stage on every point). `robust_count` (the
points still classified right on the attack's output) is a check of the result, not of speed.

Models (`--model`): gen_jax's own (`smallcnn`, `resnet18`, `wrn34_10`, built with `--conv-impl`)
or `plaincnn`, a user's own linen network defined here (`PlainCNN`: conv32-conv32-maxpool-
conv64-conv64-maxpool-dense256-dense10, ReLU, 3x3 SAME, written with nn.Conv, nn.max_pool and
nn.Dense as a user would). `plaincnn` is for the attack targets only (the training steps build
gen_jax's own models). `ModelSet` applies a user's network inside `gen_jax.ops.intercept.
fast_cpu_ops` (gen_jax's fast CPU convolution and max-pool gradients); `--fast-ops false` applies
the stock flax layers instead, the "before" figure. The weights are random (plaincnn's are
`plaincnn_weights`, the same as bench_torch.py's): the time per step of PGD and APGD does not
depend on them, AutoAttack's does (through how many points each stage still has to attack), so
for AutoAttack give a trained network: `--weights NPZ`, written by experiments/bench_fixture.py
(PGD-AT of the same network), brings its weights and its test images with their true labels
(`"labels": "file"`), the same file bench_torch.py --weights reads.

Synopsis::

    python experiments/bench.py --what generalist_step --model resnet18 --batch-size 128 --repeats 5
    python experiments/bench.py --what pgd20 --model resnet18 --batch-size 128 --conv-impl xla
    python experiments/bench.py --what pgd20,apgd_ce,autoattack --model plaincnn --n 1000 \
        --batch-size 250 --repeats 3           # a user's network; add --fast-ops false: before
    python experiments/bench.py --what natural_step --model smallcnn --sweep batch-size
    python experiments/bench.py --what robust_step --model smallcnn --sweep pgd-steps
    python experiments/bench.py --what conv --conv-shape 128,32,32,64,64,3,1
    python experiments/bench.py --what generalist_step --model smallcnn --per-device-batch 32 \
        --sweep cpu-devices                     # 1, 2, 4, 8 virtual CPU devices: the scaling table
    python experiments/bench.py --what generalist_step --model smallcnn --feed device

Flags are hyphenated. Kept for old command lines: `--batch` (= `--batch-size`), `--steps`
(deprecated = `--repeats`: elsewhere `--steps` means PGD steps), and the sweep names `batch` and
`pgd_steps`. The PyTorch baseline of this script is `experiments/reference/bench_torch.py`
(torchattacks for the attack targets), and `experiments/reference/side_by_side.py` runs both in
alternation and prints the ratio.
A sweep runs every point in a fresh subprocess (so peak RSS and failures stay per point).

Training steps run data parallel over every device (`gen_jax.parallel`: state replicated, the
batch split): `--per-device-batch N` makes the global batch N x the device count, so each device
does the same work at any count; `--cpu-devices N` gives the CPU backend N virtual devices. Each
timed step is fed like the training loop feeds it (`--feed host`: the next global batch of a
host-resident synthetic training set, placed by `parallel.global_batch`); `--feed device` times
the former way instead, a jitted gather from a copy of the training set on every device.
Many virtual CPU devices on few cores can deadlock XLA's CPU collectives (Eigen's thread pool
runs out: "Expected 8 threads to join the rendezvous", seen for natural_step on 8 devices and 2
cores); `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false` (one thread per device) avoids it,
and `--cpu-devices N` (N > 1) sets it unless XLA_FLAGS already has it.
Model FLOPs follow the usual MFU convention: F = XLA's count for one inference forward pass,
a training forward+backward = 3F, a PGD iteration (forward + input gradient) = 2F; APGD-CE
adds a clean forward pass and its starting gradient: (2 (k + 1) + 1) F per batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # run from a checkout without installing

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gen_jax.models import COMPUTE_DTYPES  # noqa: E402

WHATS = ("natural_step", "robust_step", "generalist_step", "pgd20", "apgd_ce", "autoattack", "conv")
ATTACK_WHATS = ("pgd20", "apgd_ce", "autoattack")
EPS, STEP_SIZE = 8 / 255, 2 / 255  # the attack targets' L-inf radius and PGD step
USER_MODELS = ("plaincnn",)  # networks defined here, not by gen_jax (attack targets only)
METHOD_OF = {"natural_step": "natural", "robust_step": "pgd_at", "generalist_step": "generalist"}
# Sweep name -> (record field, the flag's spellings (the first is passed on), default values).
SWEEPS = {
    "batch-size": ("batch", ("--batch-size", "--batch"), [16, 32, 64, 128, 256, 512]),
    "pgd-steps": ("pgd_steps", ("--pgd-steps",), [1, 3, 5, 10, 20]),
    "model": ("model", ("--model",), ["smallcnn", "resnet18", "wrn34_10"]),
    "cpu-devices": ("cpu_devices", ("--cpu-devices",), [1, 2, 4, 8]),
}
SWEEP_ALIASES = {"batch": "batch-size", "pgd_steps": "pgd-steps"}  # the names used before
SINGLE_THREADED_EIGEN = "--xla_cpu_multi_thread_eigen=false"  # for many virtual CPU devices


def _parse_bool(text: str) -> bool:
  if text.lower() in ("true", "1", "yes"):
    return True
  if text.lower() in ("false", "0", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              allow_abbrev=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--what",
                 default="generalist_step",
                 help=f"comma-separated subset of {','.join(WHATS)}")
  p.add_argument("--model",
                 default="resnet18",
                 help="a gen_jax model (smallcnn, resnet18, wrn34_10, ...) or plaincnn, a user's "
                 "own linen network defined here (attack targets only)")
  p.add_argument("--batch-size", dest="batch", type=int, default=128, metavar="N")
  p.add_argument("--batch",
                 dest="batch",
                 type=int,
                 default=argparse.SUPPRESS,
                 help=argparse.SUPPRESS)  # the old spelling, still accepted
  p.add_argument("--pgd-steps",
                 type=int,
                 default=None,
                 help="PGD iterations (default: 10 inside training steps, 20 for pgd20, 100 for "
                 "apgd_ce)")
  p.add_argument("--n",
                 type=int,
                 default=None,
                 metavar="N",
                 help="attack targets: attack N images in batches of --batch-size (default: one "
                 "batch)")
  p.add_argument("--fast-ops",
                 type=_parse_bool,
                 default=True,
                 metavar="{true,false}",
                 help="attack targets on a user's network (plaincnn): ModelSet's fast CPU "
                 "convolution and max-pool paths (true, default) or the stock flax layers (false); "
                 "gen_jax's own models keep --conv-impl")
  p.add_argument("--weights",
                 default=None,
                 metavar="NPZ",
                 help="plaincnn: a trained network and its test images and labels, from "
                 "experiments/bench_fixture.py (default: random weights, random images labelled "
                 "by the network's predictions)")
  p.add_argument("--dtype",
                 default="float32",
                 choices=tuple(COMPUTE_DTYPES),
                 help="compute dtype of training steps (attacks always run in float32)")
  p.add_argument("--conv-impl",
                 default="auto",
                 choices=("auto", "xla", "fast"),
                 help="xla: nn.Conv; fast/auto: gen_jax.ops.conv.FastConv (custom VJP on CPU)")
  p.add_argument("--repeats",
                 type=int,
                 default=5,
                 metavar="N",
                 help="timed repetitions (median reported)")
  p.add_argument("--steps",
                 dest="repeats",
                 type=int,
                 default=argparse.SUPPRESS,
                 metavar="N",
                 help="deprecated alias of --repeats (elsewhere --steps means PGD steps)")
  p.add_argument("--warmup", type=int, default=1, help="untimed repetitions after compiling")
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--conv-shape",
                 default="128,32,32,64,64,3,1",
                 help="N,H,W,C_in,C_out,kernel,stride for --what conv")
  p.add_argument("--aa-attacks",
                 default=None,
                 help="comma-separated AutoAttack stages (default: the 'standard' list)")
  p.add_argument("--peak-flops",
                 type=float,
                 default=None,
                 help="device peak FLOP/s; adds model FLOP utilisation (mfu) to the output")
  p.add_argument("--sweep",
                 choices=tuple(SWEEPS),
                 default=None,
                 type=lambda name: SWEEP_ALIASES.get(name, name),
                 help="run each value of the sweep in a fresh subprocess")
  p.add_argument("--sweep-values", default=None, help="comma-separated values overriding the sweep")
  p.add_argument("--out", default=None, help="also append the JSON lines to this file")
  p.add_argument("--profile",
                 type=int,
                 default=0,
                 metavar="K",
                 help="trace one more step with jax.profiler and report the K most costly XLA "
                 "operations (summed self time, ms) under `top_ops`")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
      "--per-device-batch",
      type=int,
      default=None,
      metavar="N",
      help="training steps: global batch = N x the device count (overrides --batch-size)")
  p.add_argument("--cpu-devices",
                 type=int,
                 default=None,
                 metavar="N",
                 help="give the CPU backend N virtual devices (jax_num_cpu_devices)")
  p.add_argument("--feed",
                 choices=("host", "device"),
                 default="host",
                 help="training steps: the batch from the host, as the training loop does "
                 "(default), or gathered on the device from a device-resident training set")
  args = p.parse_args(argv)
  whats = [w.strip() for w in args.what.split(",") if w.strip()]
  bad = [w for w in whats if w not in WHATS]
  if bad or not whats:
    p.error(f"--what must be a comma-separated subset of {WHATS}; got {args.what!r}")
  args.whats = whats
  for name, flag in (("batch", "--batch-size"), ("repeats", "--repeats"),
                     ("num_classes", "--num-classes"), ("image_size", "--image-size")):
    if getattr(args, name) < 1:
      p.error(f"{flag} must be >= 1; got {getattr(args, name)}")
  if args.pgd_steps is not None and args.pgd_steps < 1:
    p.error(f"--pgd-steps must be >= 1; got {args.pgd_steps}")
  if args.n is not None and args.n < 1:
    p.error(f"--n must be >= 1; got {args.n}")
  if args.model in USER_MODELS and any(w not in ATTACK_WHATS for w in whats) and not args.sweep:
    p.error(f"--model {args.model} (a user's network defined here) is for the attack targets "
            f"{','.join(ATTACK_WHATS)}; got --what {args.what}")
  if args.warmup < 0:
    p.error(f"--warmup must be >= 0; got {args.warmup}")
  if args.weights is not None:
    if args.model != "plaincnn":
      p.error(f"--weights is plaincnn's (a file of bench_fixture.py); got --model {args.model}")
    if not os.path.isfile(args.weights):
      p.error(f"--weights {args.weights}: no such file (write it with "
              "experiments/bench_fixture.py)")
  for name, flag in (("per_device_batch", "--per-device-batch"), ("cpu_devices", "--cpu-devices")):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      p.error(f"{flag} must be >= 1; got {getattr(args, name)}")
  return args


# ----------------------------------------------------------------------------------------------
# Measurement helpers.


class _CompileClock:
  """Sums JAX's own tracing/lowering/compilation durations (jax.monitoring events)."""

  def __init__(self):
    self.seconds = 0.0
    self.active = False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, name: str, duration: float, **_: Any) -> None:
    if self.active and name.startswith("/jax/core/compile/"):
      self.seconds += duration

  def __enter__(self):
    self.seconds, self.active = 0.0, True
    return self

  def __exit__(self, *exc):
    self.active = False


_CLOCK = None


def _clock() -> _CompileClock:
  global _CLOCK  # one listener per process: jax.monitoring cannot unregister a single one
  if _CLOCK is None:
    _CLOCK = _CompileClock()
  return _CLOCK


def _time_calls(run_fn: Callable[[], Any],
                repeats: int,
                warmup: int,
                profile: int = 0) -> dict[str, Any]:
  """Times `run_fn` (which must block until its result is ready); the first call compiles."""
  with _clock() as clock:
    start = time.perf_counter()
    jax.block_until_ready(run_fn())
    first = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(run_fn())
  wall, cpu = [], []
  for _ in range(repeats):
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(run_fn())
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  median = statistics.median(wall)
  extra = {"top_ops": _profile_ops(run_fn, profile)} if profile else {}
  return {
      **extra,
      "seconds_per_step": median,
      "seconds_all": [round(s, 4) for s in wall],
      "cpu_seconds_per_step": statistics.median(cpu),
      # JAX's own trace+lower+compile time; the first call minus a step is an upper bound for
      # callables JAX does not instrument (e.g. host loops such as AutoAttack).
      "compile_seconds": clock.seconds if clock.seconds > 0 else max(0.0, first - median),
      "first_call_seconds": first,
  }


def _profile_ops(run_fn: Callable[[], Any], top: int) -> list[tuple[str, float]]:
  """Runs `run_fn` once under jax.profiler and returns the `top` XLA operations by total time.

  Uses the profiler's Perfetto JSON export, so no TensorBoard plug-in is needed. Times are summed
  over threads (the CPU backend runs independent operations concurrently).
  """
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
      jax.block_until_ready(run_fn())
    finally:
      jax.profiler.stop_trace()
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
      return []
    with gzip.open(files[0], "rt") as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for e in events:
    name = e.get("name", "")
    # Keep XLA operations (fusions, dots, convolutions, ...), not the runtime's wrappers.
    if e.get("ph") == "X" and not name.startswith(("ThunkExecutor", "$", "Pjit", "Common")):
      totals[name] += e.get("dur", 0) / 1e3
  return [(name, round(ms, 1)) for name, ms in totals.most_common(top)]


def _device_peak_memory() -> int | None:
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


def _program_memory(compiled: Any) -> int | None:
  """Argument + output + temporary bytes XLA planned for a compiled program (minus aliasing)."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
               m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def _flops(program: Any) -> float | None:
  """XLA's FLOP count of a lowered (or compiled) program; None where XLA gives none.

  Pass the lowered program: its HLO still holds `convolution` ops, which every backend counts.
  After GPU compilation they are cuDNN custom calls that the cost analysis counts as nothing,
  which would understate a CNN's FLOPs, and so its MFU, by two to three orders of magnitude.
  """
  try:
    cost = program.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost["flops"])
  except Exception:  # pylint: disable=broad-except
    return None


def _context(args: argparse.Namespace, what: str) -> dict[str, Any]:
  dev = jax.devices()[0]
  return {
      "what": what,
      "framework": "jax",
      "model": args.model if what != "conv" else "conv:" + args.conv_shape,
      "batch": args.batch,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "device_kind": dev.device_kind,
      "dtype": args.dtype if what in METHOD_OF else "float32",
      "conv_impl": args.conv_impl,
      "pgd_steps": _pgd_steps(args, what),
      "repeats": args.repeats,
      "jax_version": jax.__version__,
      "load_average_1min": os.getloadavg()[0],
      "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def _pgd_steps(args: argparse.Namespace, what: str) -> int | None:
  if what in ("robust_step", "generalist_step"):
    return args.pgd_steps or 10
  if what == "pgd20":
    return args.pgd_steps or 20
  if what == "apgd_ce":
    return args.pgd_steps or 100
  return None


def _finish(record: dict[str, Any], timing: dict[str, Any], images: int, model_flops: float | None,
            args: argparse.Namespace) -> dict[str, Any]:
  record.update(timing)
  record["images_per_second"] = images / timing["seconds_per_step"]
  record["peak_memory_bytes"] = _device_peak_memory()
  record["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  record["model_flops_per_step"] = model_flops
  if model_flops:
    record["model_flops_per_second"] = model_flops / timing["seconds_per_step"]
    if args.peak_flops:
      record["mfu"] = record["model_flops_per_second"] / args.peak_flops
  return record


# ----------------------------------------------------------------------------------------------
# The measured workloads.


def _model_and_variables(args: argparse.Namespace, dtype: Any):
  from gen_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model(args.model, args.num_classes, dtype=dtype, conv_impl=args.conv_impl)
  variables = models.init_variables(model, jax.random.key(args.seed),
                                    (args.image_size, args.image_size, 3))
  return model, variables


def _forward_flops(model: Any, variables: Any, batch: int, image_size: int) -> float | None:
  """XLA's FLOP count of one inference forward pass over `batch` images (before compilation)."""
  x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
  try:
    return _flops(fwd.lower(variables, x))
  except Exception:  # pylint: disable=broad-except
    return None


_FEED_BATCHES = 4  # the synthetic training set: this many global batches, fed in turn


def _training_set(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
  """A host-resident synthetic training set of `_FEED_BATCHES` global batches (uint8, int32)."""
  rng = np.random.default_rng(args.seed + 1)
  n = _FEED_BATCHES * args.batch
  images = rng.integers(0, 256, (n, args.image_size, args.image_size, 3), dtype=np.uint8)
  return images, rng.integers(0, args.num_classes, (n,), dtype=np.int32)


def _batch_feed(args: argparse.Namespace, mesh: Any) -> Callable[[int], tuple[Any, Any]]:
  """`feed(i)`: global batch i (mod `_FEED_BATCHES`) laid out over the mesh, fed as `--feed`
  says: from the host (`parallel.global_batch`, what the training loop does) or gathered on the
  devices from a device-resident copy of the training set (the former way)."""
  from gen_jax import parallel  # pylint: disable=g-import-not-at-top
  train_x, train_y = _training_set(args)
  sharding, b = parallel.data_sharding(mesh), args.batch
  if args.feed == "host":
    return lambda i: parallel.global_batch((train_x, train_y),
                                           np.arange(b) + (i % _FEED_BATCHES) * b, sharding)
  resident = parallel.replicate((train_x, train_y), mesh)

  @functools.partial(jax.jit, out_shardings=(sharding, sharding))
  def gather(x, y, i):
    rows = jnp.arange(b) + i * b
    return x[rows], y[rows]

  return lambda i: gather(*resident, np.int32(i % _FEED_BATCHES))


def bench_train_step(args: argparse.Namespace, what: str) -> dict[str, Any]:
  """natural_step / robust_step / generalist_step: the training loop's own jitted step.

  `steps.make_train_step` is the program `train_and_evaluate` runs (augment, the experts, the
  Generalist update, running totals), compiled here ahead of time so that the compile time,
  XLA's memory plan and FLOP count are exact; it runs data parallel over every device, and each
  timed call includes feeding its batch (`--feed`) and waits for the step to finish.
  """
  from gen_jax import config as cfg, models, parallel  # pylint: disable=g-import-not-at-top
  from gen_jax.training import steps as steps_lib  # pylint: disable=g-import-not-at-top
  pgd_steps = _pgd_steps(args, what) or 10
  config = dataclasses.replace(cfg.get_config("cifar10"),
                               method=METHOD_OF[what],
                               model=args.model,
                               batch_size=args.batch,
                               pgd_steps=pgd_steps,
                               compute_dtype=args.dtype,
                               conv_impl=args.conv_impl)
  model = models.create_model(config.model,
                              args.num_classes,
                              dtype=COMPUTE_DTYPES[args.dtype],
                              conv_impl=config.conv_impl)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(args.batch, mesh)
  image_shape = (args.image_size, args.image_size, 3)
  state = parallel.replicate(
      steps_lib.create_train_state(config,
                                   model,
                                   jax.random.key(args.seed),
                                   image_shape=image_shape), mesh)
  tables = parallel.replicate(steps_lib.schedule_arrays(config, max(1, 1000 // config.epochs)),
                              mesh)
  zero_totals = lambda: parallel.replicate(steps_lib.zero_totals(config), mesh)
  feed = _batch_feed(args, mesh)
  record = _context(args, what)
  record.update(feed=args.feed, per_device_batch=args.batch // mesh.size)
  jitted = steps_lib.make_train_step(config, model)
  key = jax.random.key(2)
  with _clock():
    t0 = time.perf_counter()
    compiled = jitted.lower(state, zero_totals(), *feed(0), key, tables).compile()
    compile_seconds = time.perf_counter() - t0
  holder = {"state": state, "totals": zero_totals(), "i": 0}

  def run():
    holder["i"] += 1
    holder["state"], holder["totals"] = compiled(holder["state"], holder["totals"],
                                                 *feed(holder["i"]), key, tables)
    return holder["state"].step, holder["totals"]

  timing = _time_calls(run, args.repeats, args.warmup, args.profile)
  timing["compile_seconds"] = compile_seconds
  timing["program_memory_bytes"] = _program_memory(compiled)
  # Model FLOPs (MFU convention) from XLA's count of one float32 inference forward pass.
  fwd_model, fwd_vars = model, jax.device_get(holder["state"].global_model)
  f = _forward_flops(fwd_model, fwd_vars, args.batch, args.image_size)
  model_flops = None
  if f:
    per = {
        "natural_step": 3 * f,
        "robust_step": (2 * pgd_steps + 3) * f,
        "generalist_step": (2 * pgd_steps + 6) * f
    }
    model_flops = per[what]
  return _finish(record, timing, args.batch, model_flops, args)


class PlainCNN(nn.Module):
  """A user's own linen network defined here (`--model plaincnn`), written as a user would.

  conv32-conv32-maxpool-conv64-conv64-maxpool-dense256-dense(num_classes), ReLU, 3x3 SAME
  convolutions, 2x2 max pools: stock `nn.Conv`, `nn.max_pool` and `nn.Dense`, none of gen_jax's
  layers, so gen_jax's fast paths reach it only through `ModelSet` (`fast_cpu_ops`). The same
  network in PyTorch is `PlainCNN` of experiments/reference/bench_torch.py.
  """
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no BatchNorm or dropout; ModelSet applies every network with train=False
    for features in (32, 64):
      x = nn.relu(nn.Conv(features, (3, 3), padding="SAME")(x))
      x = nn.relu(nn.Conv(features, (3, 3), padding="SAME")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(256)(x))
    return nn.Dense(self.num_classes)(x)


def plaincnn_weights(seed: int, num_classes: int, image_size: int) -> list[tuple[Any, Any]]:
  """PlainCNN's (kernel, bias) per layer, drawn the same way by bench.py and bench_torch.py.

  NumPy only, so that both frameworks time the same function of the same images (AutoAttack's
  later stages run only on the points still robust, so the work depends on the weights). flax's
  layout: convolution kernels HWIO, dense kernels [in, out] over NHWC-flattened features; LeCun
  normal kernels (flax's default init, untruncated here), zero biases. Kept identical in both
  scripts (tests/test_bench.py compares the two sources).
  """
  rng = np.random.default_rng(seed)
  side = image_size // 4
  shapes = ((3, 3, 3, 32), (3, 3, 32, 32), (3, 3, 32, 64), (3, 3, 64, 64), (side * side * 64, 256),
            (256, num_classes))
  weights = []
  for shape in shapes:
    scale = np.float32(1.0 / np.sqrt(np.prod(shape[:-1])))
    weights.append(
        (rng.standard_normal(shape, dtype=np.float32) * scale, np.zeros(shape[-1], np.float32)))
  return weights


def plaincnn_file(path: str) -> tuple[list[tuple[Any, Any]], Any, Any]:
  """PlainCNN's (kernel, bias) per layer (flax's layout), test images (uint8 NHWC) and labels
  from a file of experiments/bench_fixture.py. NumPy only, identical in bench.py and
  bench_torch.py (tests/test_bench.py compares the two sources)."""
  with np.load(path) as f:
    weights = [(f[f"kernel_{i}"], f[f"bias_{i}"]) for i in range(6)]
    return weights, f["images"], f["labels"].astype(np.int64)


def _attack_network(args: argparse.Namespace) -> tuple[Any, Any, Any]:
  """(module, variables, logits_fn): the network of the attack targets in inference mode.

  `logits_fn` is the `Partial` of `ModelSet.logits_fns()`, the way every gen_jax evaluation
  applies a network: a user's network inside `fast_cpu_ops` unless `--fast-ops false`, gen_jax's
  own models as built (`--conv-impl`). plaincnn's weights are `plaincnn_weights`, the torch side's.
  """
  from gen_jax.evaluation import ModelSet  # pylint: disable=g-import-not-at-top
  if args.model == "plaincnn":
    model = PlainCNN(args.num_classes)
    shapes = jax.eval_shape(model.init, jax.random.key(args.seed),
                            jnp.zeros((1, args.image_size, args.image_size, 3), jnp.float32))
    names = ("Conv_0", "Conv_1", "Conv_2", "Conv_3", "Dense_0", "Dense_1")
    weights = (plaincnn_file(args.weights)[0] if args.weights else plaincnn_weights(
        args.seed, args.num_classes, args.image_size))
    variables = {
        "params": {
            name: {
                "kernel": jnp.asarray(k),
                "bias": jnp.asarray(b)
            } for name, (k, b) in zip(names, weights)
        }
    }
    if jax.tree.map(jnp.shape, variables) != jax.tree.map(lambda s: s.shape, shapes):
      raise AssertionError("plaincnn_weights does not match PlainCNN's parameters")
  else:
    model, variables = _model_and_variables(args, jnp.float32)
  logits_fn = ModelSet(model, {"bench": variables}, fast_ops=args.fast_ops).logits_fns()["bench"]
  return model, variables, logits_fn


def _predictions(logits_fn: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
  """The network's class for each image (host int32 [N]), in batches of `batch_size`."""
  from gen_jax.data.batching import map_batches  # pylint: disable=g-import-not-at-top
  predict = jax.jit(lambda f, xb: jnp.argmax(f(xb), axis=-1))
  return map_batches(lambda xb: predict(logits_fn, xb), (x,), batch_size=min(batch_size, len(x)))


def bench_attack(args: argparse.Namespace, what: str) -> dict[str, Any]:
  """pgd20 / apgd_ce / autoattack: the whole attack over N images, as a user runs it.

  PGD and APGD-CE: one batch program compiled ahead of time (exact compile time, XLA's memory
  plan and FLOP count), run over the N images by `attacks.attack_in_batches`. AutoAttack: the host
  loop of `attacks.autoattack` (it compiles on its first call and batches itself). The labels are
  the model's own predictions, so every point starts robust (module docstring).
  """
  from gen_jax import attacks  # pylint: disable=g-import-not-at-top
  model, variables, logits_fn = _attack_network(args)
  n = args.n or args.batch
  b = min(args.batch, n)
  if args.weights:  # a trained network: its test images and their labels
    _, images, labels = plaincnn_file(args.weights)
    if n > len(labels):
      raise ValueError(f"--n {n}: {args.weights} holds {len(labels)} test images.")
    x = (images[:n] / np.float32(255.0)).astype(np.float32)
    y = labels[:n].astype(np.int32)
  else:
    rng = np.random.default_rng(args.seed + 1)
    x = (rng.integers(0, 256, (n, args.image_size, args.image_size, 3), dtype=np.uint8) /
         np.float32(255.0)).astype(np.float32)
    y = _predictions(logits_fn, x, args.batch)
  steps = _pgd_steps(args, what)
  record = _context(args, what)
  record.update(n=n,
                labels="file" if args.weights else "predictions",
                weights=os.path.basename(args.weights) if args.weights else None,
                eps=EPS,
                fast_ops=args.fast_ops if args.model in USER_MODELS else None)
  if args.model in USER_MODELS:
    # fast_cpu_ops decides like conv_impl "auto" (fast on CPU); "xla" is the stock nn.Conv.
    record["conv_impl"] = "auto" if args.fast_ops else "xla"
  key = jax.random.key(args.seed + 3)
  holder: dict[str, Any] = {"i": 0}
  if what == "autoattack":
    kwargs = {}
    if args.aa_attacks:
      kwargs["attacks"] = tuple(a.strip() for a in args.aa_attacks.split(",") if a.strip())

    def run():
      holder["i"] += 1
      run_key = jax.random.fold_in(key, holder["i"])
      holder["x_adv"], holder["report"] = attacks.autoattack(logits_fn,
                                                             x,
                                                             y,
                                                             key=run_key,
                                                             eps=EPS,
                                                             batch_size=args.batch,
                                                             **kwargs)
      return holder["x_adv"]

    timing = _time_calls(run, args.repeats, args.warmup, args.profile)
    stages = holder["report"]["stages"]
    record["attacks"] = list(holder["report"]["attacks"])
    record["stage_seconds"] = {s["attack"]: round(s["seconds"], 3) for s in stages}
    record["stage_robust_accuracy"] = {s["attack"]: s["robust_accuracy"] for s in stages}
    model_flops = None
  else:
    if what == "pgd20":
      batch_attack = lambda f, xb, yb, k: attacks.pgd(
          f, xb, yb, key=k, eps=EPS, step_size=STEP_SIZE, steps=steps)
    else:
      batch_attack = lambda f, xb, yb, k: attacks.apgd(
          f, xb, yb, key=k, eps=EPS, loss="ce", steps=steps)
    with _clock():
      t0 = time.perf_counter()
      compiled = jax.jit(batch_attack).lower(logits_fn, x[:b], y[:b], key).compile()
      compile_seconds = time.perf_counter() - t0

    def run():
      holder["i"] += 1
      holder["x_adv"] = attacks.attack_in_batches(
          lambda xb, yb, key: compiled(logits_fn, xb, yb, key),
          x,
          y,
          key=jax.random.fold_in(key, holder["i"]),
          batch_size=b)
      return holder["x_adv"]

    timing = _time_calls(run, args.repeats, args.warmup, args.profile)
    timing["compile_seconds"] = compile_seconds
    timing["program_memory_bytes"] = _program_memory(compiled)
    f = _forward_flops(model, variables, b, args.image_size)
    per_batch = 2 * steps if what == "pgd20" else 2 * (steps + 1) + 1
    model_flops = per_batch * f * -(-n // b) if f else None
  robust = _predictions(logits_fn, holder["x_adv"], args.batch) == y
  record["robust_count"] = int(robust.sum())
  record["robust_accuracy"] = float(robust.mean())
  return _finish(record, timing, n, model_flops, args)


def bench_conv(args: argparse.Namespace) -> list[dict[str, Any]]:
  """One convolution's forward + gradients wrt input and kernel: XLA's VJP vs the custom one."""
  from gen_jax.ops import conv as conv_lib  # pylint: disable=g-import-not-at-top
  try:
    n, h, w, c_in, c_out, k, s = (int(v) for v in args.conv_shape.split(","))
  except ValueError as e:
    raise SystemExit(f"--conv-shape must be 7 comma-separated ints N,H,W,C_in,C_out,kernel,stride;"
                     f" got {args.conv_shape!r} ({e})") from None
  key_x, key_k = jax.random.split(jax.random.key(args.seed))
  x = jax.random.normal(key_x, (n, h, w, c_in))
  kernel = jax.random.normal(key_k, (k, k, c_in, c_out)) * 0.05
  pad = (k - 1) // 2
  pads = ((pad, pad), (pad, pad))
  fns = {
      "xla": lambda x, kk: conv_lib.conv2d_xla(x, kk, (s, s), pads),
      "fast": lambda x, kk: conv_lib.conv2d(x, kk, s, pads),
  }
  records = []
  for impl, conv_fn in fns.items():
    for part, fn in (("forward", lambda x, kk, f=conv_fn: f(x, kk)),
                     ("grad_input", jax.grad(lambda x, kk, f=conv_fn: jnp.sum(f(x, kk)**2), 0)),
                     ("grad_kernel", jax.grad(lambda x, kk, f=conv_fn: jnp.sum(f(x, kk)**2), 1)),
                     ("grad_both", jax.grad(lambda x, kk, f=conv_fn: jnp.sum(f(x, kk)**2),
                                            (0, 1)))):
      if impl == "fast" and part == "forward":
        continue  # the custom forward is XLA's
      lowered = jax.jit(fn).lower(x, kernel)
      compiled = lowered.compile()
      record = _context(args, "conv")
      record.update(conv_impl=impl, part=part, batch=n)
      timing = _time_calls(functools.partial(compiled, x, kernel), args.repeats, args.warmup)
      records.append(_finish(record, timing, n, _flops(lowered), args))
  return records


# ----------------------------------------------------------------------------------------------


def _emit(record: dict[str, Any], out: str | None) -> None:
  line = json.dumps(record, sort_keys=False)
  print(line, flush=True)
  if out:
    with open(out, "a", encoding="utf-8") as f:
      f.write(line + "\n")


def _run_sweep(args: argparse.Namespace, argv: list[str]) -> int:
  field, flags, values = SWEEPS[args.sweep]
  if args.sweep_values:
    values = [v.strip() for v in args.sweep_values.split(",") if v.strip()]
  flag = flags[0]
  # Strip the sweep flags (and any fixed value of the swept field, in any of its spellings) from
  # the child's command line.
  strip = ("--sweep", "--sweep-values", *flags)
  child, skip = [], False
  for a in argv:
    if skip:
      skip = False
      continue
    if a in strip:
      skip = True
      continue
    if a.startswith(tuple(s + "=" for s in strip)):
      continue
    child.append(a)
  status = 0
  for value in values:
    cmd = [sys.executable, os.path.abspath(__file__), *child, flag, str(value)]
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
      status = result.returncode
      _emit(
          {
              "what": args.what,
              "sweep": args.sweep,
              field: value,
              "error": f"subprocess exited with status {result.returncode}"
          }, args.out)
  return status


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parse_args(argv)
  if args.sweep:
    return _run_sweep(args, argv)
  if args.cpu_devices:
    if args.cpu_devices > 1 and SINGLE_THREADED_EIGEN not in os.environ.get("XLA_FLAGS", ""):
      # Read when the CPU backend starts (below); avoids the rendezvous deadlock (docstring).
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREADED_EIGEN}".strip()
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before any device is touched
  if args.per_device_batch:
    args.batch = args.per_device_batch * jax.device_count()
  for what in args.whats:
    if what in METHOD_OF:
      records = [bench_train_step(args, what)]
    elif what in ATTACK_WHATS:
      records = [bench_attack(args, what)]
    else:
      records = bench_conv(args)
    for record in records:
      _emit(record, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
