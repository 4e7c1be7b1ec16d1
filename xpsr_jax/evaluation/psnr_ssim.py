"""PSNR and SSIM on the Y channel, with the conventions of the SR literature (basicsr).

    psnr_y(pred_rgb, gt_rgb, crop_border=0) -> float      dB; inf for identical images
    ssim_y(pred_rgb, gt_rgb, crop_border=0) -> float
    psnr(pred, gt, data_range=255.0) / ssim(pred, gt, data_range=255.0)   on 2-D arrays

Both take (H, W, 3) RGB in [0, 255] (uint8 or float), convert to BT.601 Y (`color.rgb_to_y`),
crop `crop_border` pixels from every side and compute in float64. SSIM is the MATLAB/basicsr
one: an 11x11 Gaussian window with sigma 1.5, 'valid' filtering (no padding), K1 = 0.01,
K2 = 0.03, population (not sample) covariances, mean of the SSIM map. This equals
scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)`, which filters with padding and then drops the
5-pixel border, i.e. exactly the valid region.
"""

from __future__ import annotations

import numpy as np

from xpsr_jax.evaluation.color import rgb_to_y

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def psnr_y(pred_rgb: np.ndarray, gt_rgb: np.ndarray, crop_border: int = 0) -> float:
    """PSNR in dB between the BT.601 Y channels of two (H, W, 3) RGB images in [0, 255]."""
    pred_y, gt_y = _y_pair(pred_rgb, gt_rgb, crop_border)
    return psnr(pred_y, gt_y)


def ssim_y(pred_rgb: np.ndarray, gt_rgb: np.ndarray, crop_border: int = 0) -> float:
    """SSIM between the BT.601 Y channels of two (H, W, 3) RGB images in [0, 255]."""
    pred_y, gt_y = _y_pair(pred_rgb, gt_rgb, crop_border)
    return ssim(pred_y, gt_y)


def psnr(pred: np.ndarray, gt: np.ndarray, data_range: float = 255.0) -> float:
    """PSNR of two same-shape arrays: 10 log10(data_range^2 / MSE); inf when they are equal."""
    _check_same_shape(pred, gt)
    mse = np.mean((np.asarray(pred, np.float64) - np.asarray(gt, np.float64)) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def ssim(pred: np.ndarray, gt: np.ndarray, data_range: float = 255.0) -> float:
    """Gaussian-window SSIM of two same-shape 2-D arrays (the MATLAB / basicsr definition)."""
    _check_same_shape(pred, gt)
    if pred.ndim != 2:
        raise ValueError(f"ssim expects 2-D arrays, got shape {pred.shape}")
    if min(pred.shape) < SSIM_WINDOW:
        raise ValueError(
            f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after the crop "
            f"border, got {pred.shape[0]}x{pred.shape[1]}"
        )
    x = np.asarray(pred, np.float64)
    y = np.asarray(gt, np.float64)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _gaussian_valid(x), _gaussian_valid(y)
    var_x = _gaussian_valid(x * x) - mu_x**2
    var_y = _gaussian_valid(y * y) - mu_y**2
    cov_xy = _gaussian_valid(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return float(ssim_map.mean())


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian taps (what cv2.getGaussianKernel(11, 1.5) returns)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-(offsets**2) / (2 * sigma**2))
    return taps / taps.sum()


def _gaussian_valid(image: np.ndarray) -> np.ndarray:
    """Separable 11x11 Gaussian filter, 'valid' region only: (H, W) -> (H - 10, W - 10)."""
    taps = gaussian_window_1d()
    size = len(taps)
    rows = sum(taps[i] * image[i : image.shape[0] - size + 1 + i] for i in range(size))
    return sum(taps[j] * rows[:, j : image.shape[1] - size + 1 + j] for j in range(size))


def _y_pair(pred_rgb, gt_rgb, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    _check_same_shape(pred_rgb, gt_rgb)
    return crop(rgb_to_y(pred_rgb), crop_border), crop(rgb_to_y(gt_rgb), crop_border)


def crop(image: np.ndarray, crop_border: int) -> np.ndarray:
    """Drops `crop_border` pixels from each side of the two leading axes."""
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border == 0:
        return image
    if min(image.shape[:2]) <= 2 * crop_border:
        raise ValueError(
            f"crop_border {crop_border} removes the whole {image.shape[0]}x{image.shape[1]} image"
        )
    return image[crop_border:-crop_border, crop_border:-crop_border]


def _check_same_shape(pred, gt) -> None:
    if np.shape(pred) != np.shape(gt):
        raise ValueError(
            f"shapes differ: prediction {np.shape(pred)} vs ground truth {np.shape(gt)}")
