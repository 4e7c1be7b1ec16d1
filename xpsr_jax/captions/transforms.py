"""What the MLLM sees: transforms of the caption input, for the paper's robustness study
(supplement Table 3: captions taken from a degraded LR: downscaled to 64 px, upscaled to 256 px,
Gaussian blur, JPEG compression). They apply only to the image handed to the captioning model.

    parse_transforms("downscale:64,upscale:256") -> tuple[CaptionTransform, ...]   (in order)
    apply_transforms(image, transforms) -> a new PIL image (the input is left as it is)
    describe(transforms) -> the canonical spec, recorded in each caption record

Spec items, comma-separated, applied left to right:
    downscale:PX        shorter side down to PX (bicubic; smaller images are kept)
    upscale:PX          shorter side up to PX (bicubic; larger images are kept)
    gaussian_blur:SIGMA Gaussian blur with standard deviation SIGMA px (> 0)
    jpeg:QUALITY        JPEG encode and decode at QUALITY (1-95)
"""

from __future__ import annotations

import io
from typing import NamedTuple

from PIL import Image, ImageFilter

from xpsr_jax.captions.io import CaptionInputError

FORMS = "downscale:PX, upscale:PX, gaussian_blur:SIGMA, jpeg:QUALITY (1-95)"


class CaptionTransform(NamedTuple):
    kind: str
    value: float


def _bad(item: str, why: str) -> CaptionInputError:
    return CaptionInputError(f"--caption-transform {item!r}: {why}; valid items (comma-separated, applied in "
                             f"order): {FORMS}")


def parse_transforms(spec: str | None) -> tuple[CaptionTransform, ...]:
    """The transforms of `spec` ("" or None: none); CaptionInputError names a bad item."""
    transforms = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        kind, _, text = item.partition(":")
        if kind not in ("downscale", "upscale", "gaussian_blur", "jpeg"):
            raise _bad(item, f"unknown transform {kind!r}")
        try:
            value = float(text) if kind == "gaussian_blur" else int(text)
        except ValueError:
            raise _bad(item, f"{text!r} is not a{' number' if kind == 'gaussian_blur' else 'n integer'}") from None
        if kind in ("downscale", "upscale") and value < 1:
            raise _bad(item, "the side must be >= 1 px")
        if kind == "gaussian_blur" and not value > 0:
            raise _bad(item, "sigma must be > 0")
        if kind == "jpeg" and not 1 <= value <= 95:
            raise _bad(item, "quality must be in 1-95")
        transforms.append(CaptionTransform(kind, value))
    return tuple(transforms)


def describe(transforms: tuple[CaptionTransform, ...]) -> str:
    return ",".join(f"{t.kind}:{t.value:g}" for t in transforms)


def _resize_shorter_side(image: Image.Image, side: int) -> Image.Image:
    width, height = image.size
    scale = side / min(width, height)
    return image.resize((max(round(width * scale), 1), max(round(height * scale), 1)), Image.BICUBIC)


def apply_transforms(image: Image.Image, transforms: tuple[CaptionTransform, ...]) -> Image.Image:
    """`image` (RGB) after every transform in order, as a new image."""
    out = image.copy()
    for transform in transforms:
        shorter = min(out.size)
        if transform.kind == "downscale" and shorter > transform.value:
            out = _resize_shorter_side(out, int(transform.value))
        elif transform.kind == "upscale" and shorter < transform.value:
            out = _resize_shorter_side(out, int(transform.value))
        elif transform.kind == "gaussian_blur":
            out = out.filter(ImageFilter.GaussianBlur(transform.value))
        elif transform.kind == "jpeg":
            buffer = io.BytesIO()
            out.save(buffer, format="JPEG", quality=int(transform.value))
            buffer.seek(0)
            with Image.open(buffer) as decoded:
                out = decoded.convert("RGB")
    return out
