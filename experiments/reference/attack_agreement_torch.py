"""Reference half of the attack-strength check: the same weights and images under PyTorch attacks.

Runs in a separate environment (not part of the project's dependencies): torch 2.13 CPU,
torchattacks (installed with --no-deps) and the authors' AutoAttack (github.com/fra31/auto-attack)
on PYTHONPATH; README.md beside this file says how to make it. It loads `model.npz` written by
`experiments/attack_agreement.py train`, rebuilds the tiny CNN as a torch module, checks that its
logits equal the JAX logits, runs the reference attacks and writes `reference.json` for
`experiments/attack_agreement.py table`.

Command::

    PYTHONPATH=/tmp/autoattack_ref /opt/torchenv/bin/python \
        experiments/reference/attack_agreement_torch.py --out /tmp/agree

Flags are hyphenated and mean what they mean in `experiments/attack_agreement.py`
(`--batch-size`, `--square-queries`, `--skip-full-aa`); the underscore spellings used before are
still accepted.

Reference attacks: AutoAttack's APGDAttack (CE, DLR), and its 'standard' ensemble run individually
(APGD-CE, APGD-T, FAB-T, Square) and as a whole; torchattacks PGD and MIFGSM; CW-inf as PGD on the
margin loss written here (torchattacks' CW is the L2 optimisation attack, not CW-inf).
"""
import argparse
import json
import pathlib
import time

import numpy as np
import torch
from torch import nn

EPS = 8 / 255
STEP = 2 / 255


class TinyCNN(nn.Module):
  """The torch twin of `attack_agreement.logits_fn` (NHWC flatten order kept by a permute)."""

  def __init__(self, weights):
    super().__init__()
    self.convs = nn.ModuleList(
        [nn.Conv2d(ci, co, 3, stride=2, padding=1) for ci, co in ((3, 16), (16, 32), (32, 64))])
    self.fc1, self.fc2 = nn.Linear(1024, 128), nn.Linear(128, 10)
    with torch.no_grad():
      for i, conv in enumerate(self.convs):
        conv.weight.copy_(torch.from_numpy(weights[f"conv{i + 1}.w"]).permute(3, 2, 0, 1))
        conv.bias.copy_(torch.from_numpy(weights[f"conv{i + 1}.b"]))
      for name in ("fc1", "fc2"):
        getattr(self, name).weight.copy_(torch.from_numpy(weights[f"{name}.w"]).T)
        getattr(self, name).bias.copy_(torch.from_numpy(weights[f"{name}.b"]))

  def forward(self, x):
    h = x
    for conv in self.convs:
      h = torch.relu(conv(h))
    h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)
    return self.fc2(torch.relu(self.fc1(h)))


def cw_inf(model, x, y, eps, alpha, steps):
  """PGD on the margin loss max_{i!=y} z_i - z_y from a uniform random start (CW-inf)."""
  x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
  onehot = nn.functional.one_hot(y, 10).bool()
  for _ in range(steps):
    x_adv.requires_grad_(True)
    z = model(x_adv)
    margin = z.masked_fill(onehot, -1e9).max(1)[0] - z[onehot]
    g, = torch.autograd.grad(margin.sum(), [x_adv])
    x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
  return x_adv


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
  parser.add_argument("--out",
                      default="/tmp/agree",
                      help="folder of model.npz; reference*.json are written there")
  parser.add_argument("--n", type=int, default=0, help="attack only the first N test images")
  _add_flag(parser, "batch-size", type=int, default=500)
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  _add_flag(parser, "square-queries", type=int, default=0, help="0: the 5,000 of AutoAttack")
  _add_flag(parser,
            "skip-full-aa",
            action="store_true",
            help="run AutoAttack's stages one by one only, not the whole ensemble")
  parser.add_argument("--l2", action="store_true", help="run only APGD-CE at L2 eps 0.5")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  import torchattacks  # pylint: disable=import-outside-toplevel
  from autoattack import AutoAttack  # pylint: disable=import-outside-toplevel
  from autoattack.autopgd_base import APGDAttack  # pylint: disable=import-outside-toplevel

  out = pathlib.Path(args.out)
  with np.load(out / "model.npz", allow_pickle=False) as data:
    weights = {k: data[k] for k in data.files}
  n = args.n or len(weights["y_test"])
  model = TinyCNN(weights).eval()
  x = torch.from_numpy(weights["x_test"][:n]).permute(0, 3, 1, 2).contiguous()
  y = torch.from_numpy(weights["y_test"][:n]).long()
  with torch.no_grad():
    logits = model(x).numpy()
  gap = np.abs(logits - weights["logits"][:n]).max()
  print(f"max |torch logits - jax logits| = {gap:.2e}")
  if gap > 1e-3:
    raise SystemExit("the torch twin does not reproduce the JAX model; fix the weight layout.")

  def accuracy(x_adv):
    d = (x_adv - x).abs().reshape(n, -1).max(1)[0].max().item()
    if d > EPS + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
      raise SystemExit(f"reference attack left the ball or box (max dist {d}).")
    with torch.no_grad():
      return float(
          np.mean(
              np.concatenate([(model(
                  x_adv[i:i + args.batch_size]).argmax(1) == y[i:i + args.batch_size]).numpy()
                              for i in range(0, n, args.batch_size)])))

  def batched(attack):
    return torch.cat([
        attack(x[i:i + args.batch_size], y[i:i + args.batch_size])
        for i in range(0, n, args.batch_size)
    ])

  if args.l2:
    start = time.time()
    attack = APGDAttack(model,
                        n_restarts=1,
                        n_iter=100,
                        eps=0.5,
                        norm="L2",
                        loss="ce",
                        rho=.75,
                        seed=0,
                        device="cpu")
    x_adv = batched(attack.perturb)
    d = ((x_adv - x)**2).reshape(n, -1).sum(1).sqrt().max().item()
    if d > 0.5 + 1e-4:
      raise SystemExit(f"reference attack left the L2 ball (max dist {d}).")
    with torch.no_grad():
      acc = float((model(x_adv).argmax(1) == y).float().mean())
    results = {"APGD-CE L2": acc, "APGD-CE L2 seconds": time.time() - start}
    print(results)
    (out / "reference_l2.json").write_text(json.dumps(results, indent=1))
    return
  results = {"clean": accuracy(x)}
  print(f"clean: {results['clean']:.4f}", flush=True)
  torch.manual_seed(0)
  runs = {
      "PGD-20 (CE)":
          torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=20, random_start=True),
      "MIM-20":
          torchattacks.MIFGSM(model, eps=EPS, alpha=STEP, steps=20, decay=1.0),
      "CW-inf-20":
          lambda xb, yb: cw_inf(model, xb, yb, EPS, STEP, 20),
      "APGD-DLR":
          APGDAttack(model,
                     n_restarts=1,
                     n_iter=100,
                     eps=EPS,
                     norm="Linf",
                     loss="dlr",
                     rho=.75,
                     seed=0,
                     device="cpu").perturb,
  }
  for name, attack in runs.items():
    start = time.time()
    results[name] = accuracy(batched(attack))
    results[name + " seconds"] = time.time() - start
    print(f"{name}: {results[name]:.4f} ({time.time() - start:.0f} s)", flush=True)

  adversary = AutoAttack(model,
                         norm="Linf",
                         eps=EPS,
                         version="standard",
                         seed=0,
                         device="cpu",
                         verbose=False)
  if args.square_queries:  # else AutoAttack's own 'standard' value (5,000)
    adversary.square.n_queries = args.square_queries
  names = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square"}
  for attack in ("apgd-ce", "apgd-t", "fab-t", "square"):
    start = time.time()
    adversary.attacks_to_run = [attack]
    x_adv = adversary.run_standard_evaluation(x, y, bs=args.batch_size)
    results[names[attack]] = accuracy(x_adv)
    results[names[attack] + " seconds"] = time.time() - start
    print(f"{names[attack]}: {results[names[attack]]:.4f} ({time.time() - start:.0f} s)",
          flush=True)
  if not args.skip_full_aa:
    start = time.time()
    adversary.attacks_to_run = ["apgd-ce", "apgd-t", "fab-t", "square"]
    adversary.verbose = True
    results["AutoAttack"] = accuracy(adversary.run_standard_evaluation(x, y, bs=args.batch_size))
    results["AutoAttack seconds"] = time.time() - start
  path = out / "reference.json"
  path.write_text(json.dumps(results, indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
