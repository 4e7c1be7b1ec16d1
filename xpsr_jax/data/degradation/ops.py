"""The pure image operations of the degradation, on float32 HxWx3 RGB in [0, 1]."""

from __future__ import annotations

import cv2
import numpy as np

from xpsr_jax.data.degradation.config import RESIZE_MODES

# torchvision rgb_to_grayscale weights (used by BasicSR's gray Poisson noise).
_GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)


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
