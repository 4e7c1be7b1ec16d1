"""Our two programs lowered for a TPU topology, from shapes alone: the train step of a train config
and the sampler of an inference config.

    program = train_program(config, architecture("sd15"), topology, batch_per_chip=2)
    program = sample_program(config, architecture("sd15"), topology, batch_per_chip=4, size=(512, 512))
    program.lowered.compile()      # XLA:TPU, on this machine

The train step runs on one mesh over every chip of every slice (config.mesh: data x fsdp), as
train.py runs it on the pod. The sampler runs as infer.py does: each host on its own chips, so it
is planned for the chips of one host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from xpsr_jax.inference.abstract import abstract_sampler_inputs, abstract_sampling_networks
from xpsr_jax.inference.pipeline import jit_sampler, sampling_plan
from xpsr_jax.models.architectures import Architecture
from xpsr_jax.schedulers import noise_schedule_from_config
from xpsr_jax.tpu_plan.topology import Topology
from xpsr_jax.training.abstract import (
    TOKENS,
    abstract_batch,
    abstract_one_step_networks,
    abstract_one_step_state,
    abstract_train_state,
    abstract_training_models,
)
from xpsr_jax.training.one_step_train import one_step_step_fn
from xpsr_jax.training.sharding import make_mesh
from xpsr_jax.training.step import lower_train_step


@dataclass
class Program:
    name: str  # "train" | "sample"
    lowered: Any  # jax.stages.Lowered
    devices: int  # chips the program is partitioned over
    images_per_chip: int  # per step (train) or per sampling call (sample)
    lower_seconds: float  # tracing and lowering here
    description: str


def train_program(config: Any, arch: Architecture, topology: Topology, *, batch_per_chip: int) -> Program:
    """The train step of `config` for every device of `topology`, `batch_per_chip` examples each."""
    devices = list(topology.devices)
    mesh = make_mesh(config.mesh, devices)
    schedule = noise_schedule_from_config(arch.scheduler)
    step_fn = None
    if config.get("objective", "xpsr") == "one_step":
        graphdefs, state, frozen = abstract_one_step_state(abstract_one_step_networks(arch, config), config, mesh)
        # The negative prompt's ids are a constant of the program; their values do not change its cost.
        step_fn = one_step_step_fn(config, graphdefs, schedule, mesh, state,
                                   negative_input_ids=np.zeros((1, TOKENS), np.int32))
    else:
        graphdefs, state, frozen = abstract_train_state(abstract_training_models(arch, config), config, mesh)
    batch = abstract_batch(batch_per_chip * len(devices), int(config.pipeline.resolution))
    lowered, seconds = lower_train_step(config, graphdefs, schedule, mesh, state, frozen, batch, step_fn=step_fn)
    data, fsdp = mesh.shape["data"], mesh.shape["fsdp"]
    objective = " (one-step objective)" if step_fn is not None else ""
    description = (f"train step{objective}, {batch_per_chip} image(s) of {config.pipeline.resolution} px per chip "
                   f"({batch_per_chip * len(devices)} per step), mesh data={data} x fsdp={fsdp} "
                   f"(shard_trainable={config.mesh.shard_trainable}, shard_frozen={config.mesh.shard_frozen}), "
                   f"remat unet={config.remat.unet} controlnet={config.remat.controlnet}, compute "
                   f"{config.precision.compute_dtype}, attention {config.attention_backend}")
    return Program("train", lowered, len(devices), batch_per_chip, seconds, description)


def sample_program(config: Any, arch: Architecture, topology: Topology, *, batch_per_chip: int,
                   size: tuple[int, int]) -> Program:
    """The sampler of the inference `config` for the chips of one host of `topology`,
    `batch_per_chip` images of the processed `size` (height, width) each."""
    devices = topology.host_devices(0)
    mesh = Mesh(np.asarray(devices), ("data",))
    networks, states, scaling_factor = abstract_sampling_networks(arch, config)
    plan = sampling_plan(config, arch.scheduler, scaling_factor)
    inputs = abstract_sampler_inputs(batch_per_chip * len(devices), *size, context_width=arch.unet.cross_attention_dim)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = jit_sampler(networks, plan, mesh).lower(states, *inputs)
    seconds = time.perf_counter() - start
    guidance = f"guidance {config.guidance_scale}" if plan.classifier_free_guidance else "no guidance"
    description = (f"sampler, {batch_per_chip} image(s) of {size[0]}x{size[1]} px per chip, {len(devices)} chips of "
                   f"one host ({config.sampler}, {config.num_inference_steps} steps, {guidance}, tiling "
                   f"{'on' if config.tiling.enabled else 'off'}, {config.dtype}, attention {config.attention_backend})")
    return Program("sample", lowered, len(devices), batch_per_chip, seconds, description)
