"""The Python steps of experiments/gpu_check.sh: environment, data, bench merging, plan,
figures, AutoAttack, summary (`python experiments/gpu_check_steps.py COMMAND ARGS...`).

Not part of gen_jax: the shell script drives the phases, their time limits and their order.
"""
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import sys
import time

FIG = os.environ["GC_FIG"]
WORK = os.environ["GC_WORK"]
PRESET = os.environ["GC_PRESET"]
# Datasheet dense peaks (FLOP/s): bfloat16 and TF32 (XLA's default float32 precision on GPUs).
PEAKS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v4": (275e12, 275e12)
}
METHOD_STEP = {"natural": "natural_step", "pgd_at": "robust_step", "generalist": "generalist_step"}


def _jsonable(value):
  if hasattr(value, "item"):
    return value.item()
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)


def emit(record, echo=True):
  line = json.dumps(record, default=_jsonable)
  with open(FIG, "a") as f:
    f.write(line + "\n")
  if echo:
    print(line if len(line) < 400 else line[:397] + "...", flush=True)


def rows(phase=None):
  out = []
  with open(FIG) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if phase is None or record.get("phase") == phase:
        out.append(record)
  return out


def write_env(path, **values):
  with open(path, "w") as f:
    for k, v in values.items():
      f.write(f"{k}={'' if v is None else v}\n")


def env(allow_cpu, peak_bf16, peak_f32, nvidia_smi):
  import jax
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "scipy",
               "scikit-learn", "pillow", "tensorflow-datasets", "tensorflow"):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  devices = jax.devices()
  kind = devices[0].device_kind
  known = next((p for k, p in PEAKS.items() if k.lower() in kind.lower()), (None, None))
  peaks = {
      "bfloat16": float(peak_bf16) if peak_bf16 else known[0],
      "float32": float(peak_f32) if peak_f32 else known[1]
  }
  record = {
      "phase": "env",
      "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device_kind": kind,
      "device_count": len(devices),
      "devices": [str(d) for d in devices],
      "versions": versions,
      "peak_flops": peaks,
      "peak_source": "--peak-*" if (peak_bf16 or peak_f32) else ("datasheet" if known[0] else None),
      "nvidia_smi": nvidia_smi or None
  }
  emit(record)
  print(f"jax {jax.__version__} (jaxlib {versions['jaxlib']}), Python {platform.python_version()}"
        f"; backend {jax.default_backend()}; {len(devices)} device(s): {devices}")
  write_env(os.path.join(WORK, "env.sh"),
            BACKEND=jax.default_backend(),
            PEAK_BF16=peaks["bfloat16"],
            PEAK_F32=peaks["float32"])
  if jax.default_backend() == "cpu" and not int(allow_cpu):
    print("ERROR: JAX sees no accelerator (backend cpu), so there is nothing to measure. On a GPU "
          "machine, check `nvidia-smi` and that jax's CUDA plugin is installed (pip list | grep "
          "jax-cuda); on a TPU runtime, that jax[tpu] is. To smoke-test this script on CPU, pass "
          "--allow-cpu.")
    return 3
  return 0


def _config(data):
  from gen_jax import config as cfg
  config = cfg.get_config(PRESET)
  if data != "preset":
    config = dataclasses.replace(config, dataset="folder", data_dir=data)
  return config.validate()


def data(root):
  from gen_jax import runs
  config = _config(root)
  started = time.time()
  splits = runs.load_splits(config)
  emit({
      "phase": "data",
      "dataset": config.dataset,
      "data_dir": config.data_dir,
      "train": len(splits.train_y),
      "validation": len(splits.val_y),
      "test": len(splits.test_y),
      "classes": splits.num_classes,
      "image_shape": list(splits.train_x.shape[1:]),
      "load_seconds": round(time.time() - started, 2)
  })
  return 0


def bench_merge(path, model, batch, dtype, whats, status):
  """The point's JSON lines of bench.py, with the MFU against the peak of each record's dtype."""
  env_rows = rows("env")
  peaks = env_rows[-1]["peak_flops"] if env_rows else {}
  found = set()
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.startswith("{"):
          record = json.loads(line)
          found.add(record.get("what"))
          peak = peaks.get(record.get("dtype"))
          achieved = record.get("model_flops_per_second")
          emit(
              {
                  "phase": "bench",
                  **record, "peak_flops": peak,
                  "mfu": achieved / peak if achieved and peak else None,
                  "status": "ok"
              },
              echo=False)
  for what in whats.split(","):
    if what not in found:
      emit({
          "phase": "bench",
          "what": what,
          "model": model,
          "batch": int(batch),
          "dtype": dtype if what != "pgd20" else "float32",
          "status": status
      })
  return 0


def _per_image(bench, what, model, dtype, batch, same_dtype=False):
  """The closest measurement of `what`: {"seconds": per image, "compile", "dtype", "source"}."""
  candidates = [
      r for r in bench
      if r.get("what") == what and r.get("model") == model and r.get("seconds_per_step")
  ]
  same = [r for r in candidates if r.get("dtype") == dtype]
  if not same and not same_dtype:
    same = candidates
  if not same:
    return None
  exact = [r for r in same if r["batch"] == batch]
  # Otherwise the smallest batch: its cost per image is the highest (a conservative plan).
  r = exact[0] if exact else min(same, key=lambda r: r["batch"])
  return {
      "seconds": r["seconds_per_step"] / r["batch"],
      "compile": r.get("compile_seconds") or 0.0,
      "dtype": r["dtype"],
      "source": f"{what} {r['model']} {r['dtype']} batch {r['batch']}"
  }


# Model FLOPs per image in units of one forward pass F (bench.py's convention): the stand-in
# where a measurement is missing.
FLOPS = {"natural": 3, "pgd_at": 23, "generalist": 26, "pgd20": 40}


def _basis(bench, model, dtype, batch, eval_batch):
  """Seconds per image of each method's step and of PGD-20: measured, else scaled by FLOPs."""
  known = {m: _per_image(bench, s, model, dtype, batch) for m, s in METHOD_STEP.items()}
  known["pgd20"] = _per_image(bench, "pgd20", model, "float32", eval_batch)
  known = {m: k for m, k in known.items() if k}
  if not known:
    return None
  ref_name, ref = next(iter(known.items()))
  return {
      name:
          known.get(name) or {
              **ref, "seconds": ref["seconds"] * FLOPS[name] / FLOPS[ref_name],
              "source": f"scaled from {ref['source']} by model FLOPs"
          } for name in FLOPS
  }


def _fixed_and_epoch(basis, load_seconds, n_train, n_val, n_test):
  """Seconds of the three runs outside the epochs (compile, data, evaluation) and of one epoch."""
  from gen_jax import experts
  fixed, epoch, detail = 0.0, 0.0, {}
  pgd = basis["pgd20"]
  for method in METHOD_STEP:
    step = basis[method]
    roles = len(experts.evaluated_roles(method))
    # The last epoch's evaluation (1,000 test images and the validation split), then the final
    # one on the whole test split, clean + PGD-20.
    eval_images = roles * (min(1000, n_test) + n_test) + n_val
    run_fixed = (load_seconds + step["compile"] + pgd["compile"] + 10 +
                 1.05 * eval_images * pgd["seconds"])
    fixed += run_fixed
    epoch += n_train * step["seconds"]
    detail[method] = {
        "seconds_per_image": step["seconds"],
        "compile_seconds": step["compile"],
        "fixed_seconds": round(run_fixed, 1),
        "source": step["source"]
    }
  return fixed, epoch, detail


def plan(run_budget):
  from gen_jax import config as cfg
  run_budget = float(run_budget)
  data_rows = rows("data")
  config = cfg.get_config(PRESET)
  bench = [r for r in rows("bench") if r.get("status") == "ok"]
  env_path = os.path.join(WORK, "plan.sh")
  if not data_rows:
    emit({"phase": "plan", "error": "no data phase: nothing to plan"})
    write_env(env_path, EPOCHS="", MAX_TPC="", MAX_TEST="")
    return 1
  d = data_rows[-1]
  n_train, n_val, n_test, classes = d["train"], d["validation"], d["test"], d["classes"]
  per_class = (n_train + n_val) / classes
  basis = _basis(bench, config.model, config.compute_dtype, config.batch_size,
                 config.eval_batch_size)
  usable = 0.85 * run_budget
  max_tpc = max_test = estimate = None
  fixed = epoch = 0.0
  detail = "no benchmark measured: one epoch on a small subset"
  if basis is None:
    epochs = 1
    max_tpc = min(int(per_class), math.ceil((n_val + 4 * config.batch_size) / classes))
    max_test = min(100, math.ceil(n_test / classes))
  else:
    fixed, epoch, detail = _fixed_and_epoch(basis, d["load_seconds"], n_train, n_val, n_test)
    if usable - fixed < epoch and n_test > 1000:
      # Not one epoch on everything: evaluate on 1,000 test images (AutoAttack's number) first.
      max_test = math.ceil(1000 / classes)
      fixed, epoch, detail = _fixed_and_epoch(basis, d["load_seconds"], n_train, n_val,
                                              max_test * classes)
    if usable - fixed >= epoch:
      epochs = max(1, min(config.epochs, int((usable - fixed) // epoch)))
      estimate = fixed + epochs * epoch
    else:  # then fewer training images
      epochs = 1
      fraction = max(usable - fixed, 0.0) / epoch
      floor_tpc = math.ceil((n_val + 2 * config.batch_size) / classes)
      max_tpc = min(int(per_class), max(floor_tpc, int((fraction * n_train + n_val) / classes)))
      estimate = fixed + epoch * (max_tpc * classes - n_val) / n_train
  if config.max_train_per_class and max_tpc:
    max_tpc = min(max_tpc, config.max_train_per_class)
  emit({
      "phase": "plan",
      "preset": PRESET,
      "run_budget_seconds": round(run_budget),
      "epochs": epochs,
      "max_train_per_class": max_tpc,
      "max_test_per_class": max_test,
      "estimate_seconds": None if estimate is None else round(estimate),
      "fixed_seconds": round(fixed, 1),
      "epoch_seconds": round(epoch, 1),
      "basis": detail
  })
  write_env(env_path, EPOCHS=epochs, MAX_TPC=max_tpc, MAX_TEST=max_test)
  _estimates(bench)
  return 0


def _estimates(bench):
  """Expected wall time of the paper's runs (120 epochs) from the measured steps, per model."""
  from gen_jax import config as cfg
  from gen_jax import experts
  full = cfg.get_config("cifar10")
  steps = (50000 - int(full.validation_size)) // full.batch_size * full.epochs
  for model in sorted({r["model"] for r in bench if r["what"] in METHOD_STEP.values()}):
    for dtype in ("float32", "bfloat16"):
      if not any(r["model"] == model and r["dtype"] == dtype for r in bench):
        continue
      basis = _basis(bench, model, dtype, full.batch_size, full.eval_batch_size)
      for method in METHOD_STEP:
        step, pgd = basis[method], basis["pgd20"]
        train = steps * step["seconds"] * full.batch_size
        # As experiments/reproduce.sh runs it: every epoch evaluates the run's models on 1,000
        # test images and the global model on the 1,000 validation images (clean + PGD-20),
        # the end all models on the 10,000 test images.
        roles = len(experts.evaluated_roles(method))
        evaluation = (full.epochs * (roles * 1000 + 1000) + roles * 10000) * 1.05 * pgd["seconds"]
        emit(
            {
                "phase": "estimate",
                "model": model,
                "dtype": dtype,
                "method": method,
                "epochs": full.epochs,
                "steps": steps,
                "train_hours": round(train / 3600, 2),
                "eval_hours": round(evaluation / 3600, 2),
                "hours": round((train + evaluation) / 3600, 2),
                "source": step["source"],
                "pgd20_source": pgd["source"]
            },
            echo=False)


def compare_figures(workdir):
  path = os.path.join(workdir, "compare.json")
  done = set()
  if os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
    for run in result["runs"]:
      done.add(run["name"])
      emit({
          "phase": "compare",
          "run": run["name"],
          "method": run["method"],
          "finished": True,
          "clean": run["clean"],
          result["robust_metric"]: run["robust"],
          "robust_metric": result["robust_metric"],
          "teachers": run.get("teachers"),
          "train_seconds": run.get("train_seconds"),
          "epochs": result["config"]["epochs"],
          "max_train_per_class": result["config"]["max_train_per_class"]
      })
    chord = result["aggregate"]["chord"]
    if chord.get("per_seed"):
      emit({"phase": "chord", "per_seed": chord["per_seed"], "mean": chord["mean"]})
  if os.path.isdir(workdir):
    for name in sorted(os.listdir(workdir)):
      metrics = os.path.join(workdir, name, "metrics.jsonl")
      if name in done or not os.path.exists(metrics):
        continue
      with open(metrics) as f:
        epochs = [json.loads(line) for line in f if line.strip()]
      emit({
          "phase": "compare",
          "run": name,
          "finished": False,
          "epochs_done": epochs[-1]["epoch"] if epochs else 0
      })
  return 0


def autoattack(workdir, n, batch_size):
  from gen_jax import runs
  from gen_jax.evaluation import report
  status = 0
  for name in ("generalist-s0", "pgd_at-s0"):
    run_dir = os.path.join(workdir, name)
    try:
      run = runs.restore_models(run_dir, ("global",))
    except (FileNotFoundError, ValueError) as error:
      emit({"phase": "autoattack", "run": name, "status": f"skipped: {error}"})
      continue
    started = time.time()
    try:
      result = report.evaluate_run(run,
                                   attacks=("clean", "aa"),
                                   analyses=(),
                                   n=int(n),
                                   batch_size=int(batch_size),
                                   seed=0)
    except Exception as error:  # pylint: disable=broad-except  # report it, go on to the next
      emit({
          "phase": "autoattack",
          "run": name,
          "status": f"error: {type(error).__name__}: "
                    f"{error}"
      })
      status = 1
      continue
    report.write_report(result, os.path.join(run_dir, "eval"))
    row = result["models"]["global"]
    emit({
        "phase": "autoattack",
        "run": name,
        "model": "global",
        "status": "ok",
        "n": result["n"],
        "eps": result["eps"],
        "clean": row["clean"]["accuracy"],
        "autoattack": row["aa"]["accuracy"],
        "stages": row["aa"].get("stages"),
        "seconds": round(time.time() - started, 1)
    })
  return status


def _pct(v):
  return "-" if v is None else f"{100 * v:.2f}"


def summary(path, budget, used):
  all_rows = rows()
  by = lambda phase: [r for r in all_rows if r.get("phase") == phase]
  env_rows = by("env")
  lines = ["# gen_jax GPU check", ""]
  if env_rows:
    e = env_rows[-1]
    v = e["versions"]
    lines += [
        f"{e['time_utc']}: {e['device_count']} x {e['device_kind']} (backend "
        f"{e['backend']}), Python {e['python']}, jax {e['jax']}, jaxlib {v.get('jaxlib')}, "
        f"flax {v.get('flax')}, optax {v.get('optax')}, orbax-checkpoint "
        f"{v.get('orbax-checkpoint')}, tensorflow-datasets {v.get('tensorflow-datasets')}."
    ]
    if e.get("nvidia_smi"):
      lines += ["", f"nvidia-smi: {e['nvidia_smi']}"]
  lines += ["", f"Budget {budget} s, used {used} s. Every figure: figures.jsonl; console: log.txt."]
  data_rows = by("data")
  if data_rows:
    d = data_rows[-1]
    lines += [
        "", f"Data: {d['dataset']} {d['data_dir'] or ''} ({d['train']} train, "
        f"{d['validation']} validation, {d['test']} test images; loaded in "
        f"{d['load_seconds']} s). The JPEG copy of CIFAR-10 gives accuracies close to, "
        "not equal to, published CIFAR-10 figures."
    ]
  bench = [r for r in by("bench") if r.get("status") == "ok"]
  if bench:
    peaks = env_rows[-1]["peak_flops"] if env_rows else {}
    tflops = lambda v: "unknown (pass --peak-bf16/--peak-f32)" if not v else f"{v / 1e12:.0f}"
    lines += [
        "", "## Throughput (experiments/bench.py)", "",
        f"MFU: model FLOPs (bench.py's convention) over the device's peak in TFLOP/s: "
        f"bfloat16 {tflops(peaks.get('bfloat16'))}, float32 (TF32) "
        f"{tflops(peaks.get('float32'))}.", "",
        "| what | model | batch | dtype | img/s | ms/step | compile s | TFLOP/s | MFU | "
        "peak GB |", "|---|---|---|---|---|---|---|---|---|---|"
    ]
    for r in bench:
      mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
      tf = r.get("model_flops_per_second")
      mem = r.get("peak_memory_bytes")
      lines.append(f"| {r['what']} | {r['model']} | {r['batch']} | {r['dtype']} | "
                   f"{r['images_per_second']:.1f} | {1e3 * r['seconds_per_step']:.2f} | "
                   f"{r['compile_seconds']:.1f} | {'-' if not tf else f'{tf / 1e12:.1f}'} | "
                   f"{mfu} | {'-' if not mem else f'{mem / 1e9:.2f}'} |")
  estimates = by("estimate")
  if estimates:
    lines += [
        "", "## Expected wall time of the paper's runs (120 epochs, batch 128, this device)", "",
        "From the measured step and PGD-20 times: training steps plus the evaluation of "
        "experiments/reproduce.sh's runs (clean + PGD-20 on 1,000 test and 1,000 "
        "validation images per epoch, on the 10,000 test images at the end; AutoAttack "
        "not included).", "", "| model | dtype | method | hours (train + eval) | measured on |",
        "|---|---|---|---|---|"
    ]
    lines += [
        f"| {r['model']} | {r['dtype']} | {r['method']} | {r['hours']} "
        f"({r['train_hours']} + {r['eval_hours']}) | {r['source']} |" for r in estimates
    ]
  plans = by("plan")
  compares = by("compare")
  if plans or compares:
    p = plans[-1] if plans else {}
    lines += [
        "", f"## Real run: compare.py --preset {PRESET}", "", f"Plan: {p.get('epochs')} epoch(s)" +
        (f", {p['max_train_per_class']} training images per class" if p.get("max_train_per_class")
         else "") + (f", {p['max_test_per_class']} test images per class"
                     if p.get("max_test_per_class") else "") +
        (f", estimated {p['estimate_seconds']} s" if p.get("estimate_seconds") else
         ", no estimate (nothing measured)") + f" of {p.get('run_budget_seconds')} s."
    ]
    if compares:
      metric = next((r["robust_metric"] for r in compares if r.get("robust_metric")), "pgd20")
      lines += [
          "", f"| run | finished | clean (%) | {metric} (%) | train s |", "|---|---|---|---|---|"
      ]
      for r in compares:
        done = "yes" if r["finished"] else f"no, epoch {r.get('epochs_done')}"
        lines.append(f"| {r['run']} | {done} | {_pct(r.get('clean'))} | {_pct(r.get(metric))} | "
                     f"{r.get('train_seconds', '-')} |")
    for c in by("chord"):
      lines += [
          "", f"Chord score of the global model: {c['mean']:.3f} (1 = the straight line "
          "between standard and adversarial training; above 1 beats it)."
      ]
  aa = by("autoattack")
  if aa:
    lines += [
        "", "## AutoAttack (standard)", "", "| run | model | images | eps | clean (%) | "
        "AutoAttack (%) | s |", "|---|---|---|---|---|---|---|"
    ]
    for r in aa:
      if r.get("status") == "ok":
        lines.append(f"| {r['run']} | {r['model']} | {r['n']} | {r['eps']:.5f} | "
                     f"{_pct(r['clean'])} | {_pct(r['autoattack'])} | {r['seconds']} |")
      else:
        lines.append(f"| {r['run']} | - | - | - | - | {r.get('status')} | - |")
  timing_rows = by("timing")
  if timing_rows:
    lines += ["", "## Phases", "", "| step | limit s | s | status |", "|---|---|---|---|"]
    lines += [
        f"| {r['step']} | {r['limit_seconds']} | {r['seconds']} | {r['status']} |"
        for r in timing_rows
    ]
  missing = [r for r in by("bench") if r.get("status") != "ok"]
  if missing:
    lines += [
        "", "Not measured: " +
        "; ".join(f"{r['what']} {r['model']} {r['batch']} {r['dtype']} ({r['status']})"
                  for r in missing) + "."
    ]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  command, args = sys.argv[1], sys.argv[2:]
  sys.exit({
      "env": env,
      "data": data,
      "bench-merge": bench_merge,
      "plan": plan,
      "compare-figures": compare_figures,
      "autoattack": autoattack,
      "summary": summary
  }[command](*args))
