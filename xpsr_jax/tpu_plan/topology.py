"""Compile-only TPU devices for a named topology, on any machine with libtpu (the [tpu] extra).

    topology = load_topology("v5p:4x4x4", num_slices=2)
    topology.devices, topology.chips, topology.hosts, topology.generation

`jax.experimental.topologies` gives devices that XLA:TPU compiles for but nothing runs on: this is
how a pod run is checked before it is paid for. libtpu's start-up lines about the missing TPU are
kept out of the output (`xpsr_jax.platforms`).
"""

from __future__ import annotations

from dataclasses import dataclass

from jax.experimental import topologies

from xpsr_jax.platforms import libtpu_installed
from xpsr_jax.tpu_plan.hardware import Generation, generation_of

INSTALL_HINT = 'pip install "xpsr-jax[tpu]" (or pip install -e ".[tpu]" in a checkout): it adds jax[tpu] (libtpu)'


class TopologyError(ValueError):
    """A topology that cannot be described here (the message says why and what is valid)."""


@dataclass(frozen=True)
class Topology:
    name: str
    num_slices: int
    devices: tuple  # every device of every slice, in JAX's order
    generation: Generation

    @property
    def chips(self) -> int:
        return len(self.devices) // self.generation.devices_per_chip

    @property
    def hosts(self) -> int:
        return len({(getattr(d, "slice_index", 0), d.process_index) for d in self.devices})

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    def host_devices(self, host: int = 0) -> list:
        """The devices of one host of the first slice (what one process of a pod sees)."""
        return [d for d in self.devices if d.process_index == host and getattr(d, "slice_index", 0) == 0]


def load_topology(name: str, num_slices: int = 1) -> Topology:
    """The compile-only devices of `num_slices` slices of topology `name` (e.g. "v5e:2x2")."""
    generation = generation_of(name)
    if not libtpu_installed():
        raise TopologyError(f"compiling for TPU needs libtpu: {INSTALL_HINT}")
    if num_slices < 1:
        raise TopologyError(f"--num-slices {num_slices}: give 1 or more")
    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=name, num_slices=num_slices)
    except (RuntimeError, ValueError) as error:  # libtpu's own message names what is wrong with the shape
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TopologyError(f"--topology {name!r}: libtpu does not describe it ({first}); valid: GEN:SHAPE, "
                            "e.g. v5e:2x2, v5e:16x16, v5p:4x4x4, v6e:16x16") from None
    return Topology(name, num_slices, tuple(description.devices), generation)
