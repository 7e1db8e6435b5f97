"""The examples in gen_jax's docstrings run and give what they show (so they cannot rot)."""
import doctest
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WITH_EXAMPLES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                       for p in (ROOT / "gen_jax").rglob("*.py")
                       if ">>>" in p.read_text())


def test_some_modules_have_examples():
  assert len(WITH_EXAMPLES) >= 5, WITH_EXAMPLES


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{name}: '>>>' found but no example collected"
  assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
