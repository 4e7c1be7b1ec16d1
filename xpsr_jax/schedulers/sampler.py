"""`make_sampler`: a sampler by name, from a diffusers scheduler config."""

from __future__ import annotations

from typing import Any, Mapping

from xpsr_jax.schedulers.base import Sampler
from xpsr_jax.schedulers.ddim import DDIMSampler
from xpsr_jax.schedulers.ddpm import DDPMSampler
from xpsr_jax.schedulers.dpm_solver import DPMSolverSampler
from xpsr_jax.schedulers.unipc import UniPCSampler

_SAMPLER_CLASSES = {cls.name: cls for cls in (DDPMSampler, DDIMSampler, DPMSolverSampler,
                                              UniPCSampler)}
SAMPLERS = tuple(_SAMPLER_CLASSES)  # ("ddpm", "ddim", "dpmsolver++", "unipc")


def make_sampler(name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int,
                 **options) -> Sampler:
    """The sampler `name` for `num_inference_steps` steps of the schedule in `scheduler_config`.

    Settings come from `options`, else from the config's keys (whatever its `_class_name`), else
    from the diffusers class default; an option set to None counts as not given. Unknown names,
    options or values raise ValueError naming them and what is valid.
    """
    if name not in _SAMPLER_CLASSES:
        raise ValueError(f"unknown sampler {name!r}; valid: {' | '.join(SAMPLERS)}")
    if not isinstance(scheduler_config, Mapping):
        raise ValueError(f"scheduler_config must be a dict (see load_scheduler_config), "
                         f"got {type(scheduler_config).__name__}")
    return _SAMPLER_CLASSES[name](scheduler_config, num_inference_steps, **options)
