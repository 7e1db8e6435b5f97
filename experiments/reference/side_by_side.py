"""gen_jax against the PyTorch baseline, measured in alternation on the same machine.

    python experiments/reference/side_by_side.py --torch-python /opt/torchenv/bin/python \
        --what generalist_step,pgd20 --model resnet18 --batch-size 128 --rounds 3 --repeats 2
    python experiments/reference/side_by_side.py --torch-python /opt/torchenv/bin/python \
        --what pgd20,apgd_ce,autoattack --model plaincnn --n 1000 --batch-size 250 \
        --torch-pgd-impl torchattacks        # a user's network: gen_jax vs torchattacks

For each `--what`, runs `--rounds` rounds; a round is one `experiments/bench.py` process followed at
once by one `experiments/reference/bench_torch.py` process (the same workload, in the PyTorch
environment given by `--torch-python`: see README.md beside this file), so each pair shares the
minute and the machine's load. `--batch-size`, `--repeats`, `--warmup`, `--pgd-steps`,
`--image-size`, `--n` (attack targets: N images) and `--weights` (plaincnn trained by
experiments/bench_fixture.py: its weights, test images and labels) are passed to both (`--batch` and
the deprecated `--steps` are still accepted); `--fast-ops` only to bench.py (`false`: a user's
network with the stock flax layers, the "before" figure) and `--torch-pgd-impl` only to
bench_torch.py (as its `--pgd-impl`: `torchattacks` for torchattacks.PGD). For the attack targets
the table also shows each side's `robust_count` (the same network and images on both sides for
`plaincnn`), a check that both did comparable work: AutoAttack's later stages attack only the points
still robust. Reports per workload the median images/s of each side and the median of the per-round
ratios (gen_jax over PyTorch: the paired ratio is less sensitive to load drifting between rounds
than the ratio of medians). Prints a markdown table and writes every raw JSON line plus the summary
to `--out`.
Timing lives here and in the two bench scripts only; tests never time anything.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))  # experiments/reference
BENCH = os.path.join(os.path.dirname(_HERE), "bench.py")  # experiments/bench.py
BENCH_TORCH = os.path.join(_HERE, "bench_torch.py")


def _run_bench(command: list[str]) -> dict:
  """Runs one bench process and returns its (last) JSON line; raises with its stderr on failure."""
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  if result.returncode != 0 or not lines:
    raise RuntimeError(
        f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
  return json.loads(lines[-1])


def _commands(args, what: str) -> tuple[list[str], list[str]]:
  common = [
      "--what", what, "--model", args.model, "--batch-size",
      str(args.batch), "--repeats",
      str(args.repeats), "--warmup",
      str(args.warmup)
  ]
  if args.pgd_steps is not None:
    common += ["--pgd-steps", str(args.pgd_steps)]
  if args.image_size is not None:
    common += ["--image-size", str(args.image_size)]
  if args.n is not None:
    common += ["--n", str(args.n)]
  if args.weights is not None:
    common += ["--weights", os.path.abspath(args.weights)]
  ours = [sys.executable, BENCH, *common]
  if args.fast_ops is not None:
    ours += ["--fast-ops", args.fast_ops]
  theirs = [args.torch_python, BENCH_TORCH, *common, "--threads", str(args.threads)]
  if args.torch_pgd_impl is not None:
    theirs += ["--pgd-impl", args.torch_pgd_impl]
  return ours, theirs


def _parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  p.add_argument("--torch-python", required=True, help="python of an environment with torch")
  p.add_argument("--what", default="generalist_step,pgd20", help="comma-separated workloads")
  p.add_argument("--model", default="resnet18")
  p.add_argument("--batch-size", dest="batch", type=int, default=128, metavar="N")
  p.add_argument("--batch",
                 dest="batch",
                 type=int,
                 default=argparse.SUPPRESS,
                 help=argparse.SUPPRESS)  # the old spelling, still accepted
  p.add_argument("--pgd-steps",
                 type=int,
                 default=None,
                 help="PGD iterations (default: the bench scripts' 10 in training steps, 20 "
                 "for pgd20)")
  p.add_argument("--image-size", type=int, default=None, help="default: the bench scripts' 32")
  p.add_argument("--n",
                 type=int,
                 default=None,
                 metavar="N",
                 help="attack targets: images attacked per repetition (default: one batch)")
  p.add_argument("--weights",
                 default=None,
                 metavar="NPZ",
                 help="plaincnn: a trained network and its test images (bench_fixture.py), given "
                 "to both sides")
  p.add_argument("--fast-ops",
                 choices=("true", "false"),
                 default=None,
                 help="bench.py only: a user's network with gen_jax's fast CPU ops (default) or "
                 "the stock flax layers")
  p.add_argument("--torch-pgd-impl",
                 choices=("loop", "torchattacks"),
                 default=None,
                 help="bench_torch.py's --pgd-impl for pgd20 (default: its plain loop)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--repeats",
                 type=int,
                 default=2,
                 metavar="N",
                 help="timed repetitions per bench process (median)")
  p.add_argument("--steps",
                 dest="repeats",
                 type=int,
                 default=argparse.SUPPRESS,
                 metavar="N",
                 help="deprecated alias of --repeats (elsewhere --steps means PGD steps)")
  p.add_argument("--warmup", type=int, default=1, help="untimed repetitions per bench process")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads")
  p.add_argument("--out", default=None, help="JSON file for the raw lines and the summary")
  args = p.parse_args(argv)
  if not os.path.exists(args.torch_python):
    p.error(f"--torch-python {args.torch_python} does not exist; create an environment with "
            "`python -m venv ENV && ENV/bin/pip install -r experiments/reference/requirements.txt`"
            " (see experiments/reference/README.md) and pass ENV/bin/python.")
  if args.rounds < 1 or args.repeats < 1 or args.batch < 1 or (args.n is not None and args.n < 1):
    p.error("--rounds, --repeats, --batch-size and --n must be >= 1.")
  return args


def main(argv=None) -> None:
  args = _parse_args(argv)
  whats = [w for w in args.what.split(",") if w]
  raw, summary = [], []
  for what in whats:
    ours_cmd, theirs_cmd = _commands(args, what)
    pairs = []
    for r in range(args.rounds):
      ours = _run_bench(ours_cmd)
      theirs = _run_bench(theirs_cmd)
      raw += [ours, theirs]
      pairs.append((ours["images_per_second"], theirs["images_per_second"]))
      print(
          f"{what} round {r + 1}: gen_jax {pairs[-1][0]:.3f} img/s, PyTorch "
          f"{pairs[-1][1]:.3f} img/s (load {ours.get('load_average_1min')})",
          flush=True)
    summary.append({
        "what": what,
        "model": args.model,
        "batch": args.batch,
        "rounds": args.rounds,
        "gen_jax_images_per_second": statistics.median(o for o, _ in pairs),
        "torch_images_per_second": statistics.median(t for _, t in pairs),
        "ratio_median_of_pairs": statistics.median(o / t for o, t in pairs),
        "ratios": [o / t for o, t in pairs],
        "compile_seconds": [line.get("compile_seconds") for line in raw[-2 * args.rounds::2]],
        # Attack targets: images still classified right after the attack (last round), per side.
        "robust_count": [raw[-2].get("robust_count"), raw[-1].get("robust_count")],
    })
  images = f", N = {args.n}" if args.n is not None else ""
  fast = f", bench.py --fast-ops {args.fast_ops}" if args.fast_ops is not None else ""
  lines = [
      f"{args.model}, batch {args.batch}{images}{fast}, {args.rounds} alternating rounds of "
      f"{args.repeats} timed repetitions, {datetime.datetime.now().isoformat(timespec='minutes')}",
      "", "| what | gen_jax img/s | PyTorch img/s | ratio (median of paired ratios) | "
      "robust count (gen_jax / PyTorch) |", "| --- | --- | --- | --- | --- |"
  ]
  for s in summary:
    robust = "-" if None in s["robust_count"] else "{} / {}".format(*s["robust_count"])
    lines.append(f"| {s['what']} | {s['gen_jax_images_per_second']:.3f} | "
                 f"{s['torch_images_per_second']:.3f} | {s['ratio_median_of_pairs']:.2f} | "
                 f"{robust} |")
  print("\n".join(lines))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"summary": summary, "raw": raw}, f, indent=2)


if __name__ == "__main__":
  main()
