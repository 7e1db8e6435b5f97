"""The models an evaluation looks at: one network and several sets of its variables, by name.

Every analysis of `gen_jax.evaluation` (the attack table, sanity checks, boundary, corruptions,
the mixing sweep) takes a `ModelSet` as its first argument, so the report can run them all with
one loop and a user can hand any of them the same object.

A user's own network gets gen_jax's fast CPU convolutions and max pooling
(`gen_jax.ops.intercept.fast_cpu_ops`: same values and gradients, XLA's slow CPU gradient paths
avoided) in every analysis; `fast_ops=False` applies it with the stock flax layers. gen_jax's own
models are left as built: their `conv_impl` already says which convolution they use.

Synopsis::

    models = ModelSet(model, {"natural": v_nat, "robust": v_rob, "global": v_mix})
    fns = models.logits_fns()          # name -> x -> logits, inference mode
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from gen_jax.ops.intercept import fast_cpu_ops


def _own_model(module: nn.Module) -> bool:
  """Whether `module` is one of gen_jax's networks (whose `conv_impl` must not be overridden)."""
  return type(module).__module__.split(".")[0] == "gen_jax"


@dataclasses.dataclass(frozen=True)
class _Apply:
  """`(variables, x) -> logits` of one network in inference mode.

  A frozen dataclass, not a `functools.partial`: jit compares the function inside a `Partial`
  by equality, and partials are equal only to themselves, so every model (and every call of
  `logits_fns`) would compile its attacks anew. Two `_Apply` of the same network are equal, so
  a program compiles once per network and batch shape however many models it evaluates.
  """
  module: nn.Module
  fast_ops: bool

  def __call__(self, variables, x):
    # The context is opened here, inside the function that the attacks trace, so that the
    # choice of layers is made at trace time (and on the backend being traced for).
    with fast_cpu_ops(self.fast_ops and not _own_model(self.module)):
      return self.module.apply(variables, x, train=False)


@dataclasses.dataclass(frozen=True)
class ModelSet:
  """A linen network and named variables of it.

  Attributes:
    module: the flax.linen network (applied in inference mode, float32 for evaluation).
    variables: name -> linen variables `{"params", "batch_stats"}`, in report order.
    fast_ops: apply a user's network inside `gen_jax.ops.intercept.fast_cpu_ops` (2-D `nn.Conv`
      and `nn.max_pool` with fast CPU gradients; a no-op off CPU); False: the stock layers.
      gen_jax's own models ignore it and keep their `conv_impl`.
  """
  module: nn.Module
  variables: Mapping[str, Any]
  fast_ops: bool = True

  def __post_init__(self):
    if not self.variables:
      raise ValueError("a ModelSet needs at least one named set of variables.")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self.variables)

  def logits_fns(self) -> dict[str, jax.tree_util.Partial]:
    """name -> `x -> logits` in inference mode, as `Partial`s (new weights never retrace; all
    share one function, so the models of a set, or of several sets of the same network, share
    their compiled programs)."""
    apply = _Apply(self.module, self.fast_ops)
    return {
        name: jax.tree_util.Partial(apply, variables) for name, variables in self.variables.items()
    }

  def subset(self, names: Sequence[str]) -> "ModelSet":
    """The same network with only the named variables."""
    return ModelSet(self.module, {n: self.variables[n] for n in names}, self.fast_ops)
