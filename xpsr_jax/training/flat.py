"""The trainable parameters as a few large buffers, so the optimizer is a handful of fused ops.

Per-leaf, global-norm clipping + AdamW + the finite guard + EMA over the ~650-1000 trainable
tensors are several XLA fusions per tensor: about half of the train step's program, its compile
time and its tracing time. Every one of those updates is elementwise (or a global sum), so they
give the same numbers on the tensors concatenated into one buffer per (dtype, sharding) group:

    layout = FlatLayout.for_params(params, fsdp_size=mesh.shape["fsdp"], shard=True)
    flat = layout.flatten(params)        # {"float32": f32[n]} or {"float32/fsdp": f32[fsdp, n/fsdp], ...}
    params = layout.unflatten(flat)      # the same tree, bit for bit

Sharding. A replicated tensor is raveled into its group's 1-D buffer. A tensor split over
`fsdp` on axis a (`sharding.fsdp_partition_spec`) has that axis moved first and is reshaped to
(fsdp, -1): row i is exactly device i's shard, so the group buffer (fsdp, n) split on its first
axis keeps every element on the device that already holds it: flattening never gathers.

The optimizer state lives in this layout, in the running state and in checkpoints (their meta
keeps `record()`); `to_per_parameter` / `from_per_parameter` convert an optimizer state between
layouts when a run resumes with another fsdp size. The params and the EMA stay per parameter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xpsr_jax.training.sharding import fsdp_partition_spec

SHARDED_SUFFIX = "/fsdp"


@dataclasses.dataclass(frozen=True)
class _Place:
    """Where one leaf lives: its group, its columns [start, start + width) there, and the axis
    split over fsdp (None: replicated)."""

    group: str
    start: int
    width: int
    shape: tuple[int, ...]
    axis: int | None


class FlatLayout:
    """How a tree of arrays maps onto a few buffers; build with `FlatLayout.for_params`."""

    def __init__(self, treedef: Any, places: tuple[_Place, ...], groups: Mapping[str, tuple[np.dtype, int]],
                 fsdp_size: int, shard: bool, shard_optimizer: bool = False):
        self.treedef = treedef
        self.places = places
        self.groups = dict(groups)  # name -> (dtype, total width)
        self.fsdp_size = fsdp_size
        self.shard = shard
        self.shard_optimizer = shard_optimizer  # replicated params, their flat buffers split over fsdp

    @classmethod
    def for_params(cls, tree: Any, *, fsdp_size: int = 1, shard: bool = False,
                   shard_optimizer: bool = False) -> "FlatLayout":
        """The layout of `tree` (arrays or ShapeDtypeStructs) under the fsdp rule of
        `sharding.tree_shardings(tree, mesh, shard=shard)`. `shard_optimizer` (params replicated):
        each group's buffer is padded to a multiple of fsdp and split over it, so the optimizer state
        made of such buffers is spread over the chips (ZeRO stage 1) while the forward pass sees
        whole parameters and needs no collective."""
        shard = bool(shard) and fsdp_size > 1
        shard_optimizer = bool(shard_optimizer) and fsdp_size > 1 and not shard
        fsdp_size = fsdp_size if shard or shard_optimizer else 1  # one canonical layout per outcome (`record`)
        leaves, treedef = jax.tree.flatten(tree)
        places, widths, dtypes = [], {}, {}
        for leaf in leaves:
            shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
            spec = fsdp_partition_spec(shape, fsdp_size) if shard else P()
            axis = next((i for i, name in enumerate(spec) if name == "fsdp"), None)
            group = dtype.name + (SHARDED_SUFFIX if axis is not None else "")
            width = int(np.prod(shape, dtype=np.int64)) // (fsdp_size if axis is not None else 1)
            places.append(_Place(group, widths.get(group, 0), width, shape, axis))
            widths[group] = widths.get(group, 0) + width
            dtypes[group] = dtype
        return cls(treedef, tuple(places), {g: (dtypes[g], widths[g]) for g in sorted(widths)}, fsdp_size, shard,
                   shard_optimizer)

    def _padded(self, width: int) -> int:
        """A replicated group's buffer length: a multiple of fsdp when it is split over it."""
        return -(-width // self.fsdp_size) * self.fsdp_size if self.shard_optimizer else width

    def _buffer_shape(self, group: str) -> tuple[int, ...]:
        width = self.groups[group][1]
        return (self.fsdp_size, width) if group.endswith(SHARDED_SUFFIX) else (self._padded(width),)

    def flatten(self, tree: Any) -> dict[str, jax.Array]:
        """{group: buffer}; the tree must have this layout's structure, shapes and dtypes."""
        leaves = self.treedef.flatten_up_to(tree)
        parts: dict[str, list] = {group: [] for group in self.groups}
        for place, leaf in zip(self.places, leaves):
            if place.axis is None:
                parts[place.group].append(jnp.reshape(leaf, (-1,)))
            else:
                parts[place.group].append(jnp.reshape(jnp.moveaxis(leaf, place.axis, 0), (self.fsdp_size, -1)))
        flat = {group: jnp.concatenate(chunks, axis=-1) for group, chunks in parts.items()}
        if self.shard_optimizer:  # zero padding, which no update and no norm sees as anything but zeros
            flat = {group: jnp.pad(buffer, (0, self._padded(buffer.shape[0]) - buffer.shape[0]))
                    for group, buffer in flat.items()}
        return flat

    def unflatten(self, flat: Mapping[str, jax.Array]) -> Any:
        """The tree back from `flatten`'s buffers (or any buffers of their shapes)."""
        leaves = []
        for place in self.places:
            buffer = flat[place.group]
            chunk = jax.lax.slice_in_dim(buffer, place.start, place.start + place.width, axis=buffer.ndim - 1)
            if place.axis is None:
                leaves.append(jnp.reshape(chunk, place.shape))
            else:
                moved = (place.shape[place.axis],) + place.shape[:place.axis] + place.shape[place.axis + 1:]
                leaves.append(jnp.moveaxis(jnp.reshape(chunk, moved), 0, place.axis))
        return self.treedef.unflatten(leaves)

    def record(self) -> dict:
        """JSON of what makes two layouts the same (two equal records flatten alike)."""
        record = {"fsdp_size": self.fsdp_size, "shard": self.shard,
                  "groups": {group: [dtype.name, width] for group, (dtype, width) in self.groups.items()}}
        if self.shard_optimizer:  # only when set: the records of earlier checkpoints stay equal
            record["shard_optimizer"] = True
        return record

    def shardings(self, mesh: Mesh) -> dict[str, NamedSharding]:
        """Sharded groups split on their first (device) axis over fsdp; the rest replicated, or
        split over fsdp too with `shard_optimizer`."""
        rest = P("fsdp") if self.shard_optimizer else P()
        return {group: NamedSharding(mesh, P("fsdp", None) if group.endswith(SHARDED_SUFFIX) else rest)
                for group in self.groups}

    def is_flat(self, node: Any) -> bool:
        """True for a {group: buffer} dict of this layout (inside an optimizer state)."""
        return isinstance(node, dict) and set(node) == set(self.groups) and bool(self.groups)

    def map_flat(self, fn: Callable[[dict], Any], tree: Any, other: Callable[[Any], Any] = lambda x: x) -> Any:
        """`fn` on every {group: buffer} dict inside `tree` (e.g. Adam's mu and nu), `other` on
        every other leaf (step counts)."""
        return jax.tree.map(lambda node: fn(node) if self.is_flat(node) else other(node), tree,
                            is_leaf=self.is_flat)

    def tree_shardings(self, tree: Any, mesh: Mesh) -> Any:
        """Shardings of a tree holding flat dicts (an optimizer state): theirs, the rest replicated."""
        replicated = NamedSharding(mesh, P())
        return self.map_flat(lambda _: self.shardings(mesh), tree, lambda _: replicated)

    def to_per_parameter(self, tree: Any) -> Any:
        """Every flat dict inside `tree` unflattened (per parameter, as optax would hold it without
        this layout: the form between two layouts); other leaves kept."""
        return self.map_flat(self.unflatten, tree)

    def is_per_parameter(self, node: Any) -> bool:
        return bool(self.places) and self.treedef == jax.tree.structure(node)

    def from_per_parameter(self, tree: Any) -> Any:
        """Inverse of `to_per_parameter`: every subtree with the parameters' structure flattened."""
        return jax.tree.map(lambda node: self.flatten(node) if self.is_per_parameter(node) else node, tree,
                            is_leaf=self.is_per_parameter)
