"""The device mesh, the shardings of state and batches, and host → global arrays."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(data: int = -1, devices: list | None = None) -> Mesh:
    """A 1-D mesh with a `data` axis over `data` devices (-1 = all of them)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if data == -1 else data
    if n < 1 or n > len(devices):
        raise ValueError(f"mesh.data: {data} must be -1 (all devices) or between 1 and "
                         f"{len(devices)}, the number of devices")
    return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) dimension is split over the `data` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) global array, as NumPy on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def global_batch(local: Any, mesh: Mesh) -> Any:
    """Assembles this process's part of a batch (numpy, leading dim local) into global arrays."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
