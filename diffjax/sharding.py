"""The device mesh, the shardings of state and batches, and host → global arrays."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over both axes
# Tensors smaller than this (16 KiB in float32) stay replicated under FSDP: biases, norms and the
# like cost more in collectives than they save in memory.
MIN_FSDP_SIZE = 2**12


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A 2-D mesh (`data`, `fsdp`) over data × fsdp devices; data = -1 uses all the devices.

    Devices are taken in `jax.devices()` order, which groups each process's devices together,
    so every process feeds a contiguous block of the batch.
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"mesh.fsdp: {fsdp} must be >= 1 and divide the {len(devices)} devices")
    n_data = len(devices) // fsdp if data == -1 else data
    if n_data < 1 or n_data * fsdp > len(devices):
        raise ValueError(
            f"mesh.data: {data} must be -1 (all devices) or between 1 and "
            f"{len(devices) // fsdp} ({len(devices)} devices / mesh.fsdp={fsdp})"
        )
    grid = np.asarray(devices[: n_data * fsdp], dtype=object).reshape(n_data, fsdp)
    return Mesh(grid, (DATA_AXIS, FSDP_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) dimension is split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """The FSDP rule: split the largest dimension that `fsdp` divides; small tensors replicated."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
        return P()
    dims = [i for i, d in enumerate(shape) if d % fsdp == 0]
    if not dims:
        return P()
    axis = max(dims, key=lambda i: (shape[i], i))
    return P(*(FSDP_AXIS if i == axis else None for i in range(len(shape))))


def state_sharding(abstract: Any, mesh: Mesh) -> Any:
    """Shardings for a pytree of arrays (or ShapeDtypeStructs) under the FSDP rule."""
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(a.shape, fsdp)), abstract)


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


def from_global(tree: Any, sharding: NamedSharding) -> Any:
    """Global arrays from host values that every process holds whole (e.g. sampling labels)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i: np.asarray(x)[i]),
        tree,
    )
