"""Lossless image I/O for the training data: read any HR file, PNG encode/decode, atomic writes.

    rgb = read_rgb(path)                    # (H, W, 3) uint8, raises ImageReadError
    height, width = image_size(path)        # the same image's size, from the header only
    data = encode_png(rgb)                  # lossless 8-bit RGB PNG bytes
    rgb == decode_png(data)                 # bit-exact round trip
    data = rgb_png_bytes_of_file(path)      # the file's own bytes when already 8-bit RGB PNG
    write_bytes_atomic(path, data)          # temp file + rename: a kill leaves no half file
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from xpsr_jax.files import write_bytes_atomic

# PNG zlib level: lossless at every level; 3 is ~3x faster to write than 9 for ~10% more bytes.
_PNG_COMPRESSION = 3


class ImageReadError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, unsupported)."""


_SIDEWAYS_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


def image_size(path: str | os.PathLike, *, apply_exif_orientation: bool = True) -> tuple[int, int]:
    """(height, width) of an image file as `read_rgb` would return it, from its header alone: a
    9000 x 9000 px PNG is sized in microseconds, where decoding it takes a minute."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if apply_exif_orientation and image.getexif().get(0x0112) in _SIDEWAYS_ORIENTATIONS:
                width, height = height, width
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise ImageReadError(f"cannot read image header of {path}: {error}") from error
    return height, width


def read_rgb(path: str | os.PathLike, *, apply_exif_orientation: bool = True) -> np.ndarray:
    """read_rgb(path) -> (H, W, 3) uint8 RGB array, as an image viewer shows the file.

    Uses PIL because it raises on truncated files (OpenCV silently returns a partly grey
    image for a truncated JPEG). The EXIF orientation is applied (a phone photo stored sideways
    comes out upright; `apply_exif_orientation=False` keeps the stored pixels, for fidelity
    studies). 16-bit images are scaled to 8 bit, alpha is dropped, float images (32-bit TIFF) are
    scaled by their range ([0, 1] or [0, 255]); other ranges are refused (ImageReadError).
    """
    try:
        with Image.open(path) as image:
            image.load()
            if apply_exif_orientation:
                image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(image, dtype=np.float64)
                if wide.size and wide.max() > 65535:
                    raise ImageReadError(f"cannot decode image {path}: 32-bit integer values up to {wide.max():.0f}; "
                                         "only 8- and 16-bit images are read")
                gray = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
                return np.repeat(gray[:, :, None], 3, axis=2)
            if image.mode == "F":
                return np.repeat(_float_to_uint8(np.asarray(image, dtype=np.float64), path)[:, :, None], 3, axis=2)
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        if isinstance(error, ImageReadError):
            raise
        raise ImageReadError(f"cannot decode image {path}: {error}") from error


def _float_to_uint8(values: np.ndarray, path) -> np.ndarray:
    """A float image by its real range: [0, 1] (the usual float convention) or [0, 255]."""
    if not np.isfinite(values).all():
        raise ImageReadError(f"cannot decode image {path}: float image with NaN or infinite values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0 and high <= 1:
        scale = 255.0
    elif low >= 0 and high <= 255:
        scale = 1.0
    else:
        raise ImageReadError(f"cannot decode image {path}: float image with values in [{low:g}, {high:g}]; "
                             "only [0, 1] or [0, 255] float images are read")
    return np.clip(np.round(values * scale), 0, 255).astype(np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    """encode_png((H, W, 3) uint8 RGB) -> PNG bytes (lossless)."""
    _check_rgb_uint8(rgb, "encode_png")
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, _PNG_COMPRESSION])
    if not ok:
        raise ValueError(f"OpenCV failed to PNG-encode an array of shape {rgb.shape}")
    return buffer.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """decode_png(bytes) -> (H, W, 3) uint8 RGB array (any PNG/JPEG OpenCV can read)."""
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageReadError(f"cannot decode {len(data)} bytes as an image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def rgb_png_bytes_of_file(path: str | os.PathLike) -> bytes:
    """rgb_png_bytes_of_file(path) -> PNG bytes of the file's image as 8-bit RGB.

    Returns the file's own bytes when it already is an 8-bit RGB PNG (no re-encode, so
    building a dataset does not pay for PNG compression twice); otherwise decodes and
    re-encodes losslessly.
    """
    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            already_rgb_png = image.format == "PNG" and image.mode == "RGB"
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(f"cannot decode image {path}: {error}") from error
    if already_rgb_png:
        return data
    return encode_png(read_rgb(path))


def write_png_atomic(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Writes an (H, W, 3) uint8 RGB array as a PNG, atomically."""
    write_bytes_atomic(path, encode_png(rgb))


def _check_rgb_uint8(array: np.ndarray, what: str) -> None:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"{what} expects an (H, W, 3) uint8 RGB array, got shape {array.shape} "
            f"dtype {array.dtype}"
        )
