"""Test-session setup: runs before any JAX computation.

Two virtual CPU devices let the data-parallel code paths run on a laptop or CI machine.

`jax_disable_most_optimizations` (the optax / big_vision habit for suites of tiny programs) is
deliberately NOT set: it shortens compiles, but unfused convolution backward passes then run
about 50 times slower (measured: 20 s instead of 0.1 s per training step of the tiny preset),
which costs this suite far more than it saves.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
