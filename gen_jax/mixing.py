"""Weight mixing: the pytree arithmetic at the heart of Generalist.

Owns `mix` (two experts), `mix_many` (N experts), the EMA update with the reference code's warm-up,
the reference β schedule and its N-expert form, `weight_schedule`. Everything works on any pytree
of floating arrays: parameters, BatchNorm statistics or whole linen variable dicts
`{"params": ..., "batch_stats": ...}` (the PyTorch reference averages buffers exactly like
weights).

Synopsis::

    global_vars = mix(vars_nat, vars_rob, beta=0.6)          # 0.6 * rob + 0.4 * nat
    avg = mix_many([v1, v2, v3], [0.2, 0.3, 0.5])
    teacher = ema_update(teacher, student, ema_decay(step))  # decay warms up from 0.1 to 0.999
    w = weight_schedule(epoch, 120, start=[0, .5, .5], final=[.6, .2, .2])  # [..., 3], rows sum 1

Weights may be traced scalars (a schedule inside `jit` never recompiles); concrete weights are
checked eagerly, before any arithmetic, and so are the tree structures, shapes and dtypes. A
traced weight cannot be checked (its value is unknown while tracing) and is not clipped: the
caller keeps it in [0, 1], as the schedules of `gen_jax.training.schedules` do. The trees must
agree leaf by leaf in dtype (float16 against float32 is refused, not silently promoted); Python
floats are accepted as leaves, as arrays of JAX's default float dtype.

References:
  Wang & Wang, "Generalist: Decoupling Natural and Robust Generalization", CVPR 2023.
  Wortsman et al., "Model soups", ICML 2022 (weight averaging of fine-tuned models).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

_WEIGHT_TOLERANCE = 1e-6


def _path_str(path) -> str:
  """Renders a pytree key path as `params/Conv_0/kernel` (`<root>` for a bare leaf)."""
  return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def _leaves_by_path(tree: PyTree, name: str) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  if not flat:
    raise ValueError(f"{name} is an empty pytree: there is nothing to mix.")
  return {_path_str(path): leaf for path, leaf in flat}


def _dtype(leaf: Any) -> Any:
  """A leaf's dtype; a Python scalar's is the one `jnp.asarray` gives it (float32 unless x64)."""
  return leaf.dtype if hasattr(leaf, "dtype") else jnp.asarray(leaf).dtype


def _check_compatible(trees: Sequence[PyTree], names: Sequence[str]) -> None:
  """Raises ValueError naming the first leaf whose structure, shape or dtype differs."""
  reference = _leaves_by_path(trees[0], names[0])
  for path, leaf in reference.items():
    dtype = _dtype(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"leaf {path} of {names[0]} has dtype {dtype}; only floating-point leaves can be "
          "interpolated. Mix parameter and BatchNorm-statistic trees only (drop integer "
          "counters such as optimizer steps before mixing).")
  ref_def = jax.tree_util.tree_structure(trees[0])
  for tree, name in zip(trees[1:], names[1:]):
    other = _leaves_by_path(tree, name)
    if jax.tree_util.tree_structure(tree) != ref_def or other.keys() != reference.keys():
      missing = [p for p in reference if p not in other]
      extra = [p for p in other if p not in reference]
      first = (f"leaf {missing[0]} is in {names[0]} but not in {name}"
               if missing else f"leaf {extra[0]} is in {name} but not in {names[0]}"
               if extra else "the containers differ in type or order")
      raise ValueError(f"{names[0]} and {name} have different tree structures: {first}. "
                       "Mix only trees of the same model (same architecture and collections).")
    for path, leaf in reference.items():
      if np.shape(leaf) != np.shape(other[path]):
        raise ValueError(f"leaf {path} has shape {np.shape(leaf)} in {names[0]} but "
                         f"{np.shape(other[path])} in {name}: the models differ in architecture.")
      if _dtype(leaf) != _dtype(other[path]):
        raise ValueError(f"leaf {path} has dtype {_dtype(leaf)} in {names[0]} but "
                         f"{_dtype(other[path])} in {name}: mix trees of one dtype (cast one "
                         "first, e.g. jax.tree.map(lambda x: x.astype(jnp.float32), tree)).")


def _is_concrete(value: Any) -> bool:
  return not isinstance(value, jax.core.Tracer)


def _check_weight(value: Any, name: str) -> None:
  if _is_concrete(value):
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 0:
      raise ValueError(f"{name} must be a scalar, got shape {array.shape}.")
    if not (-_WEIGHT_TOLERANCE <= float(array) <= 1 + _WEIGHT_TOLERANCE):
      raise ValueError(f"{name} must lie in [0, 1], got {float(array)}.")


def mix(params_nat: PyTree, params_rob: PyTree, beta: float | jax.Array = 0.5) -> PyTree:
  """Interpolates two experts: `beta * rob + (1 - beta) * nat`, leaf by leaf.

  `beta` weights the robust side, as in the reference code (`beta = 1` returns the robust
  expert). It may be a traced scalar, so a β schedule inside `jit` compiles once; a traced β is
  not checked (nor clipped), so the caller must keep it in [0, 1]. A concrete β (a Python float
  or a concrete array) outside [0, 1] raises. Each leaf keeps its dtype (β is cast to it; both
  trees must have the same dtype leaf by leaf) and its sharding (the arithmetic is element-wise).
  Python floats are accepted as leaves (they become arrays of JAX's default float dtype).

  >>> import jax.numpy as jnp
  >>> nat = {"w": jnp.array([0.0, 2.0])}
  >>> rob = {"w": jnp.array([1.0, 4.0])}
  >>> mix(nat, rob, beta=0.25)["w"]
  Array([0.25, 2.5 ], dtype=float32)

  Args:
    params_nat: pytree of floating arrays of the natural expert.
    params_rob: pytree of the same structure, shapes and dtypes, of the robust expert.
    beta: weight of the robust expert, in [0, 1] (checked when concrete).

  Returns:
    The interpolated pytree, of the structure of `params_nat`.

  Raises:
    ValueError: tree structures, shapes or dtypes differ (the message names the first differing
      leaf, e.g. `params/Conv_0/kernel`), a leaf is not floating point, or a concrete `beta` is
      outside [0, 1].

  References:
    Wang & Wang, "Generalist: Decoupling Natural and Robust Generalization", CVPR 2023.
  """
  _check_compatible([params_nat, params_rob], ["params_nat", "params_rob"])
  _check_weight(beta, "beta")

  def interpolate(nat, rob):
    nat, rob = jnp.asarray(nat), jnp.asarray(rob)
    b = jnp.asarray(beta, dtype=nat.dtype)
    return (1 - b) * nat + b * rob

  return jax.tree_util.tree_map(interpolate, params_nat, params_rob)


def mix_many(trees: Sequence[PyTree], weights: Sequence[float] | jax.Array) -> PyTree:
  """Weighted average `sum_i weights[i] * trees[i]` of N experts (Generalist++).

  >>> import jax.numpy as jnp
  >>> trees = [{"w": jnp.array(0.0)}, {"w": jnp.array(1.0)}, {"w": jnp.array(2.0)}]
  >>> mix_many(trees, [0.5, 0.25, 0.25])["w"]
  Array(0.75, dtype=float32)

  Args:
    trees: a non-empty sequence of pytrees of the same structure and shapes.
    weights: one weight per tree, each in [0, 1], summing to 1 (may be a traced array).

  Returns:
    The averaged pytree, of the structure of `trees[0]`.

  Raises:
    ValueError: no trees, a weight count that differs from the tree count, a weight outside
      [0, 1], weights that do not sum to 1, or incompatible trees (as in `mix`).
  """
  trees = list(trees)
  if not trees:
    raise ValueError("mix_many needs at least one tree.")
  weight_shape = np.shape(weights)
  if weight_shape != (len(trees),):
    raise ValueError(f"mix_many got {len(trees)} trees but weights of shape {weight_shape}: "
                     "give exactly one weight per tree.")
  _check_compatible(trees, [f"trees[{i}]" for i in range(len(trees))])
  if _is_concrete(weights):
    w = np.asarray(weights, dtype=np.float64)
    for i, wi in enumerate(w):
      _check_weight(wi, f"weights[{i}]")
    if abs(w.sum() - 1.0) > 1e-5:
      raise ValueError(f"weights must sum to 1, got {w.sum():.6g} (weights={w.tolist()}).")
  weights = jnp.asarray(weights)

  def average(*leaves):
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    dtype = leaves[0].dtype
    total = weights[0].astype(dtype) * leaves[0]
    for i, leaf in enumerate(leaves[1:], start=1):
      total = total + weights[i].astype(dtype) * leaf
    return total

  return jax.tree_util.tree_map(average, *trees)


def ema_decay(step: int | jax.Array, decay: float | jax.Array = 0.999) -> jax.Array:
  """The reference code's warmed-up EMA decay `min(decay, (step + 1) / (step + 10))`.

  `step` counts the EMA updates already made (0 for the first update), as the reference `EMA`
  class does, so the first update keeps only 10 % of the old average. A concrete negative `step`
  raises (the formula would give a negative decay: -0.8 at step -5); a traced one is not checked.

  >>> float(ema_decay(0))
  0.10000000149011612

  Raises:
    ValueError: a concrete `step` below 0.
  """
  # A concrete step is checked on the host (not one spread over other processes' devices).
  if _is_concrete(step) and getattr(step, "is_fully_addressable",
                                    True) and np.any(np.asarray(step) < 0):
    raise ValueError(f"ema_decay: step counts the EMA updates made so far and must be >= 0, got "
                     f"{np.asarray(step).tolist()}.")
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.asarray(decay, jnp.float32), (step + 1.0) / (step + 10.0))


def ema_update(average: PyTree, new: PyTree, decay: float | jax.Array) -> PyTree:
  """One exponential-moving-average step: `decay * average + (1 - decay) * new`.

  Equal to `mix(new, average, beta=decay)`; written out for readability of training code.

  >>> import jax.numpy as jnp
  >>> ema_update({"w": jnp.array(1.0)}, {"w": jnp.array(3.0)}, 0.75)["w"]
  Array(1.5, dtype=float32)

  Raises:
    ValueError: as `mix`, with `decay` in place of `beta`.
  """
  _check_compatible([average, new], ["average", "new"])
  _check_weight(decay, "decay")

  def step(avg, value):
    avg, value = jnp.asarray(avg), jnp.asarray(value)
    d = jnp.asarray(decay, dtype=avg.dtype)
    return d * avg + (1 - d) * value

  return jax.tree_util.tree_map(step, average, new)


def schedule_knot(fraction: float, epochs: int) -> float:
  """The epoch at `fraction` of a run of `epochs`, rounded down as the reference's `E // 3`.

  The reference code places its schedule knots at integer epochs (`E // 3`, `2 * E // 3`); the
  tiny offset keeps fractions such as 2/3 from rounding below an exact integer.

  >>> schedule_knot(2 / 3, 120), schedule_knot(2 / 3, 20)
  (80.0, 13.0)
  """
  return float(math.floor(fraction * epochs + 1e-9))


def beta_schedule(epoch: int | jax.Array,
                  epochs: int,
                  *,
                  final_beta: float = 0.4,
                  start_fraction: float = 2 / 3) -> jax.Array:
  """The reference β schedule: robust weight 1 until `start_fraction` of training, then linear.

  The reference evaluates `np.interp(epoch, [0, E//3, 2E//3, E], [1, 1, 1, 0.4])` once per
  epoch with the 1-indexed epoch number, so with E = 120 epochs β = 1 up to epoch 80 and reaches
  0.4 in epoch 120. The training loop builds its per-step β table from this function.

  >>> round(float(beta_schedule(100, 120)), 4)
  0.7

  Args:
    epoch: 1-indexed epoch (scalar or array; may be traced).
    epochs: total number of epochs E.
    final_beta: β at the end of training (0.4: 60 % natural expert).
    start_fraction: fraction of training after which β starts to fall (knot at
      `schedule_knot(start_fraction, epochs)`).
  """
  start = schedule_knot(start_fraction, epochs)
  epoch = jnp.asarray(epoch, jnp.float32)
  return jnp.interp(epoch, jnp.array([0.0, start, float(epochs)]), jnp.array([1.0, 1.0,
                                                                              final_beta]))


def weight_schedule(epoch: int | jax.Array,
                    epochs: int,
                    *,
                    start: Sequence[float],
                    final: Sequence[float],
                    start_fraction: float = 2 / 3) -> jax.Array:
  """The N-expert form of `beta_schedule`: each expert's weight in the global model's target.

  The weights hold at `start` until `start_fraction` of training, then move linearly to `final`
  (evaluated like `beta_schedule`, once per 1-indexed epoch). Expert 0 takes the complement of
  the others, so every row sums to 1 up to one rounding; with two experts, start (0, 1) and final
  (1 - b, b), column 1 equals `beta_schedule(epoch, epochs, final_beta=b)` bit for bit and
  column 0 is `1 - β`, the natural weight of `mix`.

  >>> w = weight_schedule(100, 120, start=[0.0, 0.5, 0.5], final=[0.6, 0.2, 0.2])
  >>> [round(float(v), 4) for v in w]
  [0.3, 0.35, 0.35]

  Args:
    epoch: 1-indexed epoch (scalar or array; may be traced).
    epochs: total number of epochs E.
    start: the N weights until the knot (each in [0, 1], summing to 1).
    final: the N weights at the end of training (each in [0, 1], summing to 1).
    start_fraction: fraction of training after which the weights move (`schedule_knot`).

  Returns:
    float32 weights of shape `epoch.shape + (N,)`.

  Raises:
    ValueError: `start` and `final` differ in length, are empty, or do not each sum to 1.
  """
  if len(start) != len(final) or not len(final):
    raise ValueError(f"weight_schedule needs start and final weights of one length >= 1, got "
                     f"{len(start)} and {len(final)}.")
  for name, weights in (("start", start), ("final", final)):
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < -_WEIGHT_TOLERANCE) or np.any(w > 1 + _WEIGHT_TOLERANCE) or abs(w.sum() -
                                                                                  1) > 1e-5:
      raise ValueError(f"{name} weights must lie in [0, 1] and sum to 1, got {list(weights)}.")
  knot = schedule_knot(start_fraction, epochs)
  epoch = jnp.asarray(epoch, jnp.float32)
  # The same interpolation as beta_schedule, column by column (bit-identical for two experts).
  others = [
      jnp.interp(epoch, jnp.array([0.0, knot, float(epochs)]), jnp.array([a, a, b]))
      for a, b in zip(start[1:], final[1:])
  ]
  first = jnp.float32(1.0) - sum(others, jnp.zeros_like(epoch))
  return jnp.stack([jnp.clip(first, 0.0, 1.0)] + others, axis=-1)
