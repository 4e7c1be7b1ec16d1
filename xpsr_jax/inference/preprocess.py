"""The reference's image preprocessing (test.py of the release), with PIL exactly as it does it.

LR -> x`upscale` bicubic -> if the short side is below `process_size`, torchvision's
`Resize(process_size, BILINEAR)` (short side to `process_size`, long side truncated) -> both sides
floored to multiples of 8 (bicubic). The sampled image is resized back to exactly `upscale`x the LR.
`processed_shape` gives the result's shape without pixels, and `check_input_size` refuses an input
whose image would be over `max_output_pixels` (from a header's size, before decoding).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

MIN_SIDE = 8  # smaller inputs carry too little signal to super-resolve (and the VAE needs 8 px)


class InputImageError(ValueError):
    """An input image the pipeline cannot take (the message says why)."""


def _check_uint8_rgb(image: np.ndarray, what: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise InputImageError(f"{what} must be a uint8 (H, W, 3) RGB array; got {dtype} of shape {shape}")


def _short_side_resize(size: tuple[int, int], short: int) -> tuple[int, int]:
    """torchvision `Resize(int)` on a PIL image: (width, height) with the short side = `short`."""
    width, height = size
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def _resizes(height: int, width: int, process_size: int, upscale: int) -> list[tuple[tuple[int, int], int]]:
    """The reference's resizes of an LR of (height, width): [((width, height), PIL filter), ...]."""
    if min(height, width) < MIN_SIDE:
        raise InputImageError(f"image is {width}x{height} px; both sides must be at least {MIN_SIDE} px")
    size = (width * upscale, height * upscale)
    steps = [(size, Image.BICUBIC)]
    if min(size) < process_size:
        size = _short_side_resize(size, process_size)
        steps.append((size, Image.BILINEAR))
    steps.append(((size[0] // 8 * 8, size[1] // 8 * 8), Image.BICUBIC))
    return steps


def processed_shape(lr_shape: tuple[int, ...], process_size: int, *, upscale: int = 4) -> tuple[int, int, int]:
    """The shape `preprocess_lr` gives an LR of `lr_shape` ((H, W, ...)), without any pixels."""
    width, height = _resizes(lr_shape[0], lr_shape[1], process_size, upscale)[-1][0]
    return height, width, 3


def preprocess_lr(lr_uint8: np.ndarray, process_size: int, *, upscale: int = 4) -> np.ndarray:
    """`preprocess_lr(lr (H, W, 3) uint8, process_size) -> uint8 (H', W', 3)`, the conditioning image."""
    _check_uint8_rgb(lr_uint8, "preprocess_lr input")
    image = Image.fromarray(lr_uint8)
    for size, resample in _resizes(*lr_uint8.shape[:2], process_size, upscale):
        image = image.resize(size, resample)
    return np.asarray(image, dtype=np.uint8)


def resize_output(image_uint8: np.ndarray, lr_shape: tuple[int, ...], *, upscale: int = 4) -> np.ndarray:
    """The sampled image resized (PIL bicubic) to exactly `upscale` x the LR's (H, W)."""
    _check_uint8_rgb(image_uint8, "resize_output input")
    target = (lr_shape[1] * upscale, lr_shape[0] * upscale)
    if image_uint8.shape[1::-1] == target:
        return image_uint8
    return np.asarray(Image.fromarray(image_uint8).resize(target, Image.BICUBIC), dtype=np.uint8)


def check_input_size(lr_shape: tuple[int, ...], config, **remedy) -> tuple[int, int, int]:
    """`processed_shape` of an LR of `lr_shape`, after `check_output_size` (InputImageError for an
    input under MIN_SIDE or over max_output_pixels): callable on a header's size, before decoding."""
    shape = processed_shape(lr_shape, config.process_size, upscale=config.upscale)
    check_output_size(lr_shape, shape, config, **remedy)
    return shape


def check_output_size(lr_shape: tuple[int, ...], processed_shape: tuple[int, ...], config, *,
                      remedy: str = "raise it with --config.max_output_pixels={needed} (memory and time grow "
                                    "with it)") -> None:
    """InputImageError when the image sampled (the x4 output, raised to process_size) or written
    is over `max_output_pixels`: named with both sizes, the limit and `remedy` (by default the key
    that raises it; `{needed}` is the pixel count this input needs)."""
    limit = int(config.get("max_output_pixels", 4096 * 4096))
    output = (config.upscale * lr_shape[0], config.upscale * lr_shape[1])
    height, width = max((output, tuple(processed_shape[:2])), key=lambda hw: hw[0] * hw[1])
    if height * width > limit:
        raise InputImageError(f"{lr_shape[1]}x{lr_shape[0]} px input makes a {width}x{height} px image "
                              f"({width * height:,} px), over max_output_pixels={limit:,}; "
                              + remedy.format(needed=width * height))
