"""Reading run directories of gen_jax's first layout (before the role vocabulary).

Runs begun before the experts were keyed by role wrote metric lines with `nat_loss`, `lr_rob`,
`val_global`..., summaries with the models at the top level (`pgd20_acc`), and checkpoints
whose state holds `nat`, `rob`, `teacher_nat`, `teacher_rob` and `mix` (both experts always,
even the one a single-expert method does not train). `gen_jax.runs` reads such a directory
through these functions, so that it still resumes and evaluates in today's form; nothing here
writes the old layout. Kept apart so that `runs` holds only today's layout and protocol.
"""
from __future__ import annotations

import re
from typing import Any

from gen_jax.experts import GLOBAL, NATURAL, ROBUST

# Metric-key prefixes of the first layout and the roles they name.
ROLES = {"nat": NATURAL, "rob": ROBUST}
# The checkpoint entries that hold the evaluated models, by the role they are read under.
MODEL_KEYS = {"teacher_nat": NATURAL, "teacher_rob": ROBUST, "mix": GLOBAL}
# The entries of a first-layout training state.
STATE_KEYS = frozenset({"step", "nat", "rob", "teacher_nat", "teacher_rob", "mix"})


def upgrade_record(record: dict[str, Any]) -> dict[str, Any]:
  """An epoch record of the first layout (`nat_loss`, `lr_rob`, `val_global`...) in today's
  form (`train[role]`, `lr[role]`, `weights[role]`, `validation`); today's records unchanged."""
  if "train" in record or not any(f"{p}_loss" in record for p in ROLES):
    return record
  legacy = dict(record)
  trained = [r for p, r in ROLES.items() if f"{p}_loss" in legacy]
  out: dict[str, Any] = {"epoch": legacy.pop("epoch"), "step": legacy.pop("step")}
  out["train"] = {
      role: {
          "loss": legacy.pop(f"{p}_loss"),
          "acc": legacy.pop(f"{p}_acc", None)
      } for p, role in ROLES.items() if role in trained
  }
  lrs = {role: legacy.pop(f"lr_{p}", None) for p, role in ROLES.items()}
  out["lr"] = {role: lrs[role] for role in trained}
  beta = legacy.get("beta", 1.0)
  out["weights"] = ({NATURAL: 1.0 - beta, ROBUST: beta} if len(trained) == 2 else {trained[0]: 1.0})
  if "val_global" in legacy:
    legacy["validation"] = {GLOBAL: legacy.pop("val_global")}
  return {**out, **legacy}


def upgrade_summary(summary: dict[str, Any]) -> dict[str, Any]:
  """A summary of the first layout (models at the top level, robust accuracy as `pgd20_acc`)
  in today's form, `summary["models"][role]` with `clean_acc` and `pgd_acc`; today's unchanged
  (`summary` itself is modified)."""
  if "models" in summary:
    return summary
  moved = {}
  for role in (NATURAL, ROBUST, GLOBAL):
    if role in summary:
      figures = summary.pop(role)
      moved[role] = {
          ("pgd_acc" if re.fullmatch(r"pgd\d+_acc", k) else k): v for k, v in figures.items()
      }
  summary["models"] = moved
  return summary


def state_template(like: Any) -> dict[str, Any]:
  """The first layout's tree for today's abstract state `like` (a `GeneralistState`)."""
  expert = lambda role: like.experts.get(role, next(iter(like.experts.values())))
  teacher = lambda role: like.teachers.get(role, next(iter(like.teachers.values())))
  return {
      "step": like.step,
      "nat": expert(NATURAL),
      "rob": expert(ROBUST),
      "teacher_nat": teacher(NATURAL),
      "teacher_rob": teacher(ROBUST),
      "mix": like.global_model,
  }


def from_state(tree: dict[str, Any], *, like: Any) -> Any:
  """Today's state from a restored first-layout tree (the untrained expert is dropped)."""
  prefix = {NATURAL: "nat", ROBUST: "rob"}
  return like.replace(step=tree["step"],
                      experts={r: tree[prefix[r]] for r in like.experts},
                      teachers={r: tree[f"teacher_{prefix[r]}"] for r in like.teachers},
                      global_model=tree["mix"])


def evaluated_models(items: dict[str, Any], experts: tuple[str, ...]) -> dict[str, Any]:
  """`{role: variables}` of the evaluated models restored from a first-layout checkpoint, in
  the order natural, robust, global; of the teachers only those of `experts` (single-expert
  runs of that layout also saved the untrained expert's teacher)."""
  available = {MODEL_KEYS[k]: v for k, v in items.items()}
  return {
      r: available[r]
      for r in (NATURAL, ROBUST, GLOBAL)
      if r in available and (r == GLOBAL or r in experts)
  }
