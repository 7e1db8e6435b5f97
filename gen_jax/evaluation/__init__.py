"""Evaluation: exact accuracy under attack (more tools land with the robustness report)."""
from gen_jax.evaluation.accuracy import evaluate_models

__all__ = ["evaluate_models"]
