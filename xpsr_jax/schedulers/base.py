"""The sampler interface: numpy coefficient tables built once, a pure jit-able `step`.

A sampler turns (sample x_t, model output at t) into x_{t-1}. Everything that depends on the step
index is precomputed in float64 numpy, one row per step, so `step` only gathers row `step_index`
(which may be traced, e.g. the counter of `lax.fori_loop`) and does elementwise arithmetic.
Multistep state (previous model outputs, the last sample) is a pytree of arrays that the caller
carries through the loop.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from xpsr_jax.schedulers.config import resolve_settings
from xpsr_jax.schedulers.noise_schedule import predicted_original_sample, read_schedule_settings


class Sampler:
    """Base class. Subclasses set `name`, fill `tables` and implement `init_state` / `step`.

    Attributes:
      timesteps: int32 (num_inference_steps,), descending; the model's timestep at step i.
      needs_step_noise: whether `step` takes a standard-normal `step_noise` (ancestral samplers).
      init_noise_sigma: scale of the initial noise (1.0 for these variance-preserving samplers).
      settings: the resolved settings (options > scheduler config > diffusers default).
      tables: float64 numpy arrays, first axis = step index.

    Samplers are immutable and compare / hash by class and settings, so one can be a static
    argument of `jax.jit` and equal samplers share a compilation.
    """

    name: str = ""
    init_noise_sigma: float = 1.0

    def __init__(self, timesteps: np.ndarray, settings: Mapping[str, Any],
                 tables: Mapping[str, np.ndarray], needs_step_noise: bool):
        timesteps = np.asarray(timesteps, dtype=np.int32)
        timesteps.setflags(write=False)
        frozen_tables = {}
        for key, table in tables.items():
            table = np.asarray(table)
            if table.shape[0] != len(timesteps):
                raise AssertionError(f"table {key} has {table.shape[0]} rows, not {len(timesteps)}")
            table.setflags(write=False)
            frozen_tables[key] = table
        object.__setattr__(self, "timesteps", timesteps)
        object.__setattr__(self, "settings", dict(settings))
        object.__setattr__(self, "tables", frozen_tables)
        object.__setattr__(self, "needs_step_noise", bool(needs_step_noise))
        object.__setattr__(self, "_key", (type(self), tuple(sorted(settings.items()))))

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        return isinstance(other, Sampler) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def __repr__(self):
        return f"{type(self).__name__}({len(self.timesteps)} steps, {self.settings})"

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def timestep_at(self, step_index) -> jnp.ndarray:
        """The int32 model timestep of step `step_index` (which may be traced)."""
        return jnp.asarray(self.timesteps)[step_index]

    def coefficients(self, step_index, dtype) -> dict[str, jnp.ndarray]:
        """Row `step_index` of every table, as `dtype` (booleans stay boolean)."""
        row = {}
        for key, table in self.tables.items():
            table_dtype = jnp.bool_ if table.dtype == np.bool_ else dtype
            row[key] = jnp.asarray(table, dtype=table_dtype)[step_index]
        return row

    def predicted_original(self, sample, model_output, coefficients):
        """x0_hat at this step, in the dtype of `sample` (coefficients hold alpha, sigma)."""
        return predicted_original_sample(self.settings["prediction_type"], sample,
                                         jnp.asarray(model_output).astype(sample.dtype),
                                         coefficients["alpha"], coefficients["sigma"])

    def init_state(self, sample) -> Any:
        """The loop state before step 0, a pytree of arrays (empty for single-step samplers)."""
        return {}

    def step(self, state, step_index, model_output, sample, step_noise=None):
        """Returns (prev_sample, new_state); pure and jit-able, `step_index` may be traced."""
        raise NotImplementedError


def read_sampler_settings(name: str, defaults: Mapping[str, Any], choices: Mapping[str, tuple],
                          scheduler_config: Mapping[str, Any], options: Mapping[str, Any]):
    """(schedule settings, sampler settings) of sampler `name`; see `resolve_settings`."""
    return (read_schedule_settings(scheduler_config),
            resolve_settings(f"{name} sampler", defaults, choices, scheduler_config, options))


def compute_dtype(sample) -> jnp.dtype:
    """Arithmetic dtype of a step: the sample's, at least float32 (bf16 latents update in fp32)."""
    return jnp.promote_types(jnp.asarray(sample).dtype, jnp.float32)


def predicted_epsilon(prediction_type: str, sample, model_output, alpha, sigma):
    """eps from the model output (diffusers DDIM's `pred_epsilon`)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * sample
    return (sample - alpha * model_output) / sigma  # "sample"


def check_step_inputs(sampler: Sampler, model_output, sample, step_noise) -> None:
    """Static shape checks, done at trace time."""
    if jnp.shape(model_output) != jnp.shape(sample):
        raise ValueError(
            f"{sampler.name} step: model_output shape {jnp.shape(model_output)} differs from "
            f"sample shape {jnp.shape(sample)}"
        )
    if sampler.needs_step_noise:
        if step_noise is None:
            raise ValueError(
                f"{sampler.name} step: this sampler adds noise at every step; pass step_noise, "
                f"a standard-normal array shaped like the sample {jnp.shape(sample)}"
            )
        if jnp.shape(step_noise) != jnp.shape(sample):
            raise ValueError(
                f"{sampler.name} step: step_noise shape {jnp.shape(step_noise)} differs from "
                f"sample shape {jnp.shape(sample)}"
            )
