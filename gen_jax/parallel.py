"""Devices and processes: the data-parallel mesh, its shardings, global batches, and joining a
multi-process job.

Data parallelism is expressed through `jit` and shardings (no `pmap`, no `axis_name` in the
models): parameters and optimiser state are replicated (`P()`), batches are split along the
leading axis over the mesh axis "data". XLA's SPMD partitioner inserts the gradient all-reduce,
and BatchNorm statistics, augmentation and attack noise are computed for the global batch,
exactly as on one device (random bits do not depend on the sharding: `jax_threefry_partitionable`,
JAX's default). The same program runs on one CPU, 8 GPUs, a Colab TPU or a pod slice.

Several processes (hosts) form one job through JAX's own runtime (`initialize_distributed`,
multi-controller: every process runs the same program). Each process holds the whole epoch
order (indices only) and reads just the rows of each global batch that its own devices hold
(`global_batch`), so no host gathers or ships another host's images.

Synopsis::

    initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=0)  # first thing
    mesh = make_mesh()
    state = replicate(state, mesh)
    images, labels = global_batch((train_x, train_y), order[i * b:(i + 1) * b], data_sharding(mesh))
    if is_primary(): print("only process 0 prints and writes files")
"""
from __future__ import annotations

import functools
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
DEFAULT_TIMEOUT_SECONDS = 300
AUTO = "auto"  # `coordinator`: let jax.distributed.initialize detect the cluster

# ------------------------------------------------------------------------------- processes
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _count(text: str | None) -> int:
  try:
    return int(text or 0)
  except ValueError:
    return 0


def cluster_environment(environ: Mapping[str, str] | None = None) -> str | None:
  """The multi-process launcher this process runs under, by name; None for a lone process.

  What `jax.distributed.initialize` detects by itself from environment variables, checked
  without touching JAX: a SLURM step (`srun`) or Open MPI job (`mpirun`) of several tasks, a
  Cloud TPU pod slice that lists several workers, or `JAX_COORDINATOR_ADDRESS`. (A Cloud TPU
  pod described only by its metadata server is not seen here: pass `coordinator="auto"`.)
  """
  env = os.environ if environ is None else environ
  if all(name in env for name in _SLURM) and _count(env["SLURM_NTASKS"]) > 1:
    return "SLURM"
  if "OMPI_MCA_orte_hnp_uri" in env and _count(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
    return "Open MPI"
  if any("," in env.get(name, "") for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")):
    return "Cloud TPU pod"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU multislice"
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  return None


def _host_port(coordinator: str) -> tuple[str, int]:
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator {coordinator!r} is not HOST:PORT (e.g. 10.0.0.1:1234, or "
                     "localhost:1234 for processes on one machine), nor 'auto'.")
  return host.strip("[]"), int(port)


def _wait_for_coordinator(coordinator: str, timeout_seconds: float) -> None:
  """RuntimeError unless process 0's coordinator accepts a TCP connection within the timeout.

  JAX's runtime would abort the process (a C++ fatal error, no Python exception) after its own
  timeout; probing first turns the common mistakes (process 0 not started, wrong address,
  firewall) into a message that names the address.
  """
  host, port = _host_port(coordinator)
  deadline = time.monotonic() + timeout_seconds
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(5.0, max(timeout_seconds, 0.1))):
        return
    except OSError as error:
      if time.monotonic() >= deadline:
        reason = error.strerror or str(error)
        raise RuntimeError(
            f"cannot reach the coordinator {coordinator} (process 0 of the job) within "
            f"{timeout_seconds:g} s: {reason}. Start process 0 (--process-id 0) with the same "
            "--coordinator, check that HOST:PORT is process 0's address and reachable from this "
            "host (firewall), or raise --distributed-timeout. Not training alone.") from None
      time.sleep(0.25)


def _check_port_free(coordinator: str) -> None:
  """RuntimeError if process 0 cannot serve on the coordinator's port (another job holds it)."""
  _, port = _host_port(coordinator)
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    try:
      probe.bind(("", port))
    except OSError as error:
      raise RuntimeError(f"process 0 cannot serve the coordinator on port {port} "
                         f"({error.strerror or error}): another program uses it. Choose another "
                         "port in --coordinator for every process.") from None


def initialize_distributed(coordinator: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           *,
                           timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
                           environ: Mapping[str, str] | None = None) -> int:
  """Joins a multi-process job through `jax.distributed.initialize`; a no-op for one process.

  Call it first thing, before any JAX computation. Three ways to join:
    * explicit: `coordinator` "HOST:PORT" (process 0's address, the same for every process; or
      `JAX_COORDINATOR_ADDRESS`), `num_processes` N and this process's `process_id` in [0, N);
    * `coordinator="auto"`: JAX detects the job (Cloud TPU pod slice, SLURM, Open MPI, ...);
    * nothing given: the same detection when `cluster_environment` sees a launcher of several
      processes (`srun`, `mpirun`, a TPU pod); otherwise a single process (no-op).
  `num_processes=1` is a single process. CPU processes talk through gloo (JAX's default).

  Args:
    coordinator: "HOST:PORT", "auto" or None.
    num_processes: processes in the job.
    process_id: this process's index; process 0 hosts the coordinator and writes the files.
    timeout_seconds: how long to wait for the coordinator and the other processes.
    environ: the environment to inspect (default `os.environ`).

  Returns:
    The number of processes in the job (1 without touching JAX).

  Raises:
    ValueError: incomplete or inconsistent arguments (naming the flag).
    RuntimeError: the coordinator cannot be reached in time, its port is taken, or JAX was
      already in use (the message says what to do): never a silent single-process run.
  """
  env = os.environ if environ is None else environ
  coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is not None and (isinstance(num_processes, bool) or num_processes < 1):
    raise ValueError(f"--num-processes must be >= 1, got {num_processes!r}.")
  if process_id is not None and not 0 <= process_id < (num_processes or sys.maxsize):
    raise ValueError(f"--process-id {process_id} is not in [0, {num_processes}): number the "
                     "processes 0 to --num-processes - 1.")
  if num_processes == 1:
    return 1
  launcher = cluster_environment(env)
  detected = launcher not in (None, "JAX_COORDINATOR_ADDRESS")
  if coordinator is None and not detected:
    if num_processes is None and process_id is None:
      return 1
    raise ValueError("a multi-process job needs --coordinator HOST:PORT (process 0's address, the "
                     "same for every process), or 'auto' under a launcher that JAX detects.")
  if coordinator not in (None, AUTO):
    _host_port(coordinator)
    missing = [
        flag for flag, value in (("--num-processes", num_processes), ("--process-id", process_id))
        if value is None
    ]
    if missing and not detected:
      raise ValueError(f"--coordinator {coordinator} needs {' and '.join(missing)} as well (the "
                       "same --num-processes for every process, its own --process-id for each).")
    if not missing and process_id == 0:
      _check_port_free(coordinator)
      print(
          f"process 0 of {num_processes}: serving the coordinator on {coordinator}; waiting up "
          f"to {timeout_seconds:g} s for the other processes.",
          file=sys.stderr,
          flush=True)
    elif not missing:
      _wait_for_coordinator(coordinator, timeout_seconds)
  try:
    jax.distributed.initialize(None if coordinator == AUTO else coordinator,
                               num_processes,
                               process_id,
                               initialization_timeout=int(max(1, timeout_seconds)))
  except RuntimeError as error:
    if "before any JAX" in str(error) or "called once" in str(error):
      hint = ("call it first thing in the program, before any JAX computation or device query, "
              "and only once")
    else:
      hint = f"check the coordinator {coordinator or '(auto)'} and the other processes"
    raise RuntimeError(f"cannot join the distributed job: {error}; {hint}.") from error
  except ValueError as error:
    raise ValueError(f"cannot join the distributed job: {error}. Pass --coordinator HOST:PORT, "
                     "--num-processes and --process-id, or run under a launcher that JAX "
                     "detects (srun, mpirun, a Cloud TPU pod).") from error
  return jax.process_count()


def is_primary() -> bool:
  """Whether this is process 0, the one that prints progress and writes result files."""
  return jax.process_index() == 0


def process_max(values: Sequence[int]) -> list[int]:
  """The element-wise maximum of small ints over all processes (the values, for one process).

  How processes agree on a host-side decision (a stop signal one of them received, a timed
  checkpoint that is due) so that every process takes the same collective path.
  """
  values = [int(v) for v in values]
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(np.asarray(values, np.int32))
  return [int(v) for v in np.asarray(gathered).reshape(-1, len(values)).max(axis=0)]


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing to wait for alone)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------ mesh and shardings
def make_mesh(devices: list[Any] | None = None) -> Mesh:
  """A 1-D mesh ("data",) over all devices of all processes (or the given ones)."""
  devices = list(devices if devices is not None else jax.devices())
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of `tree` on all devices of the mesh (the same value on every process)."""
  return jax.device_put(tree, replicated(mesh))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
  """Raises ValueError unless the global batch splits evenly over the devices."""
  if batch_size % mesh.size:
    raise ValueError(f"--{name.replace('_', '-')} {batch_size} is not divisible by the "
                     f"{mesh.size} devices; use a multiple of {mesh.size}.")


# ---------------------------------------------------------------------------- global batches
@functools.lru_cache(maxsize=64)
def local_positions(sharding: NamedSharding, size: int) -> np.ndarray:
  """The positions along the leading axis (of `size`) that this process's devices hold.

  In ascending order, each once: the rows this process contributes to an array of that
  sharding (`jax.make_array_from_process_local_data` maps them to its devices in this order).
  """
  ranges = {(s.start or 0, size if s.stop is None else s.stop)
            for s, *_ in sharding.addressable_devices_indices_map((size,)).values()}
  return np.concatenate([np.arange(start, stop) for start, stop in sorted(ranges)]).astype(np.int64)


def global_batch(arrays: Sequence[Any], rows: Any,
                 sharding: NamedSharding) -> tuple[jax.Array, ...]:
  """The global batch `array[rows]` of each array, laid out by `sharding`.

  Every process passes the same `rows` (indices into its arrays, e.g. a slice of the epoch
  order) and reads only the rows its own devices hold, so a host touches its share of the data
  only; with one process this is `jax.device_put(array[rows], sharding)`.

  Args:
    arrays: host arrays (numpy, memory-mapped, or anything indexable by an int array) sharing
      their leading axis.
    rows: int indices of the global batch; its length must split evenly over the devices.
    sharding: a sharding of the leading axis, e.g. `data_sharding(mesh)`.

  Returns:
    One global `jax.Array` per input, of shape `(len(rows),) + array.shape[1:]`.
  """
  rows = np.asarray(rows)
  mine = rows[local_positions(sharding, len(rows))]
  return tuple(
      jax.make_array_from_process_local_data(sharding, np.asarray(a[mine]), (len(rows),) +
                                             tuple(a.shape[1:])) for a in arrays)
