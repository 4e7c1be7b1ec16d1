"""The degradation config: Real-ESRGAN's ranges and probabilities, validated with messages that
name the key."""

from __future__ import annotations

import math
import numbers

import ml_collections

from xpsr_jax.data.kernels import (
    KERNEL_FAMILIES,
)

RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")
RESIZE_DIRECTIONS: tuple[str, ...] = ("up", "down", "keep")
NOISE_TYPES: tuple[str, ...] = ("gaussian", "poisson")


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
