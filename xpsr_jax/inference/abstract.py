"""The sampler as shapes: the sampling networks of an architecture and the sampler's inputs, built
without weights. What a compile-only plan lowers the sampler on (`jit_sampler(...).lower(...)`).

    networks, states, scaling_factor = abstract_sampling_networks(architecture("sd15"), config)
    plan = sampling_plan(config, arch.scheduler, scaling_factor)
    inputs = abstract_sampler_inputs(batch, height, width, context_width=arch.unet.cross_attention_dim)
    lowered = jit_sampler(networks, plan, mesh).lower(states, *inputs)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xpsr_jax.inference.sampling import Networks, PromptEmbeds, split_networks
from xpsr_jax.models import AutoencoderKL, XPSRControlNet, XPSRUNet
from xpsr_jax.models.architectures import Architecture
from xpsr_jax.models.xpsr_unet import XPSRUNetConfig
from xpsr_jax.weights.pretrained import eval_shape_model

TOKENS = 77  # CLIP's context length


def abstract_sampling_networks(arch: Architecture, config: Any) -> tuple[Networks, dict, float]:
    """(graph definitions, abstract states, the VAE's scaling factor) of the release networks on
    `arch` with the inference `config`'s dtypes and attention backend."""
    kwargs = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
                  attention_backend=config.attention_backend)
    unet_config = XPSRUNetConfig.from_sd(arch.unet)
    unet = eval_shape_model(lambda: XPSRUNet(unet_config, rngs=nnx.Rngs(0), **kwargs))
    controlnet = eval_shape_model(lambda: XPSRControlNet.from_unet(unet, rngs=nnx.Rngs(0),
                                                                   load_weights_from_unet=False, **kwargs)[0])
    vae = eval_shape_model(lambda: AutoencoderKL(arch.vae, rngs=nnx.Rngs(0), **kwargs))
    networks, states = split_networks(unet, controlnet, vae)
    return networks, states, float(arch.vae.scaling_factor)


def abstract_sampler_inputs(batch: int, height: int, width: int, *, context_width: int):
    """(conditioning, embeds, noise, keys) of `jit_sampler`'s function for a batch of processed
    `height` x `width` images drawn from seeds, as ShapeDtypeStructs."""
    embed = jax.ShapeDtypeStruct((batch, TOKENS, context_width), jnp.float32)
    return (jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32), PromptEmbeds(embed, embed, embed, embed),
            None, jax.ShapeDtypeStruct((batch, 2), jnp.uint32))
