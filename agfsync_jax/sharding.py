"""The device mesh, FSDP partition rules, and placing trees and batches on the mesh.

One mesh with axes ("data", "fsdp") serves every stage. Parameters (and optimizer state, and
the frozen reference tree) are FSDP-sharded: each big kernel is split along its largest
dimension divisible by the fsdp axis size; small leaves are replicated. Batches are split over
both axes, so fsdp devices also process distinct examples (ZeRO-3 style).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# Batch dimension is split over every mesh axis.
BATCH_SPEC = P(MESH_AXES)


def make_mesh(mesh_config: Any, devices: list[jax.Device] | None = None) -> Mesh:
    """Mesh of shape (data, fsdp) over all devices; `data = -1` takes what fsdp leaves, and
    `fsdp = -1` takes every device (data must then be -1 or 1): one config for any slice size."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    fsdp = int(mesh_config.fsdp)
    data = int(mesh_config.data)
    if fsdp == -1:
        if data not in (-1, 1):
            raise ValueError(f"mesh.fsdp=-1 (every device) needs mesh.data=-1 or 1, got {data}")
        fsdp, data = n, 1
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must be >= 1 and divide the device count {n}")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh.data={mesh_config.data} x mesh.fsdp={fsdp} != {n} devices")
    # create_device_mesh orders devices so that the inner (fsdp) axis uses the fastest links.
    try:
        grid = mesh_utils.create_device_mesh((data, fsdp), devices)
    except (NotImplementedError, ValueError, AssertionError):
        # CPU and some GPU topologies have no physical layout to exploit.
        grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_shard_size: int) -> P:
    """PartitionSpec for one parameter: shard its largest fsdp-divisible dim, or replicate."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_shard_size:
        return P()
    candidates = [(dim, i) for i, dim in enumerate(shape) if dim % fsdp_size == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    spec: list[str | None] = [None] * len(shape)
    spec[axis] = FSDP_AXIS
    return P(*spec)


def param_shardings(tree: Any, mesh: Mesh, mode: str = "fsdp", min_shard_size: int = 2**16) -> Any:
    """NamedShardings for every leaf of a parameter-shaped tree (params, Adam moments, ...)."""
    if mode not in ("fsdp", "replicate"):
        raise ValueError(f"mesh.shard_params={mode!r}, expected 'fsdp' or 'replicate'")
    fsdp_size = mesh.shape[FSDP_AXIS] if mode == "fsdp" else 1

    def one(leaf):
        return NamedSharding(mesh, fsdp_spec(tuple(np.shape(leaf)), fsdp_size, min_shard_size))
    return jax.tree_util.tree_map(one, tree)


def shardings_from_config(tree: Any, mesh: Mesh, mesh_config: Any) -> Any:
    return param_shardings(tree, mesh, mesh_config.shard_params, int(mesh_config.min_shard_size))


def place_tree(tree: Any, shardings: Any) -> Any:
    """Host arrays -> global arrays with the given shardings.

    Every process holds the full host tree (it read the same checkpoint); each device gets only
    its slice, so a large model never sits whole on one accelerator. An abstract tree
    (`jax.ShapeDtypeStruct` leaves, see `is_abstract`) is placed abstractly: its leaves get the
    shardings and nothing is allocated, so the same code builds compile-only programs (the TPU
    plan in agfsync_jax/plan).
    """
    def put(x, sharding):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree_util.tree_map(put, tree, shardings)


def is_abstract(tree: Any) -> bool:
    """True when every leaf is a `jax.ShapeDtypeStruct` (shapes only, no data)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def place_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of a batch -> global arrays sharded over the batch dimension.

    With several processes, each passes only the rows it read; the global batch is their
    concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def describe(array: jax.Array) -> str:
    """One line: shape, partition spec, and the per-device shard shape."""
    shard_shape = array.sharding.shard_shape(array.shape)
    spec = getattr(array.sharding, "spec", None)
    return f"shape={tuple(array.shape)} spec={spec} shard={tuple(shard_shape)}"
