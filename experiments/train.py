"""Train Generalist (or a baseline) and print the models' clean and PGD-20 accuracy.

    python experiments/train.py --preset pilot --workdir runs/pilot
    python experiments/train.py --preset cifar10 --workdir runs/c10
    python experiments/train.py --preset pilot --dataset folder --data-dir ROOT --image-size 32
    python experiments/train.py --help     # presets and every config field

Running the same command again resumes from the workdir's newest intact checkpoint (also in
the middle of an epoch), with the same result as an uninterrupted run. SIGTERM (preemption) and
Ctrl-C save a checkpoint at the next step boundary and exit with one line (codes 143 and 130);
`--checkpoint-every STEPS` / `--checkpoint-minutes M` add checkpoints inside epochs. A run
that diverges (NaN/inf or exploding weights) stops with exit code 2, naming the model.

Several hosts: start one process per host with the same flags plus `--coordinator HOST:PORT
--num-processes N --process-id I` (or under `srun` / a TPU pod: see README "Scale out"); the
workdir must be on a file system that every host sees. Process 0 prints and writes the files.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from gen_jax import cli, parallel, training  # noqa: E402


def _add_arguments(parser):
  parser.add_argument("--workdir",
                      default=None,
                      help="directory of the run's files (default: runs/<preset>-<method>)")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  cli.add_distributed_arguments(parser)


def main():
  parser = cli.build_parser(__doc__.splitlines()[0], add_arguments=_add_arguments)
  args, config = cli.parse_config(parser)
  workdir = args.workdir or os.path.join("runs", f"{args.preset}-{config.method}")
  cli.initialize_distributed(args)
  summary = training.train_and_evaluate(config, workdir, progress=not args.no_progress)
  if parallel.is_primary():
    print(format_summary(summary))
    print(f"files in {workdir}: config.json metrics.jsonl summary.json checkpoints/ best/ "
          "tensorboard/")


def format_summary(summary):
  name = f"pgd{summary['pgd']['steps']}" if "pgd" in summary else "pgd"
  lines = [f"{'model':<10} {'clean':>7} {name:>7}"]
  for role, v in summary["models"].items():
    lines.append(f"{role:<10} {v['clean_acc']:>7.2%} {v['pgd_acc']:>7.2%}")
  lines.append(f"({summary['test_images']} test images, {summary['seconds']:.0f} s; method "
               f"{summary['method']}; best validation epoch {summary['best'].get('epoch')})")
  return "\n".join(lines)


if __name__ == "__main__":
  cli.main_guard(main)
