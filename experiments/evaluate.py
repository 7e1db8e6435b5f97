"""The paper's robustness table, gradient-masking checks, boundary and corruption analysis.

    python experiments/evaluate.py --workdir runs/pilot --model all
    python experiments/evaluate.py --workdir runs/pilot --attacks clean,pgd20,aa --n 500
    python experiments/evaluate.py --checkpoint runs/pilot/eval/mix-beta0.30   # a saved model
    python experiments/evaluate.py --checkpoint runs/pilot/best                # best global model

Writes `report.json`, `report.md`, `boundary.png` and `examples.png` to `WORKDIR/eval` (or
`CHECKPOINT/eval`, `WORKDIR/eval/best` for `WORKDIR/best`, or `--out`); earlier files are kept
as `report.1.json`, ... . What the report holds: `gen_jax.evaluation.report` (attacks:
`evaluation.catalogue`). Models: `global` (the Generalist global model), `natural` / `robust`
(the experts' EMA teachers).

Several hosts (`--coordinator HOST:PORT --num-processes N --process-id I`, as for train.py):
every process computes the same report on its own devices and process 0 alone prints and writes.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tqdm.auto import tqdm  # noqa: E402

from gen_jax import cli, parallel, runs  # noqa: E402
from gen_jax.evaluation import catalogue, outputs, report, sanity  # noqa: E402
from gen_jax.experts import ROLES  # noqa: E402


def _parse(argv=None):
  parser = cli.argument_parser(__doc__.splitlines()[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a run directory of experiments/train.py")
  source.add_argument("--checkpoint", help="a saved model (sweep_mix.py --select) or WORKDIR/best")
  parser.add_argument("--model",
                      default=None,
                      help="which model of --workdir: a role of its method (" + ", ".join(ROLES) +
                      "; robust_linf, robust_l2, ... in a multi-norm run) or all (default global); "
                      "not with --checkpoint, a saved model of one model")
  parser.add_argument("--attacks",
                      type=cli.names_of(catalogue.check_names),
                      default=catalogue.REPORT_ATTACKS,
                      help=f"comma-separated subset of {','.join(catalogue.REPORT_ATTACKS)}")
  parser.add_argument("--analysis-n",
                      "--analysis_n",
                      type=cli.positive_int,
                      default=500,
                      help="test images of the analyses (default 500)")
  for name in report.ANALYSES:
    if name != "sanity":  # the gradient-masking checks always run: they vouch for the table
      parser.add_argument(f"--no-{name}", action="store_true", help=f"skip the {name} analysis")
  parser.add_argument("--sanity-queries",
                      type=cli.positive_int,
                      default=sanity.SQUARE_QUERIES,
                      help="Square Attack queries of the black-box gradient-masking check "
                      f"(default {sanity.SQUARE_QUERIES}; fewer is faster and a weaker check)")
  parser.add_argument("--out", default=None, help="output directory (default WORKDIR/eval)")
  cli.add_evaluation_arguments(parser)
  cli.add_distributed_arguments(parser)
  args = parser.parse_args(argv)
  if args.checkpoint and args.model is not None:
    parser.error(f"--model applies to --workdir only: --checkpoint {args.checkpoint} is a saved "
                 "model, which holds one model; drop --model (or pass the run's --workdir).")
  args.model = args.model or "global"
  return args


def main():
  args = _parse()
  cli.initialize_distributed(args)
  primary = parallel.is_primary()
  if args.checkpoint:
    run = runs.load_model(args.checkpoint)
  else:
    run = runs.restore_models(args.workdir, None if args.model == "all" else (args.model,))
  out = outputs.ensure_writable(args.out or run.eval_dir) if primary else None
  analyses = [a for a in report.ANALYSES if not getattr(args, f"no_{a}", False)]
  bar = tqdm(total=len(run.models) * len(args.attacks) + len(analyses),
             desc="evaluating",
             disable=not primary)

  def progress(what, new_unit):
    bar.set_postfix_str(what)
    bar.update(int(new_unit))

  result = report.evaluate_run(run,
                               attacks=args.attacks,
                               analyses=analyses,
                               n=args.n,
                               analysis_n=args.analysis_n,
                               eps=args.eps,
                               batch_size=args.batch_size,
                               seed=args.attack_seed,
                               sanity_queries=args.sanity_queries,
                               progress=progress)
  bar.close()
  if primary:
    paths = report.write_report(result, out)
    print(paths["md"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
  cli.main_guard(main)
