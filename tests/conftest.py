"""Test-session setup: runs before any JAX computation.

Two virtual CPU devices let the data-parallel code paths run on a laptop or CI machine.

`jax_disable_most_optimizations` (the optax / big_vision habit for suites of tiny programs) is
deliberately NOT set: it shortens compiles, but unfused convolution backward passes then run
about 50 times slower, which costs this suite far more than it saves. XLA's CPU back end runs at
optimisation level 1 instead of its default (`--xla_backend_optimization_level`, set below for
the test process and inherited by every program a test starts): compiling is a large part of
this suite's time, level 1 shortens it markedly, and the programs still run at nearly full
speed (the convolutions and matrix products are library calls either way). Level 0 shortens
compiles further but made the in-process N-expert sweeps 20 times slower; it is used where it
pays: the end-to-end tests marked `programs_compile_fast` start their programs (tiny runs,
compiling nearly all the time) with it, and compare those programs only with each other, never
with results of the test process. docs/results.md has the measurements.

Compiled programs are also shared through JAX's persistent compilation cache: many tests
(and the programs they start as subprocesses, which inherit the environment) compile the same
tiny-preset steps and attacks, and compiling is most of their time. The cache lives in the
system's temporary directory; its keys include the program and the jax version, so a changed
program never reuses a stale entry.

Harmless noise after a passing run, "Exception ignored" notices (a KeyboardInterrupt in
jax's `_xla_gc_callback`, an orbax read coroutine, "Event loop is closed"): interrupts that the
signal tests and the Jupyter kernel of tests/test_notebook.py (jupyter_client interrupts it
with SIGINT on shutdown) deliver inside callbacks, and checkpoint readers closed early. Python
can only print them; setup.cfg filters those raised inside tests, and the README explains them.
"""
import os
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"gen_jax-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def _with_xla_level(flags: str, level: int) -> str:
  """`flags` (an XLA_FLAGS value) with the CPU back end's optimisation level set to `level`."""
  kept = [f for f in flags.split() if not f.startswith("--xla_backend_optimization_level")]
  return " ".join([*kept, f"--xla_backend_optimization_level={level}"])


SUITE_XLA_LEVEL = 1  # the test process and the programs its tests start (see above)
FAST_COMPILE_XLA_LEVEL = 0  # the programs started by tests marked `programs_compile_fast`
os.environ["XLA_FLAGS"] = _with_xla_level(os.environ.get("XLA_FLAGS", ""), SUITE_XLA_LEVEL)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)


@pytest.fixture(autouse=True)
def _programs_compile_fast(request, monkeypatch):
  """For a test marked `programs_compile_fast`: the programs it starts compile at XLA level 0."""
  if request.node.get_closest_marker("programs_compile_fast") is not None:
    jax.devices()  # the test process's own back end keeps its flags (XLA reads them once)
    monkeypatch.setenv("XLA_FLAGS",
                       _with_xla_level(os.environ.get("XLA_FLAGS", ""), FAST_COMPILE_XLA_LEVEL))


def _shared_fixture_module(item) -> str | None:
  """The test's module if the test uses a module- or session-scoped fixture defined there."""
  module = item.nodeid.split("::")[0]
  for name in item.fixturenames:
    definitions = item._fixtureinfo.name2fixturedefs.get(name, ())  # pylint: disable=protected-access
    if any(d.scope in ("module", "session") and d.baseid == module for d in definitions):
      return module
  return None


@pytest.hookimpl(tryfirst=True)  # xdist turns the groups into node ids in its own hook
def pytest_collection_modifyitems(items):
  """Orders and groups the tests for `-n auto` (setup.cfg passes `--dist loadgroup`).

  The end-to-end runs (marked `slow`) are handed out first: a minute-long test that starts last
  leaves one worker running it alone at the end. The tests of a module that share one of its
  module-scoped fixtures (a trained run, the device-count runs) go to one worker together, so
  that the fixture is built once instead of once per worker.
  """
  groups = {}  # a group's tests stay together, in their order (module fixtures are built once)
  for item in items:
    module = _shared_fixture_module(item)
    if module is not None:
      item.add_marker(pytest.mark.xdist_group(module))
    groups.setdefault(module or item.nodeid, []).append(item)
  ordered = sorted(groups.values(),
                   key=lambda group: not any(i.get_closest_marker("slow") for i in group))
  items[:] = [item for group in ordered for item in group]


# `-n auto` (the README's command): one worker per CPU core, at most 8, and no more than the memory
# holds (a worker and the programs its test starts take up to about 3 GiB).
MAX_WORKERS, GIB_PER_WORKER = 8, 3


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
  """The worker count for `-n auto`: the usable cores, bounded by memory and by 8."""
  del config
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return max(1, min(cores or 1, MAX_WORKERS, int(memory_gib // GIB_PER_WORKER)))


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's own; xdist may be off
def pytest_xdist_make_scheduler(config, log):
  """`--dist loadgroup` that survives a crashed worker: no hang, and the crashed test is rerun.

  xdist's group scheduler (3.8) puts a crashed worker's unfinished group back in the queue, but
  (1) it cannot mark the crashed test pending, so pytest-rerunfailures reports the crash as a
  failure although the test runs again, and (2) the run can hang: an xdist worker holds its last
  test until it hears of another one or of the end, and the scheduler gives the replacement
  worker one unit and waits for it to finish one. Here the crashed test counts as pending (it is,
  in the requeued group), a worker always gets a second test while there is one, and every
  worker is told to finish once the queue is empty, as xdist's plain `load` scheduler does.
  """
  if config.getvalue("dist") != "loadgroup":
    return None
  from xdist.scheduler import LoadGroupScheduling  # pylint: disable=import-outside-toplevel

  class CrashSafeLoadGroupScheduling(LoadGroupScheduling):

    def mark_test_pending(self, item):
      del item  # remove_node already queued it again with the rest of its group

    def _reschedule(self, node):
      super()._reschedule(node)
      # A replacement worker that got one test would hold it forever: give it two to work on.
      while (self.workqueue and not node.shutting_down and
             self._pending_of(self.assigned_work[node]) < 2):
        self._assign_work_unit(node)

    def _assign_work_unit(self, node):
      super()._assign_work_unit(node)
      if not self.workqueue:
        for other in self.nodes:
          if not other.shutting_down:
            other.shutdown()

  return CrashSafeLoadGroupScheduling(config, log)
