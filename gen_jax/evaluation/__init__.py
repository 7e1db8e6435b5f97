"""Evaluation: exact accuracy, the robustness report and the analyses that go with it.

Modules (loaded on first use):
  modelset     `ModelSet`: one network and named variables, what every analysis evaluates
  engine       per-example clean / PGD-family correctness (`correctness`): every such figure
  accuracy     exact clean / PGD accuracy of several models (`evaluate_models`, on the engine)
  catalogue    the named attacks of the report and the sanity checks, and how to run them
  report       the whole report (`evaluate`, `evaluate_run`): attack table + analyses
  sanity       gradient-masking sanity checks
  boundary     minimal adversarial perturbations and accuracy near the decision boundary
  corruptions  common corruptions computed in JAX (or CIFAR-10-C from TFDS)
  sweep        the mixing-weight sweep, BatchNorm recalibration, Pareto front, selection rule
  outputs      writing result files without overwriting earlier ones

Each analysis (sanity, boundary, corruptions, sweep) is `run(models, images, labels, *, key,
batch_size, progress, ...)` with its own `to_markdown(result)`.

Synopsis::

    from gen_jax import attacks, evaluation, runs
    threat = attacks.Threat("linf", eps=8 / 255, step_size=2 / 255, steps=20)
    report = evaluation.evaluate(evaluation.ModelSet(model, {"global": v}), images, labels,
                                 key=key, threat=threat, attacks=("clean", "pgd20", "aa"))
    report = evaluation.evaluate_run(runs.restore_models("runs/pilot"), attacks=("clean", "pgd20"))
    evaluation.write_report(report, "runs/pilot/eval")
"""
import importlib

_SUBMODULES = ("modelset", "engine", "accuracy", "catalogue", "report", "sanity", "boundary",
               "corruptions", "sweep", "outputs")
_NAMES = {
    "ModelSet": "modelset",
    "evaluate_models": "accuracy",
    "evaluate": "report",
    "evaluate_run": "report",
    "write_report": "report",
}

__all__ = list(_NAMES) + list(_SUBMODULES)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name in _NAMES:
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
