"""Drawing a degradation plan: every discrete and scalar choice, so it can be stored with the
example (the noise fields are drawn when the plan is applied)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

from xpsr_jax.data.degradation.config import RESIZE_DIRECTIONS, RESIZE_MODES
from xpsr_jax.data.kernels import (
    KernelDraw,
    odd_kernel_sizes,
    sample_mixed_kernel,
    sample_sinc_kernel,
)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Choices of one degradation stage (indices into the module's name tuples)."""

    kernel: KernelDraw | None  # None: this stage does not blur
    resize_direction: int  # RESIZE_DIRECTIONS
    resize_scale: float
    resize_mode: int  # RESIZE_MODES
    noise_type: int  # NOISE_TYPES
    noise_level: float  # Gaussian sigma (0-255 scale) or Poisson scale
    gray_noise: bool
    jpeg_quality: int  # stage 2's is applied in the final step


@dataclasses.dataclass(frozen=True)
class FinalPlan:
    jpeg_first: bool  # JPEG -> resize + sinc; else resize + sinc -> JPEG
    sinc: KernelDraw | None  # None: no final sinc (the reference's pulse kernel)
    resize_mode: int  # RESIZE_MODES


@dataclasses.dataclass(frozen=True)
class DegradationPlan:
    usm: bool
    stage1: StagePlan
    stage2: StagePlan
    final: FinalPlan


def _choice(rng: np.random.Generator, probs: Sequence[float]) -> int:
    p = np.asarray(probs, dtype=np.float64)
    return int(rng.choice(len(p), p=p / p.sum()))


def sample_blur_kernel(
    rng: np.random.Generator, stage: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> KernelDraw:
    """sample_blur_kernel(rng, stage_config, config) -> KernelDraw (unpadded).

    Size uniform over odd sizes in kernel_size_range; with stage.sinc_prob a
    sinc kernel (cutoff range depending on the size), else a family kernel.
    """
    sizes = odd_kernel_sizes(config.kernel_size_range)
    size = sizes[int(rng.integers(len(sizes)))]
    if rng.uniform() < stage.sinc_prob:
        small = size < config.sinc_large_kernel_size
        cutoffs = config.sinc_cutoff_range_small if small else config.sinc_cutoff_range_large
        return sample_sinc_kernel(rng, size=size, cutoff_range=cutoffs)
    return sample_mixed_kernel(
        rng,
        size=size,
        families=stage.kernel_families,
        probs=stage.kernel_probs,
        sigma_range=stage.blur_sigma_range,
        rotation_range=stage.rotation_range,
        betag_range=stage.betag_range,
        betap_range=stage.betap_range,
    )


def sample_final_sinc(
    rng: np.random.Generator, config: ml_collections.ConfigDict
) -> KernelDraw | None:
    """sample_final_sinc(rng, config) -> sinc KernelDraw with final.sinc_prob, else None."""
    if rng.uniform() >= config.final.sinc_prob:
        return None
    sizes = odd_kernel_sizes(config.kernel_size_range)
    size = sizes[int(rng.integers(len(sizes)))]
    return sample_sinc_kernel(rng, size=size, cutoff_range=config.final.sinc_cutoff_range)


def sample_resize(
    rng: np.random.Generator,
    probs: Sequence[float],
    scale_range: Sequence[float],
    modes: Sequence[str],
) -> tuple[int, float, int]:
    """sample_resize(rng, probs, scale_range, modes) -> (direction, scale, mode index).

    Direction up/down/keep with `probs`; up U(1, high), down U(low, 1), keep 1.
    """
    direction = _choice(rng, probs)
    if RESIZE_DIRECTIONS[direction] == "up":
        scale = float(rng.uniform(1.0, scale_range[1]))
    elif RESIZE_DIRECTIONS[direction] == "down":
        scale = float(rng.uniform(scale_range[0], 1.0))
    else:
        scale = 1.0
    mode = RESIZE_MODES.index(modes[int(rng.integers(len(modes)))])
    return direction, scale, mode


def sample_noise(
    rng: np.random.Generator, stage: ml_collections.ConfigDict
) -> tuple[int, float, bool]:
    """sample_noise(rng, stage_config) -> (noise type index, level, gray)."""
    if rng.uniform() < stage.gaussian_noise_prob:
        noise_type, level = 0, float(rng.uniform(*stage.gaussian_sigma_range))
    else:
        noise_type, level = 1, float(rng.uniform(*stage.poisson_scale_range))
    return noise_type, level, bool(rng.uniform() < stage.gray_noise_prob)


def sample_jpeg_quality(rng: np.random.Generator, quality_range: Sequence[float]) -> int:
    """sample_jpeg_quality(rng, (low, high)) -> int quality, U(low, high) rounded."""
    return int(round(rng.uniform(*quality_range)))


def _sample_stage(
    rng: np.random.Generator, stage: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> StagePlan:
    kernel = sample_blur_kernel(rng, stage, config) if rng.uniform() < stage.blur_prob else None
    direction, scale, mode = sample_resize(
        rng, stage.resize_probs, stage.resize_range, stage.resize_modes
    )
    noise_type, level, gray = sample_noise(rng, stage)
    return StagePlan(
        kernel=kernel,
        resize_direction=direction,
        resize_scale=scale,
        resize_mode=mode,
        noise_type=noise_type,
        noise_level=level,
        gray_noise=gray,
        jpeg_quality=sample_jpeg_quality(rng, stage.jpeg_quality_range),
    )


def sample_degradation_plan(
    config: ml_collections.ConfigDict, rng: np.random.Generator
) -> DegradationPlan:
    """sample_degradation_plan(config, rng) -> DegradationPlan; independent of the image."""
    stage1 = _sample_stage(rng, config.stage1, config)
    stage2 = _sample_stage(rng, config.stage2, config)
    final = FinalPlan(
        jpeg_first=bool(rng.uniform() < config.final.jpeg_first_prob),
        sinc=sample_final_sinc(rng, config),
        resize_mode=RESIZE_MODES.index(
            config.final.resize_modes[int(rng.integers(len(config.final.resize_modes)))]
        ),
    )
    return DegradationPlan(usm=config.usm.apply, stage1=stage1, stage2=stage2, final=final)
