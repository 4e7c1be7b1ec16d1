"""Periodic validation during training: the inference pipeline on a few fixed LR images, saved as
one LR | SR | HR grid PNG per validation step (`workdir/validation/step_XXXXXXXX.png`).

The images follow the official layout (`xpsr_jax.data.official_layout`, read as infer.py reads
it): `validation.lr_dir` holds the LR images (the first `validation.num_images` by name); next
to it, `HR/<name>` (optional: the grid then has two columns) and the prompt folders
(`highlevel_prompt/`, `lowlevel_prompt_q/` or the one other `lowlevel_prompt*/`); a missing
prompt file gives "".

The pipeline (`xpsr_jax.inference.XPSRPipeline`) is built once, on this process's devices; each
validation hands it the current trainable weights, so its sampling function compiles once.
Every process takes part in gathering the weights (sharded arrays), only process 0 samples and
writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from xpsr_jax.cli_config import ConfigError, load_config_file
from xpsr_jax.data import images as image_io
from xpsr_jax.data import official_layout
from xpsr_jax.files import image_files
from xpsr_jax.inference.pipeline import XPSRPipeline
from xpsr_jax.models import load_clip_tokenizer
from xpsr_jax.schedulers import load_scheduler_config
from xpsr_jax.training.step import merge_models


class ValidationImage(NamedTuple):
    name: str
    lr: np.ndarray  # uint8 (h, w, 3)
    hr: np.ndarray | None  # uint8 (4h, 4w, 3) or None
    highlevel_prompt: str
    lowlevel_prompt: str


def _prompt_or_empty(root: Path, folder: str | None, image: Path) -> str:
    path = None if folder is None else official_layout.prompt_path(root, folder, Path(image.name))
    return official_layout.read_prompt(path) if path is not None and path.is_file() else ""


def load_validation_images(lr_dir: str | os.PathLike, count: int) -> list[ValidationImage]:
    """The first `count` LR images of `lr_dir` (sorted by name) with their HR and prompts."""
    lr_dir = Path(lr_dir)
    paths = image_files(lr_dir, "validation.lr_dir", error=ConfigError)[:count]
    root = lr_dir.parent
    folders = {kind: official_layout.prompt_folder(root, kind) for kind in official_layout.PROMPT_KINDS}
    out = []
    for path in paths:
        hr_path = root / official_layout.HR_FOLDER / path.name
        out.append(ValidationImage(
            name=path.name, lr=image_io.read_rgb(path),
            hr=image_io.read_rgb(hr_path) if hr_path.is_file() else None,
            highlevel_prompt=_prompt_or_empty(root, folders["highlevel"], path),
            lowlevel_prompt=_prompt_or_empty(root, folders["lowlevel"], path)))
    return out


def validation_grid(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> np.ndarray:
    """One row per image: LR (nearest-upscaled to the SR size) | SR | HR (if any), uint8."""
    lines = []
    for lr, sr, hr in rows:
        height, width = sr.shape[:2]
        tiles = [cv2.resize(lr, (width, height), interpolation=cv2.INTER_NEAREST), sr]
        if hr is not None:
            tiles.append(cv2.resize(hr, (width, height), interpolation=cv2.INTER_AREA)
                         if hr.shape[:2] != (height, width) else hr)
        lines.append(np.concatenate(tiles, axis=1))
    widest = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 0), (0, widest - line.shape[1]), (0, 0))) for line in lines]
    return np.concatenate(lines, axis=0)


def _host_copy(tree: Any) -> Any:
    """Numpy copy of a tree of (possibly cross-process sharded) arrays; every process calls it."""
    if jax.process_count() == 1:
        return jax.device_get(tree)

    return multihost_utils.process_allgather(tree, tiled=True)


class Validator:
    """Validator(config, workdir)(step, graphdefs, params, frozen) -> path of the grid PNG
    (None on processes other than 0)."""

    def __init__(self, config, workdir: str | os.PathLike):
        self.config = config
        self.out_dir = Path(workdir) / "validation"
        self.images = load_validation_images(config.validation.lr_dir,
                                              int(config.validation.num_images))
        self.pipeline = None

    def _infer_config(self):
        return load_config_file(self.config.validation.infer_config)

    def _build(self, models) -> None:
        base = Path(self.config.base_model)
        self.pipeline = XPSRPipeline(
            unet=models.unet, controlnet=models.controlnet, vae=models.vae,
            text_encoder=models.text_encoder, tokenizer=load_clip_tokenizer(base / "tokenizer"),
            scheduler_config=load_scheduler_config(base / "scheduler"),
            config=self._infer_config(), devices=jax.local_devices())

    def __call__(self, step: int, graphdefs, params, frozen) -> Path | None:
        # Every process joins the gathers (the same ones on every process), then only 0 samples.
        params = _host_copy(params)
        first = self.pipeline is None and not hasattr(self, "_frozen")
        if first:
            self._frozen = _host_copy(frozen)
        if jax.process_index() != 0:
            return None
        if self.pipeline is None:
            self._build(merge_models(graphdefs, params, self._frozen))
            self._vae = nnx.merge(graphdefs["vae"], self._frozen["vae"])
        else:
            unet = nnx.merge(graphdefs["unet"], params["unet"], self._frozen["unet"])
            controlnet = nnx.merge(graphdefs["controlnet"], params["controlnet"],
                                   self._frozen["controlnet"])
            self.pipeline.update_weights(unet, controlnet, self._vae)
        sr = self.pipeline([image.lr for image in self.images],
                           [image.highlevel_prompt for image in self.images],
                           [image.lowlevel_prompt for image in self.images])
        grid = validation_grid([(image.lr, out, image.hr) for image, out in zip(self.images, sr)])
        path = self.out_dir / f"step_{step:08d}.png"
        image_io.write_png_atomic(path, grid)
        return path
