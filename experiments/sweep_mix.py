"""Sweep the mixing weight between a run's two experts and plot the trade-off.

    python experiments/sweep_mix.py --workdir runs/pilot
    python experiments/sweep_mix.py --workdir runs/pilot --betas 0,0.25,0.5,0.75,1 --bn-recalibrate
    python experiments/sweep_mix.py --workdir runs/pilot --bn-recalibrate matched
    python experiments/sweep_mix.py --workdir runs/pilot --select "clean>=0.88"
    python experiments/sweep_mix.py --workdir runs/pilot-multinorm --grid-step 0.25

For each beta, `gen_jax.mix(teacher_nat, teacher_rob, beta)` (beta weights the robust expert) is
evaluated for clean and PGD-20 accuracy on the test split (or its first --n images), with the
experts and the global model on the same images. Writes `WORKDIR/eval/sweep.json`, `sweep.md` and
`tradeoff.png` (earlier files are kept as `sweep.1.json`, ...). `--select` saves the mixture that
maximises the other figure under the constraint (`WORKDIR/eval/mix-beta0.30[-bn-MODE]`), which
`experiments/evaluate.py --checkpoint` evaluates. A run of more than two experts (e.g.
`--preset pilot-multinorm`: natural, L-inf and L2) is swept over a grid of the weight simplex
(`--grid-step`, 0.25: 15 mixtures of three experts) for clean, L-inf and L2 PGD-20 and union
accuracy, written to `simplex.json`, `simplex.md` and `simplex.png` (one trade-off panel per pair
of figures). The library: `gen_jax.evaluation.sweep`.

Several hosts (`--coordinator HOST:PORT --num-processes N --process-id I`, as for train.py):
every process computes the same sweep on its own devices and process 0 alone prints and writes.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tqdm.auto import tqdm  # noqa: E402

from gen_jax import cli, parallel, runs  # noqa: E402
from gen_jax.evaluation import outputs, sweep  # noqa: E402


def _parse(argv=None):
  parser = cli.argument_parser(__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a run directory of experiments/train.py")
  parser.add_argument("--betas",
                      type=cli.floats_of(sweep.check_betas),
                      default=sweep.DEFAULT_BETAS,
                      help="comma-separated weights of the robust expert in [0, 1] "
                      "(default 0,0.1,...,1)")
  parser.add_argument("--bn-recalibrate",
                      nargs="?",
                      const="clean",
                      default=None,
                      choices=sweep.RECALIBRATION_MODES,
                      help="re-estimate each mixture's BatchNorm statistics on training images: "
                      "'clean' (the bare flag) or 'matched' (beta-weighted clean and PGD images)")
  parser.add_argument("--recalibration-n",
                      "--recalibration_n",
                      type=cli.positive_int,
                      default=2000,
                      help="training images used by --bn-recalibrate")
  parser.add_argument("--select",
                      type=cli.parsed_by(sweep.parse_rule),
                      default=None,
                      help="e.g. 'clean>=0.88' or 'robust>=0.45': save the best mixture meeting it")
  parser.add_argument("--grid-step",
                      type=cli.positive_float,
                      default=0.25,
                      help="spacing of the weight grid for runs of more than two experts "
                      "(1/k; default 0.25)")
  parser.add_argument("--pgd-steps",
                      "--steps",
                      type=cli.positive_int,
                      default=None,
                      help="PGD steps (default: the run's own evaluation steps, its "
                      "--eval-pgd-steps: 20 in every preset but tiny; --steps: old spelling)")
  cli.add_evaluation_arguments(parser)
  cli.add_distributed_arguments(parser)
  return parser.parse_args(argv)


def main():
  args = _parse()
  cli.initialize_distributed(args)
  primary = parallel.is_primary()
  run = runs.restore_models(args.workdir)
  if primary:
    outputs.ensure_writable(run.eval_dir)
  experts = run.config.experts
  points = (len(args.betas) if len(experts) <= 2 else len(
      sweep.simplex_grid(len(experts), args.grid_step)))
  bar = tqdm(total=points + 1, desc="sweep", disable=not primary)

  def progress(what):
    bar.set_postfix_str(what)
    bar.update(1)

  result = sweep.sweep_run(run,
                           betas=args.betas,
                           n=args.n,
                           eps=args.eps,
                           steps=args.pgd_steps,
                           bn_recalibrate=args.bn_recalibrate,
                           recalibration_n=args.recalibration_n,
                           select=args.select,
                           seed=args.attack_seed,
                           batch_size=args.batch_size,
                           progress=progress,
                           grid_step=args.grid_step)
  bar.close()
  if primary:  # the other processes computed the same figures
    paths = sweep.write_sweep(result, run.eval_dir)
    print(paths["md"].read_text())
    print(f"plot: {paths['png']}")
  if "selected" in result and primary:
    s = result["selected"]
    print(f"selected beta {s['beta']:.2f} (clean {100 * s['clean']:.2f} %, robust "
          f"{100 * s['robust']:.2f} %) saved to {s['checkpoint']}; evaluate it with\n"
          f"  python experiments/evaluate.py --checkpoint {s['checkpoint']}")
  if "selection_error" in result:
    raise ValueError(f"--select: {result['selection_error']} (the sweep itself is saved in "
                     f"{run.eval_dir}).")


if __name__ == "__main__":
  cli.main_guard(main)
