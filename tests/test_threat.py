"""The threat model: one derivation of an evaluation's norm, radius, step and steps."""
import pytest

from gen_jax import config as cfg
from gen_jax.attacks.threat import Threat


def test_the_runs_own_threat_is_its_config_exactly():
  config = cfg.get_config("cifar10-study")
  threat = Threat.of(config)
  assert (threat.norm, threat.eps, threat.step_size,
          threat.steps) == (config.norm, config.eps, config.eval_step_size, config.eval_pgd_steps)
  assert str(threat) == "PGD-20 linf eps 0.031373 (8.00/255), step 0.0078431"
  assert {threat: 1}[Threat.of(config)] == 1  # hashable, equal by value


def test_other_radii_and_the_l2_expert_scale_the_step_alike():
  config = cfg.get_config("cifar10-multinorm")
  assert Threat.of(config, eps=16 / 255).step_size == pytest.approx(4 / 255)
  l2 = Threat.of(config, norm="l2")
  assert (l2.norm, l2.eps) == ("l2", 0.5)
  assert l2.step_size == pytest.approx(config.eval_step_size * 0.5 / config.eps)
  assert Threat.of(cfg.get_config("cifar10"), norm="l2") is None  # no L2 expert
  with pytest.raises(ValueError, match="eps > 0"):
    Threat("linf", 0.0, 0.1, 10)


def test_at_is_the_one_rescaling_rule_and_record_names_the_threat():
  config = cfg.get_config("cifar10-multinorm")
  own = Threat.of(config)
  assert own.at(own.eps) == own  # its own radius: exactly its own step
  assert Threat.of(config, norm="l2") == own.at(0.5, norm="l2")
  assert Threat.of(config, eps=16 / 255) == own.at(16 / 255)
  assert own.record() == {
      "norm": "linf",
      "eps": own.eps,
      "step_size": own.step_size,
      "steps": 20,
      "attack": "pgd",
      "restarts": 1,
      "name": str(own)
  }
