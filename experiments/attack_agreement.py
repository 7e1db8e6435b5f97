"""Strength check of gen_jax.attacks against the reference PyTorch implementations.

Three stages, each a command; the PyTorch half lives in
`experiments/reference/attack_agreement_torch.py`, which runs in a separate environment (torch 2.13
CPU, torchattacks, and fra31/auto-attack on its PYTHONPATH; experiments/reference/README.md says
how to make it):

1. `train`: a tiny CNN (three stride-2 3x3 convolutions, two dense layers; no BatchNorm, so that it
   is defined identically in both frameworks) trained with PGD-AT (L-inf 8/255, 5 steps) on a subset
   of the CIFAR-10 JPEG image folder; exports its weights, the test images and their JAX logits to
   one .npz (no pickle).
2. `attack`: runs this project's attacks on the exported images and writes their robust accuracy.
3. `table`: merges ours with the reference's JSON and prints attack, ours, reference, difference.

Commands (about 25 minutes on 2 CPU cores)::

    python experiments/attack_agreement.py train --data /tmp/cifar/cifar10-jpeg --out /tmp/agree
    python experiments/attack_agreement.py attack --out /tmp/agree
    PYTHONPATH=/tmp/autoattack_ref /opt/torchenv/bin/python \
        experiments/reference/attack_agreement_torch.py --out /tmp/agree
    python experiments/attack_agreement.py table --out /tmp/agree

Optional L2 check (APGD-CE at eps 0.5, both sides): add `--l2` to `attack` and to the torch command.

Flags are hyphenated (`--batch-size`, `--pgd-steps`, `--train-per-class`, `--test-per-class`,
`--square-queries`); the underscore spellings used before are still accepted.

The images are JPEG-compressed copies of CIFAR-10, so accuracies differ slightly from figures on the
original release; the comparison is between implementations on identical inputs and weights.
"""
import argparse
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gen_jax import attacks

EPS = 8 / 255
STEP = 2 / 255
L2_EPS = 0.5
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Layer name -> (kernel shape HWIO or [in, out]); the PyTorch twin uses the same names.
LAYERS = {
    "conv1": (3, 3, 3, 16),
    "conv2": (3, 3, 16, 32),
    "conv3": (3, 3, 32, 64),
    "fc1": (4 * 4 * 64, 128),
    "fc2": (128, 10)
}


def init_params(key: jax.Array) -> dict[str, jax.Array]:
  """He-normal kernels and zero biases for LAYERS."""
  params = {}
  for i, (name, shape) in enumerate(LAYERS.items()):
    fan_in = int(np.prod(shape[:-1]))
    params[f"{name}.w"] = jax.random.normal(jax.random.fold_in(key, i), shape) * np.sqrt(2 / fan_in)
    params[f"{name}.b"] = jnp.zeros((shape[-1],))
  return params


def logits_fn(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """Tiny CNN: 3 x (conv 3x3, stride 2, pad 1, ReLU), flatten (NHWC order), dense 128, dense 10."""
  h = x
  for name in ("conv1", "conv2", "conv3"):
    h = jax.lax.conv_general_dilated(h,
                                     params[f"{name}.w"], (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + params[f"{name}.b"])
  h = h.reshape(h.shape[0], -1)
  h = jax.nn.relu(h @ params["fc1.w"] + params["fc1.b"])
  return h @ params["fc2.w"] + params["fc2.b"]


def load_split(root: pathlib.Path, split: str, per_class: int, seed: int):
  """`per_class` random images per class of one split as float32 [N, 32, 32, 3] in [0, 1]."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  xs, ys = [], []
  for label, name in enumerate(CLASSES):
    folder = root / split / name
    if not folder.is_dir():
      raise FileNotFoundError(f"missing class folder {folder}; extract cifar10-jpeg.tar.gz there.")
    files = sorted(folder.glob("*.jpg"))
    for f in rng.choice(files, size=min(per_class, len(files)), replace=False):
      with Image.open(f) as im:
        xs.append(np.asarray(im.convert("RGB"), np.uint8))
      ys.append(label)
  order = rng.permutation(len(ys))
  return (np.stack(xs)[order].astype(np.float32) / 255.0), np.asarray(ys, np.int32)[order]


def train(args) -> None:
  """PGD-AT of the tiny CNN; exports weights, test images and JAX logits to model.npz."""
  root = pathlib.Path(args.data)
  x_train, y_train = load_split(root, "train", args.train_per_class, seed=0)
  x_test, y_test = load_split(root, "test", args.test_per_class, seed=1)
  print(f"train {x_train.shape}, test {x_test.shape}")
  key = jax.random.key(args.seed)
  params = init_params(key)
  steps_per_epoch = len(y_train) // args.batch_size
  schedule = optax.cosine_decay_schedule(args.lr, args.epochs * steps_per_epoch)
  tx = optax.adam(schedule)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, x, y, step_key, eps):
    fn = jax.tree_util.Partial(logits_fn, params)
    x_adv = attacks.pgd(fn, x, y, key=step_key, eps=eps, step_size=eps / 4, steps=args.pgd_steps)

    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x_adv), y).mean()

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  rng = np.random.default_rng(args.seed)
  start = time.time()
  for epoch in range(args.epochs):
    order = rng.permutation(len(y_train))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * args.batch_size:(i + 1) * args.batch_size]
      xb = x_train[idx]
      flip = rng.random(len(idx)) < 0.5
      xb = np.where(flip[:, None, None, None], xb[:, :, ::-1], xb)
      step = epoch * steps_per_epoch + i
      # A tiny network stalls at chance under full-strength PGD from the start: ramp eps up over
      # the first 30 % of the steps (traced eps, so no recompilation).
      eps = EPS * min(1.0, step / (0.3 * args.epochs * steps_per_epoch))
      params, opt_state, value = train_step(params, opt_state, xb, y_train[idx],
                                            jax.random.fold_in(key, step), eps)
      losses.append(value)
    print(
        f"epoch {epoch + 1}: adversarial loss {np.mean(jax.device_get(losses)):.3f} "
        f"({time.time() - start:.0f} s)",
        flush=True)
  logits = np.asarray(jax.jit(logits_fn)(params, x_test))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  np.savez(out / "model.npz",
           x_test=x_test,
           y_test=y_test,
           logits=logits,
           **{
               k: np.asarray(v) for k, v in params.items()
           })
  print(f"clean test accuracy {np.mean(logits.argmax(1) == y_test):.4f}; wrote {out / 'model.npz'}")


def run_attacks(args) -> None:
  """Runs this project's attacks on the exported model and images; writes ours.json."""
  out = pathlib.Path(args.out)
  with np.load(out / "model.npz", allow_pickle=False) as data:
    x, y = data["x_test"], data["y_test"]
    params = {k: jnp.asarray(data[k]) for k in data.files if "." in k}
  n = args.n or len(y)
  x, y = x[:n], y[:n]
  fn = jax.tree_util.Partial(logits_fn, params)
  predict = jax.jit(lambda f, xb: jnp.argmax(f(xb), axis=1))
  key = jax.random.key(args.seed)
  bs = args.batch_size

  def accuracy(x_adv, eps=EPS, norm="linf"):
    attacks.verify_adversarial(x_adv, x, eps, norm)
    return float(
        np.mean(
            np.concatenate([np.asarray(predict(fn, x_adv[i:i + bs]))
                            for i in range(0, n, bs)]) == y))

  def batched(attack, **kw):
    return lambda xb, yb, *, key: attack(fn, xb, yb, key=key, eps=EPS, **kw)

  runs = {
      "PGD-20 (CE)": batched(attacks.pgd, step_size=STEP, steps=20),
      "MIM-20": batched(attacks.mim, step_size=STEP, steps=20),
      "CW-inf-20": batched(attacks.cw, step_size=STEP, steps=20),
      "APGD-CE": batched(attacks.apgd, loss="ce"),
      "APGD-DLR": batched(attacks.apgd, loss="dlr"),
      "APGD-T": batched(attacks.apgd_targeted),
  }
  if attacks.fab_targeted is not None:
    runs["FAB-T"] = batched(attacks.fab_targeted)
  if attacks.square is not None:
    runs["Square"] = batched(attacks.square,
                             **({
                                 "n_queries": args.square_queries
                             } if args.square_queries else {}))
  results = {"clean": accuracy(x)}
  correct = np.asarray(predict(fn, x)) == y
  if args.l2:
    # L2 threat model (eps 0.5): APGD-CE only, a cheap check of the L2 steps and projections.
    start = time.time()
    x_adv = x.copy()
    x_adv[correct] = attacks.attack_in_batches(
        lambda xb, yb, *, key: attacks.apgd(fn, xb, yb, key=key, eps=L2_EPS, norm="l2"),
        x[correct],
        y[correct],
        key=jax.random.fold_in(key, 50),
        batch_size=bs)
    results = {
        "APGD-CE L2": accuracy(x_adv, L2_EPS, "l2"),
        "APGD-CE L2 seconds": time.time() - start
    }
    print(results, flush=True)
    (out / "ours_l2.json").write_text(json.dumps(results, indent=1))
    return
  print(f"clean: {results['clean']:.4f}", flush=True)
  only = set(args.only.split(",")) if args.only else None
  for i, (name, attack_fn) in enumerate(runs.items()):
    if only and name not in only:
      continue
    start = time.time()
    # Misclassified clean points are non-robust whatever the attack does: attack the others only.
    x_adv = x.copy()
    x_adv[correct] = attacks.attack_in_batches(attack_fn,
                                               x[correct],
                                               y[correct],
                                               key=jax.random.fold_in(key, i),
                                               batch_size=bs)
    results[name] = accuracy(x_adv)
    results[name + " seconds"] = time.time() - start
    print(f"{name}: {results[name]:.4f} ({time.time() - start:.0f} s)", flush=True)
  if not only or "AutoAttack" in only:
    start = time.time()
    x_adv, report = attacks.autoattack(fn,
                                       x,
                                       y,
                                       key=jax.random.fold_in(key, 99),
                                       eps=EPS,
                                       batch_size=bs,
                                       verbose=True)
    results["AutoAttack"] = accuracy(x_adv)
    results["AutoAttack seconds"] = time.time() - start
    results["AutoAttack report"] = report
  path = out / ("ours.json" if not only else f"ours_{'_'.join(sorted(only))}.json".replace(" ", ""))
  path.write_text(json.dumps(results, indent=1, default=str))
  print(f"wrote {path}")


def table(args) -> None:
  """Prints attack, ours, reference, difference (percentage points) from the two JSON files."""
  out = pathlib.Path(args.out)
  ours = {}
  for f in sorted(out.glob("ours*.json")):
    ours.update(json.loads(f.read_text()))
  ref = {}
  for f in sorted(out.glob("reference*.json")):
    ref.update(json.loads(f.read_text()))
  print("| attack | ours (%) | reference (%) | ours - reference (pp) |")
  print("| --- | --- | --- | --- |")
  for name, value in ref.items():
    if name in ours and isinstance(value, float) and "seconds" not in name:
      print(f"| {name} | {100 * ours[name]:.1f} | {100 * value:.1f} | "
            f"{100 * (ours[name] - value):+.1f} |")


def _add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
  """Adds `--name` (hyphenated) and, hidden from --help, its underscore spelling used before."""
  dest = name.replace("-", "_")
  parser.add_argument(f"--{name}", dest=dest, **kwargs)
  parser.add_argument(f"--{dest}",
                      dest=dest,
                      default=argparse.SUPPRESS,
                      help=argparse.SUPPRESS,
                      **{
                          k: v for k, v in kwargs.items() if k in ("type", "action")
                      })


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  parser.add_argument("stage", choices=("train", "attack", "table"))
  parser.add_argument("--data",
                      default="/tmp/cifar/cifar10-jpeg",
                      help="CIFAR-10 JPEG image folder (train stage)")
  parser.add_argument("--out",
                      default="/tmp/agree",
                      help="folder of model.npz and the JSON results (every stage)")
  _add_flag(parser, "train-per-class", type=int, default=2000)
  _add_flag(parser, "test-per-class", type=int, default=100)
  parser.add_argument("--epochs", type=int, default=10)
  _add_flag(parser,
            "batch-size",
            type=int,
            default=None,
            help="default 128 for train, 500 for attack (as the torch side)")
  parser.add_argument("--lr", type=float, default=2e-3)
  _add_flag(parser, "pgd-steps", type=int, default=5, help="PGD steps of adversarial training")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--n", type=int, default=0, help="attack only the first N test images")
  _add_flag(parser, "square-queries", type=int, default=0, help="0: the 5,000 of AutoAttack")
  parser.add_argument("--only", default="", help="comma-separated attack names to run")
  parser.add_argument("--l2", action="store_true", help="run only APGD-CE at L2 eps 0.5")
  args = parser.parse_args()
  if args.batch_size is None:
    args.batch_size = 500 if args.stage == "attack" else 128
  {"train": train, "attack": run_attacks, "table": table}[args.stage](args)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  main()
