"""Search Generalist's hyperparameters: an Optuna study of validation clean and PGD accuracy.

    python experiments/tune.py --preset pilot --study-name pilot --trials 30 --workdir runs/tune
    python experiments/tune.py --preset pilot --study-name pilot --trials 30 --workdir runs/tune \\
        --space space.json --eval-every 1            # another space; figures every epoch
    python experiments/tune.py --report --study-name pilot --workdir runs/tune --select "clean>=0.9"
    optuna-dashboard sqlite:///runs/tune/tune.db     # the study in a browser (pip install it)

Each trial trains the preset with the trial's values of the searched fields, with the project's
training loop, in the run directory `WORKDIR/trials/<number>` (a retry keeps the directory of the
trial it retries); its objectives are the global model's validation clean and PGD accuracy at the
last epoch, both maximised (multi-objective TPE). A trial whose figures at an evaluated epoch are
below the median of the completed trials' in both objectives is pruned (`--pruner none` turns this
off). The default space searches both experts' learning rate and weight decay, beta_final,
beta_start, the EMA decay, the redistribution start, period and duty cycle and the training PGD
steps; `--space FILE` (JSON) changes it:

    {"lr_rob": {"low": 0.01, "high": 0.1, "scale": "log"}, "pgd_steps": null}

(scale log, linear or int; null drops a field, keeping the preset's value; `"base": "none"`
starts from an empty space). A range the config would refuse is refused before anything runs.

Storage: `sqlite:///WORKDIR/tune.db` by default (a file, no server). Any number of workers may
run the same command at once: each takes the next trial, and `--trials` bounds the study, not
the worker. Two workers on one machine:

    python experiments/tune.py --preset pilot --study-name pilot --trials 30 --workdir runs/tune &
    python experiments/tune.py --preset pilot --study-name pilot --trials 30 --workdir runs/tune

Several hosts: a server database (`--storage postgresql://USER:PASSWORD@HOST/DB`, or
`mysql+pymysql://...`, with its Python driver installed) or an Optuna journal file on a file
system every host sees (`--storage /shared/tune.log`: a path without `://`), with `--workdir` on
that shared file system too; run the same command on every host.

Rerunning the command resumes the study: a finished trial is never retrained, and a trial whose
worker was killed is retried with the same parameters in the same directory, resuming from its
checkpoint (at once for a worker of this host that has ended; after three `--heartbeat` periods
without news for another host's). SIGTERM and Ctrl-C save the running trial's checkpoint, queue
its retry and exit (codes 143 and 130).

`--report` writes `WORKDIR/tune.json` (every trial: parameters, figures per epoch, state, time),
`tune.md` (the Pareto front) and `tune.png`, and saves each front trial's final global model as
`WORKDIR/front/trial-<number>` for `evaluate.py --checkpoint` and `export.py --checkpoint`.
`--select "clean>=0.88"` picks the front trial with the best PGD accuracy among those with at
least 88 % clean accuracy (as `sweep_mix.py --select`). Finished `natural` and `pgd_at` runs of
the same data and attack in `WORKDIR/natural` and `WORKDIR/pgd_at` (`train.py --method natural
--workdir WORKDIR/natural ...`) are drawn as the chord's ends, and each front trial gets its
chord score. The library: `gen_jax.tune`.
"""
import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from gen_jax import cli  # noqa: E402
from gen_jax import config as cfg  # noqa: E402
from gen_jax.evaluation import sweep  # noqa: E402


def _add_arguments(parser):
  parser.add_argument("--study-name", required=True, help="the study's name in the storage")
  parser.add_argument("--workdir",
                      default=None,
                      help="directory of the trials and the report (default: runs/tune-<study>)")
  parser.add_argument("--storage",
                      default=None,
                      help="SQLAlchemy URL or journal file path (default: "
                      "sqlite:///WORKDIR/tune.db)")
  parser.add_argument("--trials",
                      type=cli.positive_int,
                      default=None,
                      help="the study's number of trials (all workers together)")
  parser.add_argument("--space",
                      default=None,
                      help='JSON file of the search space: {"FIELD": {"low": L, "high": H, '
                      '"scale": "log"|"linear"|"int"} or null, ...} over the default space '
                      '("base": "none": over nothing)')
  parser.add_argument("--pruner",
                      choices=("median", "none"),
                      default="median",
                      help="stop a trial below the completed trials' medians in both objectives "
                      "(default) or never")
  parser.add_argument("--prune-warmup",
                      type=cli.non_negative_int,
                      default=0,
                      help="epochs at the start of a trial that are never pruned (default 0)")
  parser.add_argument("--prune-min-trials",
                      type=cli.positive_int,
                      default=5,
                      help="completed trials needed before pruning (default 5)")
  parser.add_argument("--startup-trials",
                      type=cli.positive_int,
                      default=10,
                      help="random trials before TPE models the front (default 10)")
  parser.add_argument("--sampler-seed",
                      type=cli.seed_int,
                      default=0,
                      help="seed of the sampler (default 0; --seed is the training seed)")
  parser.add_argument("--heartbeat",
                      type=cli.positive_float,
                      default=60.0,
                      metavar="SECONDS",
                      help="how often a running trial says it is alive (default 60)")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  parser.add_argument(
      "--report",
      action="store_true",
      help="write tune.json, tune.md, tune.png and the front's models; train nothing")
  parser.add_argument("--select",
                      type=cli.parsed_by(sweep.parse_rule),
                      default=None,
                      help="with --report: e.g. 'clean>=0.88' picks the front trial with the best "
                      "PGD accuracy meeting it")


def _parse(argv=None):
  """(args, base config or None for --report, the config fields set on the command line)."""
  parser = cli.build_parser(__doc__.splitlines()[0],
                            preset_default="",
                            add_arguments=_add_arguments)
  args = parser.parse_args(argv)
  fixed = [
      f.name for f in dataclasses.fields(cfg.Config) if getattr(args, f"cfg_{f.name}") is not None
  ]
  if args.report:
    given = [cli.flag_of(f) for f in fixed] + (["--preset"] if args.preset else [])
    if given:
      parser.error(f"--report reads the study's own settings; drop {', '.join(given)}.")
    if args.trials is not None:
      parser.error("--trials runs trials; --report only reads the study.")
    return args, None, fixed
  if args.select is not None:
    parser.error("--select applies to --report.")
  if not args.preset:
    parser.error("--preset is required to run trials (or pass --report).")
  if args.trials is None:
    parser.error("--trials is required to run trials (or pass --report).")
  _, config = cli.parse_config(parser, argv)
  return args, config, fixed


def main():
  args, config, fixed = _parse()
  try:
    import optuna  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise RuntimeError("experiments/tune.py needs Optuna: pip install -e '.[tune]' (or "
                       "pip install -r requirements.txt).") from None
  from gen_jax import tune  # pylint: disable=import-outside-toplevel

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  workdir = args.workdir or os.path.join("runs", f"tune-{args.study_name}")
  url = args.storage or tune.default_storage(workdir)
  if args.report:
    storage = tune.open_storage(url, must_exist=True)
    study, base, space = tune.load_study(storage, args.study_name)
    result = tune.report(study, workdir, base=base, space=space, select=args.select)
    print(tune.to_markdown(result), end="")
    print(f"files: {os.path.join(workdir, 'tune.json')}, tune.md, tune.png")
    if "selected" in result:
      print(f"evaluate the selected model with\n  python experiments/evaluate.py --checkpoint "
            f"{result['selected']['model']}")
    if "selection_error" in result:
      raise ValueError(f"--select: {result['selection_error']} (the report is written to "
                       f"{workdir}).")
    return
  # Everything that can be refused is checked before a trial runs.
  tune.check_base(config)
  space = tune.load_space(args.space, config, fixed=fixed)
  storage = tune.open_storage(url)
  study = tune.open_study(storage, args.study_name, base=config, space=space)
  print(
      f"study {args.study_name} in {url}: {len(space)} fields ({', '.join(space)}); "
      f"{args.trials} trials in {os.path.join(workdir, tune.TRIALS_DIR)}",
      flush=True)
  done = tune.run_trials(study,
                         storage,
                         base=config,
                         space=space,
                         workdir=workdir,
                         trials=args.trials,
                         pruning=tune.Pruning(enabled=args.pruner != "none",
                                              warmup_epochs=args.prune_warmup,
                                              min_trials=args.prune_min_trials),
                         sampler_seed=args.sampler_seed,
                         startup_trials=args.startup_trials,
                         heartbeat=args.heartbeat,
                         progress=not args.no_progress,
                         log=lambda line: print(line, flush=True))
  print(f"this worker: {done['complete']} trials complete, {done['resumed']} resumed, "
        f"{done['pruned']} pruned, {done['diverged']} diverged. The study's {args.trials} "
        "trials are taken; write the report with\n  python experiments/tune.py --report "
        f"--study-name {args.study_name} --workdir {workdir}" +
        (f" --storage {args.storage}" if args.storage else ""))


if __name__ == "__main__":
  cli.main_guard(main)
