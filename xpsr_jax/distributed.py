"""Joining a multi-process run (one process per host, or several on one machine): the one
start-up path of `train.py` and `infer.py`.

    initialize_distributed(DistributedOptions(coordinator_address="10.0.0.1:1234", num_processes=4,
                                              process_id=rank))
    initialize_distributed(DistributedOptions(auto=True))     # TPU pods, SLURM: JAX's detection
"""

from __future__ import annotations

import dataclasses
import os

import jax
from jax._src import distributed as jax_distributed  # the client JAX started: no public handle to its barrier


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """How to join a multi-process run; `None` fields come from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID. auto=True calls jax.distributed.initialize() with JAX's
    cluster auto-detection (TPU pods, SLURM, ...)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @classmethod
    def from_args(cls, args) -> DistributedOptions:
        """From the flags of `xpsr_jax.cli_config.add_distributed_arguments`."""
        return cls(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                   process_id=args.process_id, auto=bool(args.distributed_auto))


def wait_for_every_process(name: str, timeout_s: float = 3600.0) -> None:
    """Returns once every process has called it with `name` (no-op with one process).

    The coordination service's barrier, not a device collective: on CPU, gloo gives up connecting
    when one process reaches the first collective long before another (one compiles the train step
    while the other loaded it from the compile cache), and the run dies with "Gloo context
    initialization failed: Connect timeout"."""
    if jax.process_count() == 1:
        return
    jax_distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def initialize_distributed(options: DistributedOptions | None = None) -> bool:
    """jax.distributed.initialize when more than one process is configured; True if it ran."""
    options = options or DistributedOptions()
    address = options.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = options.num_processes
    if count is None and os.environ.get("JAX_NUM_PROCESSES"):
        count = int(os.environ["JAX_NUM_PROCESSES"])
    process_id = options.process_id
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if jax.distributed.is_initialized():
        return True
    if options.auto:
        jax.distributed.initialize()
    elif count is not None and count > 1:
        if not address or process_id is None:
            raise ValueError(f"{count} processes need a coordinator address and a process id "
                             f"(got coordinator_address={address!r}, process_id={process_id!r})")
        # CPU collectives across processes (harmless for GPU / TPU clients).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=address, num_processes=count,
                                   process_id=process_id)
    else:
        return False
    return True
