"""Training methods and the one role vocabulary of the project.

A run trains one or two *experts*, named by their role: `natural` (clean data) and `robust`
(adversarial data). Each expert has an EMA *teacher* of the same name, and the run deploys one
*global* model. The same three names key the training state, the metrics, `summary.json` and the
evaluation reports, so no caller translates between vocabularies.

Synopsis::

    experts("generalist")       # ("natural", "robust")
    evaluated_roles("pgd_at")   # ("robust", "global")
"""
from __future__ import annotations

NATURAL, ROBUST, GLOBAL = "natural", "robust", "global"
ROLES: tuple[str, ...] = (NATURAL, ROBUST, GLOBAL)

# Method -> the experts it trains. For a single-expert method the global model is its teacher.
_EXPERTS: dict[str, tuple[str, ...]] = {
    "generalist": (NATURAL, ROBUST),
    "pgd_at": (ROBUST,),
    "trades": (ROBUST,),
    "natural": (NATURAL,),
}
METHODS: tuple[str, ...] = tuple(_EXPERTS)

# Loss of the robust expert under `generalist`: Madry's PGD cross-entropy or TRADES.
ROBUST_LOSSES: tuple[str, ...] = ("pgd", "trades")


def experts(method: str) -> tuple[str, ...]:
  """The roles of the experts that `method` trains; ValueError for an unknown method."""
  if method not in _EXPERTS:
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
  return _EXPERTS[method]


def evaluated_roles(method: str) -> tuple[str, ...]:
  """The models a run of `method` evaluates: its experts' teachers, then the global model."""
  return experts(method) + (GLOBAL,)


def uses_trades(method: str, robust_loss: str) -> bool:
  """Whether the robust expert of `method` trains with the TRADES objective."""
  return method == "trades" or (method == "generalist" and robust_loss == "trades")
