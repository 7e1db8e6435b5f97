"""Compare Generalist with standard and adversarial training on the same data and budget.

    python experiments/compare.py --preset pilot --workdir runs/compare
    python experiments/compare.py --preset cifar10-study --dataset folder --data-dir ROOT \\
        --workdir runs/study --seeds 0,1,2 --ablations all
    python experiments/compare.py --preset pilot-multinorm --workdir runs/cmp-multinorm

Trains `natural`, `pgd_at` and `generalist` for every seed of `--seeds` (each run in
`WORKDIR/<method>-s<seed>`), then each Generalist ablation of `--ablations` (see
`gen_jax.study.ABLATIONS`) for the seeds of `--ablation-seeds`. Every run resumes from its
workdir, so the whole study survives being stopped at any moment: run the same command again.
After each run it rewrites `WORKDIR/compare.json` (every finished run and the aggregate) and
`WORKDIR/compare.md`: per variant the mean and spread of clean and PGD-20 accuracy of the final
model (for generalist, the global model), the chord score of each seed and its Student-t interval.
With `--sweep`, each Generalist run then gets the mixing sweep of its two teachers on all test
images (`RUN/eval/sweep.json`, reused when present) and the study records each mixture's chord
score;
the end writes `WORKDIR/compare.png`: every run, each seed's chord and the sweep curves, with a
second panel zoomed on the PGD-AT and Generalist runs. The chord score is

    score = (C_g - C_at) / (C_nat - C_at) + (R_g - R_nat) / (R_at - R_nat),

with C clean and R PGD accuracy: 1 is the straight line between standard and adversarial
training; above 1 the global model beats that trade-off. `--report-only` trains and evaluates
nothing: it writes the files from what has finished (a study running elsewhere can be read at any
time; unfinished runs and missing sweeps are named and left out).

A config that lists its experts (`--experts-spec`, e.g. `--preset pilot-multinorm`: natural, L-inf
and L2 experts) gets the multi-norm comparison instead: the Generalist global model and, on the
same budget, the natural model and one single-norm adversarial model per adversarial expert
(`pgd_at_linf`, `pgd_at_l2`: `gen_jax.study.multinorm_baselines`), each evaluated on the test split
(or its first `--eval-n` images) under clean, L-inf PGD-20 (the config's eps), L2 PGD-20 (the L2
expert's eps) and their union (`RUN/eval/norms.json`, reused when present). `compare.md` gives the
four figures per model and where the global model sits against each pair of baselines (natural
vs L-inf-AT on clean / L-inf, natural vs L2-AT on clean / L2, L-inf-AT vs L2-AT on L-inf / L2);
`compare.png` draws each of those planes. `--sweep` adds the simplex sweep of each Generalist run
(`RUN/eval/simplex.json`, grid `--grid-step`).
"""
import dataclasses
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from gen_jax import cli, runs, study, training  # noqa: E402
from gen_jax.attacks.threat import Threat  # noqa: E402
from gen_jax.evaluation import ModelSet, engine, report, sweep  # noqa: E402
from gen_jax.experts import GLOBAL  # noqa: E402


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
                      default=None,
                      help="test images of --sweep (default: all, the images of the runs' final "
                      "figures, against which each mixture's chord score is computed)")
  parser.add_argument("--grid-step",
                      type=cli.positive_float,
                      default=0.25,
                      help="weight-grid spacing of --sweep for runs of more than two experts")
  parser.add_argument("--eval-n",
                      type=cli.positive_int,
                      default=None,
                      help="test images of the multi-norm evaluation (default: all)")
  parser.add_argument("--only",
                      type=cli.names_of(tuple),
                      default=(),
                      help="comma-separated run names (e.g. warm-start-s0,pgd_at-s1) to train; "
                      "the study's other runs are read if finished, as with --report-only (to "
                      "spread one study over several processes)")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  parser.add_argument("--report-only",
                      action="store_true",
                      help="train and evaluate nothing: write compare.json/md/png from the runs "
                      "that have finished and the evaluations already saved (e.g. while the "
                      "study still runs elsewhere)")


def main():
  parser = cli.build_parser(__doc__.splitlines()[0], add_arguments=_add_arguments)
  args, config = cli.parse_config(parser)
  workdir = args.workdir or os.path.join("runs", f"compare-{args.preset}")
  if config.experts_spec:
    _multinorm(args, config, workdir)
    return
  ablations = list(study.ABLATIONS) if args.ablations == "all" else [
      a for a in args.ablations.split(",") if a.strip()
  ]
  plan = study.plan_runs(args.seeds or [config.seed], ablations, args.ablation_seeds)
  unknown = sorted(set(args.only) - {run.name for run in plan})
  if unknown:
    raise ValueError(f"--only names {unknown}, which this study does not plan; its runs are "
                     f"{', '.join(run.name for run in plan)}.")
  rows = []
  steps_per_epoch = None
  for run in plan:
    overrides = {"method": run.method, "seed": run.seed}
    if run.variant in study.ABLATIONS:
      if steps_per_epoch is None:
        steps_per_epoch = len(runs.load_splits(config).train_y) // config.batch_size
      context = study.AblationContext(config, steps_per_epoch, seed=run.seed, study_dir=workdir)
      overrides.update(study.ablation_overrides(run.variant, context))
    run_config = dataclasses.replace(config, **overrides).validate()
    run_dir = os.path.join(workdir, run.name)
    summary = _summary(run_config, run_dir, run.name, args)
    if summary is None:
      continue
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
  if not rows:
    raise ValueError(f"--report-only: no run of this study has finished in {workdir} yet.")
  sweeps = {}
  if args.sweep:
    for row in rows:
      if row["method"] == "generalist":
        result = _sweep(row["workdir"], args, name=row["name"])
        if result is not None:
          sweeps[row["name"]] = result
    _write(workdir, args.preset, config, rows, sweeps)
  png = study.plot_study(rows, sweeps, os.path.join(workdir, "compare.png"),
                         f"PGD-{config.eval_pgd_steps}")
  print(open(os.path.join(workdir, "compare.md")).read())
  print(f"figure: {png}")


def _summary(run_config, run_dir, name, args):
  """A run's summary: trained to the end (resuming), or with --report-only read back (None, and
  a line saying so, for a run that has not finished)."""
  if args.report_only or (args.only and name not in args.only):
    summary = runs.read_summary(run_dir) if runs.check_config(run_config, run_dir) else None
    if summary is None:
      print(f"== {name}: not finished, left out (not trained by this command)", flush=True)
    return summary
  print(f"== {name} ==", flush=True)
  return training.train_and_evaluate(run_config, run_dir, progress=not args.no_progress)


def _sweep(run_dir, args, file="sweep.json", name=""):
  """The sweep of one Generalist run: read back if it exists, else computed and written
  (`simplex.json` for a run of more than two experts); None with --report-only when absent."""
  path = os.path.join(run_dir, runs.EVAL_DIR, file)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  if args.report_only or (args.only and name not in args.only):
    print(f"== sweep {name}: not computed yet, left out (not computed by this command)", flush=True)
    return None
  print(f"== sweep {name} ==", flush=True)
  result = sweep.sweep_run(runs.restore_models(run_dir),
                           betas=args.sweep_betas,
                           n=args.sweep_n,
                           grid_step=args.grid_step)
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


# ------------------------------------------------------------------------- multi-norm study
def _threat_models(config):
  """The comparison's threats (L-inf, L2 or None): the config's own and its L2 expert's."""
  if config.norm != "linf":
    raise ValueError(f"the multi-norm comparison evaluates L-inf PGD-20 at --eps; the config has "
                     f"--norm {config.norm}. Describe the experts with --experts-spec and keep "
                     "--norm linf.")
  return Threat.of(config), Threat.of(config, norm="l2")


def _threat_settings(threats):
  """The radii and steps of `_threat_models`, as compare.json and RUN/eval/norms.json record
  them (the attacks are PGD-20 whatever the config's evaluation steps)."""
  threat, l2 = threats
  return {
      "eps": threat.eps,
      "step_size": threat.step_size,
      "l2_eps": l2.eps if l2 else None,
      "l2_step_size": l2.step_size if l2 else None,
  }


def _norm_figures(run_dir, run_seed, threats, args):
  """Clean, L-inf, L2 and union accuracy of a run's global model: read back from
  RUN/eval/norms.json when it holds these settings, else computed and written.

  The attacks are the correctness engine's with the run's own evaluation key
  (`engine.attack_key(seed)`), so the L-inf figure is the run's `summary.json` figure when its
  evaluation is PGD-20 on the same images; "keys" marks figures of per-example keys, so that a
  file of the earlier per-batch keys is recomputed, not reused."""
  path = os.path.join(run_dir, runs.EVAL_DIR, "norms.json")
  settings = {
      **_threat_settings(threats), "n": args.eval_n,
      "seed": run_seed,
      "keys": "per-example"
  }
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("settings") == settings:
      return saved["figures"]
  if args.report_only:
    print(f"== {run_dir}: union figures not computed yet, left out (--report-only)", flush=True)
    return None
  run = runs.restore_models(run_dir, roles=(GLOBAL,))
  threat, l2 = threats
  attacks = ("clean", "pgd20") + (("pgd20-l2",) if l2 else ())
  table = report.attack_table(ModelSet(run.model, run.models),
                              *run.test_split(args.eval_n),
                              key=engine.attack_key(run_seed),
                              threat=threat,
                              attacks=attacks,
                              l2=l2)
  row = table["models"][GLOBAL]
  figures = {"clean": row["clean"]["accuracy"], "linf": row["pgd20"]["accuracy"]}
  if "union" in table:
    figures.update(l2=row["pgd20-l2"]["accuracy"],
                   union=table["union"]["models"][GLOBAL]["accuracy"])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"settings": settings, "figures": figures, "table": table}, f, indent=2)
  return figures


def _multinorm(args, config, workdir):
  """The multi-norm comparison (module docstring): baselines, then the global model, per seed."""
  if args.ablations:
    raise ValueError("--ablations vary the two-expert Generalist; a config with --experts-spec "
                     "is compared with its single-expert baselines only (drop --ablations).")
  baselines = study.multinorm_baselines(config)
  pairs = study.multinorm_pairs(config, baselines)
  threats = _threat_models(config)
  threat = _threat_settings(threats)
  rows, sweeps = [], {}
  for run in study.plan_multinorm_runs(args.seeds or [config.seed], baselines):
    run_config = dataclasses.replace(config, seed=run.seed, **baselines.get(run.variant,
                                                                            {})).validate()
    run_dir = os.path.join(workdir, run.name)
    summary = _summary(run_config, run_dir, run.name, args)
    figures = None if summary is None else _norm_figures(run_dir, run.seed, threats, args)
    if figures is None:
      continue
    rows.append({
        **dataclasses.asdict(run),
        **figures, "train_seconds": summary["train_seconds"],
        "workdir": run_dir
    })
    _write_multinorm(workdir, args.preset, config, threat, rows, pairs, sweeps)
  if not rows:
    raise ValueError(f"--report-only: no run of this comparison has finished in {workdir} yet.")
  if args.sweep:
    for row in rows:
      if row["method"] == "generalist":
        result = _sweep(row["workdir"], args, "simplex.json", row["name"])
        if result is not None:
          sweeps[row["name"]] = result
    _write_multinorm(workdir, args.preset, config, threat, rows, pairs, sweeps)
  png = study.plot_multinorm(rows, pairs, os.path.join(workdir, "compare.png"))
  print(open(os.path.join(workdir, "compare.md")).read())
  print(f"figure: {png}")


def _write_multinorm(workdir, preset, config, threat, rows, pairs, sweeps):
  """compare.json (every run, the aggregate, the sweeps) and compare.md, rewritten in full."""
  result = {
      "preset": preset,
      "kind": "multinorm",
      "threat_models": threat,
      "runs": rows,
      "aggregate": study.aggregate_multinorm(rows, pairs),
      "sweeps": sweeps,
      "config": dataclasses.asdict(config)
  }
  with open(os.path.join(workdir, "compare.json"), "w") as f:
    json.dump(result, f, indent=2, allow_nan=True)
  l2 = f", L2 PGD-20 at eps {threat['l2_eps']:g}" if threat["l2_eps"] else ""
  text = (f"Multi-norm comparison ({preset}): L-inf PGD-20 at eps {threat['eps']:.4g}{l2}; union: "
          "an image counts only if it survives every attack.\n\n" +
          study.multinorm_markdown(result["aggregate"]))
  with open(os.path.join(workdir, "compare.md"), "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  cli.main_guard(main)
