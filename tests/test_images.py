"""Reading images as a viewer shows them: EXIF orientation, float and 16-bit modes, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xpsr_jax.data.images import ImageReadError, read_rgb
from xpsr_jax.inference.cli import load_lr


def test_exif_orientation_is_applied_unless_asked_not_to(tmp_path):
    """A photo stored 24 wide x 16 high with orientation 6 is shown (and read) 16 wide x 24 high."""
    stored = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "photo.png", exif=exif)
    shown = read_rgb(tmp_path / "photo.png")
    assert shown.shape == (24, 16, 3)
    np.testing.assert_array_equal(shown, np.rot90(stored, k=-1))
    np.testing.assert_array_equal(read_rgb(tmp_path / "photo.png", apply_exif_orientation=False), stored)
    assert load_lr(tmp_path / "photo.png").shape == (24, 16, 3)
    assert load_lr(tmp_path / "photo.png", apply_exif_orientation=False).shape == (16, 24, 3)


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_images_are_scaled_by_their_range(tmp_path, scale):
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8) * scale
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    rgb = read_rgb(tmp_path / "f.tif")
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], np.round(values * (255.0 / scale)).astype(np.uint8))
    assert rgb.max() == 255  # a [0, 1] float TIFF used to come out black


def test_unusual_ranges_are_refused_by_name(tmp_path):
    Image.fromarray(np.full((8, 8), 7.5e3, np.float32), mode="F").save(tmp_path / "wide.tif")
    with pytest.raises(ImageReadError, match=r"wide.tif: float image with values in \[7500, 7500\]"):
        read_rgb(tmp_path / "wide.tif")
    Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        read_rgb(tmp_path / "nan.tif")
