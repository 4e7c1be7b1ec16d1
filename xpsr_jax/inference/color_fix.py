"""Colour correction of the sampled image against the upscaled LR (pure jnp, NHWC in [0, 1]).

The release's `myutils/wavelet_color_fix.py`: AdaIN matches each channel's mean and (unbiased)
std to the LR's; the wavelet fix keeps the sample's high frequencies and the LR's low ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ADAIN_EPS = 1e-5
WAVELET_LEVELS = 5
_WAVELET_KERNEL = np.array([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]], np.float32)


def _mean_std(image: jax.Array) -> tuple[jax.Array, jax.Array]:
    pixels = image.shape[1] * image.shape[2]
    mean = image.mean(axis=(1, 2), keepdims=True)
    var = jnp.square(image - mean).sum(axis=(1, 2), keepdims=True) / (pixels - 1)  # torch .var(): unbiased
    return mean, jnp.sqrt(var + ADAIN_EPS)


def adain_color_fix(target: jax.Array, source: jax.Array) -> jax.Array:
    """`target` with each channel's mean/std replaced by `source`'s (both (B, H, W, C))."""
    target_mean, target_std = _mean_std(target)
    source_mean, source_std = _mean_std(source)
    return (target - target_mean) / target_std * source_std + source_mean


def _wavelet_blur(image: jax.Array, radius: int) -> jax.Array:
    padded = jnp.pad(image, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    channels = image.shape[-1]
    kernel = jnp.tile(jnp.asarray(_WAVELET_KERNEL, image.dtype)[:, :, None, None], (1, 1, 1, channels))
    return jax.lax.conv_general_dilated(padded, kernel, (1, 1), "VALID", rhs_dilation=(radius, radius),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
                                        precision=jax.lax.Precision.HIGHEST)


def _wavelet_decomposition(image: jax.Array) -> tuple[jax.Array, jax.Array]:
    high = jnp.zeros_like(image)
    for level in range(WAVELET_LEVELS):
        low = _wavelet_blur(image, 2 ** level)
        high = high + (image - low)
        image = low
    return high, image


def wavelet_color_fix(target: jax.Array, source: jax.Array) -> jax.Array:
    """High frequencies of `target` plus the low frequencies of `source` (5 dilated levels)."""
    return _wavelet_decomposition(target)[0] + _wavelet_decomposition(source)[1]


COLOR_FIX_FUNCTIONS = {"adain": adain_color_fix, "wavelet": wavelet_color_fix, "none": lambda target, source: target}


def to_uint8_image(decoded: jax.Array, conditioning: jax.Array, color_fix: str) -> jax.Array:
    """VAE output in [-1, 1] -> uint8 as the reference: clamp, round to 8 bits (diffusers'
    postprocess to PIL), colour fix against the [0, 1] conditioning image, clamp, truncate
    (torchvision ToPILImage)."""
    image = jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    image = jnp.round(image * 255.0) / 255.0
    image = COLOR_FIX_FUNCTIONS[color_fix](image, conditioning.astype(jnp.float32))
    return jnp.floor(jnp.clip(image, 0.0, 1.0) * 255.0).astype(jnp.uint8)
