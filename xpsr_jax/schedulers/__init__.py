"""Diffusion samplers as pure functions over array state, and the DDPM noise schedule.

A sampler's `step` is jit-able with a traced step index, so a whole denoising loop compiles into
one `lax.fori_loop`:

    sampler = make_sampler("unipc", load_scheduler_config(sd15), 20)
    def body(i, carry):
        x, state = carry
        eps = model(x, sampler.timestep_at(i))
        return sampler.step(state, i, eps, x)
    x, _ = jax.lax.fori_loop(0, sampler.num_inference_steps, body, (x, sampler.init_state(x)))
"""

from xpsr_jax.schedulers.base import Sampler
from xpsr_jax.schedulers.config import load_scheduler_config
from xpsr_jax.schedulers.ddim import DDIMSampler
from xpsr_jax.schedulers.ddpm import DDPMSampler
from xpsr_jax.schedulers.dpm_solver import DPMSolverSampler
from xpsr_jax.schedulers.noise_schedule import (
    NoiseSchedule,
    add_noise,
    get_velocity,
    noise_schedule_from_config,
    predicted_latents,
)
from xpsr_jax.schedulers.sampler import SAMPLERS, make_sampler
from xpsr_jax.schedulers.timesteps import (
    TIMESTEP_SPACINGS,
    discrete_timesteps,
    multistep_timesteps,
)
from xpsr_jax.schedulers.unipc import UniPCSampler

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "NoiseSchedule",
    "SAMPLERS",
    "Sampler",
    "TIMESTEP_SPACINGS",
    "UniPCSampler",
    "add_noise",
    "discrete_timesteps",
    "get_velocity",
    "load_scheduler_config",
    "make_sampler",
    "multistep_timesteps",
    "noise_schedule_from_config",
    "predicted_latents",
]
