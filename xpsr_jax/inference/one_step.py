"""One-step XPSR inference: LR pixels to SR pixels in one pass of ControlNet + UNet.

The generator of the one-step objective (xpsr_jax.training.one_step, after OSEDiff's
`OSEDiff_test.forward`): VAE-encode the LR image (bicubic to the output size), one denoiser
pass at t = 999 with the high- and low-level prompts, the predicted x0 decoded. No sampler, no
guidance, no noise: with the posterior mean the output is a deterministic function of the input.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from xpsr_jax.schedulers import predicted_latents

ONE_STEP_TIMESTEP = 999  # osediff.py: self.timesteps = torch.tensor([999])


def one_step_generate(unet: Any, controlnet: Any, vae: Any, conditioning_pixel_values: jax.Array,
                      highlevel_prompt_embeds: jax.Array, lowlevel_prompt_embeds: jax.Array,
                      vae_sample: jax.Array | None, *, noise_schedule: Any,
                      timestep: int = ONE_STEP_TIMESTEP) -> tuple[jax.Array, jax.Array]:
    """(SR image in [-1, 1], its latents) from LR images in [0, 1] at the output size (NHWC), in
    one pass of ControlNet + UNet. `vae_sample` is the posterior draw (None: its mean, as
    inference). LoRA, where used, is already merged into the networks (`with_lora`)."""
    posterior = vae.encode(conditioning_pixel_values * 2.0 - 1.0)
    moments = posterior.mean if vae_sample is None else posterior.mean + posterior.std * vae_sample.astype(
        posterior.mean.dtype)
    lr_latents = moments.astype(jnp.float32) * vae.config.scaling_factor
    timesteps = jnp.full((lr_latents.shape[0],), timestep, jnp.int32)
    control = controlnet(lr_latents, timesteps, highlevel_prompt_embeds, lowlevel_prompt_embeds,
                         conditioning_pixel_values)
    model_output = unet(lr_latents, timesteps, highlevel_prompt_embeds, lowlevel_prompt_embeds,
                        control.down_block_res_samples, control.mid_block_res_sample)
    latents = predicted_latents(noise_schedule, model_output, lr_latents, timesteps)
    image = jnp.clip(vae.decode(latents / vae.config.scaling_factor).astype(jnp.float32), -1.0, 1.0)
    return image, latents
