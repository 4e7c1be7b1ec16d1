"""DDPM ancestral sampling, equal to diffusers' `DDPMScheduler.step`.

x_{t'} = c0 * x0_hat + c1 * x_t + std * z, with t' the next timestep of the schedule, x0_hat
clipped when `clip_sample`, and no noise at t = 0. The caller draws z (standard normal).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from xpsr_jax.schedulers.base import (
    Sampler,
    check_step_inputs,
    compute_dtype,
    read_sampler_settings,
)
from xpsr_jax.schedulers.noise_schedule import alphas_cumprod_float64
from xpsr_jax.schedulers.timesteps import TIMESTEP_SPACINGS, discrete_timesteps

DEFAULTS = {
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "thresholding": False,
    # "schedule": t' = the next inference timestep (diffusers >= 0.22, the installed version);
    # "step_ratio": t' = t - T // n (diffusers 0.21.4). Both agree for "leading" spacing.
    "previous_timestep": "schedule",
}
CHOICES = {
    "timestep_spacing": TIMESTEP_SPACINGS,
    "variance_type": ("fixed_small", "fixed_small_log", "fixed_large"),
    "thresholding": (False,),
    "previous_timestep": ("schedule", "step_ratio"),
}


class DDPMSampler(Sampler):
    name = "ddpm"

    def __init__(self, scheduler_config: Mapping[str, Any], num_inference_steps: int, **options):
        schedule, settings = read_sampler_settings(self.name, DEFAULTS, CHOICES, scheduler_config,
                                                   options)
        total = schedule["num_train_timesteps"]
        timesteps = discrete_timesteps(settings["timestep_spacing"], num_inference_steps, total,
                                       settings["steps_offset"])
        if settings["previous_timestep"] == "schedule":
            prev = np.append(timesteps[1:], -1)
        else:
            prev = timesteps - total // len(timesteps)
        alpha_bar = alphas_cumprod_float64(schedule)
        alpha_bar_t = alpha_bar[timesteps]
        alpha_bar_prev = np.where(prev >= 0, alpha_bar[np.maximum(prev, 0)], 1.0)
        beta_t = 1.0 - alpha_bar_t / alpha_bar_prev
        if settings["variance_type"] == "fixed_large":
            variance = beta_t
        else:  # fixed_small and fixed_small_log: the posterior variance, clamped like diffusers
            variance = np.maximum((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta_t, 1e-20)
        tables = {
            "alpha": np.sqrt(alpha_bar_t),
            "sigma": np.sqrt(1.0 - alpha_bar_t),
            "x0_coef": np.sqrt(alpha_bar_prev) * beta_t / (1.0 - alpha_bar_t),
            "sample_coef": np.sqrt(1.0 - beta_t) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t),
            "noise_std": np.where(timesteps > 0, np.sqrt(variance), 0.0),
        }
        all_settings = {**schedule, **settings, "num_inference_steps": len(timesteps)}
        super().__init__(timesteps, all_settings, tables, needs_step_noise=True)
        prev = prev.astype(np.int32)
        prev.setflags(write=False)
        object.__setattr__(self, "prev_timesteps", prev)  # t' of each step; < 0 on the last

    def step(self, state, step_index, model_output, sample, step_noise=None):
        check_step_inputs(self, model_output, sample, step_noise)
        dtype = compute_dtype(sample)
        c = self.coefficients(step_index, dtype)
        x = jnp.asarray(sample).astype(dtype)
        x0 = self.predicted_original(x, model_output, c)
        if self.settings["clip_sample"]:
            limit = self.settings["clip_sample_range"]
            x0 = jnp.clip(x0, -limit, limit)
        prev = c["x0_coef"] * x0 + c["sample_coef"] * x
        prev = prev + c["noise_std"] * jnp.asarray(step_noise).astype(dtype)
        return prev.astype(jnp.asarray(sample).dtype), state
