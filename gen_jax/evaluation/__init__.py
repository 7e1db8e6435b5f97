"""Evaluation: exact accuracy, the robustness report and the analyses that go with it.

Modules (loaded on first use):
  accuracy     exact clean / PGD accuracy of several models (`evaluate_models`)
  report       the attack table, written with the analyses as report.json / report.md
  sanity       gradient-masking sanity checks
  boundary     minimal adversarial perturbations and accuracy near the decision boundary
  corruptions  common corruptions computed in JAX (or CIFAR-10-C from TFDS)
  sweep        the mixing-weight sweep, BatchNorm recalibration, Pareto front, selection rule
  outputs      writing result files without overwriting earlier ones

Synopsis::

    from gen_jax import evaluation
    evaluation.evaluate_models({"global": v}, images, labels, model=model, key=key, eps=8 / 255,
                               step_size=2 / 255, steps=20)
    report = evaluation.robustness_report({"global": v}, model, images, labels,
                                          attacks_to_run=("clean", "pgd20", "aa"), key=key)
"""
import importlib

_SUBMODULES = ("accuracy", "report", "sanity", "boundary", "corruptions", "sweep", "outputs")
_NAMES = {
    "evaluate_models": "accuracy",
    "ATTACKS": "report",
    "robustness_report": "report",
    "write_report": "report",
}

__all__ = list(_NAMES) + list(_SUBMODULES)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name in _NAMES:
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
