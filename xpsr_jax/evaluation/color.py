"""BT.601 luma as the SR literature computes it (basicsr `to_y_channel`, MATLAB `rgb2ycbcr`).

    y = rgb_to_y(rgb)    # (H, W, 3) uint8 or float RGB in [0, 255] -> (H, W) float64 Y in [16, 235]

Y = (65.481 R + 128.553 G + 24.966 B) / 255 + 16 for R, G, B in [0, 255]
(equivalently 65.481 R + 128.553 G + 24.966 B + 16 for R, G, B in [0, 1]). The result is
not rounded: basicsr and the papers that follow it compute PSNR/SSIM on the float Y.
"""

from __future__ import annotations

import numpy as np

# BT.601 studio-swing luma weights for RGB in [0, 1], output in [16, 235].
BT601_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64)
BT601_Y_OFFSET = 16.0


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """rgb_to_y((H, W, 3) RGB in [0, 255]) -> (H, W) float64 BT.601 Y in [16, 235]."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb_to_y expects an (H, W, 3) RGB array, got shape {rgb.shape}")
    return rgb.astype(np.float64) @ (BT601_Y_WEIGHTS / 255.0) + BT601_Y_OFFSET
