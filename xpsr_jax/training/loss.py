"""The XPSR training objective, as a pure function of the networks, a batch and injected draws.

Follows the official `train.py` loss lines:
    latents = vae.encode(HR).latent_dist.sample() * scaling_factor        (no grad)
    noisy = DDPM add_noise(latents, noise, t)
    high, low = text_encoder(highlevel ids), text_encoder(lowlevel ids)  (no grad)
    control = controlnet(noisy, t, high, low, conditioning image)
    eps = unet(noisy, t, high, low, control residuals)
    loss = mse(eps, noise) + dfc_weight * (sum_i L1(resize(HR, rgb_i), rgb_i)
                                         + sum_i L1(latent_i, resize(latents, latent_i))
                                         + L1(latent_mid, resize(latents, latent_mid)))
with every resize PyTorch's bilinear (align_corners=False, no antialias).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from xpsr_jax.models.layers import deinterleave, interleave
from xpsr_jax.schedulers import add_noise, get_velocity
from xpsr_jax.training.resize import resize_bilinear

BATCH_KEYS = ("pixel_values", "conditioning_pixel_values", "highlevel_input_ids", "lowlevel_input_ids")


class LossDraws(NamedTuple):
    """Every random draw of one loss evaluation. timesteps (B,) int32 in [0, T); noise and
    vae_sample (B, h, w, latent_channels) float32 standard normal (vae_sample is the draw of the
    VAE posterior sample: latent = mean + std * vae_sample)."""

    timesteps: jax.Array
    noise: jax.Array
    vae_sample: jax.Array


def sample_loss_draws(key: jax.Array, batch_size: int, latent_shape: tuple[int, int, int],
                      num_train_timesteps: int) -> LossDraws:
    """LossDraws from one key, split per purpose; latent_shape is (h, w, latent_channels)."""
    key_t, key_noise, key_vae = jax.random.split(key, 3)
    shape = (batch_size, *latent_shape)
    return LossDraws(
        timesteps=jax.random.randint(key_t, (batch_size,), 0, num_train_timesteps, dtype=jnp.int32),
        noise=jax.random.normal(key_noise, shape, jnp.float32),
        vae_sample=jax.random.normal(key_vae, shape, jnp.float32),
    )


def latent_shape_for(vae: Any, image_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(h, w, latent_channels) of the latents of NHWC images of `image_shape` (B, H, W, 3)."""
    factor = vae.config.downsample_factor
    return image_shape[1] // factor, image_shape[2] // factor, vae.config.latent_channels


def _prediction_target(noise_schedule: Any, latents: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    prediction_type = noise_schedule.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return get_velocity(noise_schedule, latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"scheduler prediction_type={prediction_type!r}; valid: 'epsilon', 'v_prediction', 'sample'")


def _l1(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))


def encode_latents(vae: Any, pixel_values: jax.Array, vae_sample: jax.Array) -> jax.Array:
    """Scaled latents of HR images in [-1, 1]: (mean + std * vae_sample) * scaling_factor, float32,
    without gradient (the VAE is frozen and runs under no_grad in the reference)."""
    posterior = vae.encode(pixel_values)
    sample = posterior.mean + posterior.std * vae_sample.astype(posterior.mean.dtype)
    return jax.lax.stop_gradient(sample.astype(jnp.float32) * vae.config.scaling_factor)


def encode_prompts(text_encoder: Any, highlevel_input_ids: jax.Array, lowlevel_input_ids: jax.Array):
    """(high-level, low-level) last hidden states, without gradient. One encoder call on both
    prompt batches, rows interleaved per example ([high_0, low_0, high_1, ...]): rows do not
    interact, the program holds one copy of CLIP, and each device keeps its own examples' rows
    (stacking the batches end to end made XLA move token ids between devices every step)."""
    hidden = jax.lax.stop_gradient(text_encoder(interleave(highlevel_input_ids, lowlevel_input_ids)))
    return deinterleave(hidden)


def xpsr_loss(models: Any, batch: Mapping[str, jax.Array], draws: LossDraws, *, noise_schedule: Any,
              dfc_weight: float = 0.05) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, terms): terms has mse, dfc (= dfc_weight * sum of the L1s, the reference's
    `degradation_loss`), loss = mse + dfc, and each unweighted L1: dfc_rgb_{i}, dfc_latent_{i},
    dfc_latent_mid. `models` has unet / controlnet / vae / text_encoder; `batch` is what
    xpsr_jax.data.pipeline yields (NHWC images)."""
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"xpsr_loss: batch lacks {missing}; it needs {list(BATCH_KEYS)}")
    pixel_values = batch["pixel_values"]
    latents = encode_latents(models.vae, pixel_values, draws.vae_sample)
    high, low = encode_prompts(models.text_encoder, batch["highlevel_input_ids"], batch["lowlevel_input_ids"])
    noisy_latents = add_noise(noise_schedule, latents, draws.noise, draws.timesteps)

    control = models.controlnet(noisy_latents, draws.timesteps, high, low, batch["conditioning_pixel_values"])
    model_pred = models.unet(noisy_latents, draws.timesteps, high, low, control.down_block_res_samples,
                             control.mid_block_res_sample)
    target = _prediction_target(noise_schedule, latents, draws.noise, draws.timesteps)
    mse = jnp.mean(jnp.square(model_pred.astype(jnp.float32) - target.astype(jnp.float32)))

    terms: dict[str, jax.Array] = {}
    for i, rgb in enumerate(control.rgb_preds):
        target_rgb = resize_bilinear(pixel_values.astype(jnp.float32), rgb.shape[1:3])
        terms[f"dfc_rgb_{i}"] = _l1(target_rgb, rgb)
    for i, latent_pred in enumerate(control.latent_preds):
        terms[f"dfc_latent_{i}"] = _l1(latent_pred, resize_bilinear(latents, latent_pred.shape[1:3]))
    if control.latent_pred_mid is not None:
        mid = control.latent_pred_mid
        terms["dfc_latent_mid"] = _l1(mid, resize_bilinear(latents, mid.shape[1:3]))
    dfc = dfc_weight * sum(terms.values(), jnp.zeros((), jnp.float32))
    loss = mse + dfc
    return loss, {"loss": loss, "mse": mse, "dfc": dfc, **terms}
