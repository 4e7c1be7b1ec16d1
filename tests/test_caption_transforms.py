"""The caption-input transforms (what the MLLM sees in the paper's robustness study) and the
`simple` question preset: each transform checked against PIL's own operation, on the pixels the
captioning model receives, with the image file untouched; `simple` answers never pass 20 words."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tests.helpers.tiny_llava import record_caption_inputs, tiny_llava_dir  # noqa: F401  (session fixture)
from xpsr_jax.captions import CaptionInputError
from xpsr_jax.captions.cli import main
from xpsr_jax.captions.config import SIMPLE_QUESTIONS, SIMPLE_WORD_LIMIT, limit_words
from xpsr_jax.captions.transforms import apply_transforms, describe, parse_transforms


def photo(height=48, width=40, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 150, width)[None, :, None]
    return Image.fromarray(np.clip(rng.integers(0, 100, (height, width, 3)) + ramp, 0, 255).astype(np.uint8))


def test_each_transform_is_the_pil_operation_it_names():
    image = photo()
    before = np.asarray(image).copy()
    down = apply_transforms(image, parse_transforms("downscale:16"))
    assert down.size == (16, 19)  # shorter side (width 40) -> 16, aspect kept
    np.testing.assert_array_equal(np.asarray(down), np.asarray(image.resize((16, 19), Image.BICUBIC)))
    up = apply_transforms(image, parse_transforms("upscale:80"))
    assert up.size == (80, 96)
    assert apply_transforms(image, parse_transforms("upscale:20")).size == image.size  # never shrinks
    blurred = apply_transforms(image, parse_transforms("gaussian_blur:1.5"))
    np.testing.assert_array_equal(np.asarray(blurred), np.asarray(image.filter(ImageFilter.GaussianBlur(1.5))))
    assert np.abs(np.asarray(blurred, np.int16) - before).mean() > 1
    jpeg = apply_transforms(image, parse_transforms("jpeg:10"))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=10)
    np.testing.assert_array_equal(np.asarray(jpeg), np.asarray(Image.open(buffer).convert("RGB")))
    chain = parse_transforms(" downscale:8, upscale:32 ,gaussian_blur:2,jpeg:50")
    assert describe(chain) == "downscale:8,upscale:32,gaussian_blur:2,jpeg:50"
    assert apply_transforms(image, chain).size == (32, 40)  # 40x48 -> 8x10 -> 32x40
    np.testing.assert_array_equal(np.asarray(image), before)  # the input image is never changed
    assert parse_transforms("") == () and parse_transforms(None) == ()


@pytest.mark.parametrize("spec, message", [
    ("sharpen:2", "unknown transform 'sharpen'"),
    ("downscale:abc", "'abc' is not an integer"),
    ("downscale:0", "the side must be >= 1 px"),
    ("gaussian_blur:0", "sigma must be > 0"),
    ("jpeg:100", "quality must be in 1-95"),
])
def test_bad_transform_specs_are_named(spec, message):
    with pytest.raises(CaptionInputError, match=message) as error:
        parse_transforms(f"downscale:64,{spec}")
    assert repr(spec) in str(error.value) and "jpeg:QUALITY" in str(error.value)


def test_limit_words():
    assert limit_words("a b  c", 2) == "a b"
    assert limit_words(" a b ", 2) == " a b "  # short answers are kept as they are
    assert len(limit_words(" ".join(["w"] * 50), SIMPLE_WORD_LIMIT).split()) == SIMPLE_WORD_LIMIT


def test_the_model_sees_the_transformed_image_and_records_say_so(tiny_llava_dir, tmp_path, monkeypatch):  # noqa: F811
    folder = tmp_path / "LR"
    folder.mkdir()
    for index in range(3):
        photo(seed=index).save(folder / f"img{index}.png")
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    seen = record_caption_inputs(monkeypatch)
    spec = "downscale:8,upscale:32,gaussian_blur:1,jpeg:30"
    output = tmp_path / "captions.jsonl"
    argv = ["--model", tiny_llava_dir, "--lr-dir", str(folder), "--output", str(output), "--max-new-tokens", "40",
            "--batch-size", "2", "--caption-transform", spec, "--question-preset", "simple"]
    assert main(argv) == 0
    expected = [np.asarray(apply_transforms(Image.open(folder / f"img{i}.png").convert("RGB"), parse_transforms(spec)))
                for i in range(3)]
    assert len(seen) == 3
    for got, want in zip(seen, expected):
        np.testing.assert_array_equal(got, want)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert {r["caption_transform"] for r in records} == {spec}
    assert {r["question"] for r in records} == {SIMPLE_QUESTIONS["highlevel"]}
    assert all(len(r["text"].split()) <= SIMPLE_WORD_LIMIT for r in records)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == digests
    # Resuming into the same file with another transform would mix two studies: refused by name.
    argv[argv.index(spec)] = "jpeg:30"
    with pytest.raises(SystemExit):
        main(argv)
