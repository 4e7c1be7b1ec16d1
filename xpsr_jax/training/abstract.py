"""The training setup as shapes: the four networks, the sharded train state and a batch, built
without allocating or initialising anything. What a compile-only plan for a TPU pod and the
compile-time benchmark lower the train step on.

    models = abstract_training_models(architecture("sd15"), config)
    graphdefs, state, frozen = abstract_train_state(models, config, mesh)
    batch = abstract_batch(batch_size, config.pipeline.resolution)
    lowered, seconds = lower_train_step(config, graphdefs, noise_schedule, mesh, state, frozen, batch)

A one-step run (objective "one_step"): `abstract_one_step_networks` + `abstract_one_step_state`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from xpsr_jax.models import AutoencoderKL, CLIPTextEncoder, UNet2DCondition, XPSRControlNet, XPSRUNet
from xpsr_jax.models.architectures import Architecture
from xpsr_jax.models.dtypes import dtype_from_name
from xpsr_jax.models.lpips import LPIPS
from xpsr_jax.models.xpsr_unet import XPSRUNetConfig
from xpsr_jax.training.models import XPSRModels, remat_block_types, sfa_overrides
from xpsr_jax.training.one_step import OneStepNetworks
from xpsr_jax.training.one_step_train import create_one_step_state, split_one_step
from xpsr_jax.training.step import TrainState, create_train_state, split_models
from xpsr_jax.weights.pretrained import eval_shape_model

TOKENS = 77  # CLIP's context length: the prompts' token ids per example


def abstract_training_models(arch: Architecture, config: Any) -> XPSRModels:
    """The networks of a run of `config` on `arch`, as shapes: the dtypes, SFA switches, remat
    policies and attention backend of the config, as `load_training_models` builds them."""
    kwargs = dict(dtype=dtype_from_name(config.precision.compute_dtype, "precision.compute_dtype"),
                  param_dtype=dtype_from_name(config.precision.param_dtype, "precision.param_dtype"),
                  attention_backend=config.attention_backend)
    unet_config = XPSRUNetConfig.from_sd(arch.unet, **sfa_overrides(config.model.to_dict()))
    unet = eval_shape_model(lambda: XPSRUNet(unet_config, rngs=nnx.Rngs(0), **kwargs))
    controlnet = eval_shape_model(lambda: XPSRControlNet.from_unet(unet, rngs=nnx.Rngs(0),
                                                                   load_weights_from_unet=False, **kwargs)[0])
    unet.remat_block_types = remat_block_types(config.remat.unet, "remat.unet")
    controlnet.remat_block_types = remat_block_types(config.remat.controlnet, "remat.controlnet")
    vae = eval_shape_model(lambda: AutoencoderKL(arch.vae, rngs=nnx.Rngs(0), **kwargs))
    text_encoder = eval_shape_model(lambda: CLIPTextEncoder(arch.text_encoder, rngs=nnx.Rngs(0), **kwargs))
    return XPSRModels(unet=unet, controlnet=controlnet, vae=vae, text_encoder=text_encoder)


def abstract_train_state(models: XPSRModels, config: Any, mesh: Mesh) -> tuple[dict, TrainState, Any]:
    """(graphdefs, state, frozen) of `create_train_state` on `mesh`, as ShapeDtypeStructs."""
    graphdefs = split_models(models)[0]
    names = list(XPSRModels._fields)
    definitions, states = zip(*(nnx.split(getattr(models, name)) for name in names))

    def build(states):
        merged = XPSRModels(**{n: nnx.merge(d, s) for n, d, s in zip(names, definitions, states)})
        return create_train_state(merged, config, mesh)[:2]

    state, frozen = jax.eval_shape(build, list(states))
    return graphdefs, state, frozen


def abstract_one_step_networks(arch: Architecture, config: Any) -> OneStepNetworks:
    """The networks of a one-step run (objective "one_step") of `config` on `arch`, as shapes:
    XPSR's four, the frozen SD UNet (VSD's score, the regulariser's base) and LPIPS."""
    models = abstract_training_models(arch, config)
    kwargs = dict(dtype=dtype_from_name(config.precision.compute_dtype, "precision.compute_dtype"),
                  param_dtype=dtype_from_name(config.precision.param_dtype, "precision.param_dtype"))
    sd_unet = eval_shape_model(lambda: UNet2DCondition(arch.unet, rngs=nnx.Rngs(0),
                                                       attention_backend=config.attention_backend, **kwargs))
    lpips = eval_shape_model(lambda: LPIPS(rngs=nnx.Rngs(0), **kwargs))
    return OneStepNetworks(unet=models.unet, controlnet=models.controlnet, vae=models.vae,
                           text_encoder=models.text_encoder, sd_unet=sd_unet, lpips=lpips)


def abstract_one_step_state(networks: OneStepNetworks, config: Any, mesh: Mesh) -> tuple[dict, TrainState, Any]:
    """(graphdefs, state, frozen) of `create_one_step_state` on `mesh`, as ShapeDtypeStructs."""
    graphdefs = split_one_step(networks, {})[0]
    definitions, states = zip(*(nnx.split(module) for module in networks))

    def build(states):
        merged = OneStepNetworks(*(nnx.merge(d, s) for d, s in zip(definitions, states)))
        return create_one_step_state(merged, config, mesh)[:2]

    state, frozen = jax.eval_shape(build, list(states))
    return graphdefs, state, frozen


def abstract_batch(batch_size: int, resolution: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A training batch of `batch_size` examples at `resolution` px, as shapes (NHWC images)."""
    images = jax.ShapeDtypeStruct((batch_size, resolution, resolution, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((batch_size, TOKENS), jnp.int32)
    return {"pixel_values": images, "conditioning_pixel_values": images, "highlevel_input_ids": ids,
            "lowlevel_input_ids": ids}
