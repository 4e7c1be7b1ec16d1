"""The flat parameter record of a plan (`DEGRADATION_PARAM_KEYS`), stored with each example."""

from __future__ import annotations

from xpsr_jax.data.degradation.config import NOISE_TYPES
from xpsr_jax.data.degradation.plan import DegradationPlan, StagePlan
from xpsr_jax.data.kernels import (
    NOT_APPLICABLE,
    KernelDraw,
)

_KERNEL_FIELDS = (
    "applied",
    "family",
    "is_sinc",
    "kernel_size",
    "sigma_x",
    "sigma_y",
    "rotation",
    "beta",
    "sinc_cutoff",
)
_STAGE_FIELDS = (
    "resize{s}_direction",
    "resize{s}_scale",
    "resize{s}_mode",
    "noise{s}_type",
    "noise{s}_gaussian_sigma",
    "noise{s}_poisson_scale",
    "noise{s}_gray",
    "jpeg{s}_quality",
)

# Every params dict has exactly these keys, whatever was drawn. Values are
# python floats: flags 0/1; indices into KERNEL_FAMILIES (-1 for sinc or no
# blur), RESIZE_DIRECTIONS, RESIZE_MODES, NOISE_TYPES; -1 for a value that does
# not apply (rotation: 0). jpeg2_quality is the final JPEG's quality.
DEGRADATION_PARAM_KEYS: tuple[str, ...] = (
    ("usm_applied",)
    + tuple(f"blur1_{field}" for field in _KERNEL_FIELDS)
    + tuple(field.format(s=1) for field in _STAGE_FIELDS)
    + tuple(f"blur2_{field}" for field in _KERNEL_FIELDS)
    + tuple(field.format(s=2) for field in _STAGE_FIELDS)
    + (
        "final_jpeg_first",
        "final_sinc_applied",
        "final_sinc_kernel_size",
        "final_sinc_cutoff",
        "final_resize_mode",
    )
)


def _kernel_params(prefix: str, draw: KernelDraw | None) -> dict[str, float]:
    if draw is None:
        values = (0.0, -1.0, 0.0, NOT_APPLICABLE, NOT_APPLICABLE, NOT_APPLICABLE, 0.0,
                  NOT_APPLICABLE, NOT_APPLICABLE)  # fmt: skip
    else:
        values = (1.0, draw.family, draw.is_sinc, draw.size, draw.sigma_x, draw.sigma_y,
                  draw.rotation, draw.beta, draw.sinc_cutoff)  # fmt: skip
    return {f"{prefix}_{field}": float(v) for field, v in zip(_KERNEL_FIELDS, values)}


def _stage_params(index: int, stage: StagePlan) -> dict[str, float]:
    gaussian = NOISE_TYPES[stage.noise_type] == "gaussian"
    values = (
        stage.resize_direction,
        stage.resize_scale,
        stage.resize_mode,
        stage.noise_type,
        stage.noise_level if gaussian else NOT_APPLICABLE,
        NOT_APPLICABLE if gaussian else stage.noise_level,
        stage.gray_noise,
        stage.jpeg_quality,
    )
    return {field.format(s=index): float(v) for field, v in zip(_STAGE_FIELDS, values)}


def degradation_params(plan: DegradationPlan) -> dict[str, float]:
    """degradation_params(plan) -> flat {key: float} with keys DEGRADATION_PARAM_KEYS."""
    sinc = plan.final.sinc
    params = {"usm_applied": float(plan.usm)}
    params |= _kernel_params("blur1", plan.stage1.kernel)
    params |= _stage_params(1, plan.stage1)
    params |= _kernel_params("blur2", plan.stage2.kernel)
    params |= _stage_params(2, plan.stage2)
    params |= {
        "final_jpeg_first": float(plan.final.jpeg_first),
        "final_sinc_applied": float(sinc is not None),
        "final_sinc_kernel_size": float(sinc.size) if sinc else NOT_APPLICABLE,
        "final_sinc_cutoff": float(sinc.sinc_cutoff) if sinc else NOT_APPLICABLE,
        "final_resize_mode": float(plan.final.resize_mode),
    }
    return {key: params[key] for key in DEGRADATION_PARAM_KEYS}
