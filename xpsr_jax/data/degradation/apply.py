"""Running a plan on an image, and `degrade`: plan + application from (seed, example id)."""

from __future__ import annotations

import math
import numbers

import ml_collections
import numpy as np

from xpsr_jax.data.degradation.config import (
    NOISE_TYPES,
    RESIZE_MODES,
    validate_degradation_config,
)
from xpsr_jax.data.degradation.ops import (
    add_gaussian_noise,
    add_poisson_noise,
    blur,
    jpeg_compress,
    resize,
    to_uint8,
    usm_sharpen,
)
from xpsr_jax.data.degradation.params import degradation_params
from xpsr_jax.data.degradation.plan import (
    DegradationPlan,
    FinalPlan,
    StagePlan,
    sample_degradation_plan,
)


def _add_noise(img: np.ndarray, stage: StagePlan, rng: np.random.Generator) -> np.ndarray:
    if NOISE_TYPES[stage.noise_type] == "gaussian":
        return add_gaussian_noise(img, stage.noise_level, gray=stage.gray_noise, rng=rng)
    return add_poisson_noise(img, stage.noise_level, gray=stage.gray_noise, rng=rng)


def _resize_and_sinc(img: np.ndarray, size: tuple[int, int], final: FinalPlan) -> np.ndarray:
    img = resize(img, size, RESIZE_MODES[final.resize_mode])
    return blur(img, final.sinc.kernel) if final.sinc is not None else img


def apply_degradation_plan(
    image: np.ndarray,
    plan: DegradationPlan,
    config: ml_collections.ConfigDict,
    rng: np.random.Generator,
) -> np.ndarray:
    """apply_degradation_plan(image, plan, config, rng) -> float32 LR in [0, 1], unrounded.

    image: float32 HxWx3 in [0, 1], H and W multiples of config.scale. rng
    draws only the noise fields.
    """
    height, width = image.shape[:2]
    lr_size = (height // config.scale, width // config.scale)
    out = image
    if plan.usm:
        out = usm_sharpen(
            out, radius=config.usm.radius, weight=config.usm.weight, threshold=config.usm.threshold
        )

    s1 = plan.stage1
    if s1.kernel is not None:
        out = blur(out, s1.kernel.kernel)
    # torch F.interpolate(scale_factor=s) output size: floor(size * s).
    size1 = tuple(max(1, math.floor(side * s1.resize_scale)) for side in (height, width))
    out = resize(out, size1, RESIZE_MODES[s1.resize_mode])
    out = _add_noise(out, s1, rng)
    out = jpeg_compress(out, s1.jpeg_quality)

    s2 = plan.stage2
    if s2.kernel is not None:
        out = blur(out, s2.kernel.kernel)
    # Stage 2 resizes relative to the final LR size, not the current one.
    size2 = tuple(max(1, int(side / config.scale * s2.resize_scale)) for side in (height, width))
    out = resize(out, size2, RESIZE_MODES[s2.resize_mode])
    out = _add_noise(out, s2, rng)

    if plan.final.jpeg_first:
        out = jpeg_compress(out, s2.jpeg_quality)
        out = _resize_and_sinc(out, lr_size, plan.final)
    else:
        out = _resize_and_sinc(out, lr_size, plan.final)
        out = jpeg_compress(out, s2.jpeg_quality)
    return np.clip(out, 0.0, 1.0)


def _check_hr(hr: np.ndarray, scale: int) -> None:
    if not isinstance(hr, np.ndarray) or hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
        described = f"{hr.dtype} {hr.shape}" if isinstance(hr, np.ndarray) else type(hr).__name__
        raise ValueError(f"hr must be a uint8 HxWx3 RGB array, got {described}")
    height, width = hr.shape[:2]
    if height % scale or width % scale or min(height, width) < 4 * scale:
        raise ValueError(
            f"hr size {height}x{width} must be multiples of scale {scale} and at least "
            f"{4 * scale} pixels on each side"
        )


def degrade(
    hr: np.ndarray, config: ml_collections.ConfigDict, *, seed: int, example_id: int
) -> tuple[np.ndarray, dict[str, float]]:
    """degrade(hr, config, *, seed, example_id) -> (lr, params).

    hr: uint8 HxWx3 RGB, H and W multiples of config.scale. lr: uint8
    (H/scale, W/scale, 3). params: flat dict keyed by DEGRADATION_PARAM_KEYS.
    The same (seed, example_id) gives the same lr bit for bit; the plan comes
    from one child of SeedSequence([seed, example_id]) and the noise fields
    from another, so params do not depend on the image.
    """
    validate_degradation_config(config)
    _check_hr(hr, config.scale)
    for name, value in (("seed", seed), ("example_id", example_id)):
        if not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    plan_seed, noise_seed = np.random.SeedSequence([int(seed), int(example_id)]).spawn(2)
    plan = sample_degradation_plan(config, np.random.default_rng(plan_seed))
    image = hr.astype(np.float32) / 255.0
    lr = apply_degradation_plan(image, plan, config, np.random.default_rng(noise_seed))
    return to_uint8(lr), degradation_params(plan)
