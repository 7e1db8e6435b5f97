"""The paper's robustness table, gradient-masking checks, boundary and corruption analysis.

    python experiments/evaluate.py --workdir runs/pilot --model all
    python experiments/evaluate.py --workdir runs/pilot --attacks clean,pgd20,aa --n 500
    python experiments/evaluate.py --checkpoint runs/pilot/eval/mix-beta0.30   # a saved model
    python experiments/evaluate.py --checkpoint runs/pilot/best                # best global model

Writes `OUT/report.json`, `OUT/report.md` and `OUT/boundary.png` (OUT: `WORKDIR/eval`,
`CHECKPOINT/eval`, or `WORKDIR/eval/best` for `WORKDIR/best`; earlier files are kept as
`report.1.json`, ...):
- robust accuracy per model and attack, measured on adversarial images verified to lie in the
  eps-ball and the [0, 1] box (default: every attack, eps and PGD step of the run: 8/255, 2/255);
- gradient-masking sanity checks for every model (always run): the eps curve falls, PGD beats
  FGSM, black-box Square is not much stronger than the white-box attacks, an unbounded eps reaches
  0 %, more PGD steps do not raise accuracy;
- boundary analysis: each model's minimal L-inf perturbation per test point, its accuracy on the
  10 % of points closest to its boundary, and a histogram per model (`--no-boundary` skips it);
- common corruptions (noise, blur, contrast, brightness, pixelation, JPEG) at severities 1-5,
  computed on the device, or CIFAR-10-C from TFDS when it is prepared (`--no-corruptions` skips).
Models: `global` (the Generalist global model), `natural` / `robust` (the experts' EMA teachers).
"""
import argparse
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from gen_jax import cli  # noqa: E402
from gen_jax.evaluation import boundary, corruptions, sanity  # noqa: E402
from gen_jax.evaluation import report as report_lib  # noqa: E402
from gen_jax.training import loop  # noqa: E402

ROLES = ("global", "natural", "robust")


def _parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a run directory of experiments/train.py")
  source.add_argument("--checkpoint",
                      help="a saved model: a directory written by sweep_mix.py --select, or "
                      "WORKDIR/best")
  parser.add_argument("--model",
                      default="global",
                      choices=ROLES + ("all",),
                      help="which model of --workdir (default global)")
  parser.add_argument("--attacks",
                      default=",".join(report_lib.ATTACKS),
                      help=f"comma-separated subset of {','.join(report_lib.ATTACKS)}")
  parser.add_argument("--n", type=int, default=None, help="first N test images (default: all)")
  parser.add_argument("--analysis-n",
                      type=int,
                      default=500,
                      help="test images for the sanity checks, boundary and corruption analyses "
                      "(default 500, at most --n)")
  parser.add_argument("--eps", type=float, default=None, help="L-inf radius (default: the run's)")
  parser.add_argument("--no-boundary", action="store_true", help="skip the boundary analysis")
  parser.add_argument("--no-corruptions", action="store_true", help="skip the corruption analysis")
  parser.add_argument("--batch-size", type=int, default=250)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="output directory (default WORKDIR/eval)")
  args = parser.parse_args(argv)
  try:
    args.attack_names = report_lib.check_attack_names([a for a in args.attacks.split(",") if a])
  except ValueError as error:
    parser.error(str(error))
  for name in ("n", "analysis_n", "batch_size"):
    value = getattr(args, name)
    if value is not None and value < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1; got {value}.")
  if args.eps is not None and args.eps <= 0:
    parser.error(f"--eps must be > 0; got {args.eps}.")
  return args


def _load(args):
  """(config, splits, model, {name: variables}, default output directory)."""
  if args.checkpoint:
    config, splits, model, variables, name = loop.restore_model_checkpoint(args.checkpoint)
    path = pathlib.Path(args.checkpoint)
    if name.startswith("best"):  # keep files out of the orbax manager's directory
      return config, splits, model, {"global (best)": variables}, path.parent / "eval" / "best"
    return config, splits, model, {name: variables}, path / "eval"
  config, splits, model, state = loop.restore_run(args.workdir)
  roles = ROLES if args.model == "all" else (args.model,)
  available = state.models()
  return config, splits, model, {r: available[r] for r in roles}, pathlib.Path(args.workdir) / "eval"


def main():
  args = _parse()
  config, splits, model, models, out = _load(args)
  out = pathlib.Path(args.out) if args.out else out
  n = min(args.n or len(splits.test_y), len(splits.test_y))
  m = min(args.analysis_n, n)
  x, y = splits.test_x[:n], splits.test_y[:n]
  eps = args.eps or config.eps
  step_size = config.eval_step_size * eps / config.eps
  key = jax.random.key(args.seed)
  steps = len(models) * len(args.attack_names)
  analyses = ["sanity"
             ] + ["boundary"] * (not args.no_boundary) + ["corruptions"] * (not args.no_corruptions)
  bar = tqdm(total=steps + len(analyses), desc="evaluating")

  def progress(what):  # told before each piece of work starts
    bar.set_postfix_str(what)

  def advance(what):
    progress(what)
    bar.update(1)

  report = report_lib.robustness_report(models,
                                        model,
                                        x,
                                        y,
                                        attacks_to_run=args.attack_names,
                                        eps=eps,
                                        step_size=step_size,
                                        key=jax.random.fold_in(key, 0),
                                        batch_size=args.batch_size,
                                        progress=advance)
  logits_fns = report_lib.logits_functions(models, model)
  xf = report_lib.as_float_images(x[:m])
  advance("sanity checks")
  report["sanity"] = {
      "n": m,
      "models": {
          role:
              sanity.sanity_checks(fn,
                                   xf,
                                   y[:m],
                                   key=jax.random.fold_in(key, 1),
                                   eps=eps,
                                   step_size=step_size,
                                   known=report_lib.known_figures(report, role) if m == n else None,
                                   batch_size=args.batch_size,
                                   progress=progress) for role, fn in logits_fns.items()
      }
  }
  if not args.no_boundary:
    advance("boundary")
    report["boundary"] = boundary.boundary_report(logits_fns,
                                                  xf,
                                                  y[:m],
                                                  key=jax.random.fold_in(key, 2),
                                                  eps=eps,
                                                  batch_size=args.batch_size,
                                                  progress=progress)
  if not args.no_corruptions:
    advance("corruptions")
    tfds_result = None
    if config.dataset == "cifar10":
      tfds_result = corruptions.cifar10_corrupted_accuracy(logits_fns,
                                                           config.data_dir,
                                                           n=m,
                                                           corruptions=corruptions.CORRUPTIONS,
                                                           severities=corruptions.SEVERITIES,
                                                           batch_size=args.batch_size,
                                                           progress=progress)
    report["corruptions"] = tfds_result or corruptions.corruption_accuracy(
        logits_fns,
        x[:m],
        y[:m],
        key=jax.random.fold_in(key, 3),
        batch_size=args.batch_size,
        progress=progress)
  bar.close()
  paths = report_lib.write_report(report, out)
  print(paths["md"].read_text())
  print("written: " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
  cli.main_guard(main)
