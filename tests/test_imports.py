"""The import graph of gen_jax: no module imports itself back, directly or through others.

A cycle makes a module's behaviour depend on which one was imported first; the evaluation once
had one (report <-> sanity). The graph is read from the source (every `import`, at any depth,
so a function-level import cannot hide a cycle either): `from pkg import sub` is an edge to the
submodule `pkg.sub`, anything else an edge to the module named.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gen_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        edges.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        subs = [f"{node.module}.{a.name}" for a in node.names]
        edges.update(s for s in subs if s in modules)
        if not all(s in modules for s in subs):
          edges.add(node.module)
    graph[name] = {e for e in edges if e in modules and e != name}
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  found, state, stack = [], {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        found.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)
  return found


def test_the_cycle_finder_finds_a_planted_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_gen_jax_import_graph_has_no_cycle():
  graph = _graph()
  assert "gen_jax.evaluation.report" in graph and "gen_jax.runs" in graph
  assert _cycles(graph) == []


def _first_level(name: str) -> str:
  """`gen_jax.evaluation.sweep` -> `gen_jax.evaluation`; `gen_jax.runs` stays itself."""
  return ".".join(name.split(".")[:2])


def test_first_level_packages_and_modules_form_no_cycle():
  """Collapsed to gen_jax's first-level packages and modules (config, runs, training,
  evaluation, ...), the graph has no cycle either: a package never needs another that needs it
  back, so the layers can be read bottom-up (the role vocabulary, `gen_jax.experts`, at the
  bottom)."""
  graph = _graph()
  levels = {}
  for name, edges in graph.items():
    if name == "gen_jax":  # the lazy public API names everything
      continue
    levels.setdefault(_first_level(name), set()).update(
        _first_level(e) for e in edges if e != "gen_jax" and _first_level(e) != _first_level(name))
  assert "gen_jax.training" in levels and "gen_jax.config" in levels
  assert _cycles(levels) == []


def _dependency_order(graph):
  order, done = [], set()

  def visit(node):
    if node not in done:
      done.add(node)
      for nxt in sorted(graph[node]):
        visit(nxt)
      order.append(node)

  for node in sorted(graph):
    visit(node)
  return order


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
  """Each module imports on its own (gen_jax unloaded before each), in dependency order."""
  graph = _graph()
  code = ("import importlib, sys\n"
          "for name in sys.argv[1:]:\n"
          "  for loaded in [m for m in sys.modules if m.startswith('gen_jax')]:\n"
          "    del sys.modules[loaded]\n"
          "  importlib.import_module(name)\n")
  out = subprocess.run([sys.executable, "-c", code, *_dependency_order(graph)],
                       capture_output=True,
                       text=True,
                       cwd=ROOT,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
