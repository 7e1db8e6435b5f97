"""Compare Generalist with standard and adversarial training on the same data and budget.

    python experiments/compare.py --preset pilot --workdir runs/compare
    python experiments/compare.py --preset pilot --dataset folder --data-dir ROOT --image-size 32

Trains `generalist`, `pgd_at` and `natural` with the same preset and overrides (each in
`WORKDIR/<method>`, resumable), then writes `WORKDIR/compare.json` and prints each method's final
model (for generalist, the global model): test clean and PGD-20 accuracy and wall time, and the
chord score of the Generalist global model against the two standalone models,

    score = (C_g - C_at) / (C_nat - C_at) + (R_g - R_nat) / (R_at - R_nat),

with C clean and R PGD accuracy: 1 is the straight line between standard and adversarial
training; above 1 the global model beats that trade-off.
"""
import dataclasses
import json
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from gen_jax import cli, training  # noqa: E402

METHODS = ("generalist", "pgd_at", "natural")


def _add_arguments(parser):
  parser.add_argument("--workdir",
                      default=None,
                      help="directory of the comparison (default: runs/compare-<preset>)")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def chord_score(clean, robust):
  """The chord score of `generalist` against `natural` and `pgd_at` (NaN if undefined)."""
  c_gap = clean["natural"] - clean["pgd_at"]
  r_gap = robust["pgd_at"] - robust["natural"]
  if c_gap == 0 or r_gap == 0:
    return math.nan
  return ((clean["generalist"] - clean["pgd_at"]) / c_gap +
          (robust["generalist"] - robust["natural"]) / r_gap)


def main():
  parser = cli.build_parser(__doc__.splitlines()[0], add_arguments=_add_arguments)
  args, config = cli.parse_config(parser)
  workdir = args.workdir or os.path.join("runs", f"compare-{args.preset}")
  rows = {}
  for method in METHODS:
    run_config = dataclasses.replace(config, method=method)
    print(f"== {method} ==", flush=True)
    summary = training.train_and_evaluate(run_config,
                                          os.path.join(workdir, method),
                                          progress=not args.no_progress)
    pgd_key = next(k for k in summary["global"] if k.startswith("pgd"))
    rows[method] = {
        "clean_acc": summary["global"]["clean_acc"],
        "pgd_acc": summary["global"][pgd_key],
        "train_seconds": summary["train_seconds"],
        "workdir": os.path.join(workdir, method)
    }
  score = chord_score({
      m: r["clean_acc"] for m, r in rows.items()
  }, {
      m: r["pgd_acc"] for m, r in rows.items()
  })
  result = {
      "preset": args.preset,
      "pgd_key": pgd_key,
      "methods": rows,
      "chord_score": score,
      "config": dataclasses.asdict(config)
  }
  with open(os.path.join(workdir, "compare.json"), "w") as f:
    json.dump(result, f, indent=2, allow_nan=True)
  print(format_table(rows, score, pgd_key))


def format_table(rows, score, pgd_key):
  name = pgd_key.replace("_acc", "").upper()
  lines = [f"| method | final model | clean | {name} | train time |", "|---|---|---|---|---|"]
  final = {
      "generalist": "global model",
      "pgd_at": "robust teacher (EMA)",
      "natural": "natural teacher (EMA)"
  }
  for method, r in rows.items():
    lines.append(f"| {method} | {final[method]} | {r['clean_acc']:.2%} | {r['pgd_acc']:.2%} | "
                 f"{r['train_seconds']:.0f} s |")
  lines.append(f"chord score of the global model: {score:.3f} (1 = the straight line between "
               "natural and PGD-AT training; above 1 beats it)")
  return "\n".join(lines)


if __name__ == "__main__":
  cli.main_guard(main)
