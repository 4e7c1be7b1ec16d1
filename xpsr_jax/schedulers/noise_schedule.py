"""The DDPM noise schedule (betas, alphas and their cumulative product), for training and sampling.

Betas follow diffusers' `beta_schedule` formulas, computed in float64 (diffusers computes them in
float32 torch; the two agree to ~1e-6 relative in `alphas_cumprod`). Samplers build their
coefficient tables from the float64 arrays; `NoiseSchedule` holds float32 copies for jitted code.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import struct

from xpsr_jax.schedulers.config import resolve_settings

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# diffusers' DDPMScheduler defaults for a key the file does not have.
SCHEDULE_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}
SCHEDULE_CHOICES = {"beta_schedule": BETA_SCHEDULES, "prediction_type": PREDICTION_TYPES}


def read_schedule_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The validated schedule keys of a scheduler config (diffusers defaults for absent keys).

    `trained_betas`, when the file has it, is kept as a tuple of floats.
    """
    settings = resolve_settings("noise schedule", SCHEDULE_DEFAULTS, SCHEDULE_CHOICES, config, {})
    steps = settings["num_train_timesteps"]
    if steps < 2:
        raise ValueError(f"noise schedule: num_train_timesteps={steps} must be >= 2")
    trained = config.get("trained_betas")
    if trained is not None:
        trained = tuple(float(b) for b in np.asarray(trained, dtype=np.float64).ravel())
        if len(trained) != steps:
            raise ValueError(
                f"noise schedule: trained_betas has {len(trained)} values but "
                f"num_train_timesteps={steps}"
            )
    settings["trained_betas"] = trained
    return settings


def betas_float64(settings: Mapping[str, Any]) -> np.ndarray:
    """Betas (T,) in float64 from `read_schedule_settings` output, diffusers' formulas."""
    steps = settings["num_train_timesteps"]
    start, end = settings["beta_start"], settings["beta_end"]
    if settings["trained_betas"] is not None:
        betas = np.asarray(settings["trained_betas"], dtype=np.float64)
    elif settings["beta_schedule"] == "linear":
        betas = np.linspace(start, end, steps, dtype=np.float64)
    elif settings["beta_schedule"] == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    else:  # squaredcos_cap_v2: the cosine schedule of Nichol & Dhariwal, betas capped at 0.999
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                          for i in range(steps)])
    if settings["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_float64(settings: Mapping[str, Any]) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float64 (T,)."""
    return np.cumprod(1.0 - betas_float64(settings))


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    # Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last step has SNR 0.
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    alpha_bar = root**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


@struct.dataclass
class NoiseSchedule:
    """The forward-process schedule as a pytree (arrays float32, shape (T,))."""

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    num_train_timesteps: int = struct.field(pytree_node=False, default=1000)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")


def noise_schedule_from_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """The schedule of a diffusers scheduler config (`beta_schedule`, `beta_start`, `beta_end`,
    `num_train_timesteps`, `prediction_type`, optional `trained_betas` / `rescale_betas_zero_snr`).
    """
    settings = read_schedule_settings(config)
    betas = betas_float64(settings)
    alphas = 1.0 - betas
    return NoiseSchedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas=jnp.asarray(alphas, jnp.float32),
        alphas_cumprod=jnp.asarray(np.cumprod(alphas), jnp.float32),
        num_train_timesteps=settings["num_train_timesteps"],
        prediction_type=settings["prediction_type"],
    )


def _per_sample(values: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
    # (B,) -> (B, 1, ..., 1) so a per-sample factor broadcasts over NHWC
    values = jnp.ravel(values) if jnp.ndim(values) else values
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def add_noise(schedule: NoiseSchedule, original_samples, noise, timesteps) -> jnp.ndarray:
    """The forward process q(x_t | x_0): sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise.
    `timesteps` are int, shape (B,) (or a scalar); the factors broadcast over the trailing axes.
    Computed in at least float32 and returned in the dtype of `original_samples`.
    """
    original_samples = jnp.asarray(original_samples)
    dtype = jnp.promote_types(original_samples.dtype, jnp.float32)
    alpha_bar = schedule.alphas_cumprod.astype(dtype)[jnp.asarray(timesteps)]
    x0 = original_samples.astype(dtype)
    noisy = (_per_sample(jnp.sqrt(alpha_bar), x0) * x0
             + _per_sample(jnp.sqrt(1.0 - alpha_bar), x0) * jnp.asarray(noise).astype(dtype))
    return noisy.astype(original_samples.dtype)


def get_velocity(schedule: NoiseSchedule, sample, noise, timesteps) -> jnp.ndarray:
    """The v-prediction target sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * x0 (diffusers'
    `get_velocity`), in the dtype of `sample`."""
    sample = jnp.asarray(sample)
    dtype = jnp.promote_types(sample.dtype, jnp.float32)
    alpha_bar = schedule.alphas_cumprod.astype(dtype)[jnp.asarray(timesteps)]
    x0 = sample.astype(dtype)
    velocity = (_per_sample(jnp.sqrt(alpha_bar), x0) * jnp.asarray(noise).astype(dtype)
                - _per_sample(jnp.sqrt(1.0 - alpha_bar), x0) * x0)
    return velocity.astype(sample.dtype)


def predicted_original_sample(prediction_type: str, sample, model_output, alpha, sigma):
    """x0 from the model output, where x_t = alpha * x0 + sigma * eps (diffusers' op order)."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    return model_output  # "sample"


def predicted_latents(schedule: NoiseSchedule, model_output, sample, timesteps) -> jnp.ndarray:
    """x0 from a model output at int `timesteps` (B,), float32: DDPM's `pred_original_sample`
    (OSEDiff's `eps_to_mu` for epsilon models)."""
    alpha_bar = schedule.alphas_cumprod.astype(jnp.float32)[jnp.asarray(timesteps)]
    sample = jnp.asarray(sample).astype(jnp.float32)
    alpha_bar = _per_sample(alpha_bar, sample)
    return predicted_original_sample(schedule.prediction_type, sample, jnp.asarray(model_output).astype(jnp.float32),
                                     jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar))
