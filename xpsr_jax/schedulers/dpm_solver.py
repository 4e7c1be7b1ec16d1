"""DPM-Solver++ multistep (2M by default), equal to diffusers' `DPMSolverMultistepScheduler`.

In the data-prediction form every update is linear in the current sample and the x0 predictions
of this and the previous step: x_{i+1} = A_i x_i + B_i0 m_i + B_i1 m_{i-1}, m = x0_hat. The
coefficients follow diffusers' first- and second-order updates, with the same order choice per
step (first order at step 0 and, with `lower_order_final`, at the last step).
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
from xpsr_jax.schedulers.timesteps import TIMESTEP_SPACINGS, multistep_timesteps

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

DEFAULTS = {
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": float("-inf"),
    "thresholding": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
}
CHOICES = {
    "timestep_spacing": TIMESTEP_SPACINGS,
    "solver_order": (1, 2),
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint", "heun"),
    "final_sigmas_type": FINAL_SIGMAS_TYPES,
    **{key: (False,) for key in ("thresholding", "use_karras_sigmas", "use_exponential_sigmas",
                                 "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas")},
}


def sigma_tables(alpha_bar: np.ndarray, timesteps: np.ndarray, final_sigmas_type: str):
    """(alpha, sigma, lambda) at each timestep plus the final level, float64 (n + 1,).

    sigma_k here is diffusers' sqrt((1 - acp) / acp); alpha_t = 1 / sqrt(sigma_k^2 + 1) and
    sigma_t = sigma_k * alpha_t are the VP coefficients, lambda = log(alpha_t / sigma_t). The final
    level is acp[0]'s ("sigma_min") or the clean sample ("zero": sigma 0, lambda +inf).
    """
    karras_sigma = np.sqrt((1.0 - alpha_bar) / alpha_bar)
    final = karras_sigma[0] if final_sigmas_type == "sigma_min" else 0.0
    levels = np.append(karras_sigma[timesteps], final)
    alpha = 1.0 / np.sqrt(levels**2 + 1.0)
    sigma = levels * alpha
    with np.errstate(divide="ignore"):
        lambdas = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lambdas


class DPMSolverSampler(Sampler):
    name = "dpmsolver++"

    def __init__(self, scheduler_config: Mapping[str, Any], num_inference_steps: int, **options):
        schedule, settings = read_sampler_settings(self.name, DEFAULTS, CHOICES, scheduler_config,
                                                   options)
        total = schedule["num_train_timesteps"]
        alpha_bar = alphas_cumprod_float64(schedule)
        if schedule["rescale_betas_zero_snr"]:
            alpha_bar[-1] = 2.0**-24  # as diffusers: keeps sigma finite at the last train step
        train_lambda = 0.5 * (np.log(alpha_bar) - np.log1p(-alpha_bar))
        clipped = np.searchsorted(train_lambda[::-1], settings["lambda_min_clipped"], side="left")
        timesteps = multistep_timesteps(settings["timestep_spacing"], num_inference_steps, total,
                                        settings["steps_offset"], last_timestep=total - clipped)
        alpha, sigma, lambdas = sigma_tables(alpha_bar, timesteps, settings["final_sigmas_type"])
        n, order = len(timesteps), settings["solver_order"]
        last_first_order = (settings["euler_at_final"] or settings["final_sigmas_type"] == "zero"
                            or (settings["lower_order_final"] and n < 15))
        sample_coef = np.zeros(n)
        output_coefs = np.zeros((n, order))  # column 0: this step's x0_hat; 1: the previous one
        for i in range(n):
            h = lambdas[i + 1] - lambdas[i]
            phi = np.expm1(-h)  # exp(-h) - 1, -1 when the next level is the clean sample
            sample_coef[i] = sigma[i + 1] / sigma[i]
            first_order = order == 1 or i == 0 or (i == n - 1 and last_first_order)
            output_coefs[i, 0] = -alpha[i + 1] * phi
            if first_order:
                continue
            r0 = (lambdas[i] - lambdas[i - 1]) / h
            if settings["solver_type"] == "midpoint":
                d1_coef = -0.5 * alpha[i + 1] * phi
            else:  # heun
                d1_coef = alpha[i + 1] * (phi / h + 1.0)
            # D1 = (m_i - m_{i-1}) / r0
            output_coefs[i, 0] += d1_coef / r0
            output_coefs[i, 1] = -d1_coef / r0
        tables = {
            "alpha": alpha[:-1],
            "sigma": sigma[:-1],
            "sample_coef": sample_coef,
            "output_coefs": output_coefs,
        }
        all_settings = {**schedule, **settings, "num_inference_steps": n}
        super().__init__(timesteps, all_settings, tables, needs_step_noise=False)

    def init_state(self, sample):
        zeros = jnp.zeros(jnp.shape(sample), compute_dtype(sample))
        return {"history": tuple(zeros for _ in range(self.settings["solver_order"] - 1))}

    def step(self, state, step_index, model_output, sample, step_noise=None):
        check_step_inputs(self, model_output, sample, step_noise)
        dtype = compute_dtype(sample)
        c = self.coefficients(step_index, dtype)
        x = jnp.asarray(sample).astype(dtype)
        x0 = self.predicted_original(x, model_output, c)
        outputs = (x0,) + tuple(state["history"])
        prev = c["sample_coef"] * x
        for k, output in enumerate(outputs):
            prev = prev + c["output_coefs"][k] * output
        new_state = {"history": outputs[:-1]}
        return prev.astype(jnp.asarray(sample).dtype), new_state
