"""The paper's robustness table for the models of a training run.

    python experiments/evaluate.py --workdir runs/pilot --model all --attacks clean,pgd20,aa --n 500

Writes `WORKDIR/eval/report.json` and `WORKDIR/eval/report.md` (robust accuracy per model and
attack, measured on adversarial images verified to lie in the eps-ball and the [0, 1] box).
Models: `global` (the Generalist global model), `natural` / `robust` (the experts' EMA teachers).
"""
import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from gen_jax import cli  # noqa: E402
from gen_jax.evaluation import report as report_lib  # noqa: E402
from gen_jax.training import loop  # noqa: E402

ROLES = ("global", "natural", "robust")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a run directory of experiments/train.py")
  parser.add_argument("--model", default="global", choices=ROLES + ("all",))
  parser.add_argument("--attacks",
                      default=",".join(report_lib.ATTACKS),
                      help=f"comma-separated subset of {','.join(report_lib.ATTACKS)}")
  parser.add_argument("--n", type=int, default=None, help="first N test images (default: all)")
  parser.add_argument("--eps", type=float, default=None, help="L-inf radius (default: the run's)")
  parser.add_argument("--batch-size", type=int, default=250)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  names = report_lib.check_attack_names([a for a in args.attacks.split(",") if a])
  if args.n is not None and args.n < 1:
    parser.error("--n must be >= 1")
  config, splits, model, state = loop.restore_run(args.workdir)
  roles = ROLES if args.model == "all" else (args.model,)
  available = state.models()
  n = args.n or len(splits.test_y)
  bar = tqdm(total=len(roles) * len(names), desc="evaluating")

  def progress(what):  # told before each (model, attack) evaluation starts
    bar.set_postfix_str(what)
    bar.update(1)

  report = report_lib.robustness_report({r: available[r] for r in roles},
                                        model,
                                        splits.test_x[:n],
                                        splits.test_y[:n],
                                        attacks_to_run=names,
                                        eps=args.eps or config.eps,
                                        step_size=config.eval_step_size,
                                        key=jax.random.key(args.seed),
                                        batch_size=args.batch_size,
                                        progress=progress)
  bar.close()
  path = report_lib.write_report(report, os.path.join(args.workdir, "eval"))
  print(path.read_text())


if __name__ == "__main__":
  cli.main_guard(main)
