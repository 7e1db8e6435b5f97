"""The models an evaluation looks at: one network and several sets of its variables, by name.

Every analysis of `gen_jax.evaluation` (the attack table, sanity checks, boundary, corruptions,
the mixing sweep) takes a `ModelSet` as its first argument, so the report can run them all with
one loop and a user can hand any of them the same object.

Synopsis::

    models = ModelSet(model, {"natural": v_nat, "robust": v_rob, "global": v_mix})
    fns = models.logits_fns()          # name -> x -> logits, inference mode
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax


def _apply(module, variables, x):
  return module.apply(variables, x, train=False)


@dataclasses.dataclass(frozen=True)
class ModelSet:
  """A linen network and named variables of it.

  Attributes:
    module: the flax.linen network (applied in inference mode, float32 for evaluation).
    variables: name -> linen variables `{"params", "batch_stats"}`, in report order.
  """
  module: nn.Module
  variables: Mapping[str, Any]

  def __post_init__(self):
    if not self.variables:
      raise ValueError("a ModelSet needs at least one named set of variables.")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self.variables)

  def logits_fns(self) -> dict[str, jax.tree_util.Partial]:
    """name -> `x -> logits` in inference mode, as `Partial`s (new weights never retrace)."""
    return {
        name: jax.tree_util.Partial(functools.partial(_apply, self.module), variables)
        for name, variables in self.variables.items()
    }

  def subset(self, names: Sequence[str]) -> "ModelSet":
    """The same network with only the named variables."""
    return ModelSet(self.module, {n: self.variables[n] for n in names})
