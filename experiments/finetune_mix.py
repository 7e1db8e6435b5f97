"""Generalist's mechanism in isolation: mix a PGD-AT model with its own clean fine-tune.

    python experiments/finetune_mix.py --study runs/study --seeds 0,1,2
    python experiments/finetune_mix.py --study runs/study --seeds 0 --lrs 0.02 --steps 50,200

For each seed, the final model of `STUDY/pgd_at-s<seed>` (a finished `compare.py` or
`train.py --method pgd_at` run) is fine-tuned on clean training images for K steps (`--steps`)
at each constant learning rate of `--lrs` (SGD with momentum 0.9 and the natural expert's
weight decay: `gen_jax.finetune`), and `mix(fine-tuned, robust, β)` is evaluated for each β of
`--betas` on the whole test split with the PGD-AT run's own final attack (PGD-20, its keys).
A mixture's BatchNorm statistics are averaged as its weights are (`--bn mixed`), or re-estimated
on training images (`--bn clean`, `--bn matched`: `sweep_mix.py --bn-recalibrate`'s modes);
`--bn mixed,clean` evaluates both from the same fine-tunes.
Each mixture's chord score is taken against the final models of `STUDY/natural-s<seed>` and
`STUDY/pgd_at-s<seed>`, measured here by the same engine, threat and keys as the mixtures (so
β = 1 is the PGD-AT baseline itself): above 1, that mixture beats the straight line between
natural training and PGD-AT.

Files (in `--out`, default `STUDY/finetune-mix`): `s<seed>.json` (every evaluated point of that
seed, rewritten after each fine-tuning budget), `finetune_mix.json` (all points, the baselines
and the summary per learning rate and budget: each seed's best β, and the best β fixed across
seeds), `finetune_mix.md` (that table) and `finetune_mix.png` (best chord against K; the first
seed's mixtures in the clean/robust plane). Fine-tuned states are kept under `s<seed>/lr<lr>/`,
so the same command resumes after a kill: finished points are not recomputed, and a fine-tune
continues from its last saved budget. Several processes may share `--out` when they take
different seeds. `--report-only` rewrites the summary, table and figure from what exists.
"""
import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

from gen_jax import cli, finetune, models, runs  # noqa: E402
from gen_jax.evaluation import sweep  # noqa: E402

DEFAULT_BETAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _parser():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]),
                                   allow_abbrev=False)
  parser.add_argument("--study",
                      required=True,
                      help="directory holding natural-s<seed> and pgd_at-s<seed> runs")
  parser.add_argument("--seeds", type=cli.parsed_by(_seeds), default=(0,), help="default 0")
  parser.add_argument("--lrs",
                      type=cli.floats_of(_lrs),
                      default=(0.005, 0.02, 0.05),
                      help="constant fine-tuning learning rates (default 0.005,0.02,0.05)")
  parser.add_argument("--steps",
                      type=cli.parsed_by(_budgets),
                      default=(50, 200, 800, 2000),
                      help="fine-tuning budgets K, increasing (default 50,200,800,2000)")
  parser.add_argument("--betas",
                      type=cli.floats_of(lambda b: tuple(sweep.check_betas(b))),
                      default=DEFAULT_BETAS,
                      help="robust weights of the mixtures (default 0,0.2,...,1)")
  parser.add_argument("--bn",
                      type=cli.parsed_by(_bn_modes),
                      default=("mixed",),
                      help="BatchNorm statistics of the mixtures, comma-separated: mixed (averaged "
                      "as the weights, the default), clean (re-estimated on training images), "
                      "matched (clean and PGD statistics weighted by β; as sweep_mix.py "
                      "--bn-recalibrate)")
  parser.add_argument(
      "--recalibration-n",
      type=cli.positive_int,
      default=2000,
      help="training images (drawn at random) for --bn clean/matched (default 2000)")
  parser.add_argument("--out", default=None, help="output directory (default STUDY/finetune-mix)")
  parser.add_argument("--report-only",
                      action="store_true",
                      help="train and evaluate nothing: rewrite the summary, table and figure")
  return parser


def _lrs(values):
  if not values or any(not 0 < v < float("inf") for v in values):
    raise ValueError(f"learning rates must be positive numbers, got {values}")
  return tuple(values)


def _bn_modes(text):
  values = tuple(t.strip() for t in text.split(",") if t.strip())
  unknown = [v for v in values if v not in finetune.BN_MODES]
  if not values or unknown or len(set(values)) != len(values):
    raise ValueError(f"--bn takes distinct modes among {', '.join(finetune.BN_MODES)}; "
                     f"got {text!r}")
  return values


def _ints(text, what):
  try:
    return [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise ValueError(f"expected comma-separated {what}, got {text!r}") from None


def _budgets(text):
  values = _ints(text, "step counts")
  if not values or values != sorted(set(values)) or values[0] < 1:
    raise ValueError(f"step counts must increase from 1 or more, got {values}")
  return tuple(values)


def _seeds(text):
  values = _ints(text, "seeds")
  if not values or min(values) < 0 or len(set(values)) != len(values):
    raise ValueError(f"seeds must be distinct and >= 0, got {values}")
  return tuple(values)


def _run_dir(study_dir, method, seed):
  """`STUDY/<method>-s<seed>`, checked to hold a finished run before any work."""
  run_dir = os.path.join(study_dir, f"{method}-s{seed}")
  if not os.path.isdir(run_dir) or runs.read_summary(run_dir) is None:
    raise FileNotFoundError(f"--study {study_dir}: {run_dir} holds no finished run; train it "
                            f"first (experiments/compare.py --seeds {seed}, or train.py "
                            f"--method {method} --seed {seed} --workdir {run_dir}).")
  return run_dir


def _baselines(config, splits, natural, robust):
  """{"natural": {"clean", "robust"}, "pgd_at": {...}}: both final models, by the one engine.

  Measured here rather than read from the runs' summaries, so that a baseline and a mixture of
  the seed are one measurement (same code, threat and keys) whenever the runs were trained.
  """
  figures = finetune.evaluate(config, {"natural": natural, "pgd_at": robust}, splits)
  return {method: figures[method] for method in ("natural", "pgd_at")}


def _read(path, default):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def _write(path, value):
  temporary = f"{path}.tmp{os.getpid()}"
  with open(temporary, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(temporary, path)


def _seed(args, out, seed):
  """Every point of one seed: read back, the missing ones computed (and saved as they come)."""
  sources = {m: _run_dir(args.study, m, seed) for m in ("natural", "pgd_at")}
  path = os.path.join(out, f"s{seed}.json")
  record = _read(path, None)
  if args.report_only:
    return record
  done = set() if record is None else {
      (finetune.bn_mode(p), p["lr"], p["steps"], p["beta"]) for p in record["points"]
  }
  missing = {(bn, lr, k) for bn in args.bn for lr in args.lrs for k in args.steps if any(
      (bn, lr, k, b) not in done for b in args.betas)}
  if not missing:
    return record
  config = runs.read_config(sources["pgd_at"])
  splits = runs.load_splits(config)
  network = runs.build_model(config, splits.num_classes)
  abstract = jax.eval_shape(
      lambda: models.init_variables(network, jax.random.key(0), tuple(splits.train_x.shape[1:])))
  robust, natural = (runs.load_init(sources[m], config, abstract, num_classes=splits.num_classes)[0]
                     for m in ("pgd_at", "natural"))
  if record is None:
    record = {"seed": seed, "baselines": _baselines(config, splits, natural, robust), "points": []}
    _write(path, record)
  baselines = record["baselines"]
  recalibrate = {
      bn: finetune.recalibrator(config, splits, bn, n=args.recalibration_n) for bn in args.bn
  }
  for lr in args.lrs:
    budgets = [k for k in args.steps if any((bn, lr, k) in missing for bn in args.bn)]
    if not budgets:
      continue
    tuned_states = finetune.finetune(config,
                                     robust,
                                     splits,
                                     lr=lr,
                                     at_steps=args.steps,
                                     checkpoint_dir=os.path.join(out, f"s{seed}", f"lr{lr:g}"))
    for k, tuned in tuned_states:
      for bn in args.bn:
        if (bn, lr, k) not in missing:
          continue
        betas = [b for b in args.betas if (bn, lr, k, b) not in done]
        for point in finetune.evaluate_mixtures(config,
                                                tuned,
                                                robust,
                                                splits,
                                                betas=betas,
                                                recalibrate=recalibrate[bn]):
          point.update(seed=seed, bn=bn, lr=lr, steps=k, chord=finetune.chord(point, baselines))
          record["points"].append(point)
        _write(path, record)
        best = max((p for p in record["points"]
                    if (finetune.bn_mode(p), p["lr"], p["steps"]) == (bn, lr, k)),
                   key=finetune.chord_key)
        print(
            f"seed {seed} BatchNorm {bn} lr {lr:g} K {k}: best chord {best['chord']:.3f} at "
            f"β {best['beta']:g} ({100 * best['clean']:.2f} / {100 * best['robust']:.2f} %)",
            flush=True)
  return record


def main():
  args = _parser().parse_args()
  out = args.out or os.path.join(args.study, "finetune-mix")
  os.makedirs(out, exist_ok=True)
  records = [_seed(args, out, seed) for seed in args.seeds]
  # The summary covers every seed whose file exists in --out (other processes' seeds too).
  names = sorted(f for f in os.listdir(out) if f.startswith("s") and f.endswith(".json"))
  records = {
      r["seed"]: r for r in [_read(os.path.join(out, f), None)
                             for f in names] + records if r is not None
  }
  points = [
      p for r in records.values() for p in r["points"] if p["lr"] in args.lrs and
      p["steps"] in args.steps and p["beta"] in args.betas and finetune.bn_mode(p) in args.bn
  ]
  if not points:
    raise ValueError(f"no evaluated point in {out} yet; run without --report-only.")
  rows = finetune.summarize(points)
  baselines = {seed: r["baselines"] for seed, r in sorted(records.items())}
  _write(
      os.path.join(out, "finetune_mix.json"), {
          "study": os.path.abspath(args.study),
          "betas": list(args.betas),
          "bn": list(args.bn),
          "baselines": baselines,
          "summary": rows,
          "points": points
      })
  table = finetune.to_markdown(rows)
  with open(os.path.join(out, "finetune_mix.md"), "w") as f:
    f.write(table + "\n")
  png = finetune.plot(rows, points, baselines, os.path.join(out, "finetune_mix.png"))
  print(table)
  print(f"files: {out}/finetune_mix.json, finetune_mix.md, {png.name}")


if __name__ == "__main__":
  cli.main_guard(main)
