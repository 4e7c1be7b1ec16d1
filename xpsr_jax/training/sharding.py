"""One device mesh (data x fsdp), and the shardings of batches, parameters and optimizer state.

The batch is split over both axes (every device gets different examples). A sharded tensor is
split on `fsdp` along its largest dimension divisible by the fsdp size; tensors below
MIN_SHARDED_ELEMENTS (biases, norms) or without a divisible dimension stay replicated. The rule
depends on the shape only, so a parameter and its Adam moments get the same sharding.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xpsr_jax.cli_config import ConfigError, config_value

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
MIN_SHARDED_ELEMENTS = 2 ** 12


def mesh_shape(mesh_config: Any, device_count: int) -> tuple[int, int]:
    """(data, fsdp) sizes; data = -1 takes every device the fsdp axis leaves."""
    given_data = config_value(mesh_config, "data", "mesh")
    data, fsdp = int(given_data), int(config_value(mesh_config, "fsdp", "mesh"))
    if fsdp < 1 or device_count % fsdp:
        raise ConfigError(f"mesh.fsdp={fsdp} must be >= 1 and divide the device count {device_count}")
    if data == -1:
        data = device_count // fsdp
    if data < 1 or data * fsdp != device_count:
        raise ConfigError(f"mesh.data={given_data} x mesh.fsdp={fsdp} must equal the device count "
                          f"{device_count} (mesh.data=-1 uses all devices left over)")
    return data, fsdp


def make_mesh(mesh_config: Any, devices: list | None = None) -> Mesh:
    """Mesh over all devices (or `devices`) with axes ("data", "fsdp"), laid out by `device_grid`."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(device_grid(devices, mesh_shape(mesh_config, len(devices))), MESH_AXES)


def device_grid(devices: list, shape: tuple[int, int]) -> np.ndarray:
    """The (data, fsdp) grid of `devices`. On TPU, laid out on the chips' interconnect
    (`mesh_utils`): fsdp neighbours are ICI neighbours, and with several slices the data axis
    runs over the slices (DCN) outermost, so fsdp's collectives never leave a slice. Other
    devices keep JAX's order."""
    if devices[0].platform != "tpu":
        return np.asarray(devices, dtype=object).reshape(shape)
    slices = len({getattr(device, "slice_index", 0) for device in devices})
    data, fsdp = shape
    if slices > 1:
        if data % slices:
            raise ConfigError(f"mesh.data={data} must be a multiple of the {slices} slices: data parallelism "
                              "spans the slices, fsdp stays inside one")
        return mesh_utils.create_hybrid_device_mesh((data // slices, fsdp), (slices, 1), devices)
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):  # a shape the torus does not split into
        return np.asarray(devices, dtype=object).reshape(shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_partition_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """P with "fsdp" on the largest dimension divisible by fsdp_size; P() if none or too small."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_ELEMENTS:
        return P()
    candidates = [axis for axis, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda a: (shape[a], -a))  # largest; the first among equals
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, *, shard: bool) -> Any:
    """NamedSharding per array leaf of `tree` (arrays or ShapeDtypeStructs): fsdp rule or replicated."""
    fsdp_size = mesh.shape["fsdp"]

    def one(leaf):
        shape = tuple(np.shape(leaf))
        return NamedSharding(mesh, fsdp_partition_spec(shape, fsdp_size) if shard else P())

    return jax.tree.map(one, tree)


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """The global batch from this process's share (each process passes its own rows).

    The global batch size is the local one x the process count; it must divide by the mesh size.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "OUS":  # strings (image ids) stay on the host
            continue
        global_rows = value.shape[0] * jax.process_count()
        if global_rows % mesh.size:
            raise ValueError(f"batch[{key!r}]: global batch {global_rows} is not divisible by the "
                             f"{mesh.size} devices of the mesh {dict(mesh.shape)}")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
