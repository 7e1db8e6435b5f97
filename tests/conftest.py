"""Test-session setup: runs before any JAX computation.

Two virtual CPU devices let the data-parallel code paths run on a laptop or CI machine.

`jax_disable_most_optimizations` (the optax / big_vision habit for suites of tiny programs) is
deliberately NOT set: it shortens compiles, but unfused convolution backward passes then run
about 50 times slower (measured: 20 s instead of 0.1 s per training step of the tiny preset),
which costs this suite far more than it saves.

Instead, compiled programs are shared through JAX's persistent compilation cache: many tests
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"gen_jax-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
