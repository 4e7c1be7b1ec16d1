"""PyTorch's `F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing), NHWC.

`jax.image.resize` antialiases when downsampling, so the DFC targets would differ; this is the
PyTorch rule written out: source coordinate (dst + 0.5) * in / out - 0.5, clamped at 0, and a
lerp between floor and floor + 1 (clamped to the last pixel). 8x8 -> 1x1 is the mean of the
centre 2x2. Gathers and lerps are elementwise, so the result does not depend on matmul precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def bilinear_source_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low index, high index, weight of high) per output pixel, as PyTorch computes them (float32
    arithmetic, as its CPU kernel does for float inputs)."""
    scale = np.float32(in_size / out_size)
    dst = np.arange(out_size, dtype=np.float32)
    source = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0)).astype(np.float32)
    low = np.minimum(np.floor(source).astype(np.int32), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (source - low.astype(np.float32)).astype(np.float32)


def _resize_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    low, high, weight = bilinear_source_indices(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    weight = jnp.asarray(weight, x.dtype).reshape(shape)
    return jnp.take(x, low, axis=axis) * (1 - weight) + jnp.take(x, high, axis=axis) * weight


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """resize_bilinear(x: (B, H, W, C), (h, w)) -> (B, h, w, C), PyTorch bilinear, align_corners=False."""
    if x.ndim != 4:
        raise ValueError(f"resize_bilinear expects NHWC (B, H, W, C); got shape {tuple(x.shape)}")
    return _resize_axis(_resize_axis(x, 1, int(size[0])), 2, int(size[1]))
