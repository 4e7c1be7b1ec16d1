"""PyTorch reference of the one-step objective: the official OSEDiff lines with XPSR's denoiser.

Replays github cswry/OSEDiff `osediff.py` (OSEDiff_gen.forward, OSEDiff_reg.distribution_matching_loss,
OSEDiff_reg.diff_loss, eps_to_mu) and the loss lines of `train_osediff.py`, with the random draws
injected. LoRA is peft's (`inject_adapter_in_model`, LoraConfig with peft's defaults, as the
official `add_adapter` calls); the XPSR ControlNet + UNet (tests/torch_reference) take the place of
OSEDiff's UNet, with the LR image as ControlNet condition and the two prompts through SFA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model

ONE_STEP_TIMESTEP = 999
ADAPTER = "default"


def add_lora(module: torch.nn.Module, targets, rank: int) -> torch.nn.Module:
    """peft LoRA on `targets` (full module names), init "gaussian" as OSEDiff's LoraConfig."""
    config = LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=list(targets))
    return inject_adapter_in_model(config, module, adapter_name=ADAPTER)


def lora_state(module: torch.nn.Module, grads: bool = False) -> dict:
    return {name: (p.grad if grads else p).detach().numpy().copy() for name, p in module.named_parameters()
            if ".lora_" in name}


def one_step_scheduler(scheduler):
    """OSEDiff calls `set_timesteps(1)` and steps from 999; diffusers 0.25.0 (its requirements) then
    steps to prev_t = 999 - 1000 // 1 = -1. Newer diffusers look the timestep up in `timesteps`, so
    the same step is `set_timesteps(timesteps=[999])` there: prev_t = -1, alpha_prod_t_prev = 1."""
    scheduler.set_timesteps(timesteps=[ONE_STEP_TIMESTEP])
    return scheduler


def generator_forward(vae, unet, controlnet, scheduler, conditioning01, high, low, vae_draw):
    """OSEDiff_gen.forward: (output_image, x_denoised)."""
    c_t = conditioning01 * 2 - 1
    latent_dist = vae.encode(c_t).latent_dist
    encoded_control = (latent_dist.mean + latent_dist.std * vae_draw) * vae.config.scaling_factor
    timesteps = torch.full((c_t.shape[0],), ONE_STEP_TIMESTEP).long()
    _, _, down, mid, _ = controlnet(encoded_control, timesteps, high, low, conditioning01).to_official_tuple()
    model_pred = unet(encoded_control, timesteps, high, low, down, mid)
    x_denoised = scheduler.step(model_pred, ONE_STEP_TIMESTEP, encoded_control, return_dict=True).prev_sample
    output_image = (vae.decode(x_denoised / vae.config.scaling_factor).sample).clamp(-1, 1)
    return output_image, x_denoised


def eps_to_mu(scheduler, model_output, sample, timesteps):
    alphas_cumprod = scheduler.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
    alpha_prod_t = alphas_cumprod[timesteps]
    while len(alpha_prod_t.shape) < len(sample.shape):
        alpha_prod_t = alpha_prod_t.unsqueeze(-1)
    beta_prod_t = 1 - alpha_prod_t
    return (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)


def distribution_matching_loss(unet_fix, unet_update, scheduler, latents, prompt_embeds, neg_prompt_embeds,
                               cfg_vsd, timesteps, noise):
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        # `.float()` in the official line: its compute dtype (fp32; float64 in the float64 replay)
        noise_pred_update = unet_update(noisy_latents, timestep=timesteps,
                                        encoder_hidden_states=prompt_embeds.to(latents.dtype)).sample
        x0_pred_update = eps_to_mu(scheduler, noise_pred_update, noisy_latents, timesteps)
        noisy_latents_input = torch.cat([noisy_latents] * 2)
        timesteps_input = torch.cat([timesteps] * 2)
        prompt_embeds = torch.cat([neg_prompt_embeds, prompt_embeds], dim=0)
        noise_pred_fix = unet_fix(noisy_latents_input, timestep=timesteps_input,
                                  encoder_hidden_states=prompt_embeds).sample
        noise_pred_uncond, noise_pred_text = noise_pred_fix.chunk(2)
        noise_pred_fix = noise_pred_uncond + cfg_vsd * (noise_pred_text - noise_pred_uncond)
        x0_pred_fix = eps_to_mu(scheduler, noise_pred_fix, noisy_latents, timesteps)
    weighting_factor = torch.abs(latents - x0_pred_fix).mean(dim=[1, 2, 3], keepdim=True)
    grad = (x0_pred_update - x0_pred_fix) / weighting_factor
    return F.mse_loss(latents, (latents - grad).detach())


def diff_loss(unet_update, scheduler, latents, prompt_embeds, timesteps, noise):
    latents, prompt_embeds = latents.detach(), prompt_embeds.detach()
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    noise_pred = unet_update(noisy_latents, timestep=timesteps, encoder_hidden_states=prompt_embeds).sample
    return F.mse_loss(noise_pred, noise, reduction="mean")  # `.float()` on both in the official line


def generator_loss(nets, batch, neg_ids, draws, lambdas):
    """train_osediff.py's generator lines: (loss, terms unweighted, x_denoised, high)."""
    vae, unet, controlnet, text_encoder, scheduler, unet_fix, unet_update, net_lpips = nets
    with torch.no_grad():
        high = text_encoder(batch["highlevel_input_ids"])[0]
        low = text_encoder(batch["lowlevel_input_ids"])[0]
        neg = text_encoder(neg_ids)[0].expand(high.shape[0], -1, -1)
    x_tgt_pred, latents_pred = generator_forward(vae, unet, controlnet, scheduler, batch["conditioning_pixel_values"],
                                                 high, low, draws["vae_sample"])
    x_tgt = batch["pixel_values"]
    # `.float()` on both images in the official lines (their compute dtype)
    loss_l2 = F.mse_loss(x_tgt_pred, x_tgt, reduction="mean")
    loss_lpips = net_lpips(x_tgt_pred, x_tgt).mean()
    loss_kl = distribution_matching_loss(unet_fix, unet_update, scheduler, latents_pred, high, neg, lambdas["cfg_vsd"],
                                         draws["vsd_timesteps"], draws["vsd_noise"])
    loss = loss_l2 * lambdas["l2"] + loss_lpips * lambdas["lpips"] + loss_kl * lambdas["vsd"]
    return loss, {"l2": loss_l2, "lpips": loss_lpips, "vsd": loss_kl, "loss": loss}, latents_pred, high
