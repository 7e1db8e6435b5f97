"""Devices: the 1-D data-parallel mesh and the shardings of batches and replicated state.

Data parallelism is expressed through `jit` and shardings (no `pmap`, no `axis_name` in the
models): parameters and optimiser state are replicated (`P()`), batches are split along the
leading axis over the mesh axis "data". XLA's SPMD partitioner inserts the gradient all-reduce,
and BatchNorm statistics are computed over the global batch, exactly as on one device. The same
code runs on one CPU, a Colab TPU or several GPUs.

Synopsis::

    mesh = make_mesh()
    state = replicate(state, mesh)
    batch = jax.device_put(images, data_sharding(mesh))   # leading dim divisible by mesh.size
"""
from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_multihost() -> None:
  """Joins a multi-host job (TPU pods, multi-node GPU); a no-op for a single process.

  Call it first thing in a program that may run on several hosts; `jax.distributed` reads the
  cluster from the environment (TPU metadata, SLURM, ...).
  """
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError):
    pass  # Not a multi-host environment: nothing to join.


def make_mesh(devices: list[Any] | None = None) -> Mesh:
  """A 1-D mesh ("data",) over all (or the given) devices, in auto-sharding mode."""
  devices = list(devices if devices is not None else jax.devices())
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of `tree` on all devices of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
  """Raises ValueError unless the global batch splits evenly over the devices."""
  if batch_size % mesh.size:
    raise ValueError(f"--{name} {batch_size} is not divisible by the {mesh.size} devices; "
                     f"use a multiple of {mesh.size}.")
