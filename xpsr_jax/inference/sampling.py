"""The whole XPSR sampling function, pure and jit-able: encode -> noise -> denoising loop -> decode.

`make_sample_fn(networks, plan)` returns `fn(states, conditioning, embeds, noise_or_keys)`; the
whole loop is one `lax.fori_loop`, so one compiled call does every step. Order of operations
and draws as the release's `StableDiffusionControlNetPipeline` (pipelines/pipeline_xpsr.py):

1. latent = VAE posterior sample of (2 * conditioning - 1) [draw `vae_sample`] * scaling factor
2. noised to the first timestep [draw `first`], then again at `added_noise_level` [draw `added`]
   (init "noise": the latent is the `first` draw itself)
3. each step: ControlNet and UNet on the CFG batch ([negative, positive] for BOTH prompt kinds,
   the ControlNet on the doubled batch too), guidance, sampler step [DDPM: draw `steps[i]`]
4. VAE decode of latents / scaling factor; uint8 image after the colour fix.
With init "one_step" (one-step XPSR weights) steps 2-3 are one unguided pass at t = 999 on the LR
latent, whose predicted x0 is decoded (`_one_step`).

CFG pairs are laid out per image ([neg_0, pos_0, neg_1, pos_1, ...]) rather than the release's
[all negatives, all positives]: every network is per-sample, so the numbers are the same, and a
batch sharded over devices keeps each image's pair on its device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from xpsr_jax.inference.color_fix import to_uint8_image
from xpsr_jax.inference.one_step import ONE_STEP_TIMESTEP
from xpsr_jax.inference.tiling import (
    VAE_DECODER_PAD,
    VAE_ENCODER_PAD,
    latent_tiling_applies,
    run_tiled,
    run_tiled_streaming,
    tiled_model_call,
    vae_tiles,
    with_tile_synced_group_norm,
)
from xpsr_jax.models.layers import deinterleave, interleave
from xpsr_jax.models.vae import DiagonalGaussian
from xpsr_jax.schedulers import NoiseSchedule, Sampler, add_noise, predicted_latents


class PromptEmbeds(NamedTuple):
    """Text-encoder outputs, each (B, 77, D): the positive and negative prompts of both kinds."""

    highlevel: jax.Array
    highlevel_negative: jax.Array
    lowlevel: jax.Array
    lowlevel_negative: jax.Array


class SamplingNoise(NamedTuple):
    """Every random draw of one sampling run, NHWC latents (B, h, w, 4).

    vae_sample: the standard-normal draw of the VAE posterior sample; first: the noise added at
    the first timestep (with init "noise": the initial latent); added: the noise added at
    `added_noise_level`; steps: (num_steps, B, h, w, 4), the DDPM per-step draws (None otherwise).
    """

    vae_sample: jax.Array
    first: jax.Array
    added: jax.Array
    steps: jax.Array | None = None


class SampleOutput(NamedTuple):
    """latents_init: the latent entering the loop; latents: the final latent; decoded: the raw VAE
    output (NHWC, not clamped); images: uint8 after the colour fix, at the processed size."""

    latents_init: jax.Array
    latents: jax.Array
    decoded: jax.Array
    images: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """Everything static about one sampling function (part of the compilation key)."""

    sampler: Sampler
    noise_schedule: NoiseSchedule
    guidance_scale: float
    conditioning_scale: float
    init: str
    added_noise_level: int
    color_fix: str
    scaling_factor: float
    tiling: bool
    latent_tile_size: int
    latent_tile_overlap: int
    tile_batch_size: int
    vae_encoder_tile_size: int
    vae_decoder_tile_size: int
    vae_streaming: bool = True  # VAE tiles one at a time (run_tiled_streaming), else all at once

    @property
    def classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0


class Networks(NamedTuple):
    """Graph definitions (static) of the sampling networks; their states travel as arguments."""

    unet: Any
    controlnet: Any
    vae: Any
    vae_tiled: Any  # the VAE with GroupNorm statistics pooled over tiles


def split_networks(unet: nnx.Module, controlnet: nnx.Module, vae: nnx.Module) -> tuple[Networks, dict]:
    """(graph definitions, states) — split once; the states are what a jitted call takes."""
    unet_def, unet_state = nnx.split(unet)
    controlnet_def, controlnet_state = nnx.split(controlnet)
    vae_def, vae_state = nnx.split(vae)
    vae_tiled_def, _ = nnx.split(with_tile_synced_group_norm(vae))
    states = {"unet": unet_state, "controlnet": controlnet_state, "vae": vae_state}
    return Networks(unet_def, controlnet_def, vae_def, vae_tiled_def), states


def draw_noise(keys: jax.Array, latent_shape: tuple[int, int, int]) -> tuple[SamplingNoise, jax.Array]:
    """Per-image draws from per-image keys (B, 2): (vae_sample, first, added) and the step keys."""
    def one(key):
        vae_key, first_key, added_key, step_key = jax.random.split(key, 4)
        return (jax.random.normal(vae_key, latent_shape), jax.random.normal(first_key, latent_shape),
                jax.random.normal(added_key, latent_shape), step_key)

    vae_sample, first, added, step_keys = jax.vmap(one)(keys)
    return SamplingNoise(vae_sample, first, added, None), step_keys


def step_noise_from_keys(step_keys: jax.Array, index: jax.Array, latent_shape) -> jax.Array:
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, index), latent_shape))(step_keys)


def _vae_encode_moments(networks: Networks, plan: SamplingPlan, vae_state, image: jax.Array):
    tiles = vae_tiles(image.shape[1], image.shape[2], plan.vae_encoder_tile_size, VAE_ENCODER_PAD, align=8) \
        if plan.tiling else None
    if tiles is None:
        posterior = nnx.merge(networks.vae, vae_state).encode(image)
        return posterior.mean, posterior.std
    if plan.vae_streaming:
        vae = nnx.merge(networks.vae, vae_state)
        moments = run_tiled_streaming(vae, lambda m: m.encode_stages(), image.astype(vae.dtype), tiles, 1 / 8)
        posterior = DiagonalGaussian.from_moments(moments)
        return posterior.mean, posterior.std
    vae = nnx.merge(networks.vae_tiled, vae_state)

    def encode(window):
        posterior = vae.encode(window)
        return jnp.concatenate([posterior.mean, posterior.std], axis=-1)

    moments = run_tiled(encode, image, tiles, 1 / 8)
    return jnp.split(moments, 2, axis=-1)


def _vae_decode(networks: Networks, plan: SamplingPlan, vae_state, latents: jax.Array) -> jax.Array:
    tiles = vae_tiles(latents.shape[1], latents.shape[2], plan.vae_decoder_tile_size, VAE_DECODER_PAD) \
        if plan.tiling else None
    if tiles is None:
        return nnx.merge(networks.vae, vae_state).decode(latents)
    if plan.vae_streaming:
        vae = nnx.merge(networks.vae, vae_state)
        return run_tiled_streaming(vae, lambda m: m.decode_stages(), latents.astype(vae.dtype), tiles, 8)
    return run_tiled(nnx.merge(networks.vae_tiled, vae_state).decode, latents, tiles, 8)


def guided_noise(networks: Networks, plan: SamplingPlan, states, latents, timestep, image, embeds: PromptEmbeds):
    """The guided epsilon for `latents` (B, h, w, 4) at integer `timestep`."""
    unet = nnx.merge(networks.unet, states["unet"])
    controlnet = nnx.merge(networks.controlnet, states["controlnet"])
    if plan.classifier_free_guidance:
        model_latents = interleave(latents, latents)
        model_image = interleave(image, image)
        highlevel = interleave(embeds.highlevel_negative, embeds.highlevel)
        lowlevel = interleave(embeds.lowlevel_negative, embeds.lowlevel)
    else:
        model_latents, model_image, highlevel, lowlevel = latents, image, embeds.highlevel, embeds.lowlevel

    def model(latent_tiles, image_tiles, tiles_per_sample):
        high = jnp.repeat(highlevel, tiles_per_sample, axis=0)
        low = jnp.repeat(lowlevel, tiles_per_sample, axis=0)
        timesteps = jnp.full((latent_tiles.shape[0],), timestep, jnp.int32)
        control = controlnet(latent_tiles, timesteps, high, low, image_tiles,
                             conditioning_scale=plan.conditioning_scale)
        eps = unet(latent_tiles, timesteps, high, low, control.down_block_res_samples,
                   control.mid_block_res_sample)
        return eps.astype(jnp.float32)

    height, width = latents.shape[1:3]
    if plan.tiling and latent_tiling_applies(height, width, plan.latent_tile_size):
        eps = tiled_model_call(model, model_latents, model_image, tile_size=plan.latent_tile_size,
                               overlap=plan.latent_tile_overlap, tile_batch_size=plan.tile_batch_size)
    else:
        eps = model(model_latents, model_image, 1)
    if not plan.classifier_free_guidance:
        return eps
    uncond, text = deinterleave(eps)
    return uncond + plan.guidance_scale * (text - uncond)


def _one_step(networks: Networks, plan: SamplingPlan, states, conditioning: jax.Array, embeds: PromptEmbeds,
              vae_sample: jax.Array) -> SampleOutput:
    """One-step XPSR (xpsr_jax.inference.one_step) with this module's tiling: the LR latent (a
    posterior sample, as OSEDiff's test) -> one unguided ControlNet + UNet pass at t = 999 -> x0."""
    mean, std = _vae_encode_moments(networks, plan, states["vae"], conditioning * 2.0 - 1.0)
    lr_latents = (mean.astype(jnp.float32) + std.astype(jnp.float32) * vae_sample) * plan.scaling_factor
    eps = guided_noise(networks, plan, states, lr_latents, ONE_STEP_TIMESTEP, conditioning, embeds)
    timesteps = jnp.full((lr_latents.shape[0],), ONE_STEP_TIMESTEP, jnp.int32)
    latents = predicted_latents(plan.noise_schedule, eps, lr_latents, timesteps)
    decoded = _vae_decode(networks, plan, states["vae"], latents / plan.scaling_factor)
    return SampleOutput(lr_latents, latents, decoded, to_uint8_image(decoded, conditioning, plan.color_fix))


def sample(networks: Networks, plan: SamplingPlan, states, conditioning: jax.Array, embeds: PromptEmbeds,
           noise: SamplingNoise | None = None, keys: jax.Array | None = None) -> SampleOutput:
    """One sampling run. conditioning: (B, H, W, 3) float in [0, 1] (the preprocessed LR / 255);
    draws from `noise` when given, else from the per-image `keys` (B, 2)."""
    batch, height, width = conditioning.shape[:3]
    latent_shape = (height // 8, width // 8, 4)
    conditioning = conditioning.astype(jnp.float32)
    if noise is None:
        noise, step_keys = draw_noise(keys, latent_shape)
        step_noise = lambda i: step_noise_from_keys(step_keys, i, latent_shape)  # noqa: E731
    else:
        steps = noise.steps
        step_noise = (lambda i: steps[i]) if steps is not None else (lambda i: None)  # noqa: E731
    sampler, schedule = plan.sampler, plan.noise_schedule
    timesteps = jnp.asarray(sampler.timesteps, jnp.int32)

    if plan.init == "one_step":
        return _one_step(networks, plan, states, conditioning, embeds, noise.vae_sample)
    if plan.init == "lr_latent":
        mean, std = _vae_encode_moments(networks, plan, states["vae"], conditioning * 2.0 - 1.0)
        latents = (mean.astype(jnp.float32) + std.astype(jnp.float32) * noise.vae_sample) * plan.scaling_factor
        latents = add_noise(schedule, latents, noise.first, jnp.full((batch,), timesteps[0]))
        if plan.added_noise_level >= 0:
            latents = add_noise(schedule, latents, noise.added, jnp.full((batch,), plan.added_noise_level))
    else:
        latents = noise.first.astype(jnp.float32)
    latents_init = latents * sampler.init_noise_sigma

    def body(index, carry):
        latents, sampler_state = carry
        eps = guided_noise(networks, plan, states, latents, timesteps[index], conditioning, embeds)
        draw = step_noise(index) if sampler.needs_step_noise else None
        return sampler.step(sampler_state, index, eps, latents, draw)

    latents, _ = jax.lax.fori_loop(0, len(sampler.timesteps), body,
                                   (latents_init, sampler.init_state(latents_init)))
    decoded = _vae_decode(networks, plan, states["vae"], latents / plan.scaling_factor)
    images = to_uint8_image(decoded, conditioning, plan.color_fix)
    return SampleOutput(latents_init, latents, decoded, images)
