"""Shared pieces of every attack: input checks, projections, random starts, losses, batching.

Everything here is a pure function of arrays (no state, explicit PRNG keys) and is traceable, so
the attacks built on it run inside `jax.jit`. Losses are per example and "higher = more
adversarial"; projections map onto the eps-ball around the clean point AND the [0, 1] box.

Synopsis::

    from gen_jax.attacks import core
    num_classes = core.validate_attack_inputs(logits_fn, x, y, eps=eps, steps=10, norm="linf")
    x_adv = core.project(x + delta, x, eps, "linf")       # eps-ball and [0, 1] box
    x0 = core.random_start(key, x, eps, "l2")             # random point in the ball
    loss = core.dlr_loss(logits_fn(x_adv), y)             # [B], higher = more adversarial
    x_adv = core.attack_in_batches(attack_fn, x, y, key=key, batch_size=500)

References:
  Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018,
  https://arxiv.org/abs/1706.06083
  Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", S&P 2017,
  https://arxiv.org/abs/1608.04644
  Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690
"""
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gen_jax.data.batching import map_batches

NORMS = ("linf", "l2")

# Floor of the L2 norm in divisions (the reference AutoAttack uses 1e-12 as well).
_TINY = 1e-12


def is_concrete(value: Any) -> bool:
  """Whether `value` is a concrete value (not a tracer), i.e. whether it may be inspected."""
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(value))


def as_pytree_fn(logits_fn: Callable[..., jax.Array]) -> jax.tree_util.Partial:
  """Wraps `logits_fn` so that it can be passed to `jax.jit` as an ordinary argument.

  A `jax.tree_util.Partial(apply_fn, variables)` keeps its variables as jit arguments, so changing
  the variables does not recompile and they are not baked into the program as constants; any other
  callable becomes a `Partial` without arguments (compiled once per function object).

  Args:
    logits_fn: a callable, or a `jax.tree_util.Partial`.

  Returns:
    A `jax.tree_util.Partial` that computes what `logits_fn` computes.

  Raises:
    TypeError: if `logits_fn` is not callable.
  """
  if isinstance(logits_fn, jax.tree_util.Partial):
    return logits_fn
  if not callable(logits_fn):
    raise TypeError(f"logits_fn must be callable (x -> logits [B, C]), got {type(logits_fn)!r}.")
  return jax.tree_util.Partial(logits_fn)


def check_norm(norm: str) -> None:
  """Raises ValueError unless `norm` is one of NORMS."""
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")


def check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
  """Raises TypeError/ValueError unless `value` is a Python int >= `minimum`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be a Python int (it is static), got {type(value).__name__}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def check_eps(name: str, eps: Any) -> None:
  """Raises ValueError if a concrete `eps` (or step size) is negative or not finite."""
  if eps is None:
    raise ValueError(f"{name} is required (a non-negative radius, e.g. 8 / 255).")
  if not is_concrete(eps):
    return
  eps_np = np.asarray(eps)
  if not np.issubdtype(eps_np.dtype, np.number) or eps_np.ndim > 1:
    raise TypeError(f"{name} must be a scalar or a [B] vector of numbers, got {eps!r}.")
  if not np.all(np.isfinite(eps_np)) or np.any(eps_np < 0):
    raise ValueError(f"{name} must be finite and >= 0, got {eps!r}.")


def validate_attack_inputs(logits_fn: Callable[[jax.Array], jax.Array],
                           x: jax.Array,
                           y: jax.Array,
                           *,
                           eps: Any = None,
                           steps: Optional[int] = None,
                           norm: Optional[str] = None,
                           min_classes: int = 2) -> int:
  """Checks the inputs of an attack before any expensive work; returns the number of classes.

  Shapes, dtypes, `steps` and `norm` are always checked; the values of `x`, `y` and `eps` only when
  they are concrete (not under a trace), so that attacks stay usable inside `jax.jit`.

  Args:
    logits_fn: `x -> logits [B, C]`.
    x: images [B, H, W, C] with float values in [0, 1].
    y: integer labels [B] in [0, num_classes).
    eps: radius of the ball (checked to be finite and >= 0 when concrete); None skips the check.
    steps: number of iterations (>= 1); None skips the check.
    norm: "linf" or "l2"; None skips the check.
    min_classes: the number of classes the attack's loss needs (DLR needs 3, targeted DLR 4).

  Returns:
    The number of classes C of `logits_fn`'s output.

  Raises:
    TypeError: non-callable `logits_fn`, non-float `x`, non-integer `y`, non-int `steps`.
    ValueError: a wrong rank or shape, values of `x` outside [0, 1], labels out of range, negative
      `eps`, `steps` < 1, an unknown `norm`, too few classes for the loss.
  """
  if not callable(logits_fn):
    raise TypeError(f"logits_fn must be callable (x -> logits [B, C]), got {type(logits_fn)!r}.")
  if norm is not None:
    check_norm(norm)
  if steps is not None:
    check_positive_int("steps", steps)
  x_shape, x_dtype = jnp.shape(x), jnp.result_type(x)
  y_shape, y_dtype = jnp.shape(y), jnp.result_type(y)
  if len(x_shape) != 4:
    raise ValueError(f"x must have rank 4 (NHWC images [B, H, W, C]), got shape {x_shape}; add "
                     "a batch or channel axis.")
  if not jnp.issubdtype(x_dtype, jnp.floating):
    raise TypeError(f"x must be a float array with values in [0, 1], got dtype {x_dtype}; "
                    "convert uint8 images with x.astype(jnp.float32) / 255.")
  if not jnp.issubdtype(y_dtype, jnp.integer):
    raise TypeError(f"y must hold integer class labels, got dtype {y_dtype}.")
  if y_shape != x_shape[:1]:
    raise ValueError(f"y must have shape [B] = {x_shape[:1]} to match x, got {y_shape}.")
  if eps is not None:
    check_eps("eps", eps)
    if is_concrete(eps) and np.ndim(eps) == 1 and np.shape(eps) != x_shape[:1]:
      raise ValueError(f"a vector eps must have shape [B] = {x_shape[:1]}, got {np.shape(eps)}.")
  out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x_shape, x_dtype))
  if not isinstance(out, jax.ShapeDtypeStruct) or len(out.shape) != 2 or out.shape[0] != x_shape[0]:
    got = getattr(out, "shape", type(out).__name__)
    raise ValueError(f"logits_fn must return logits of shape [B, C] = [{x_shape[0]}, C], got "
                     f"{got}; make it return the logits of the batch (no softmax, no dict).")
  num_classes = int(out.shape[1])
  if num_classes < min_classes:
    raise ValueError(f"this attack's loss needs at least {min_classes} classes, logits_fn returns "
                     f"{num_classes}; use the 'ce' loss (or another attack) for fewer classes.")
  if is_concrete(x) and x_shape[0] > 0:
    x_np = np.asarray(x)
    lo, hi = float(np.min(x_np)), float(np.max(x_np))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
      raise ValueError(f"x must hold images in [0, 1], got values in [{lo}, {hi}]; rescale "
                       "(uint8 / 255) and move any normalisation inside logits_fn.")
  if is_concrete(y) and y_shape[0] > 0:
    y_np = np.asarray(y)
    if int(y_np.min()) < 0 or int(y_np.max()) >= num_classes:
      raise ValueError(f"labels y must lie in [0, {num_classes}), got values in "
                       f"[{int(y_np.min())}, {int(y_np.max())}].")
  return num_classes


def _per_example(value: Any, x: jax.Array) -> jax.Array:
  """Broadcasts a scalar or a [B] vector against a batch `x` of rank 4."""
  value = jnp.asarray(value, dtype=x.dtype)
  if value.ndim == 1:
    value = value.reshape((-1,) + (1,) * (x.ndim - 1))
  return value


def lp_norm(d: jax.Array, norm: str) -> jax.Array:
  """Per-example norm of a batch `d` [B, ...]: max |d| ("linf") or sqrt(sum d^2) ("l2")."""
  check_norm(norm)
  flat = d.reshape((d.shape[0], -1))
  if norm == "linf":
    return jnp.max(jnp.abs(flat), axis=1)
  return jnp.sqrt(jnp.sum(flat * flat, axis=1))


def normalize(d: jax.Array, norm: str) -> jax.Array:
  """Scales each example of `d` to unit `norm` (zero stays zero), as the reference AutoAttack."""
  return d / (_per_example(lp_norm(d, norm), d) + _TINY)


def project_linf(x_adv: jax.Array, x: jax.Array, eps: Any) -> jax.Array:
  """Projects `x_adv` onto {|x_adv - x|_inf <= eps} intersected with the [0, 1] box.

  The two sets are boxes, so clipping to one and then the other is the exact projection.
  """
  eps = _per_example(eps, x)
  return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def project_l2(x_adv: jax.Array, x: jax.Array, eps: Any) -> jax.Array:
  """Projects `x_adv` onto the L2 ball of radius `eps` around `x`, then clips to [0, 1].

  Clipping after the ball projection moves every coordinate towards `x` (which lies in the box),
  so the result stays inside the ball (the reference AutoAttack does the same).
  """
  eps = _per_example(eps, x)
  d = x_adv - x
  n = _per_example(lp_norm(d, "l2"), x)
  # Only shrink: points already inside the ball are left where they are.
  d = d * jnp.minimum(1.0, eps / (n + _TINY))
  return jnp.clip(x + d, 0.0, 1.0)


def project(x_adv: jax.Array, x: jax.Array, eps: Any, norm: str) -> jax.Array:
  """Projects `x_adv` onto the `norm` ball of radius `eps` around `x` and onto the [0, 1] box."""
  check_norm(norm)
  if norm == "linf":
    return project_linf(x_adv, x, eps)
  return project_l2(x_adv, x, eps)


def is_key_batch(key: jax.Array) -> bool:
  """Whether `key` holds one PRNG key per example, not one key: a [B] array of typed keys
  (`jax.random.key`), or [B, 2] of raw uint32 keys (`jax.random.PRNGKey`, whose one key is [2])."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 1
  return jnp.ndim(key) == 2


def split_keys(key: jax.Array, num: int) -> jax.Array:
  """`num` keys from `key`: [num] for one key, [num, B] for a [B] batch of per-example keys.

  Each example's keys are split from its own key only, so the runs of an example (restarts) do
  not depend on the batch it is in.
  """
  if is_key_batch(key):
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, num))(key), 0, 1)
  return jax.random.split(key, num)


def noise(key: jax.Array, x: jax.Array, distribution: str) -> jax.Array:
  """Standard "uniform" (in [-1, 1]) or "normal" noise of the shape and dtype of `x` [B, ...].

  With one key, the batch's noise is one draw of the whole shape (the attacks' historic
  behaviour). With a [B] batch of keys, example i's noise is drawn from its key i alone: the same
  whatever the batch size, the padding or the other examples, which is what makes a per-example
  figure reproducible across programs (`gen_jax.evaluation.engine`).
  """
  draw = {
      "uniform": lambda k, shape: jax.random.uniform(k, shape, x.dtype, -1.0, 1.0),
      "normal": lambda k, shape: jax.random.normal(k, shape, x.dtype)
  }[distribution]
  if is_key_batch(key):
    return jax.vmap(lambda k: draw(k, x.shape[1:]))(key)
  return draw(key, x.shape)


def random_start(key: jax.Array, x: jax.Array, eps: Any, norm: str) -> jax.Array:
  """Random starting point in the ball around `x`, clipped to the box.

  L-inf: x + U(-eps, eps) per pixel (Madry et al.). L2: x + eps * g / ||g||_2 with g standard
  normal, i.e. a uniformly random direction at radius eps (as the reference AutoAttack).

  Args:
    key: PRNG key, or one key per example ([B]; each example's start then depends on its own
      key only: see `noise`).
    x: clean images [B, H, W, C] in [0, 1].
    eps: radius (scalar or [B]).
    norm: "linf" or "l2".

  Returns:
    The starting images, same shape and dtype as `x`.
  """
  check_norm(norm)
  eps = _per_example(eps, x)
  if norm == "linf":
    return jnp.clip(x + eps * noise(key, x, "uniform"), 0.0, 1.0)
  return jnp.clip(x + eps * normalize(noise(key, x, "normal"), "l2"), 0.0, 1.0)


def ce_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example cross-entropy, logsumexp(z) - z_y."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  return jax.nn.logsumexp(logits, axis=1) - z_y


def _max_other(logits: jax.Array, y: jax.Array) -> jax.Array:
  """max_{i != y} z_i per example."""
  mask = jax.nn.one_hot(y, logits.shape[1], dtype=bool)
  return jnp.max(jnp.where(mask, -jnp.inf, logits), axis=1)


def margin_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example CW margin max_{i != y} z_i - z_y (positive iff misclassified).

  References:
    Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", S&P 2017.
  """
  z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  return _max_other(logits, y) - z_y


def dlr_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example Difference of Logits Ratio, -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3 + 1e-12).

  `pi` sorts the logits in decreasing order. Needs at least 3 classes.

  References:
    Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690 (eq. 5).
  """
  z_sorted = jnp.sort(logits, axis=1)
  z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  return -(z_y - _max_other(logits, y)) / (z_sorted[:, -1] - z_sorted[:, -3] + _TINY)


def dlr_targeted_loss(logits: jax.Array, y: jax.Array, target: jax.Array) -> jax.Array:
  """Per-example targeted DLR, -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12).

  Needs at least 4 classes.

  References:
    Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690 (eq. 6).
  """
  z_sorted = jnp.sort(logits, axis=1)
  z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  z_t = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
  return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + _TINY)


def kl_loss(logits: jax.Array, clean_logits: jax.Array) -> jax.Array:
  """Per-example KL(p_clean || p), with p = softmax(logits), in float32.

  PyTorch's `KLDivLoss(log_softmax(adv), softmax(clean))` summed over classes: the TRADES attack
  maximises it, and the TRADES objective adds beta times its mean to the clean cross-entropy.

  References:
    Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019.
  """
  log_p_clean = jax.nn.log_softmax(clean_logits.astype(jnp.float32))
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  return jnp.sum(jnp.exp(log_p_clean) * (log_p_clean - log_p), axis=-1)


# Per-example losses the PGD engine ascends: (logits, target) -> [B]. The target is the label for
# "ce", "cw" and "dlr", and the clean logits for "kl" (TRADES).
LOSSES = {"ce": ce_loss, "cw": margin_loss, "dlr": dlr_loss, "kl": kl_loss}


def get_loss_fn(loss: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The per-example loss named `loss` ("ce", "cw", "dlr" or "kl").

  Raises:
    ValueError: for any other name.
  """
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {loss!r}.")
  return LOSSES[loss]


def attack_in_batches(attack_fn: Callable[..., jax.Array], x: Any, y: Any, *, key: jax.Array,
                      batch_size: int) -> np.ndarray:
  """Runs `attack_fn(x_b, y_b, key=key_b)` over batches of a large input; returns a host array.

  Batches follow `gen_jax.data.batching.map_batches`: the last one is padded to `batch_size`, so
  a jitted `attack_fn` compiles once (N <= `batch_size` examples form one batch of size N);
  batch `i` uses `jax.random.fold_in(key, i)`.

  Args:
    attack_fn: `(x, y, *, key) -> x_adv`, e.g. `functools.partial(pgd, logits_fn, eps=..., ...)`.
    x: images [N, H, W, C] (host or device array).
    y: labels [N].
    key: PRNG key.
    batch_size: examples per call.

  Returns:
    The adversarial images [N, H, W, C] as a numpy array of the dtype of `x`.

  Raises:
    ValueError: if `batch_size` < 1 or `x` and `y` disagree on N.
  """
  check_positive_int("batch_size", batch_size)
  n = np.shape(y)[0]
  return map_batches(lambda xb, yb, k: attack_fn(xb, yb, key=k), (x, y),
                     batch_size=max(1, min(batch_size, n)),
                     key=key)
