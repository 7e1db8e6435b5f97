"""Evaluation: exact accuracy under attack and the robustness report.

Synopsis::

    from gen_jax import evaluation
    evaluation.evaluate_models({"global": v}, images, labels, model=model, key=key, eps=8 / 255,
                               step_size=2 / 255, steps=20)
    report = evaluation.robustness_report({"global": v}, model, images, labels,
                                          attacks_to_run=("clean", "pgd20", "aa"), key=key)
"""
from gen_jax.evaluation.accuracy import evaluate_models
from gen_jax.evaluation.report import ATTACKS, robustness_report, write_report

__all__ = ["ATTACKS", "evaluate_models", "robustness_report", "write_report"]
