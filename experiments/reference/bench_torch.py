"""PyTorch baseline of experiments/bench.py: the same per-batch work, run the reference's way.

Runs in a separate environment with PyTorch (not a dependency of gen_jax), e.g.
`/opt/torchenv/bin/python` with torch 2.13.0 (CPU build): see README.md beside this file. Prints
the same JSON lines as experiments/bench.py (`framework` is "torch"; `compile_seconds` is null:
eager mode), and takes the same flags for the same things (`--batch-size`, `--repeats`, ...).

The workloads follow the Generalist reference code (github.com/PKU-ML/Generalist, main.py and
attacks.py), written independently:
  natural_step     train mode, cross-entropy on the clean augmented batch, SGD (momentum 0.9,
                   weight decay 5e-4).
  robust_step      PGD-k in eval mode (uniform start in the eps-ball, sign steps, clip to [0, 1]),
                   then a train-mode SGD step on the adversarial batch (weight decay 3.5e-3).
                   `--pgd-grad reference` (default) calls loss.backward() as the reference does,
                   which also computes every parameter's gradient at each PGD iteration;
                   `--pgd-grad input` uses torch.autograd.grad w.r.t. the input only.
  generalist_step  robust step + EMA teacher update of the robust expert, natural step + EMA teacher
                   update of the natural expert, then the global model's EMA towards
                   beta * teacher_rob + (1 - beta) * teacher_nat, over parameters AND BatchNorm
                   buffers, with the reference's `apply_shadow` copies into the teacher modules.
                   `--redistribute` adds the late-phase copy of the global model into both experts;
                   `--reference-monitoring` adds the reference's two extra eval-mode forward passes
                   per batch that only feed its progress bar (off: gen_jax computes no such thing).
  pgd20            PGD-k (`--pgd-steps`, default 20), eps 8/255, step 2/255, random start, eval
                   mode: `--pgd-impl loop` (default) a plain PyTorch loop (input gradient only),
                   `--pgd-impl torchattacks` torchattacks.PGD (what a user of torchattacks runs).
  apgd_ce          torchattacks.APGD, loss "ce", 1 restart, `--pgd-steps` (default 100: the
                   reference AutoAttack's; torchattacks' own default is 10), rho 0.75.
  autoattack       torchattacks.AutoAttack(version="standard"): APGD-CE, APGD-T, FAB-T (9 target
                   classes), Square (5,000 queries). torchattacks builds its stages with 10
                   iterations; `--aa-steps` (default 100) sets APGD-CE, APGD-T and FAB-T to the
                   reference AutoAttack's 100, the work gen_jax's `attacks.autoattack` does
                   (`--aa-steps 10`: torchattacks as shipped).
Augmentation (4-pixel pad + random crop + flip, on the tensor batch) is part of the training steps,
as it is inside gen_jax's jitted step.

The attack targets run as in bench.py: the whole attack over `--n` images (default: one batch) in
batches of `--batch-size` (the last one may be smaller), L-inf eps 8/255, the model in eval mode;
the labels are the model's own predictions (every point starts robust: APGD and AutoAttack
attack only the points classified right), or with `--weights` (plaincnn trained by
experiments/bench_fixture.py) the file's test images and true labels; `robust_count` checks the
result. `--model plaincnn`
is bench.py's user network (`PlainCNN` here: the same layer shapes, NCHW), for the attack
targets only. torchattacks (installed with --no-deps, README.md) is imported only for the targets
that use it.

Synopsis::

    /opt/torchenv/bin/python experiments/reference/bench_torch.py --what generalist_step \
        --model resnet18 --batch-size 128 --repeats 5
    /opt/torchenv/bin/python experiments/reference/bench_torch.py --what pgd20 --batch-size 128
    /opt/torchenv/bin/python experiments/reference/bench_torch.py --what pgd20,apgd_ce,autoattack \
        --model plaincnn --n 1000 --batch-size 250 --repeats 3 --pgd-impl torchattacks

As in bench.py, `--batch` and `--steps` (deprecated) are still accepted for `--batch-size` and
`--repeats`.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

WHATS = ("natural_step", "robust_step", "generalist_step", "pgd20", "apgd_ce", "autoattack")
ATTACK_WHATS = ("pgd20", "apgd_ce", "autoattack")
USER_MODELS = ("plaincnn",)  # bench.py's user network (attack targets only)
EPS, STEP_SIZE = 8 / 255, 2 / 255

# ----------------------------------------------------------------------------------------------
# Networks (the same architectures as gen_jax.models, PyTorch layout NCHW).


class BasicBlock(nn.Module):
  """Post-activation residual block of the CIFAR ResNet-18 (reference models/resnet.py)."""

  def __init__(self, c_in: int, c_out: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c_out)
    self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(c_out)
    self.shortcut = nn.Sequential()
    if stride != 1 or c_in != c_out:
      self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                    nn.BatchNorm2d(c_out))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):

  def __init__(self, num_classes: int = 10):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    layers, c_in = [], 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
      layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
      c_in = c_out
    self.layers = nn.Sequential(*layers)
    self.linear = nn.Linear(512, num_classes)

  def forward(self, x):
    out = self.layers(F.relu(self.bn1(self.conv1(x))))
    out = F.adaptive_avg_pool2d(out, 1).flatten(1)
    return self.linear(out)


class WideBlock(nn.Module):
  """Pre-activation wide block (reference models/wrn_madry.py)."""

  def __init__(self, c_in: int, c_out: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(c_in)
    self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(c_out)
    self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
    self.equal = c_in == c_out
    self.shortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

  def forward(self, x):
    act = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(act))))
    return out + (x if self.equal else self.shortcut(act))


class WideResNet(nn.Module):

  def __init__(self, depth: int = 34, widen: int = 10, num_classes: int = 10):
    super().__init__()
    n = (depth - 4) // 6
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    blocks, c_in = [], 16
    for c_out, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
      for i in range(n):
        blocks.append(WideBlock(c_in, c_out, stride if i == 0 else 1))
        c_in = c_out
    self.blocks = nn.Sequential(*blocks)
    self.bn = nn.BatchNorm2d(c_in)
    self.fc = nn.Linear(c_in, num_classes)

  def forward(self, x):
    out = F.relu(self.bn(self.blocks(self.conv1(x))))
    return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class SmallCNN(nn.Module):
  """gen_jax's SmallCNN: conv3x3-BN-ReLU x4 (32, 64/2, 128/2, 128), average pool, linear."""

  def __init__(self, num_classes: int = 10):
    super().__init__()
    layers, c_in = [], 3
    for c_out, stride in ((32, 1), (64, 2), (128, 2), (128, 1)):
      layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
      c_in = c_out
    self.features = nn.Sequential(*layers)
    self.linear = nn.Linear(c_in, num_classes)

  def forward(self, x):
    return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class PlainCNN(nn.Module):
  """bench.py's `plaincnn` (a user's own network): conv32-conv32-maxpool-conv64-conv64-maxpool-
  dense256-dense(num_classes), ReLU, 3x3 "same" convolutions with bias, 2x2 max pools."""

  def __init__(self, num_classes: int = 10, image_size: int = 32):
    super().__init__()
    self.features = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(),
                                  nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2))
    side = image_size // 4
    self.classifier = nn.Sequential(nn.Linear(64 * side * side, 256), nn.ReLU(),
                                    nn.Linear(256, num_classes))

  def forward(self, x):
    return self.classifier(self.features(x).flatten(1))


def plaincnn_weights(seed: int, num_classes: int, image_size: int) -> list[tuple[Any, Any]]:
  """PlainCNN's (kernel, bias) per layer, drawn the same way by bench.py and bench_torch.py.

  NumPy only, so that both frameworks time the same function of the same images (AutoAttack's
  later stages run only on the points still robust, so the work depends on the weights). flax's
  layout: convolution kernels HWIO, dense kernels [in, out] over NHWC-flattened features; LeCun
  normal kernels (flax's default init, untruncated here), zero biases. Kept identical in both
  scripts (tests/test_bench.py compares the two sources).
  """
  rng = np.random.default_rng(seed)
  side = image_size // 4
  shapes = ((3, 3, 3, 32), (3, 3, 32, 32), (3, 3, 32, 64), (3, 3, 64, 64), (side * side * 64, 256),
            (256, num_classes))
  weights = []
  for shape in shapes:
    scale = np.float32(1.0 / np.sqrt(np.prod(shape[:-1])))
    weights.append(
        (rng.standard_normal(shape, dtype=np.float32) * scale, np.zeros(shape[-1], np.float32)))
  return weights


MODELS = {
    "resnet18": ResNet18,
    "wrn34_10": lambda num_classes: WideResNet(34, 10, num_classes),
    "smallcnn": SmallCNN,
    "plaincnn": PlainCNN,
}


def plaincnn_file(path: str) -> tuple[list[tuple[Any, Any]], Any, Any]:
  """PlainCNN's (kernel, bias) per layer (flax's layout), test images (uint8 NHWC) and labels
  from a file of experiments/bench_fixture.py. NumPy only, identical in bench.py and
  bench_torch.py (tests/test_bench.py compares the two sources)."""
  with np.load(path) as f:
    weights = [(f[f"kernel_{i}"], f[f"bias_{i}"]) for i in range(6)]
    return weights, f["images"], f["labels"].astype(np.int64)


def build_model(args: argparse.Namespace) -> nn.Module:
  """The network of `--model`; plaincnn with bench.py's weights (`plaincnn_weights`, or those of
  `--weights`, a file of bench_fixture.py)."""
  if args.model != "plaincnn":
    return MODELS[args.model](num_classes=args.num_classes)
  net = PlainCNN(args.num_classes, args.image_size)
  (c0, c1, c2, c3, d0, d1) = (plaincnn_file(args.weights)[0] if args.weights else plaincnn_weights(
      args.seed, args.num_classes, args.image_size))
  side = args.image_size // 4
  # HWIO -> OIHW; the first dense kernel's rows from flax's (h, w, c) flattening to torch's
  # (c, h, w); [in, out] -> [out, in].
  dense0 = d0[0].reshape(side, side, 64, 256).transpose(3, 2, 0, 1).reshape(256, -1)
  tensors = [(k.transpose(3, 2, 0, 1), b) for k, b in (c0, c1, c2, c3)]
  tensors += [(dense0, d0[1]), (d1[0].T, d1[1])]
  layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
  with torch.no_grad():
    for layer, (k, b) in zip(layers, tensors):
      layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(k)))
      layer.bias.copy_(torch.from_numpy(b))
  return net


# ----------------------------------------------------------------------------------------------
# The per-batch work.


def augment(images_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
  """4-pixel zero pad, random 32x32 crop and random horizontal flip, per image; to [0, 1]."""
  x = images_uint8.float().div_(255.0)
  n, _, h, w = x.shape
  padded = F.pad(x, (4, 4, 4, 4))
  dy = torch.randint(0, 9, (n,), generator=generator)
  dx = torch.randint(0, 9, (n,), generator=generator)
  rows = (dy[:, None] + torch.arange(h)[None, :])  # [n, h]
  cols = (dx[:, None] + torch.arange(w)[None, :])  # [n, w]
  idx_n = torch.arange(n)[:, None, None]
  out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
  flip = torch.rand(n, generator=generator) < 0.5
  out = torch.where(flip[:, None, None, None], out.flip(3), out)
  return out.contiguous()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, grad_mode: str,
        generator: torch.Generator) -> torch.Tensor:
  """L-inf PGD in eval mode: uniform start, sign steps, projection onto the ball and [0, 1]."""
  model.eval()
  delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * EPS
  x_adv = torch.clamp(x + delta, 0.0, 1.0)
  for _ in range(steps):
    x_adv.requires_grad_()
    loss = F.cross_entropy(model(x_adv), y)
    if grad_mode == "reference":
      model.zero_grad()
      loss.backward()  # as the reference: parameter gradients are computed too, then discarded
      grad = x_adv.grad
    else:
      (grad,) = torch.autograd.grad(loss, [x_adv])
    x_adv = x_adv.detach() + STEP_SIZE * grad.sign()
    x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp_(0.0, 1.0)
  return x_adv.detach()


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
  model.train()
  optimizer.zero_grad()
  loss = F.cross_entropy(model(x), y)
  loss.backward()
  optimizer.step()
  return loss


class EMA:
  """The reference's EMA teacher: shadow state dict, decay min(0.999, (t+1)/(t+10)), buffers too."""

  def __init__(self, model: nn.Module, alpha: float = 0.999):
    self.step = 0
    self.model = copy.deepcopy(model)
    self.alpha = alpha
    self.shadow = {k: v.clone().detach() for k, v in self.model.state_dict().items()}
    self.param_keys = [k for k, _ in self.model.named_parameters()]
    self.buffer_keys = [k for k, _ in self.model.named_buffers()]

  def update_params(self, model, model2=None, beta=None):
    decay = min(self.alpha, (self.step + 1) / (self.step + 10))
    state = model.state_dict()
    # The reference calls model2.state_dict() once per key; it is hoisted here (same result,
    # fewer Python dict builds) so that the baseline is not slowed by that quirk.
    state2 = model2.state_dict() if model2 is not None else None
    for name in self.param_keys + self.buffer_keys:
      if state2 is not None:
        target = state[name] * beta + state2[name] * (1 - beta)
      else:
        target = state[name]
      self.shadow[name].copy_(decay * self.shadow[name] + (1 - decay) * target)
    self.step += 1

  def apply_shadow(self):
    self.backup = {k: v.clone().detach() for k, v in self.model.state_dict().items()}
    self.model.load_state_dict(self.shadow)


class Workload:
  """Models, optimisers and teachers of one benchmark; `run()` does one batch's work."""

  def __init__(self, args: argparse.Namespace, what: str):
    torch.manual_seed(args.seed)
    self.args, self.what = args, what
    self.generator = torch.Generator().manual_seed(args.seed)
    net = build_model(args)
    if args.channels_last:
      net = net.to(memory_format=torch.channels_last)
    self.model_at = net
    self.model_st = copy.deepcopy(net)
    self.opt_at = torch.optim.SGD(self.model_at.parameters(),
                                  lr=0.01,
                                  momentum=0.9,
                                  weight_decay=3.5e-3)
    self.opt_st = torch.optim.SGD(self.model_st.parameters(),
                                  lr=0.01,
                                  momentum=0.9,
                                  weight_decay=5e-4)
    if what == "generalist_step":
      self.teacher_at, self.teacher_st = EMA(self.model_at), EMA(self.model_st)
      self.teacher_mixed = EMA(self.model_st)
      for t in (self.teacher_at, self.teacher_st, self.teacher_mixed):
        t.model.eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    s = args.image_size
    self.images = torch.randint(0, 256, (args.batch, 3, s, s), generator=g, dtype=torch.uint8)
    self.labels = torch.randint(0, args.num_classes, (args.batch,), generator=g)

  def _x(self):
    x = augment(self.images, self.generator)
    if self.args.channels_last:
      x = x.contiguous(memory_format=torch.channels_last)
    return x

  def run(self) -> float:
    args, y = self.args, self.labels
    x = self._x()
    if self.what == "natural_step":
      return sgd_step(self.model_st, self.opt_st, x, y).item()
    steps = args.pgd_steps or 10
    x_adv = pgd(self.model_at, x, y, steps, args.pgd_grad, self.generator)
    loss_at = sgd_step(self.model_at, self.opt_at, x_adv, y)
    if self.what == "robust_step":
      return loss_at.item()
    self.teacher_at.update_params(self.model_at)
    self.teacher_at.apply_shadow()
    loss_st = sgd_step(self.model_st, self.opt_st, x, y)
    self.teacher_st.update_params(self.model_st)
    self.teacher_st.apply_shadow()
    beta = 1.0  # the reference's value until 2/3 of training (the cost is the same for any beta)
    self.teacher_mixed.update_params(self.teacher_at.model, self.teacher_st.model, beta=beta)
    self.teacher_mixed.apply_shadow()
    if args.redistribute:
      self.model_at.load_state_dict(self.teacher_mixed.shadow)
      self.model_st.load_state_dict(self.teacher_mixed.shadow)
    if args.reference_monitoring:
      with torch.no_grad():
        self.teacher_st.model(x).argmax(1).eq(y).float().mean().item()
        self.teacher_at.model(x).argmax(1).eq(y).float().mean().item()
    return loss_at.item() + loss_st.item()


class AttackWorkload:
  """pgd20 / apgd_ce / autoattack: the whole attack over N images in batches, labels = the
  model's own predictions; `run()` attacks all N images once."""

  def __init__(self, args: argparse.Namespace, what: str):
    torch.manual_seed(args.seed)
    self.args, self.what = args, what
    self.generator = torch.Generator().manual_seed(args.seed)
    self.model = build_model(args).eval()
    if args.channels_last:
      self.model = self.model.to(memory_format=torch.channels_last)
    # bench.py's images (NumPy, seed + 1; or the --weights file's), NHWC -> NCHW.
    s, n = args.image_size, args.n or args.batch
    if args.weights:
      _, images, labels = plaincnn_file(args.weights)
      x = images[:n] / np.float32(255.0)
    else:
      rng = np.random.default_rng(args.seed + 1)
      x = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8) / np.float32(255.0)
    x = torch.from_numpy(np.ascontiguousarray(x.astype(np.float32).transpose(0, 3, 1, 2)))
    if args.channels_last:
      x = x.contiguous(memory_format=torch.channels_last)
    self.x = x
    self.y = torch.from_numpy(labels[:n]) if args.weights else self._predict(x)
    self.x_adv = x
    self.attack = self._make_attack()

  def _predict(self, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
      return torch.cat([self.model(xb).argmax(1) for xb in x.split(self.args.batch)])

  def _make_attack(self):
    args, model = self.args, self.model
    steps = attack_steps(args, self.what)
    if self.what == "pgd20" and args.pgd_impl == "loop":
      return lambda x, y: pgd(model, x, y, steps, "input", self.generator)
    import torchattacks  # pylint: disable=g-import-not-at-top
    if self.what == "pgd20":
      return torchattacks.PGD(model, eps=EPS, alpha=STEP_SIZE, steps=steps, random_start=True)
    if self.what == "apgd_ce":
      return torchattacks.APGD(model,
                               norm="Linf",
                               eps=EPS,
                               steps=steps,
                               n_restarts=1,
                               seed=args.seed,
                               loss="ce",
                               rho=0.75)
    attack = torchattacks.AutoAttack(model,
                                     norm="Linf",
                                     eps=EPS,
                                     version="standard",
                                     n_classes=args.num_classes,
                                     seed=args.seed)
    # torchattacks builds the standard stages with 10 iterations; the reference (and gen_jax)
    # run APGD-CE, APGD-T and FAB-T with 100. Square's 5,000 queries are the same already.
    for stage in attack._autoattack.attacks:  # pylint: disable=protected-access
      if hasattr(stage, "steps"):
        stage.steps = args.aa_steps
    return attack

  def run(self) -> float:
    b = self.args.batch
    self.x_adv = torch.cat(
        [self.attack(xb, yb).detach() for xb, yb in zip(self.x.split(b), self.y.split(b))])
    return float(self.x_adv.sum())

  def robust_count(self) -> int:
    return int((self._predict(self.x_adv) == self.y).sum())


def attack_steps(args: argparse.Namespace, what: str) -> int | None:
  """PGD iterations of a workload, as bench.py counts them (its `pgd_steps` field)."""
  defaults = {"pgd20": 20, "apgd_ce": 100, "robust_step": 10, "generalist_step": 10}
  return (args.pgd_steps or defaults[what]) if what in defaults else None


def bench(args: argparse.Namespace, what: str) -> dict:
  attack = what in ATTACK_WHATS
  work = AttackWorkload(args, what) if attack else Workload(args, what)
  for _ in range(max(1, args.warmup)):
    work.run()
  wall, cpu = [], []
  for _ in range(args.repeats):
    c0, t0 = time.process_time(), time.perf_counter()
    work.run()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  median = statistics.median(wall)
  images = (args.n or args.batch) if attack else args.batch
  record = {
      "what": what,
      "framework": "torch",
      "model": args.model,
      "batch": args.batch,
      "backend": "cpu",
      "devices": 1,
      "device_kind": "cpu",
      "dtype": "float32",
      "conv_impl": "torch",
      "pgd_steps": attack_steps(args, what),
      "repeats": args.repeats,
      "torch_version": torch.__version__,
      "torch_threads": torch.get_num_threads(),
      "pgd_grad": args.pgd_grad if what in ("robust_step", "generalist_step") else "input",
      "channels_last": args.channels_last,
      "load_average_1min": os.getloadavg()[0],
      "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if attack:
    record.update(n=images,
                  labels="file" if args.weights else "predictions",
                  weights=os.path.basename(args.weights) if args.weights else None,
                  eps=EPS,
                  robust_count=work.robust_count())
    record["robust_accuracy"] = record["robust_count"] / images
    if what == "pgd20":
      record["pgd_impl"] = args.pgd_impl
    if what == "autoattack":
      record["aa_steps"] = args.aa_steps
    if what != "pgd20" or args.pgd_impl == "torchattacks":
      import torchattacks  # pylint: disable=g-import-not-at-top
      record["torchattacks_version"] = torchattacks.__version__
  record.update({
      "seconds_per_step": median,
      "seconds_all": [round(s, 4) for s in wall],
      "cpu_seconds_per_step": statistics.median(cpu),
      "compile_seconds": None,
      "images_per_second": images / median,
      "peak_memory_bytes": None,
      "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  })
  return record


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  p.add_argument("--what", default="generalist_step", help=f"comma-separated subset of {WHATS}")
  p.add_argument("--model", default="resnet18", choices=tuple(MODELS))
  p.add_argument("--batch-size", dest="batch", type=int, default=128, metavar="N")
  p.add_argument("--batch",
                 dest="batch",
                 type=int,
                 default=argparse.SUPPRESS,
                 help=argparse.SUPPRESS)  # the old spelling, still accepted
  p.add_argument("--pgd-steps",
                 type=int,
                 default=None,
                 help="PGD iterations (default: 10 inside training steps, 20 for pgd20, 100 for "
                 "apgd_ce)")
  p.add_argument("--n",
                 type=int,
                 default=None,
                 metavar="N",
                 help="attack targets: attack N images in batches of --batch-size (default: one "
                 "batch)")
  p.add_argument("--pgd-impl",
                 choices=("loop", "torchattacks"),
                 default="loop",
                 help="pgd20: a plain PyTorch loop or torchattacks.PGD")
  p.add_argument("--aa-steps",
                 type=int,
                 default=100,
                 help="autoattack: iterations of APGD-CE, APGD-T and FAB-T (100: the reference's; "
                 "10: torchattacks' own)")
  p.add_argument("--repeats",
                 type=int,
                 default=5,
                 metavar="N",
                 help="timed repetitions (median reported)")
  p.add_argument("--steps",
                 dest="repeats",
                 type=int,
                 default=argparse.SUPPRESS,
                 metavar="N",
                 help="deprecated alias of --repeats (elsewhere --steps means PGD steps)")
  p.add_argument("--warmup",
                 type=int,
                 default=1,
                 help="untimed repetitions before the timed ones (at least 1 is run)")
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--pgd-grad", choices=("reference", "input"), default="reference")
  p.add_argument("--channels-last", action="store_true")
  p.add_argument("--redistribute", action="store_true")
  p.add_argument("--reference-monitoring", action="store_true")
  p.add_argument("--out", default=None, help="also append the JSON lines to this file")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--weights",
                 default=None,
                 metavar="NPZ",
                 help="plaincnn: a trained network, its test images and labels (bench_fixture.py)")
  args = p.parse_args(argv)
  whats = [w.strip() for w in args.what.split(",") if w.strip()]
  if not whats or any(w not in WHATS for w in whats):
    p.error(f"--what must be a comma-separated subset of {WHATS}; got {args.what!r}")
  for name, flag in (("batch", "--batch-size"), ("repeats", "--repeats"), ("aa_steps",
                                                                           "--aa-steps")):
    if getattr(args, name) < 1:
      p.error(f"{flag} must be >= 1; got {getattr(args, name)}")
  if args.n is not None and args.n < 1:
    p.error(f"--n must be >= 1; got {args.n}")
  if args.model in USER_MODELS and any(w not in ATTACK_WHATS for w in whats):
    p.error(f"--model {args.model} (bench.py's user network) is for the attack targets "
            f"{','.join(ATTACK_WHATS)}; got --what {args.what}")
  torch.set_num_threads(args.threads)
  for what in whats:
    line = json.dumps(bench(args, what))
    print(line, flush=True)
    if args.out:
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
