"""Shared helpers for the data tests: tiny images, caption files, source layouts, a tiny CLIP
tokenizer and a Python environment in which importing TensorFlow fails. Nothing is downloaded.

    write_hr_images(folder, sizes, seed) -> [paths]
    write_captions(path, image_ids, skip=()) -> None         texts from caption_text()
    write_prepared_work_dir(work_dir, count, hr_size) -> [image ids]
    write_official_layout(root, count, hr_size, sub) -> [image ids]
    build_tiny_clip_tokenizer(folder) -> str
    no_tensorflow_env(folder) -> env for subprocess.run
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np

from xpsr_jax.captions.config import QUESTIONS
from xpsr_jax.captions.io import CaptionWriter
from xpsr_jax.data import images
from xpsr_jax.models.tiny_tokenizer import write_tiny_clip_tokenizer

SOURCES_TASKS = [(source, task) for task in ("highlevel", "lowlevel") for source in ("lr", "hr")]


def textured_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Random uint8 RGB with some structure (so PNG bytes and crops are all distinct)."""
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ramp = np.linspace(0, 120, width, dtype=np.float32)[None, :, None]
    return np.clip(noise * 0.5 + ramp, 0, 255).astype(np.uint8)


def write_hr_images(folder, sizes, seed: int = 0) -> list[pathlib.Path]:
    """One PNG per (height, width) in `sizes`: folder/img_{i:02d}.png."""
    rng = np.random.default_rng(seed)
    paths = []
    for index, (height, width) in enumerate(sizes):
        path = pathlib.Path(folder) / f"img_{index:02d}.png"
        images.write_png_atomic(path, textured_rgb(rng, height, width))
        paths.append(path)
    return paths


def caption_text(image_id: str, source: str, task: str) -> str:
    return f"{task} caption of the {source} image {image_id}"


def write_captions(path, image_ids, skip=()) -> None:
    """Captions JSONL with all four prompts per id except the (id, source, task) in `skip`."""
    records = [
        {"image_id": image_id, "source": source, "task": task,
         "text": caption_text(image_id, source, task), "model": "fixture",
         "question": QUESTIONS[task]}
        for image_id in image_ids for source, task in SOURCES_TASKS
        if (image_id, source, task) not in skip
    ]
    with CaptionWriter(path) as writer:
        writer.write(records)


def write_prepared_work_dir(work_dir, count: int = 6, hr_size: int = 64, seed: int = 0
                            ) -> list[str]:
    """A prepare work folder (HR/, LR/ via the real degradation, degradation.jsonl,
    captions.jsonl) with `count` examples; returns the image ids."""
    from xpsr_jax.data.degradation import default_degradation_config, degrade

    work_dir = pathlib.Path(work_dir)
    config = default_degradation_config()
    rng = np.random.default_rng(seed)
    ids, lines = [], []
    for index in range(count):
        image_id = f"pic{index:02d}_000"
        hr = textured_rgb(rng, hr_size, hr_size)
        lr, params = degrade(hr, config, seed=seed, example_id=index)
        images.write_png_atomic(work_dir / "HR" / f"{image_id}.png", hr)
        images.write_png_atomic(work_dir / "LR" / f"{image_id}.png", lr)
        lines.append(json.dumps({"image_id": image_id, "source_file": f"pic{index:02d}.png",
                                 "params": params}) + "\n")
        ids.append(image_id)
    (work_dir / "degradation.jsonl").write_text("".join(lines))
    write_captions(work_dir / "captions.jsonl", ids)
    return ids


def write_official_layout(root, count: int = 3, hr_size: int = 32, sub: str = "DIV2K",
                          seed: int = 1) -> list[str]:
    """A folder in the official XPSR layout: LR bicubic-upsampled to HR size (make_train.py)
    and one prompt .txt per folder. Returns the ids the builder gives (root name/sub/name)."""
    import cv2

    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    ids = []
    folders = {"lr": {"highlevel": "highlevel_prompt", "lowlevel": "lowlevel_prompt_q"},
               "hr": {"highlevel": "highlevel_prompt_GT", "lowlevel": "lowlevel_prompt_q_GT"}}
    for index in range(count):
        name = f"{index:04d}"
        image_id = f"{root.name}/{sub}/{name}"
        hr = textured_rgb(rng, hr_size, hr_size)
        small = cv2.resize(hr, (hr_size // 4, hr_size // 4), interpolation=cv2.INTER_AREA)
        lr = cv2.resize(small, (hr_size, hr_size), interpolation=cv2.INTER_CUBIC)
        images.write_png_atomic(root / "HR" / sub / f"{name}.png", hr)
        images.write_png_atomic(root / "LR" / sub / f"{name}.png", lr)
        for source, task in SOURCES_TASKS:
            path = root / folders[source][task] / sub / f"{name}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            # Official prompt files: one line, generated text after "ASSISTANT:" keeps a space.
            path.write_text(" " + caption_text(image_id, source, task) + "\nsecond line ignored")
        ids.append(image_id)
    return ids


def build_tiny_clip_tokenizer(folder) -> str:
    """A CLIP BPE tokenizer folder in which any text tokenizes (xpsr_jax.models.tiny_tokenizer)."""
    return str(write_tiny_clip_tokenizer(folder))


def no_tensorflow_env(folder) -> dict[str, str]:
    """Environment whose Python finds a `tensorflow` package that raises ImportError first.

    (sys.modules["tensorflow"] = None is not enough: tfds then believes TF is loaded.)
    """
    package = pathlib.Path(folder) / "tensorflow"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        'raise ImportError("tensorflow is blocked for this test")\n')
    env = dict(os.environ)
    repo_root = str(pathlib.Path(__file__).resolve().parents[2])
    paths = [str(folder), repo_root, *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONIOENCODING"] = "utf-8"
    return env


PYTHON = sys.executable
