"""Export a trained model to ONNX and PyTorch weights (parity-checked), or import PyTorch weights.

    python experiments/export.py --checkpoint runs/pilot/best --out exports/pilot
    python experiments/export.py --checkpoint runs/pilot/eval/mix-beta0.30 --format onnx \
        --layout nhwc --out exports/mix
    python experiments/export.py --workdir runs/pilot --model robust --format torch --out exp/rob
    python experiments/export.py --from-torch model.safetensors --preset cifar10 \
        --data-dir ~/tensorflow_datasets --out runs/imported-resnet18

An export writes `model.onnx` (float32 inference graph, input "input" in [0, 1], NCHW unless
`--layout nhwc`, dynamic batch; output "logits"), `model.safetensors` (the PyTorch state dict,
named as in the reference code) with `torch_model.py` (its self-contained PyTorch definition:
`import torch_model; model = torch_model.load(DIR)`), and `model.json` (architecture, classes,
input range, mean/std, the training config, which model or mixture beta, parity figures, export
times). Each export is checked on the first `--parity-n` (64) test images: ONNX Runtime and a
numpy re-implementation of the PyTorch forward pass must give the JAX logits within 1e-4. An
earlier export in `--out` is refused unless `--overwrite`.

`--from-torch` reads PyTorch weights (safetensors; the reference code's "module." prefix and the
TRADES WRN's unused sub_block1 are accepted) of the network of `--preset` (or `--network`) and
saves them as a gen_jax model directory for `experiments/evaluate.py --checkpoint OUT`, which
evaluates it on the preset's data set and threat model.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

from gen_jax import cli, config as cfg, models  # noqa: E402
from gen_jax.experts import ROLES  # noqa: E402

# Flags that only --from-torch reads (an export takes everything from its checkpoint).
_IMPORT_FLAGS = ("--preset", "--network", "--dataset", "--data-dir", "--data_dir", "--num-classes",
                 "--num_classes")

# What each file of an export holds, for the printed summary (the keys of model.json's "files").
_FILE_CONTENTS = {
    "onnx": "ONNX graph",
    "torch_weights": "PyTorch weights",
    "torch_module": "PyTorch definition"
}


def model_description(which):
  """Which model an export holds, from model.json's "model" record, for the printed summary.

  The best model of a run is named as such: it is not the final model whose figures training
  printed (train.py's summary and summary.json are of the final models).
  """
  role = which.get("role")
  if "beta" in which:
    return f"the mixture, beta {which['beta']} ({which.get('checkpoint')})"
  if which.get("checkpoint") == "latest":
    return (f"the {role} model of the latest checkpoint of {which.get('source')} (the final "
            "model once training has finished)")
  if "selected" in which:
    epoch = re.search(r"epoch (\d+)", which.get("name", ""))
    at = f" (epoch {epoch[1]})" if epoch else ""
    return (f"the best {role} model{at} of {pathlib.Path(which['checkpoint']).parent}, selected "
            f"by {which['selected'].removeprefix('best by ')}; not the final model whose figures "
            "training printed")
  return f"the saved model {which.get('checkpoint')} ({role})"


def _opset(text):
  value = cli.positive_int(text)
  if value < 18:
    raise argparse.ArgumentTypeError(f"must be >= 18 (jax2onnx 0.13.0 writes ReduceMean with axes "
                                     f"as an input, which opset 18 introduced); got {value}")
  return value


def _formats(text):
  from gen_jax.export import check_formats
  return check_formats(text)


def _parse(argv=None):
  parser = cli.argument_parser(__doc__.splitlines()[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint",
                      help="a saved model (sweep_mix.py --select) or WORKDIR/best to export")
  source.add_argument("--workdir", help="a run directory: export its --model (latest checkpoint)")
  source.add_argument("--from-torch",
                      "--from_torch",
                      metavar="SAFETENSORS",
                      help="import PyTorch weights as a gen_jax model instead")
  parser.add_argument("--model",
                      default=None,
                      help="which model of --workdir: a role of its method (" + ", ".join(ROLES) +
                      "; robust_linf, robust_l2, ... in a multi-norm run) (default global); not "
                      "with --checkpoint, a saved model of one model")
  parser.add_argument("--format",
                      default="both",
                      type=cli.parsed_by(_formats),
                      help="onnx, torch or both (default both)")
  parser.add_argument("--layout",
                      default="NCHW",
                      type=str.upper,
                      choices=("NCHW", "NHWC"),
                      help="input layout of the ONNX graph (default NCHW, the PyTorch/ONNX "
                      "convention)")
  parser.add_argument("--opset", type=_opset, default=18, help="ONNX opset, >= 18 (default 18)")
  parser.add_argument("--parity-n",
                      "--parity_n",
                      type=cli.non_negative_int,
                      default=64,
                      help="test images of the parity check (default 64; 0 skips it)")
  parser.add_argument("--tolerance",
                      type=cli.positive_float,
                      default=1e-4,
                      help="largest |logit difference| an export may have (default 1e-4)")
  parser.add_argument("--out", required=True, help="the export (or imported model) directory")
  parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
  group = parser.add_argument_group("--from-torch only")
  group.add_argument("--preset",
                     default="cifar10",
                     choices=list(cfg.PRESETS),
                     help="config to evaluate the imported model under (default cifar10)")
  group.add_argument("--network",
                     choices=models.MODEL_NAMES,
                     help="the network of the weights (default: the preset's)")
  group.add_argument("--dataset", default=None, help="data set (default: the preset's)")
  group.add_argument("--data-dir", "--data_dir", default=None, help="data directory")
  group.add_argument("--num-classes",
                     "--num_classes",
                     type=cli.positive_int,
                     default=None,
                     help="classes (default: read off the weights)")
  args = parser.parse_args(argv)
  given = [a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)]
  stray = [a for a in given if a in _IMPORT_FLAGS]
  if stray and not args.from_torch:
    parser.error(f"{stray[0]} applies only with --from-torch: an export takes its network and "
                 "config from the checkpoint.")
  if args.model is not None and not args.workdir:
    parser.error(
        f"--model applies to --workdir only: --{'checkpoint' if args.checkpoint else 'from-torch'} "
        "gives one model; drop --model (or pass the run's --workdir).")
  args.model = args.model or "global"
  config = None
  if args.from_torch:
    overrides = {
        k: v
        for k, v in dict(model=args.network, dataset=args.dataset, data_dir=args.data_dir).items()
        if v is not None
    }
    try:
      config = dataclasses.replace(cfg.get_config(args.preset), **overrides).validate()
    except cfg.ConfigError as error:
      parser.error(f"{cli.flag_of(error.field)} {error.detail}")
  return args, config


def main(argv=None):
  args, config = _parse(argv)
  try:
    _run(args, config)
  except ImportError as error:  # the export extra is missing: one line that says what to install
    raise RuntimeError(str(error)) from error


def _run(args, config):
  from gen_jax import export
  if args.from_torch:
    path = export.import_torch_checkpoint(args.from_torch,
                                          config,
                                          args.out,
                                          num_classes=args.num_classes)
    print(f"saved the {config.model} weights as a gen_jax model in {path}; evaluate it with\n"
          f"  python experiments/evaluate.py --checkpoint {path}")
    return
  record = export.export_checkpoint(args.out,
                                    checkpoint=args.checkpoint,
                                    workdir=args.workdir,
                                    role=args.model,
                                    formats=args.format,
                                    layout=args.layout,
                                    opset=args.opset,
                                    parity_n=args.parity_n,
                                    tolerance=args.tolerance,
                                    overwrite=args.overwrite)
  files = [f"{name} ({_FILE_CONTENTS.get(kind, kind)})" for kind, name in record["files"].items()]
  files.append(f"{export.RECORD_FILE} (which model, config, parity)")
  print(f"exported {record['architecture']['name']} ({record['num_classes']} classes) to "
        f"{args.out}; every file holds {model_description(record['model'])}:\n  " +
        ", ".join(files))
  for name, seconds in record["export_seconds"].items():
    parity = record["parity"].get(name)
    figure = (f"max |logit diff| {parity['max_abs_diff']:.1e} on {parity['images']} test images "
              f"({parity['runtime']})" if parity else "parity not checked (--parity-n 0)")
    print(f"  {name}: {seconds:.2f} s; {figure}")
  print(json.dumps({"parity": record["parity"], "export_seconds": record["export_seconds"]}))


if __name__ == "__main__":
  cli.main_guard(main)
