"""Blur kernels of the Real-ESRGAN degradation (numpy).

The six kernel families of Real-ESRGAN (BasicSR `basicsr/data/degradations.py`)
and the 2-D circular low-pass ("sinc") kernel, as pure functions of their
parameters, plus samplers that draw those parameters from an explicit
`np.random.Generator` with the reference distributions.

Conventions follow the reference so kernels match it value for value:
  * a kernel of odd size K is sampled on the integer grid -K//2+1 .. K//2,
    with x along columns and y along rows;
  * kernels are correlation kernels (cv2.filter2D / torch conv2d), normalised
    to sum to 1;
  * rotation is in radians, counter-clockwise from the x axis.

Public API:
  KERNEL_FAMILIES
  mesh_grid(size) -> (K, K, 2) array of (x, y)
  covariance_matrix(sigma_x, sigma_y, rotation) -> (2, 2)
  gaussian_kernel(size, sigma_x, sigma_y, rotation) -> (K, K)
  generalized_gaussian_kernel(size, sigma_x, sigma_y, rotation, beta) -> (K, K)
  plateau_kernel(size, sigma_x, sigma_y, rotation, beta) -> (K, K)
  circular_lowpass_kernel(cutoff, size) -> (K, K)
  pad_kernel(kernel, pad_to) -> (pad_to, pad_to)
  odd_kernel_sizes(size_range) -> tuple of odd sizes
  sample_mixed_kernel(rng, *, size, families, probs, ...) -> KernelDraw
  sample_sinc_kernel(rng, *, size, cutoff_range) -> KernelDraw
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import special

KERNEL_FAMILIES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)

# Family index recorded for a sinc kernel (it is not one of KERNEL_FAMILIES).
SINC_FAMILY_INDEX = -1
# Value recorded for a parameter that does not apply to the drawn kernel.
NOT_APPLICABLE = -1.0


@dataclasses.dataclass(frozen=True)
class KernelDraw:
    """A drawn kernel and the parameters that produced it.

    `family` is an index into KERNEL_FAMILIES, or SINC_FAMILY_INDEX for a sinc
    kernel. Parameters that do not apply are NOT_APPLICABLE, except `rotation`,
    which is 0.0 for isotropic and sinc kernels (as the reference sets it;
    -1 would be a valid angle).
    """

    kernel: np.ndarray  # (size, size) float32, sums to 1
    family: int
    size: int
    sigma_x: float = NOT_APPLICABLE
    sigma_y: float = NOT_APPLICABLE
    rotation: float = 0.0
    beta: float = NOT_APPLICABLE
    sinc_cutoff: float = NOT_APPLICABLE

    @property
    def is_sinc(self) -> bool:
        return self.family == SINC_FAMILY_INDEX


# --------------------------------------------------------------------------
# Deterministic kernels
# --------------------------------------------------------------------------


def _check_odd_size(size: int) -> None:
    if size < 1 or size % 2 != 1:
        raise ValueError(f"kernel size must be a positive odd integer, got {size!r}")


def mesh_grid(size: int) -> np.ndarray:
    """mesh_grid(size) -> (size, size, 2) float64 grid of (x, y), centred at 0."""
    _check_odd_size(size)
    axis = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    xx, yy = np.meshgrid(axis, axis)
    return np.stack([xx, yy], axis=-1)


def covariance_matrix(sigma_x: float, sigma_y: float, rotation: float) -> np.ndarray:
    """covariance_matrix(sigma_x, sigma_y, rotation) -> U diag(sx^2, sy^2) U^T."""
    cos, sin = np.cos(rotation), np.sin(rotation)
    rot = np.array([[cos, -sin], [sin, cos]])
    return rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T


def _mahalanobis_sq(
    size: int, sigma_x: float, sigma_y: float | None, rotation: float
) -> np.ndarray:
    """x^T Sigma^-1 x on the kernel grid; sigma_y=None means isotropic."""
    if sigma_y is None:
        sigma_y, rotation = sigma_x, 0.0
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"kernel sigmas must be > 0, got sigma_x={sigma_x}, sigma_y={sigma_y}")
    grid = mesh_grid(size)
    inv_cov = np.linalg.inv(covariance_matrix(sigma_x, sigma_y, rotation))
    return np.einsum("hwi,ij,hwj->hw", grid, inv_cov, grid)


def _normalise(kernel: np.ndarray) -> np.ndarray:
    return (kernel / np.sum(kernel)).astype(np.float32)


def gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, rotation: float = 0.0
) -> np.ndarray:
    """gaussian_kernel(size, sigma_x, sigma_y=None, rotation=0.) -> (size, size) float32.

    Bivariate Gaussian exp(-d/2), d the squared Mahalanobis distance;
    sigma_y=None gives the isotropic kernel (rotation ignored).
    """
    return _normalise(np.exp(-0.5 * _mahalanobis_sq(size, sigma_x, sigma_y, rotation)))


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float | None, rotation: float, beta: float
) -> np.ndarray:
    """generalized_gaussian_kernel(size, sigma_x, sigma_y, rotation, beta) -> (size, size).

    exp(-d^beta / 2); beta=1 is the Gaussian, beta<1 heavier tails, beta>1 flatter top.
    """
    if beta <= 0:
        raise ValueError(f"generalized Gaussian beta must be > 0, got {beta}")
    dist = _mahalanobis_sq(size, sigma_x, sigma_y, rotation)
    return _normalise(np.exp(-0.5 * np.power(dist, beta)))


def plateau_kernel(
    size: int, sigma_x: float, sigma_y: float | None, rotation: float, beta: float
) -> np.ndarray:
    """plateau_kernel(size, sigma_x, sigma_y, rotation, beta) -> (size, size): 1 / (1 + d^beta)."""
    if beta <= 0:
        raise ValueError(f"plateau beta must be > 0, got {beta}")
    dist = _mahalanobis_sq(size, sigma_x, sigma_y, rotation)
    return _normalise(1.0 / (np.power(dist, beta) + 1.0))


def circular_lowpass_kernel(cutoff: float, size: int) -> np.ndarray:
    """circular_lowpass_kernel(cutoff, size) -> (size, size) float32.

    Ideal circular low-pass filter ("2-D sinc"): c J1(c r) / (2 pi r), with the
    r=0 limit c^2 / (4 pi); `cutoff` c is in radians per pixel (pi = Nyquist).
    """
    _check_odd_size(size)
    if not 0 < cutoff <= np.pi:
        raise ValueError(f"sinc cutoff must be in (0, pi], got {cutoff}")
    radius = np.linalg.norm(mesh_grid(size), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = cutoff * special.j1(cutoff * radius) / (2 * np.pi * radius)
    kernel[size // 2, size // 2] = cutoff**2 / (4 * np.pi)
    return _normalise(kernel)


def pad_kernel(kernel: np.ndarray, pad_to: int) -> np.ndarray:
    """pad_kernel(kernel, pad_to) -> kernel zero-padded (centred) to (pad_to, pad_to)."""
    size = kernel.shape[0]
    if kernel.shape != (size, size) or pad_to < size or (pad_to - size) % 2:
        raise ValueError(f"cannot centre-pad a {kernel.shape} kernel to {pad_to}x{pad_to}")
    pad = (pad_to - size) // 2
    return np.pad(kernel, pad)


# --------------------------------------------------------------------------
# Samplers (reference distributions)
# --------------------------------------------------------------------------


def odd_kernel_sizes(size_range: Sequence[int]) -> tuple[int, ...]:
    """odd_kernel_sizes((lo, hi)) -> all odd sizes in [lo, hi] (reference: 7, 9, ..., 21)."""
    lo, hi = size_range
    return tuple(range(lo if lo % 2 else lo + 1, hi + 1, 2))


def _sample_beta(rng: np.random.Generator, beta_range: Sequence[float]) -> float:
    # Reference: half the draws below 1, half above, whatever the range's
    # balance. For betap_range (1, 2) this makes beta exactly 1 half the time.
    if rng.uniform() < 0.5:
        return float(rng.uniform(beta_range[0], 1.0))
    return float(rng.uniform(1.0, beta_range[1]))


def sample_mixed_kernel(
    rng: np.random.Generator,
    *,
    size: int,
    families: Sequence[str],
    probs: Sequence[float],
    sigma_range: Sequence[float],
    rotation_range: Sequence[float],
    betag_range: Sequence[float],
    betap_range: Sequence[float],
) -> KernelDraw:
    """sample_mixed_kernel(rng, *, size, families, probs, sigma_range, rotation_range,
    betag_range, betap_range) -> KernelDraw

    Draws a family with `probs`, then its parameters as BasicSR's
    `random_mixed_kernels` does: sigma_x (and for anisotropic families sigma_y
    and rotation) uniform in their ranges; beta from `betag_range` for
    generalized and `betap_range` for plateau families.
    """
    family = str(families[rng.choice(len(families), p=np.asarray(probs, dtype=np.float64))])
    if family not in KERNEL_FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; valid: {KERNEL_FAMILIES}")
    isotropic = not family.endswith("aniso")
    sigma_x = float(rng.uniform(*sigma_range))
    if isotropic:
        sigma_y, rotation = sigma_x, 0.0
    else:
        sigma_y = float(rng.uniform(*sigma_range))
        rotation = float(rng.uniform(*rotation_range))
    shape_sigma_y = None if isotropic else sigma_y

    beta = NOT_APPLICABLE
    if family.startswith("generalized"):
        beta = _sample_beta(rng, betag_range)
        kernel = generalized_gaussian_kernel(size, sigma_x, shape_sigma_y, rotation, beta)
    elif family.startswith("plateau"):
        beta = _sample_beta(rng, betap_range)
        kernel = plateau_kernel(size, sigma_x, shape_sigma_y, rotation, beta)
    else:
        kernel = gaussian_kernel(size, sigma_x, shape_sigma_y, rotation)
    return KernelDraw(
        kernel=kernel,
        family=KERNEL_FAMILIES.index(family),
        size=size,
        sigma_x=sigma_x,
        sigma_y=sigma_y,
        rotation=rotation,
        beta=beta,
    )


def sample_sinc_kernel(
    rng: np.random.Generator, *, size: int, cutoff_range: Sequence[float]
) -> KernelDraw:
    """sample_sinc_kernel(rng, *, size, cutoff_range) -> KernelDraw with cutoff ~ U(range)."""
    cutoff = float(rng.uniform(*cutoff_range))
    return KernelDraw(
        kernel=circular_lowpass_kernel(cutoff, size),
        family=SINC_FAMILY_INDEX,
        size=size,
        sinc_cutoff=cutoff,
    )
