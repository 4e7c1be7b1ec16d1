"""UniPC multistep (predictor UniP + corrector UniC), equal to diffusers' `UniPCMultistepScheduler`
with `predict_x0=True`.

Step i receives the model output at x_i (the previous predictor's result) and:
  1. m_i = x0_hat(x_i);
  2. corrector (i > 0): x_i^c = a * x_{i-1}^c + sum_k c_k m_{i-1-k} + c_t m_i, where x_{i-1}^c
     is the sample the previous predictor started from;
  3. predictor: x_{i+1} = A * x_i^c + sum_k B_k m_{i-k}.
Both are linear in their inputs, so their coefficients are tabulated per step in float64 with
diffusers' formulas (bh1/bh2 B(h), the rho solves, the per-step order with `lower_order_final`).

The final level defaults to "sigma_min" (acp[0]'s noise level), which is what diffusers 0.21.4
(pinned by the XPSR release) does; current diffusers defaults to "zero".
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
from xpsr_jax.schedulers.dpm_solver import FINAL_SIGMAS_TYPES, sigma_tables
from xpsr_jax.schedulers.noise_schedule import alphas_cumprod_float64
from xpsr_jax.schedulers.timesteps import TIMESTEP_SPACINGS, multistep_timesteps

DEFAULTS = {
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "disable_corrector": (),
    "final_sigmas_type": "sigma_min",
    "thresholding": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
}
CHOICES = {
    "timestep_spacing": TIMESTEP_SPACINGS,
    "solver_order": (1, 2, 3),
    "solver_type": ("bh1", "bh2"),
    "predict_x0": (True,),
    "final_sigmas_type": FINAL_SIGMAS_TYPES,
    **{key: (False,) for key in ("thresholding", "use_karras_sigmas", "use_exponential_sigmas",
                                 "use_beta_sigmas", "use_flow_sigmas")},
}


def _rhos(rks: np.ndarray, hh: float, b_h: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' R matrix (order x order) and b vector for the step with ratios `rks`."""
    h_phi_k = np.expm1(hh) / hh - 1.0
    factorial = 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.stack(rows), np.array(b)


def _update(lambdas, alpha, sigma, target: int, source: int, history: list[int], order: int,
            solver_type: str, corrector: bool):
    """Coefficients of one UniP (corrector=False) or UniC (corrector=True) update from level
    `source` to level `target`, in x0 form.

    Returns (sample_coef, m0_coef, history_coefs, model_t_coef): the update is
    sample_coef * x + m0_coef * m0 + sum_k history_coefs[k] * history_k (+ model_t_coef * m_t),
    where m0 is the x0 prediction at `source` and history_k the one at level `history[k]`.
    """
    h = lambdas[target] - lambdas[source]
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = hh if solver_type == "bh1" else np.expm1(hh)
    rks = np.array([(lambdas[level] - lambdas[source]) / h for level in history[: order - 1]]
                   + [1.0])
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(*_rhos(rks, hh, b_h, order))
    elif order >= 2:
        rows, b = _rhos(rks, hh, b_h, order)
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1])
    else:
        rhos = np.zeros(0)
    scale = -alpha[target] * b_h
    # D1_k = (m_k - m0) / r_k for the history terms, D1_t = m_t - m0 for the corrector
    history_coefs = [scale * rhos[k] / rks[k] for k in range(order - 1)]
    model_t_coef = scale * rhos[-1] if corrector else 0.0
    m0_coef = -alpha[target] * h_phi_1 - sum(history_coefs) - model_t_coef
    return sigma[target] / sigma[source], m0_coef, history_coefs, model_t_coef


class UniPCSampler(Sampler):
    name = "unipc"

    def __init__(self, scheduler_config: Mapping[str, Any], num_inference_steps: int, **options):
        schedule, settings = read_sampler_settings(self.name, DEFAULTS, CHOICES, scheduler_config,
                                                   options)
        total = schedule["num_train_timesteps"]
        timesteps = multistep_timesteps(settings["timestep_spacing"], num_inference_steps, total,
                                        settings["steps_offset"])
        order = settings["solver_order"]
        final_zero = settings["final_sigmas_type"] == "zero"
        if final_zero and order > 1 and not settings["lower_order_final"]:
            raise ValueError("unipc sampler: final_sigmas_type='zero' needs lower_order_final=True "
                             "(a higher-order step onto sigma 0 divides by an infinite step size)")
        alpha_bar = alphas_cumprod_float64(schedule)
        if schedule["rescale_betas_zero_snr"]:
            alpha_bar[-1] = 2.0**-24  # as diffusers
        alpha, sigma, lambdas = sigma_tables(alpha_bar, timesteps, settings["final_sigmas_type"])
        n = len(timesteps)
        # the predictor's order at step i (diffusers' `this_order`)
        orders = [min(order, n - i if settings["lower_order_final"] else order, i + 1)
                  for i in range(n)]
        tables = {
            "alpha": alpha[:-1], "sigma": sigma[:-1],
            "use_corrector": np.zeros(n, bool), "corrector_sample_coef": np.zeros(n),
            "corrector_model_coef": np.zeros(n), "corrector_history_coefs": np.zeros((n, order)),
            "predictor_sample_coef": np.zeros(n), "predictor_output_coefs": np.zeros((n, order)),
        }
        for i in range(n):
            if i > 0 and (i - 1) not in settings["disable_corrector"]:
                # corrects x_i using the x0 predictions up to step i-1 and the new one, m_i
                a, m0, hist, mt = _update(lambdas, alpha, sigma, target=i, source=i - 1,
                                          history=[i - 1 - k for k in range(1, order)],
                                          order=orders[i - 1], solver_type=settings["solver_type"],
                                          corrector=True)
                tables["use_corrector"][i] = True
                tables["corrector_sample_coef"][i] = a
                tables["corrector_model_coef"][i] = mt
                tables["corrector_history_coefs"][i, : 1 + len(hist)] = [m0, *hist]
            a, m0, hist, _ = _update(lambdas, alpha, sigma, target=i + 1, source=i,
                                     history=[i - k for k in range(1, order)], order=orders[i],
                                     solver_type=settings["solver_type"], corrector=False)
            tables["predictor_sample_coef"][i] = a
            tables["predictor_output_coefs"][i, : 1 + len(hist)] = [m0, *hist]
        all_settings = {**schedule, **settings, "num_inference_steps": n}
        super().__init__(timesteps, all_settings, tables, needs_step_noise=False)

    def init_state(self, sample):
        zeros = jnp.zeros(jnp.shape(sample), compute_dtype(sample))
        # last_sample: the (corrected) sample the previous predictor started from;
        # history: the x0 predictions of the previous steps, newest first
        return {"last_sample": zeros,
                "history": tuple(zeros for _ in range(self.settings["solver_order"]))}

    def step(self, state, step_index, model_output, sample, step_noise=None):
        check_step_inputs(self, model_output, sample, step_noise)
        dtype = compute_dtype(sample)
        c = self.coefficients(step_index, dtype)
        x = jnp.asarray(sample).astype(dtype)
        x0 = self.predicted_original(x, model_output, c)
        history = tuple(state["history"])
        corrected = (c["corrector_sample_coef"] * state["last_sample"]
                     + c["corrector_model_coef"] * x0)
        for k, output in enumerate(history):
            corrected = corrected + c["corrector_history_coefs"][k] * output
        x = jnp.where(c["use_corrector"], corrected, x)
        outputs = (x0,) + history[:-1]
        prev = c["predictor_sample_coef"] * x
        for k, output in enumerate(outputs):
            prev = prev + c["predictor_output_coefs"][k] * output
        new_state = {"last_sample": x, "history": outputs}
        return prev.astype(jnp.asarray(sample).dtype), new_state
