"""A trained user network for the attack benchmarks: PGD-AT of bench.py's `plaincnn` on images.

    python experiments/bench_fixture.py --data-dir data_local/cifar10-jpeg \
        --out runs/bench/plaincnn-at.npz          # about 10 minutes on 2 CPU cores
    python experiments/reference/side_by_side.py --torch-python /opt/torchenv/bin/python \
        --what autoattack --model plaincnn --weights runs/bench/plaincnn-at.npz --n 200 \
        --batch-size 200 --torch-pgd-impl torchattacks --rounds 3 --repeats 1

bench.py's random `plaincnn` is fine for timing PGD and APGD, whose work per step does not depend
on the weights, but AutoAttack on it has nothing to do after its first stage: every point falls at
once. A user evaluates a network that resists, so this program trains one: `bench.PlainCNN` (the
same linen network, stock `nn.Conv` / `nn.max_pool` / `nn.Dense`), adversarially (PGD-AT: PGD-k
L-inf 8/255, step 2/255, SGD with momentum 0.9 and weight decay 5e-4, random flips) on the first
`--train-per-class` images of each class of an image folder, and writes one `.npz` that
`bench.py --weights` and `experiments/reference/bench_torch.py --weights` both read: the six
layers' `kernel_i` / `bias_i` in flax's layout (HWIO convolutions, [in, out] dense layers over
NHWC-flattened features, the layout `plaincnn_weights` draws), and `--test-n` test images
(uint8 NHWC, a seeded shuffle of the test split, so every class is present) with their labels.
It prints the network's clean and PGD-10 accuracy on those images (the correctness engine) and
records them in the file (`meta`, a JSON string). The output is written to a temporary name and
renamed; an existing file is never replaced.

It is the benchmark's fixture, not a training recipe: the figures of a few epochs on 10,000
images are far from a tuned robust CIFAR-10 model, and they need not be close: what matters for
the timing is that both frameworks attack the same network that resists part of the attacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench.py, beside this file

import bench  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from gen_jax import attacks, cli  # noqa: E402
from gen_jax.data import load_dataset, to_float  # noqa: E402
from gen_jax.evaluation import ModelSet, engine  # noqa: E402
from gen_jax.ops.intercept import fast_cpu_ops  # noqa: E402

LAYERS = ("Conv_0", "Conv_1", "Conv_2", "Conv_3", "Dense_0", "Dense_1")  # PlainCNN's, in order


def _parse(argv=None) -> argparse.Namespace:
  p = cli.argument_parser(__doc__.splitlines()[0])
  p.add_argument("--data-dir", required=True, help="image folder with train/ and test/")
  p.add_argument("--out", required=True, help="the .npz to write (must not exist)")
  p.add_argument("--train-per-class", type=cli.positive_int, default=1000)
  p.add_argument("--test-n", type=cli.positive_int, default=1000, help="test images to save")
  p.add_argument("--epochs", type=cli.positive_int, default=10)
  p.add_argument("--batch-size", type=cli.positive_int, default=128)
  p.add_argument("--lr", type=cli.positive_float, default=0.01)
  p.add_argument("--pgd-steps", type=cli.positive_int, default=3)
  p.add_argument("--image-size", type=cli.positive_int, default=32)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.image_size % 4:
    p.error(f"--image-size must be a multiple of 4 (PlainCNN pools twice), got {args.image_size}.")
  if os.path.exists(args.out):
    p.error(f"--out {args.out} exists; give a new path (nothing is overwritten).")
  return args


def train(args: argparse.Namespace, images: np.ndarray, labels: np.ndarray, num_classes: int):
  """PGD-AT of `bench.PlainCNN` on uint8 `images`; returns its linen variables."""
  model = bench.PlainCNN(num_classes)
  key = jax.random.key(args.seed)
  init_key, key = jax.random.split(key)
  variables = model.init(init_key, jnp.zeros((1,) + images.shape[1:], jnp.float32))
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(args.lr, momentum=0.9))
  opt_state = tx.init(variables)

  def logits(v, x):
    with fast_cpu_ops():  # traced here: the fast CPU convolution and max-pool gradients
      return model.apply(v, x)

  @jax.jit
  def step(v, opt_state, xb, yb, step_key):
    flip_key, attack_key = jax.random.split(step_key)
    x = to_float(xb)
    x = jnp.where(jax.random.bernoulli(flip_key, 0.5, (x.shape[0], 1, 1, 1)), x[:, :, ::-1], x)
    x_adv = attacks.pgd(jax.tree_util.Partial(logits, v),
                        x,
                        yb,
                        key=attack_key,
                        eps=bench.EPS,
                        step_size=bench.STEP_SIZE,
                        steps=args.pgd_steps)
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p, x_adv), yb).mean()
    loss, grads = jax.value_and_grad(loss_fn)(v)
    updates, opt_state = tx.update(grads, opt_state, v)
    return optax.apply_updates(v, updates), opt_state, loss

  rng = np.random.default_rng(args.seed)
  b = min(args.batch_size, len(labels))
  for epoch in range(args.epochs):
    started, order, losses = time.time(), rng.permutation(len(labels)), []
    for i in range(len(labels) // b):
      idx = order[i * b:(i + 1) * b]
      key, step_key = jax.random.split(key)
      variables, opt_state, loss = step(variables, opt_state, images[idx], labels[idx], step_key)
      losses.append(loss)
    print(
        f"epoch {epoch + 1}/{args.epochs}: adversarial loss {float(np.mean(losses)):.3f} "
        f"({time.time() - started:.0f} s)",
        flush=True)
  return model, variables


def main(argv=None) -> int:
  args = _parse(argv)
  data = load_dataset("folder",
                      data_dir=args.data_dir,
                      image_size=args.image_size,
                      max_per_class=args.train_per_class)
  num_classes = len(data.class_names)
  model, variables = train(args, data.train_images, data.train_labels, num_classes)
  # A seeded shuffle: the folder's test split is stored class by class.
  pick = np.random.default_rng(args.seed + 1).permutation(len(data.test_labels))[:args.test_n]
  test_x, test_y = data.test_images[pick], data.test_labels[pick].astype(np.int32)
  threat = attacks.Threat("linf", bench.EPS, bench.STEP_SIZE, 10)
  correct = engine.correctness(ModelSet(model, {"m": variables}),
                               test_x,
                               test_y,
                               threats=[threat],
                               key=jax.random.key(args.seed + 2))["m"]
  meta = {
      "clean": float(correct[engine.CLEAN].mean()),
      "pgd10": float(correct[threat].mean()),
      "args": {
          k: v for k, v in vars(args).items() if k != "out"
      },
      "classes": list(data.class_names)
  }
  params = jax.device_get(variables["params"])
  arrays = {"images": test_x, "labels": test_y, "meta": np.asarray(json.dumps(meta))}
  for i, name in enumerate(LAYERS):
    arrays[f"kernel_{i}"] = np.asarray(params[name]["kernel"], np.float32)
    arrays[f"bias_{i}"] = np.asarray(params[name]["bias"], np.float32)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  partial = args.out + ".partial.npz"
  np.savez(partial, **arrays)
  os.replace(partial, args.out)
  print(f"{args.out}: {len(test_y)} test images, clean {meta['clean']:.2%}, "
        f"PGD-10 {meta['pgd10']:.2%}")
  return 0


if __name__ == "__main__":
  cli.main_guard(main)
