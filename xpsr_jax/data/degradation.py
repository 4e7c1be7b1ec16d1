"""Real-ESRGAN second-order degradation (numpy + OpenCV) for XPSR training pairs.

Turns an HR crop into its LR counterpart the way Real-ESRGAN synthesises
training data (`realesrgan/models/realesrnet_model.py::feed_data`, kernels from
`realesrgan/data/realesrgan_dataset.py`, ops from BasicSR), with the values of
`options/train_realesrnet_x4plus.yml` and the XPSR data script
(`utils_data/make_train.py`, second blur probability 0.8):

  USM-sharpen GT
  stage 1: blur -> random resize -> Gaussian|Poisson noise -> JPEG
  stage 2: blur (p=0.8) -> random resize -> Gaussian|Poisson noise
  final:   [resize to HR/scale + sinc, JPEG] or [JPEG, resize + sinc] (p=0.5 each)
  clamp, round to 1/255 -> uint8

The randomness is drawn in two steps so every choice can be stored with the
example: `sample_degradation_plan` draws all discrete and scalar choices (a
`DegradationPlan`), `apply_degradation_plan` runs the ops, drawing only the
noise fields. `degrade(hr, config, seed=, example_id=)` does both from
`SeedSequence([seed, example_id])`, so an example is reproducible bit for bit.
XPSR then upsamples the LR bicubically back to HR size; that is not done here.

Known, documented deviations from the PyTorch reference (all sub-pixel or
codec-level): JPEG is libjpeg via cv2 at an integer quality instead of
BasicSR's DiffJPEG at a float quality; stage-1 resize maps coordinates with the
output/input size ratio, torch with the drawn scale factor (they differ by
under one output pixel across the image). 'area' resizing reproduces torch's
adaptive average pooling exactly; bilinear and bicubic match torch
(align_corners=False, A=-0.75) to float rounding.

Public API:
  default_degradation_config() -> ConfigDict
  validate_degradation_config(cfg) -> None (raises ValueError naming the key)
  degrade(hr, config, *, seed, example_id) -> (lr uint8, params dict)
  DEGRADATION_PARAM_KEYS, KERNEL_FAMILIES, RESIZE_MODES, RESIZE_DIRECTIONS, NOISE_TYPES
  sample_degradation_plan(config, rng) -> DegradationPlan
  apply_degradation_plan(image, plan, config, rng) -> float32 LR in [0, 1]
  degradation_params(plan) -> flat dict keyed by DEGRADATION_PARAM_KEYS
  ops: usm_sharpen, blur, resize, add_gaussian_noise, add_poisson_noise, jpeg_compress
  samplers: sample_blur_kernel, sample_final_sinc, sample_resize, sample_noise,
            sample_jpeg_quality

CLI:
  python -m xpsr_jax.data.degradation --image hr.png --out lr.png --seed 0 --example-id 3
  python -m xpsr_jax.data.degradation --benchmark 50 --size 512 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import time
from collections.abc import Sequence

import cv2
import ml_collections
import numpy as np
from tqdm import tqdm

from xpsr_jax.data.kernels import (
    KERNEL_FAMILIES,
    NOT_APPLICABLE,
    KernelDraw,
    odd_kernel_sizes,
    sample_mixed_kernel,
    sample_sinc_kernel,
)

RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")
RESIZE_DIRECTIONS: tuple[str, ...] = ("up", "down", "keep")
NOISE_TYPES: tuple[str, ...] = ("gaussian", "poisson")

# torchvision rgb_to_grayscale weights (used by BasicSR's gray Poisson noise).
_GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def _stage_config(
    *,
    blur_prob: float,
    blur_sigma_range: tuple[float, float],
    resize_probs: tuple[float, float, float],
    resize_range: tuple[float, float],
    gaussian_sigma_range: tuple[float, float],
    poisson_scale_range: tuple[float, float],
) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            blur_prob=blur_prob,
            kernel_families=KERNEL_FAMILIES,
            kernel_probs=(0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
            sinc_prob=0.1,
            blur_sigma_range=blur_sigma_range,
            rotation_range=(-math.pi, math.pi),
            betag_range=(0.5, 4.0),
            betap_range=(1.0, 2.0),
            resize_probs=resize_probs,
            resize_range=resize_range,
            resize_modes=RESIZE_MODES,
            gaussian_noise_prob=0.5,
            gaussian_sigma_range=gaussian_sigma_range,
            poisson_scale_range=poisson_scale_range,
            gray_noise_prob=0.4,
            jpeg_quality_range=(30.0, 95.0),
        )
    )


def default_degradation_config() -> ml_collections.ConfigDict:
    """default_degradation_config() -> locked ConfigDict with the official values.

    Reference option names in brackets (train_realesrnet_x4plus.yml unless noted).

    scale                      4     LR side = HR side / scale [scale]
    usm.apply                  True  USM-sharpen the GT before degrading [gt_usm]
    usm.radius                 50    Gaussian window (made odd: 51, sigma 8) [USMSharp]
    usm.weight                 0.5   sharpening amount [USMSharp.forward]
    usm.threshold              10    residual (0-255 scale) that counts as an edge
    kernel_size_range          (7, 21)  blur kernel size, uniform over odd sizes
                                        [realesrgan_dataset.kernel_range]
    kernel_pad_to              21    kernels are zero-padded to this size
                                     [blur_kernel_size]
    sinc_cutoff_range_small    (pi/3, pi)  sinc cutoff for blur kernels smaller
                                           than sinc_large_kernel_size
    sinc_cutoff_range_large    (pi/5, pi)  ... for larger ones
    sinc_large_kernel_size     13

    stage1 / stage2 (first / second degradation; values stage1 | stage2):
      blur_prob                1.0 | 0.8   probability of blurring
                                           [always | second_blur_prob]
      kernel_families          six families, see kernels.KERNEL_FAMILIES [kernel_list]
      kernel_probs             (.45, .25, .12, .03, .12, .03)  [kernel_prob]
      sinc_prob                0.1         sinc instead of a family kernel [sinc_prob]
      blur_sigma_range         (0.2, 3) | (0.2, 1.5)  sigma_x, sigma_y [blur_sigma]
      rotation_range           (-pi, pi)   anisotropic kernel rotation
      betag_range              (0.5, 4)    generalized Gaussian beta [betag_range]
      betap_range              (1, 2)      plateau beta [betap_range]
      resize_probs             (.2, .7, .1) | (.3, .4, .3)  up, down, keep [resize_prob]
      resize_range             (0.15, 1.5) | (0.3, 1.2)  scale: up U(1, hi), down
                                           U(lo, 1) [resize_range]; stage 1 scales
                                           the current size, stage 2 HR size / scale
      resize_modes             (area, bilinear, bicubic), uniform
      gaussian_noise_prob      0.5         else Poisson [gaussian_noise_prob]
      gaussian_sigma_range     (1, 30) | (1, 25)  0-255 scale [noise_range]
      poisson_scale_range      (0.05, 3) | (0.05, 2.5) [poisson_scale_range]
      gray_noise_prob          0.4         same noise in all channels [gray_noise_prob]
      jpeg_quality_range       (30, 95)    uniform, rounded to int [jpeg_range];
                                           stage 2's is used by the final JPEG

    final (last step, realesrnet_model.feed_data):
      sinc_prob                0.8         apply the final sinc [final_sinc_prob]
      sinc_cutoff_range        (pi/3, pi)
      jpeg_first_prob          0.5         order JPEG -> resize+sinc, else
                                           resize+sinc -> JPEG
      resize_modes             (area, bilinear, bicubic), uniform
    """
    cfg = ml_collections.ConfigDict()
    cfg.scale = 4
    cfg.usm = ml_collections.ConfigDict(dict(apply=True, radius=50, weight=0.5, threshold=10.0))
    cfg.kernel_size_range = (7, 21)
    cfg.kernel_pad_to = 21
    cfg.sinc_cutoff_range_small = (math.pi / 3, math.pi)
    cfg.sinc_cutoff_range_large = (math.pi / 5, math.pi)
    cfg.sinc_large_kernel_size = 13
    cfg.stage1 = _stage_config(
        blur_prob=1.0,
        blur_sigma_range=(0.2, 3.0),
        resize_probs=(0.2, 0.7, 0.1),
        resize_range=(0.15, 1.5),
        gaussian_sigma_range=(1.0, 30.0),
        poisson_scale_range=(0.05, 3.0),
    )
    cfg.stage2 = _stage_config(
        blur_prob=0.8,
        blur_sigma_range=(0.2, 1.5),
        resize_probs=(0.3, 0.4, 0.3),
        resize_range=(0.3, 1.2),
        gaussian_sigma_range=(1.0, 25.0),
        poisson_scale_range=(0.05, 2.5),
    )
    cfg.final = ml_collections.ConfigDict(
        dict(
            sinc_prob=0.8,
            sinc_cutoff_range=(math.pi / 3, math.pi),
            jpeg_first_prob=0.5,
            resize_modes=RESIZE_MODES,
        )
    )
    cfg.lock()
    return cfg


class _ConfigChecker:
    """Collects the checks of validate_degradation_config; errors name the key."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg

    def get(self, key: str):
        node = self.cfg
        for part in key.split("."):
            node = node[part]
        return node

    @staticmethod
    def fail(key: str, value, expected: str):
        raise ValueError(f"degradation config '{key}' = {value!r} is invalid: expected {expected}")

    def number(self, key: str, lo: float = -math.inf, hi: float = math.inf) -> float:
        value = self.get(key)
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not ok or not lo <= value <= hi:
            self.fail(key, value, f"a number in [{lo}, {hi}]")
        return value

    def integer(self, key: str, lo: int, hi: int = 10**9, odd: bool = False) -> int:
        value = self.get(key)
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not ok or not lo <= value <= hi or (odd and value % 2 == 0):
            self.fail(key, value, f"an {'odd ' if odd else ''}integer in [{lo}, {hi}]")
        return value

    def prob(self, key: str) -> float:
        return self.number(key, 0.0, 1.0)

    def sequence(self, key: str, length: int | None = None) -> tuple:
        value = self.get(key)
        if not isinstance(value, (tuple, list)) or (length is not None and len(value) != length):
            self.fail(key, value, f"a tuple of {length or 'one or more'} items")
        if not value:
            self.fail(key, value, "a non-empty tuple")
        return tuple(value)

    def range_(self, key: str, lo: float = -math.inf, hi: float = math.inf, contains=None):
        value = self.sequence(key, 2)
        numeric = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
        if not numeric or not lo <= value[0] <= value[1] <= hi:
            self.fail(key, value, f"(low, high) with {lo} <= low <= high <= {hi}")
        if contains is not None and not value[0] <= contains <= value[1]:
            self.fail(key, value, f"(low, high) with low <= {contains} <= high")
        return value

    def distribution(self, key: str, length: int) -> tuple:
        value = self.sequence(key, length)
        numeric = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
        if not numeric or min(value) < 0 or abs(sum(value) - 1.0) > 1e-6:
            self.fail(key, value, f"{length} non-negative probabilities summing to 1")
        return value

    def choices(self, key: str, valid: tuple[str, ...]) -> tuple:
        value = self.sequence(key)
        if any(v not in valid for v in value) or len(set(value)) != len(value):
            self.fail(key, value, f"distinct names from {valid}")
        return value


def _check_key_sets(cfg, reference, prefix: str = "") -> None:
    if not isinstance(cfg, (ml_collections.ConfigDict, dict)):
        where = prefix.rstrip(".") or "<root>"
        got = type(cfg).__name__
        raise ValueError(f"degradation config '{where}' must be a ConfigDict, got {got}")
    missing = sorted(set(reference.keys()) - set(cfg.keys()))
    unknown = sorted(set(cfg.keys()) - set(reference.keys()))
    if missing or unknown:
        raise ValueError(
            f"degradation config keys: missing {[prefix + k for k in missing]}, "
            f"unknown {[prefix + k for k in unknown]}"
        )
    for key, ref_value in reference.items():
        if isinstance(ref_value, ml_collections.ConfigDict):
            _check_key_sets(cfg[key], ref_value, f"{prefix}{key}.")


def validate_degradation_config(cfg: ml_collections.ConfigDict) -> None:
    """validate_degradation_config(cfg) -> None; raises ValueError naming key and value."""
    _check_key_sets(cfg, default_degradation_config())
    check = _ConfigChecker(cfg)
    check.integer("scale", 1, 64)
    if not isinstance(cfg.usm.apply, bool):
        check.fail("usm.apply", cfg.usm.apply, "True or False")
    check.integer("usm.radius", 1, 1000)
    check.number("usm.weight", 0.0)
    check.number("usm.threshold", 0.0, 255.0)
    pad_to = check.integer("kernel_pad_to", 1, 101, odd=True)
    sizes = check.sequence("kernel_size_range", 2)
    for size in sizes:
        if not isinstance(size, numbers.Integral) or size < 1 or size % 2 == 0 or size > pad_to:
            check.fail("kernel_size_range", sizes, f"two odd sizes <= kernel_pad_to ({pad_to})")
    if sizes[0] > sizes[1]:
        check.fail("kernel_size_range", sizes, "(low, high) with low <= high")
    check.range_("sinc_cutoff_range_small", 1e-6, math.pi)
    check.range_("sinc_cutoff_range_large", 1e-6, math.pi)
    check.integer("sinc_large_kernel_size", 1)
    for stage in ("stage1", "stage2"):
        families = check.choices(f"{stage}.kernel_families", KERNEL_FAMILIES)
        check.distribution(f"{stage}.kernel_probs", len(families))
        for name in ("blur_prob", "sinc_prob", "gaussian_noise_prob", "gray_noise_prob"):
            check.prob(f"{stage}.{name}")
        check.range_(f"{stage}.blur_sigma_range", 1e-6)
        check.range_(f"{stage}.rotation_range")
        # Beta is drawn below 1 or above 1 with equal odds, so 1 must be inside.
        check.range_(f"{stage}.betag_range", 1e-6, contains=1.0)
        check.range_(f"{stage}.betap_range", 1e-6, contains=1.0)
        check.distribution(f"{stage}.resize_probs", len(RESIZE_DIRECTIONS))
        check.range_(f"{stage}.resize_range", 1e-6, contains=1.0)
        check.choices(f"{stage}.resize_modes", RESIZE_MODES)
        check.range_(f"{stage}.gaussian_sigma_range", 0.0)
        check.range_(f"{stage}.poisson_scale_range", 0.0)
        check.range_(f"{stage}.jpeg_quality_range", 1.0, 100.0)
    check.prob("final.sinc_prob")
    check.range_("final.sinc_cutoff_range", 1e-6, math.pi)
    check.prob("final.jpeg_first_prob")
    check.choices("final.resize_modes", RESIZE_MODES)


# --------------------------------------------------------------------------
# Pure image ops: float32 HxWx3 RGB in [0, 1]
# --------------------------------------------------------------------------


def usm_sharpen(
    img: np.ndarray, *, radius: int = 50, weight: float = 0.5, threshold: float = 10.0
) -> np.ndarray:
    """usm_sharpen(img, *, radius=50, weight=0.5, threshold=10) -> sharpened img.

    BasicSR USMSharp: residual r = img - gaussian(img); sharpen to
    clip(img + weight * r) where |r| * 255 > threshold, softened by blurring
    that mask with the same Gaussian. The window is radius (made odd) wide with
    OpenCV's default sigma for that size.
    """
    size = radius + 1 if radius % 2 == 0 else radius

    def gaussian(x):
        return cv2.GaussianBlur(x, (size, size), 0, borderType=cv2.BORDER_REFLECT_101)

    residual = img - gaussian(img)
    edge_mask = (np.abs(residual) * 255 > threshold).astype(np.float32)
    soft_mask = gaussian(edge_mask)
    sharp = np.clip(img + weight * residual, 0.0, 1.0)
    return (soft_mask * sharp + (1.0 - soft_mask) * img).astype(np.float32)


def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """blur(img, kernel) -> img correlated with kernel, reflect-101 borders (BasicSR filter2D)."""
    return cv2.filter2D(img, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def _adaptive_mean(x: np.ndarray, out_len: int, axis: int) -> np.ndarray:
    """Mean over torch adaptive-pool bins [floor(i n/m), ceil((i+1) n/m)) along axis."""
    n = x.shape[axis]
    index = np.arange(out_len)
    start = index * n // out_len
    end = ((index + 1) * n + out_len - 1) // out_len
    cumsum = np.cumsum(x, axis=axis, dtype=np.float64)
    zero = np.zeros_like(np.take(cumsum, [0], axis=axis))
    cumsum = np.concatenate([zero, cumsum], axis=axis)
    sums = np.take(cumsum, end, axis=axis) - np.take(cumsum, start, axis=axis)
    shape = [1] * x.ndim
    shape[axis] = out_len
    return sums / (end - start).reshape(shape)


def resize(img: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """resize(img, (height, width), mode) -> img resized like torch F.interpolate(size=...).

    'area' is torch's adaptive average pooling (exact); 'bilinear'/'bicubic'
    are cv2 INTER_LINEAR/INTER_CUBIC, which equal torch with
    align_corners=False (bicubic A=-0.75) up to float rounding.
    """
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"resize target must be at least 1x1, got {size}")
    if img.shape[:2] == (height, width):
        return img
    if mode == "area":
        out = _adaptive_mean(_adaptive_mean(img, height, 0), width, 1)
        return out.astype(np.float32)
    interpolation = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}.get(mode)
    if interpolation is None:
        raise ValueError(f"unknown resize mode {mode!r}; valid: {RESIZE_MODES}")
    return cv2.resize(img, (width, height), interpolation=interpolation)


def add_gaussian_noise(
    img: np.ndarray, sigma: float, *, gray: bool, rng: np.random.Generator
) -> np.ndarray:
    """add_gaussian_noise(img, sigma, *, gray, rng) -> clip(img + N(0, (sigma/255)^2), 0, 1).

    sigma is on the 0-255 scale; gray noise is one field shared by all channels.
    """
    shape = img.shape[:2] + (1,) if gray else img.shape
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma / 255.0)
    return np.clip(img + noise, 0.0, 1.0)


def add_poisson_noise(
    img: np.ndarray, scale: float, *, gray: bool, rng: np.random.Generator
) -> np.ndarray:
    """add_poisson_noise(img, scale, *, gray, rng) -> clip(img + scale * shot noise, 0, 1).

    BasicSR: quantise the image (or its luma, for gray noise) to 1/255, take
    v = 2^ceil(log2(#distinct levels)) photon levels, draw Poisson(x v) / v and
    add scale times its deviation from x. So the noise variance is
    scale^2 x / v at intensity x.
    """
    base = (img @ _GRAY_WEIGHTS)[..., None] if gray else img
    levels = np.clip(np.round(base * 255.0), 0, 255).astype(np.uint8)
    distinct = np.count_nonzero(np.bincount(levels.ravel(), minlength=256))
    photons = 2.0 ** np.ceil(np.log2(distinct))
    quantised = levels.astype(np.float64) / 255.0
    noise = (rng.poisson(quantised * photons) / photons - quantised) * scale
    return np.clip(img + noise.astype(np.float32), 0.0, 1.0)


def jpeg_compress(img: np.ndarray, quality: int) -> np.ndarray:
    """jpeg_compress(img, quality) -> img after a libjpeg round trip at quality 1..100."""
    pixels = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise RuntimeError(f"cv2 failed to JPEG-encode a {pixels.shape} image")
    decoded = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return decoded.astype(np.float32) / 255.0


def to_uint8(img: np.ndarray) -> np.ndarray:
    """to_uint8(img) -> clamp(round(img * 255), 0, 255) as uint8 (the reference's final step)."""
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# Sampling the plan
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Applying the plan
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Flat parameter record
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


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


def _synthetic_hr(size: int, seed: int) -> np.ndarray:
    """A textured test image (smoothed noise + gradients), uint8 RGB."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.uniform(0, 1, (size, size, 3)).astype(np.float32), (0, 0), 3)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    texture = 0.1 * (noise - noise.mean()) / (noise.std() + 1e-6)
    image = texture + ramp[None, :, None] * 0.6 + 0.2
    return to_uint8(image)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", help="HR image to degrade (any format cv2 reads)")
    parser.add_argument("--out", help="where to write the LR image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--example-id", type=int, default=0)
    parser.add_argument(
        "--benchmark", type=int, default=0, help="degrade N synthetic crops, report crops/s"
    )
    parser.add_argument("--size", type=int, default=512, help="benchmark crop size")
    parser.add_argument("--threads", type=int, default=1, help="cv2 threads for the benchmark")
    args = parser.parse_args(argv)
    config = default_degradation_config()

    if args.benchmark:

        cv2.setNumThreads(args.threads)
        hr = _synthetic_hr(args.size, args.seed)
        start = time.perf_counter()
        for example_id in tqdm(range(args.benchmark), desc=f"degrading {args.size}px crops"):
            degrade(hr, config, seed=args.seed, example_id=example_id)
        elapsed = time.perf_counter() - start
        rate = args.benchmark / elapsed
        print(f"{rate:.2f} crops/s ({args.size}x{args.size}, cv2 threads {args.threads})")
        return
    if not args.image or not args.out:
        parser.error("give --image and --out, or --benchmark N")
    bgr = cv2.imread(args.image, cv2.IMREAD_COLOR)
    if bgr is None:
        parser.error(f"cannot read image {args.image!r}")
    hr = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    height, width = (side - side % config.scale for side in hr.shape[:2])
    lr, params = degrade(hr[:height, :width], config, seed=args.seed, example_id=args.example_id)
    cv2.imwrite(args.out, cv2.cvtColor(lr, cv2.COLOR_RGB2BGR))
    print(json.dumps(params, indent=1))


if __name__ == "__main__":
    main()
