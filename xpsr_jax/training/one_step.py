"""The one-step XPSR objective: OSEDiff's (Wu et al., NeurIPS 2024) with XPSR's networks and priors.

Follows the official OSEDiff code (github cswry/OSEDiff, `osediff.py` and `train_osediff.py`):
    generator (OSEDiff_gen.forward):
        lr_latents = vae_lora.encode(LR).latent_dist.sample() * scaling_factor
        eps = denoiser(lr_latents, t=999, prompts)
        latents = DDPMScheduler(set_timesteps(1)).step(eps, 999, lr_latents).prev_sample
        image = vae.decode(latents / scaling_factor).clamp(-1, 1)
    generator loss = lambda_l2 * mse(image, HR) + lambda_lpips * LPIPS(image, HR).mean()
                     + lambda_vsd * distribution_matching_loss(latents)            (VSD)
    regulariser loss = lambda_vsd_lora * diff_loss(latents.detach())               (its own step)
Here the denoiser is XPSR's ControlNet + UNet: the LR image (in [0, 1]) is the ControlNet's
condition, the high- and low-level MLLM prompts go through SFA as in XPSR, and the UNet's SD
tensors carry LoRA (XPSR's own trainable modules and the ControlNet train fully, as XPSR trains
them, and conv_in fully, as OSEDiff). VSD's two score networks are the frozen SD 1.5 UNet (with
classifier-free guidance `cfg_vsd` between the negative prompt and the high-level prompt) and the
"regulariser", SD 1.5 + LoRA, both on the high-level prompt (SD 1.5 has one text stream; OSEDiff
gives them its RAM tags). DDPM's step at t=999 to t=-1 is the predicted x0 exactly, plus its
variance term sqrt(1e-20) * noise, which we leave out. The random draws are injected
(`OneStepDraws`), so the objective is a pure function.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from xpsr_jax.inference.one_step import one_step_generate
from xpsr_jax.models.layers import deinterleave, interleave
from xpsr_jax.models.lora import with_lora
from xpsr_jax.schedulers import add_noise, predicted_latents
from xpsr_jax.training.loss import BATCH_KEYS, encode_prompts

VSD_TIMESTEP_RANGE = (20, 980)  # osediff.py distribution_matching_loss: torch.randint(20, 980, ...)


class OneStepDraws(NamedTuple):
    """Every random draw of one step. vae_sample: the generator's VAE posterior draw; vsd_*: the
    VSD loss's timesteps (B,) in VSD_TIMESTEP_RANGE and noise; regulariser_*: the regulariser's
    diffusion loss's timesteps (B,) in [0, T) and noise. Latent-shaped arrays (B, h, w, c) float32."""

    vae_sample: jax.Array
    vsd_timesteps: jax.Array
    vsd_noise: jax.Array
    regulariser_timesteps: jax.Array
    regulariser_noise: jax.Array


def sample_one_step_draws(key: jax.Array, batch_size: int, latent_shape: tuple[int, int, int],
                          num_train_timesteps: int) -> OneStepDraws:
    keys = jax.random.split(key, 5)
    shape = (batch_size, *latent_shape)
    low, high = VSD_TIMESTEP_RANGE
    return OneStepDraws(
        vae_sample=jax.random.normal(keys[0], shape, jnp.float32),
        vsd_timesteps=jax.random.randint(keys[1], (batch_size,), low, high, dtype=jnp.int32),
        vsd_noise=jax.random.normal(keys[2], shape, jnp.float32),
        regulariser_timesteps=jax.random.randint(keys[3], (batch_size,), 0, num_train_timesteps, dtype=jnp.int32),
        regulariser_noise=jax.random.normal(keys[4], shape, jnp.float32),
    )


class OneStepNetworks(NamedTuple):
    """unet / controlnet: XPSR's (the generator's denoiser); vae; text_encoder; sd_unet: the frozen
    SD 1.5 UNet (VSD's real score, and the regulariser's base); lpips: an LPIPS module."""

    unet: Any
    controlnet: Any
    vae: Any
    text_encoder: Any
    sd_unet: Any
    lpips: Any


class OneStepLoRA(NamedTuple):
    """LoRA sets (xpsr_jax.models.lora) of the generator's UNet and VAE encoder, and of the
    regulariser (on the SD 1.5 UNet)."""

    unet: Mapping[str, Any]
    vae: Mapping[str, Any]
    regulariser: Mapping[str, Any]


class OneStepWeights(NamedTuple):
    """train_osediff.py's defaults: --lambda_l2 1, --lambda_lpips 2, --lambda_vsd 1,
    --lambda_vsd_lora 1, --cfg_vsd 7.5 (scripts/train/train_osediff.sh sets the same)."""

    l2: float = 1.0
    lpips: float = 2.0
    vsd: float = 1.0
    regulariser: float = 1.0
    cfg_vsd: float = 7.5


def vsd_loss(sd_unet: Any, regulariser_unet: Any, latents: jax.Array, prompt_embeds: jax.Array,
             negative_prompt_embeds: jax.Array, timesteps: jax.Array, noise: jax.Array, *,
             noise_schedule: Any, cfg_vsd: float) -> jax.Array:
    """OSEDiff's `distribution_matching_loss`: the gradient (x0_regulariser - x0_sd_cfg) / w, w the
    mean |latents - x0_sd_cfg| per example, applied to `latents` through mse(latents,
    sg(latents - gradient)). Neither score network gets a gradient."""
    noisy = jax.lax.stop_gradient(add_noise(noise_schedule, latents, noise, timesteps))
    prompt_embeds = jax.lax.stop_gradient(prompt_embeds)
    update_output = regulariser_unet(noisy, timesteps, prompt_embeds)
    x0_update = predicted_latents(noise_schedule, update_output, noisy, timesteps)
    # The guidance pair of each example side by side ([neg_0, pos_0, neg_1, ...]), not the two
    # batches end to end: a batch sharded over devices keeps each example's pair on its device.
    both = sd_unet(interleave(noisy, noisy), interleave(timesteps, timesteps),
                   interleave(jax.lax.stop_gradient(negative_prompt_embeds), prompt_embeds))
    uncond, text = deinterleave(both.astype(jnp.float32))
    x0_fix = predicted_latents(noise_schedule, uncond + cfg_vsd * (text - uncond), noisy, timesteps)
    x0_update, x0_fix = jax.lax.stop_gradient(x0_update), jax.lax.stop_gradient(x0_fix)
    weighting = jnp.mean(jnp.abs(latents - x0_fix), axis=(1, 2, 3), keepdims=True)
    target = jax.lax.stop_gradient(latents - (x0_update - x0_fix) / weighting)
    return jnp.mean(jnp.square(latents - target))


def regulariser_loss(regulariser_unet: Any, latents: jax.Array, prompt_embeds: jax.Array, timesteps: jax.Array,
                     noise: jax.Array, *, noise_schedule: Any) -> jax.Array:
    """OSEDiff's `diff_loss`: the regulariser's epsilon loss on the generator's (detached) latents."""
    latents = jax.lax.stop_gradient(latents)
    noisy = add_noise(noise_schedule, latents, noise, timesteps)
    output = regulariser_unet(noisy, timesteps, jax.lax.stop_gradient(prompt_embeds))
    return jnp.mean(jnp.square(output.astype(jnp.float32) - noise.astype(jnp.float32)))


class GeneratorOutput(NamedTuple):
    latents: jax.Array
    highlevel_prompt_embeds: jax.Array


def one_step_generator_loss(networks: OneStepNetworks, lora: OneStepLoRA, lora_scaling: float,
                            batch: Mapping[str, jax.Array], negative_input_ids: jax.Array, draws: OneStepDraws, *,
                            noise_schedule: Any, weights: OneStepWeights = OneStepWeights(),
                            ) -> tuple[jax.Array, tuple[dict[str, jax.Array], GeneratorOutput]]:
    """(loss, (terms, GeneratorOutput)); terms: loss, l2, lpips, vsd (unweighted). The regulariser
    takes `GeneratorOutput` in its own loss (its own optimizer step, as the official code)."""
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"one_step_generator_loss: batch lacks {missing}; it needs {list(BATCH_KEYS)}")
    high, low = encode_prompts(networks.text_encoder, batch["highlevel_input_ids"], batch["lowlevel_input_ids"])
    unet = with_lora(networks.unet, lora.unet, lora_scaling)
    vae = with_lora(networks.vae, lora.vae, lora_scaling)
    image, latents = one_step_generate(unet, networks.controlnet, vae, batch["conditioning_pixel_values"], high, low,
                                       draws.vae_sample, noise_schedule=noise_schedule)
    target = batch["pixel_values"].astype(jnp.float32)
    l2 = jnp.mean(jnp.square(image - target))
    lpips = jnp.mean(networks.lpips(image, target))
    negative = jax.lax.stop_gradient(networks.text_encoder(negative_input_ids))
    negative = jnp.broadcast_to(negative, (high.shape[0],) + negative.shape[1:])
    regulariser_unet = with_lora(networks.sd_unet, lora.regulariser, lora_scaling)
    vsd = vsd_loss(networks.sd_unet, regulariser_unet, latents, high, negative, draws.vsd_timesteps, draws.vsd_noise,
                   noise_schedule=noise_schedule, cfg_vsd=weights.cfg_vsd)
    loss = weights.l2 * l2 + weights.lpips * lpips + weights.vsd * vsd
    terms = {"loss": loss, "l2": l2, "lpips": lpips, "vsd": vsd}
    return loss, (terms, GeneratorOutput(jax.lax.stop_gradient(latents), jax.lax.stop_gradient(high)))
