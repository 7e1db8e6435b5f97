"""Generalist training: expert states, pure expert steps, schedules and the loop.

Submodules load on first use, so that importing the package does not import the loop, orbax or
the models. The method and role vocabulary lives below it, in `gen_jax.experts`.

Modules:
  schedules  per-step tables: learning rates, beta, the redistribution mask
  losses     cross-entropy and the TRADES objective
  steps      the state, the pure expert steps, the Generalist update, the jitted step builder
  loop       `train_and_evaluate(config, workdir)`

Synopsis::

    from gen_jax import config as cfg, training
    summary = training.train_and_evaluate(cfg.get_config("pilot"), "runs/pilot")

    # or step by step (`images`, `labels`: one global batch from `parallel.global_batch`):
    state = training.create_train_state(config, model, key, image_shape=(32, 32, 3))
    tables = training.steps.schedule_arrays(config, steps_per_epoch)
    totals = training.steps.zero_totals(config)
    step_fn = training.make_train_step(config, model)
    state, totals = step_fn(state, totals, images, labels, key, tables)
"""
import importlib

_SUBMODULES = ("schedules", "losses", "steps", "loop")
_NAMES = {
    "train_and_evaluate": "loop",
    "build_schedules": "schedules",
    "ExpertState": "steps",
    "GeneralistState": "steps",
    "create_train_state": "steps",
    "generalist_update": "steps",
    "make_train_step": "steps",
    "natural_train_step": "steps",
    "robust_train_step": "steps",
    "train_step": "steps",
}

__all__ = list(_NAMES) + list(_SUBMODULES)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name in _NAMES:
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
