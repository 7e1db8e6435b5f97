"""Generalist training: expert states, pure expert steps, the Generalist update and the loop.

Synopsis::

    from gen_jax import config as cfg, training
    summary = training.train_and_evaluate(cfg.get_config("pilot"), "runs/pilot")

    # or step by step:
    state = training.create_train_state(config, model, key, image_shape=(32, 32, 3))
    step_fn = training.make_train_step(config, model, steps_per_epoch=390)
    state, metrics = step_fn(state, images_uint8, labels, key)
"""
from gen_jax.training.loop import train_and_evaluate
from gen_jax.training.schedules import build_schedules
from gen_jax.training.steps import (ExpertState, GeneralistState, create_train_state,
                                    generalist_update, make_train_step, natural_train_step,
                                    robust_train_step, train_step)

__all__ = [
    "ExpertState", "GeneralistState", "build_schedules", "create_train_state", "generalist_update",
    "make_train_step", "natural_train_step", "robust_train_step", "train_and_evaluate", "train_step"
]
