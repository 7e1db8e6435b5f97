"""Sweep the mixing weight between a run's two experts and plot the trade-off.

    python experiments/sweep_mix.py --workdir runs/pilot
    python experiments/sweep_mix.py --workdir runs/pilot --betas 0,0.25,0.5,0.75,1 --bn-recalibrate
    python experiments/sweep_mix.py --workdir runs/pilot --bn-recalibrate matched
    python experiments/sweep_mix.py --workdir runs/pilot --select "clean>=0.88"

For each beta, `gen_jax.mix(teacher_nat, teacher_rob, beta)` (beta weights the robust expert) is
evaluated for clean and PGD-20 accuracy on the test split (or its first --n images); the experts and
the trained global model are evaluated on the same images. Writes `WORKDIR/eval/sweep.json`,
`WORKDIR/eval/sweep.md` and `WORKDIR/eval/tradeoff.png` (earlier files are kept as `sweep.1.json`,
...). `--select` picks the beta that maximises the other figure under the constraint and saves that
mixture as a model checkpoint (`WORKDIR/eval/mix-beta0.30[-bn-MODE]`), which
`experiments/evaluate.py --checkpoint` evaluates.
"""
import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from gen_jax import checkpoint, cli, mixing  # noqa: E402
from gen_jax.evaluation import outputs, sweep  # noqa: E402
from gen_jax.training import loop  # noqa: E402


def _betas(text: str) -> list[float]:
  try:
    return sweep.check_betas([float(b) for b in text.split(",") if b.strip()])
  except ValueError as error:
    raise argparse.ArgumentTypeError(f"--betas {text!r}: {error}") from None


def _rule(text: str):
  try:
    return sweep.parse_rule(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a run directory of experiments/train.py")
  parser.add_argument("--betas",
                      type=_betas,
                      default=sweep.check_betas(np.linspace(0, 1, 11)),
                      help="comma-separated weights of the robust expert in [0, 1] "
                      "(default 0,0.1,...,1)")
  parser.add_argument(
      "--bn-recalibrate",
      nargs="?",
      const="clean",
      default=None,
      choices=sweep.RECALIBRATION_MODES,
      help="re-estimate each mixture's BatchNorm statistics on training images: "
      "'clean' (the default of the bare flag) or 'matched' (beta-weighted clean and "
      "PGD images, as the experts' statistics are weighted)")
  parser.add_argument("--recalibration-n",
                      type=int,
                      default=2000,
                      help="training images used by --bn-recalibrate (default 2000)")
  parser.add_argument("--select",
                      type=_rule,
                      default=None,
                      help="e.g. 'clean>=0.88' or 'robust>=0.45': save the best mixture meeting it")
  parser.add_argument("--n", type=int, default=None, help="first N test images (default: all)")
  parser.add_argument("--eps", type=float, default=None, help="L-inf radius (default: the run's)")
  parser.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
  parser.add_argument("--batch-size", type=int, default=250)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  for name in ("n", "steps", "batch_size", "recalibration_n"):
    value = getattr(args, name)
    if value is not None and value < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1; got {value}.")

  config, splits, model, state = loop.restore_run(args.workdir)
  if config.method != "generalist":
    raise ValueError(f"{args.workdir} was trained with --method {config.method}, which trains one "
                     "expert only: there is nothing to mix. Sweep a generalist run.")
  n = args.n or len(splits.test_y)
  recalibrate = None
  if args.bn_recalibrate:
    recalibrate = sweep.recalibrator(model,
                                     splits.train_x[:args.recalibration_n],
                                     mode=args.bn_recalibrate,
                                     labels=splits.train_y[:args.recalibration_n],
                                     key=jax.random.key(args.seed + 1),
                                     eps=config.eps,
                                     step_size=config.step_size,
                                     steps=config.pgd_steps,
                                     batch_size=args.batch_size)
  bar = tqdm(total=len(args.betas) + 1, desc="sweep")

  def progress(what):
    bar.set_postfix_str(what)
    bar.update(1)

  eps = args.eps or config.eps
  step_size = config.eval_step_size * eps / config.eps
  result = sweep.sweep_mix(state.teacher_nat,
                           state.teacher_rob,
                           model,
                           splits.test_x[:n],
                           splits.test_y[:n],
                           betas=args.betas,
                           key=jax.random.key(args.seed),
                           eps=eps,
                           step_size=step_size,
                           steps=args.steps,
                           global_variables=state.mix,
                           recalibrate=recalibrate,
                           recalibration=args.bn_recalibrate,
                           batch_size=args.batch_size,
                           progress=progress)
  bar.close()
  out = os.path.join(args.workdir, "eval")
  choice, selection_error = None, None
  if args.select is not None:
    try:
      choice = sweep.select_point(result["points"], args.select)
    except ValueError as error:  # reported after the sweep's own files are written
      selection_error = error
  if choice is not None:
    variables = mixing.mix(state.teacher_nat, state.teacher_rob, choice["beta"])
    if recalibrate is not None:
      variables = recalibrate(variables, choice["beta"])
    name = f"mix-beta{choice['beta']:.2f}" + (f"-bn-{args.bn_recalibrate}" if recalibrate else "")
    target = outputs.unique_directory(os.path.join(out, name))
    checkpoint.save_model(
        target, jax.device_get(variables), {
            "config": loop.config_record(config),
            "source": os.path.abspath(args.workdir),
            "beta": choice["beta"],
            "bn_recalibrated": args.bn_recalibrate,
            "rule": f"{args.select[0]}>={args.select[1]}",
            "sweep_figures": choice
        })
    result["selected"] = {**choice, "rule": list(args.select), "checkpoint": str(target)}
  outputs.write_json(os.path.join(out, "sweep.json"), result)
  table = sweep.to_markdown(result)
  outputs.write_text(os.path.join(out, "sweep.md"), table)
  png = sweep.plot_tradeoff(result, os.path.join(out, "tradeoff.png"))
  print(table)
  print(f"plot: {png}")
  if "selected" in result:
    s = result["selected"]
    print(f"selected beta {s['beta']:.2f} (clean {100 * s['clean']:.2f} %, robust "
          f"{100 * s['robust']:.2f} %) saved to {s['checkpoint']}; evaluate it with\n"
          f"  python experiments/evaluate.py --checkpoint {s['checkpoint']}")
  if selection_error is not None:
    raise ValueError(f"--select: {selection_error} (the sweep itself is saved in {out}).")


if __name__ == "__main__":
  cli.main_guard(main)
