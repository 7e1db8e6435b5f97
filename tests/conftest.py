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

Harmless noise after a passing run: "Exception ignored in: <function _xla_gc_callback ...>"
with a KeyboardInterrupt traceback, and "RuntimeError: Event loop is closed". They come from the
Jupyter kernel of tests/test_notebook.py as papermill shuts it down, not from a test: on every
shutdown jupyter_client (8.10) first interrupts the kernel with SIGINT, ipykernel turns SIGINT
into KeyboardInterrupt while it is still handling a message, and when that lands inside the gc
callback that jax registers (`jax._src.lib._xla_gc_callback`) Python can only print it and go
on; an interrupted kernel that is shutting down can also close its event loop while callbacks
are still queued on it (the second message; not reproduced in isolation). The kernel writes
to the stderr it inherited from pytest, and the notebook's outputs have been collected by then.
Avoiding the SIGINT would mean replacing jupyter_client's kernel manager, so the test leaves it.
The signal tests of tests/test_reliability.py cannot print them: their train.py processes write
stderr to a log file, which the tests require to hold no traceback.
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
