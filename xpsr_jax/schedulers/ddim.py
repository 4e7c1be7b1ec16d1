"""DDIM, equal to diffusers' `DDIMScheduler.step` (deterministic at the default eta = 0).

x_{t'} = sqrt(acp[t']) * x0_hat + sqrt(1 - acp[t'] - std^2) * eps_hat + std * z, with
t' = t - T // n (acp[t'] = `final_alpha_cumprod` when t' < 0) and std = eta * sigma_t(DDPM).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from xpsr_jax.schedulers.base import (
    Sampler,
    check_step_inputs,
    compute_dtype,
    predicted_epsilon,
    read_sampler_settings,
)
from xpsr_jax.schedulers.noise_schedule import alphas_cumprod_float64
from xpsr_jax.schedulers.timesteps import TIMESTEP_SPACINGS, discrete_timesteps

DEFAULTS = {
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "thresholding": False,
    "eta": 0.0,  # 0: DDIM; 1: DDPM-like stochastic steps (then step_noise is needed)
    "use_clipped_model_output": False,
}
CHOICES = {"timestep_spacing": TIMESTEP_SPACINGS, "thresholding": (False,)}


class DDIMSampler(Sampler):
    name = "ddim"

    def __init__(self, scheduler_config: Mapping[str, Any], num_inference_steps: int, **options):
        schedule, settings = read_sampler_settings(self.name, DEFAULTS, CHOICES, scheduler_config,
                                                   options)
        if settings["eta"] < 0:
            raise ValueError(f"ddim sampler: option eta={settings['eta']} must be >= 0")
        total = schedule["num_train_timesteps"]
        timesteps = discrete_timesteps(settings["timestep_spacing"], num_inference_steps, total,
                                       settings["steps_offset"])
        prev = timesteps - total // len(timesteps)
        alpha_bar = alphas_cumprod_float64(schedule)
        final_alpha_bar = 1.0 if settings["set_alpha_to_one"] else alpha_bar[0]
        alpha_bar_t = alpha_bar[timesteps]
        alpha_bar_prev = np.where(prev >= 0, alpha_bar[np.maximum(prev, 0)], final_alpha_bar)
        beta_t = 1.0 - alpha_bar_t / alpha_bar_prev
        variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta_t
        std = settings["eta"] * np.sqrt(variance)
        tables = {
            "alpha": np.sqrt(alpha_bar_t),
            "sigma": np.sqrt(1.0 - alpha_bar_t),
            "x0_coef": np.sqrt(alpha_bar_prev),
            "eps_coef": np.sqrt(1.0 - alpha_bar_prev - std**2),
            "noise_std": std,
        }
        all_settings = {**schedule, **settings, "num_inference_steps": len(timesteps)}
        super().__init__(timesteps, all_settings, tables, needs_step_noise=settings["eta"] > 0)
        prev = prev.astype(np.int32)
        prev.setflags(write=False)
        object.__setattr__(self, "prev_timesteps", prev)  # t' of each step; < 0 on the last

    def step(self, state, step_index, model_output, sample, step_noise=None):
        check_step_inputs(self, model_output, sample, step_noise)
        dtype = compute_dtype(sample)
        c = self.coefficients(step_index, dtype)
        x = jnp.asarray(sample).astype(dtype)
        output = jnp.asarray(model_output).astype(dtype)
        x0 = self.predicted_original(x, output, c)
        eps = predicted_epsilon(self.settings["prediction_type"], x, output, c["alpha"], c["sigma"])
        if self.settings["clip_sample"]:
            limit = self.settings["clip_sample_range"]
            x0 = jnp.clip(x0, -limit, limit)
        if self.settings["use_clipped_model_output"]:
            eps = (x - c["alpha"] * x0) / c["sigma"]
        prev = c["x0_coef"] * x0 + c["eps_coef"] * eps
        if self.needs_step_noise:
            prev = prev + c["noise_std"] * jnp.asarray(step_noise).astype(dtype)
        return prev.astype(jnp.asarray(sample).dtype), state
