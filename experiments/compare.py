"""Compare Generalist with standard and adversarial training on the same data and budget.

    python experiments/compare.py --preset pilot --workdir runs/compare
    python experiments/compare.py --preset cifar10-study --dataset folder --data-dir ROOT \\
        --workdir runs/study --seeds 0,1,2 --ablations all

Trains `natural`, `pgd_at` and `generalist` for every seed of `--seeds` (each run in
`WORKDIR/<method>-s<seed>`), then each Generalist ablation of `--ablations` (see
`gen_jax.study.ABLATIONS`) for the seeds of `--ablation-seeds`. Every run resumes from its
workdir, so the whole study survives being stopped at any moment: run the same command again.
After each run it rewrites `WORKDIR/compare.json` (every finished run and the aggregate) and
`WORKDIR/compare.md`: per variant the mean and spread of clean and PGD-20 accuracy of the final
model (for generalist, the global model), the chord score of each seed and its Student-t interval.
With `--sweep`, each Generalist run then gets the mixing sweep of its two teachers
(`RUN/eval/sweep.json`, reused when present) and the study records each mixture's chord score;
the end writes `WORKDIR/compare.png`, every run, each seed's chord and the sweep curves. The
chord score is

    score = (C_g - C_at) / (C_nat - C_at) + (R_g - R_nat) / (R_at - R_nat),

with C clean and R PGD accuracy: 1 is the straight line between standard and adversarial
training; above 1 the global model beats that trade-off.
"""
import dataclasses
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from gen_jax import cli, runs, study, training  # noqa: E402
from gen_jax.evaluation import sweep  # noqa: E402


def _ints(text):
  return [int(t) for t in text.split(",") if t.strip()]


def _add_arguments(parser):
  parser.add_argument("--workdir",
                      default=None,
                      help="directory of the comparison (default: runs/compare-<preset>)")
  parser.add_argument("--seeds",
                      type=_ints,
                      default=None,
                      help="comma-separated seeds of the baselines (default: the config's seed)")
  parser.add_argument("--ablations",
                      default="",
                      help="comma-separated Generalist ablations, or 'all': " +
                      ", ".join(study.ABLATIONS))
  parser.add_argument("--ablation-seeds",
                      type=_ints,
                      default=None,
                      help="seeds of the ablations (default: the first of --seeds)")
  parser.add_argument("--sweep",
                      action="store_true",
                      help="sweep the mixing weight of every Generalist run (after training)")
  parser.add_argument("--sweep-betas",
                      type=cli.floats_of(sweep.check_betas),
                      default=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
                      help="betas of --sweep (default 0,0.2,...,1)")
  parser.add_argument("--sweep-n",
                      type=cli.positive_int,
                      default=1000,
                      help="test images of --sweep (default 1000)")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def main():
  parser = cli.build_parser(__doc__.splitlines()[0], add_arguments=_add_arguments)
  args, config = cli.parse_config(parser)
  workdir = args.workdir or os.path.join("runs", f"compare-{args.preset}")
  ablations = list(study.ABLATIONS) if args.ablations == "all" else [
      a for a in args.ablations.split(",") if a.strip()
  ]
  plan = study.plan_runs(args.seeds or [config.seed], ablations, args.ablation_seeds)
  rows = []
  total_steps = None
  for run in plan:
    overrides = {"method": run.method, "seed": run.seed}
    if run.variant in study.ABLATIONS:
      if total_steps is None:
        splits = runs.load_splits(config)
        total_steps = len(splits.train_y) // config.batch_size * config.epochs
      overrides.update(study.ablation_overrides(run.variant, total_steps=total_steps))
    run_config = dataclasses.replace(config, **overrides).validate()
    run_dir = os.path.join(workdir, run.name)
    print(f"== {run.name} ==", flush=True)
    summary = training.train_and_evaluate(run_config, run_dir, progress=not args.no_progress)
    final = summary["models"]
    rows.append({
        **dataclasses.asdict(run), "clean": final["global"]["clean_acc"],
        "robust": final["global"]["pgd_acc"],
        "teachers": {
            r: final[r] for r in ("natural", "robust") if r in final
        },
        "train_seconds": summary["train_seconds"],
        "workdir": run_dir
    })
    _write(workdir, args.preset, config, rows, {})
  sweeps = {}
  if args.sweep:
    for row in rows:
      if row["method"] == "generalist":
        print(f"== sweep {row['name']} ==", flush=True)
        sweeps[row["name"]] = _sweep(row["workdir"], args)
    _write(workdir, args.preset, config, rows, sweeps)
  png = study.plot_study(rows, sweeps, os.path.join(workdir, "compare.png"),
                         f"PGD-{config.eval_pgd_steps}")
  print(open(os.path.join(workdir, "compare.md")).read())
  print(f"figure: {png}")


def _sweep(run_dir, args):
  """The sweep of one Generalist run: read back if it exists, else computed and written."""
  path = os.path.join(run_dir, runs.EVAL_DIR, "sweep.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  result = sweep.sweep_run(runs.restore_models(run_dir), betas=args.sweep_betas, n=args.sweep_n)
  sweep.write_sweep(result, os.path.join(run_dir, runs.EVAL_DIR))
  return result


def _write(workdir, preset, config, rows, sweeps):
  """compare.json (every run, the aggregate, the sweeps) and compare.md, rewritten in full."""
  robust_name = f"PGD-{config.eval_pgd_steps}"
  result = {
      "preset": preset,
      "robust_metric": f"pgd{config.eval_pgd_steps}",
      "runs": rows,
      "aggregate": study.aggregate(rows),
      "sweeps": sweeps,
      "sweep_chords": study.sweep_chords(rows, sweeps),
      "config": dataclasses.asdict(config)
  }
  with open(os.path.join(workdir, "compare.json"), "w") as f:
    json.dump(result, f, indent=2, allow_nan=True)
  text = study.to_markdown(result["aggregate"], robust_name, result["sweep_chords"])
  with open(os.path.join(workdir, "compare.md"), "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  cli.main_guard(main)
