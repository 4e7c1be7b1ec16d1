"""What the web demo does, without the web page: read an upload, caption it, super-resolve it.

    service = DemoService(pipeline, output_dir=..., captioner=PromptCaptioner.load(config.captioner))
    lr = service.read_upload(path, name)                   # uint8 (H, W, 3), or UploadError
    settings = Settings.parse(sampler, steps, guidance, seed, color_fix, tiling, latent_tile_size)
    result = service.super_resolve(lr, highlevel, lowlevel, settings)   # bicubic x4, SR, PNG path

The networks are loaded once. Each recipe (sampler, steps, guidance, colour fix, tiling) is a
`XPSRPipeline.with_config` view of the same weights with its own compiled programs, kept for the
last `MAX_RECIPES` recipes, so a repeated request of the same size and recipe does not compile.
The seed is an input of the compiled sampler, so changing it never compiles.
"""

from __future__ import annotations

import copy
import math
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ml_collections import config_dict
from PIL import Image

from xpsr_jax.captions.batches import CaptionSettings, load_captioner, with_question
from xpsr_jax.captions.config import SIMPLE_WORD_LIMIT, limit_words, preset_question
from xpsr_jax.captions.on_demand import check_captioner_folder
from xpsr_jax.captions.transforms import apply_transforms, parse_transforms
from xpsr_jax.data.images import ImageReadError, image_size, read_rgb, write_png_atomic
from xpsr_jax.inference.batching import NonFiniteOutputError, non_finite_error
from xpsr_jax.inference.config import COLOR_FIXES, validate_infer_config
from xpsr_jax.inference.pipeline import XPSRPipeline
from xpsr_jax.inference.preprocess import InputImageError, check_input_size
from xpsr_jax.schedulers import SAMPLERS
from xpsr_jax.seeds import VALID_SEEDS, is_valid_seed

MAX_RECIPES = 4  # recipes kept compiled at once; each holds the programs of the sizes it has seen

Report = Callable[[float, str], None]  # (fraction done, what is happening) -> None


class UploadError(ValueError):
    """An upload or a setting the demo cannot take; the message is shown in the page."""


def _number(name: str, value, *, integer: bool = False) -> float | int:
    if isinstance(value, int) and not isinstance(value, bool) and integer:
        return value  # exact, however large (the range checks name it)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError, OverflowError):
            raise UploadError(f"{name}: {_shown(value)} is not a number") from None
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond float range
        finite = False
    if not finite:
        raise UploadError(f"{name}: {_shown(value)} is not a finite number")
    if integer:
        if value != int(value):
            raise UploadError(f"{name}: {value!r} is not a whole number")
        return int(value)
    return float(value)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _prompt(name: str, value) -> str:
    """A prompt from the page or an API caller: text (None is empty), nothing else."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UploadError(f"{name}: give text, not {type(value).__name__} {_shown(value)}")
    return value


@dataclass(frozen=True)
class Settings:
    """The page's sampling controls (the rest of the recipe comes from the demo's config)."""

    sampler: str
    steps: int
    guidance: float
    seed: int
    color_fix: str
    tiling: bool
    latent_tile_size: int

    @classmethod
    def parse(cls, sampler, steps, guidance, seed, color_fix, tiling, latent_tile_size) -> Settings:
        """Settings from the page's (or an API caller's) raw values; UploadError names a bad one."""
        if sampler not in SAMPLERS:
            raise UploadError(f"sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
        if color_fix not in COLOR_FIXES:
            raise UploadError(f"colour fix: {color_fix!r} is not one of {', '.join(COLOR_FIXES)}")
        if not isinstance(tiling, bool):
            raise UploadError(f"tiling: {tiling!r} is not true or false")
        seed = _number("seed", seed, integer=True)
        if not is_valid_seed(seed):
            raise UploadError(f"seed: {_shown(seed)} is out of range; give {VALID_SEEDS}")
        return cls(sampler, _number("steps", steps, integer=True), _number("guidance", guidance), seed, color_fix,
                   tiling, _number("latent tile size", latent_tile_size, integer=True))

    @classmethod
    def from_config(cls, config: config_dict.ConfigDict) -> Settings:
        return cls(config.sampler, config.num_inference_steps, float(config.guidance_scale), config.seed,
                   config.color_fix, bool(config.tiling.enabled), config.tiling.latent_tile_size)

    def recipe(self, base: config_dict.ConfigDict) -> config_dict.ConfigDict:
        """`base` with these settings; UploadError (naming the key and the valid values) when
        the combination is invalid."""
        config = copy.deepcopy(base)
        config.sampler = self.sampler
        config.num_inference_steps = self.steps
        config.guidance_scale = self.guidance
        config.seed = self.seed
        config.color_fix = self.color_fix
        config.tiling.enabled = self.tiling
        config.tiling.latent_tile_size = self.latent_tile_size
        config.tiling.latent_tile_overlap = min(config.tiling.latent_tile_overlap, max(self.latent_tile_size - 1, 0))
        try:
            validate_infer_config(config)
        except ValueError as error:
            raise UploadError(str(error)) from None
        return config


@dataclass
class Result:
    bicubic: np.ndarray  # the LR upscaled x4 (bicubic), the "before"
    image: np.ndarray  # the SR image, exactly x4 the LR
    png: Path  # the SR image as a PNG, for download
    bicubic_png: Path  # the "before" as a PNG
    seconds: float  # request time, compile included
    compile_seconds: float  # of which compiling (0 when the size and recipe were compiled before)
    prompts: tuple[str, str]  # (high-level, low-level) as sampled
    captioned: bool  # a prompt came from the captioner

    def describe(self) -> str:
        height, width = self.image.shape[:2]
        compiled = f", {self.compile_seconds:.1f} s of it compiling this size and recipe" if self.compile_seconds \
            else ""
        captions = f"; captioned prompts: \"{self.prompts[0]}\" / \"{self.prompts[1]}\"" if self.captioned else ""
        return f"{width}x{height} px in {self.seconds:.1f} s{compiled}{captions}"


class PromptCaptioner:
    """The MLLM(s) that write the two prompts of an image (`infer.py --captioner`'s questions)."""

    def __init__(self, highlevel, lowlevel, settings: config_dict.ConfigDict):
        self.highlevel, self.lowlevel, self.settings = highlevel, lowlevel, settings
        self.transforms = parse_transforms(settings.caption_transform)
        self.lock = threading.Lock()  # one generate() at a time per model

    @classmethod
    def load(cls, settings: config_dict.ConfigDict) -> PromptCaptioner:
        """From `config.captioner` (model, lowlevel_model, question_preset, dtype, device, ...);
        CaptionInputError names a folder that is not a captioning model."""
        models = {"highlevel": settings.model, "lowlevel": settings.lowlevel_model or settings.model}
        for folder in dict.fromkeys(models.values()):
            check_captioner_folder(folder)
        loaded = {}
        for task in ("highlevel", "lowlevel"):
            question = preset_question(settings.question_preset, task)
            caption_settings = CaptionSettings(task=task, question=question, model_name=models[task])
            earlier = next((c for t, c in loaded.items() if models[t] == models[task]), None)
            loaded[task] = with_question(earlier, question, models[task], caption_settings) if earlier else \
                load_captioner(models[task], question, caption_settings, settings.device or None, settings.dtype)
        return cls(loaded["highlevel"], loaded["lowlevel"], settings)

    def __call__(self, lr: np.ndarray) -> tuple[str, str]:
        image = apply_transforms(Image.fromarray(lr), self.transforms)
        with self.lock:
            texts = [captioner.caption([image], self.settings.max_new_tokens)[0]
                     for captioner in (self.highlevel, self.lowlevel)]
        if self.settings.question_preset == "simple":
            texts = [limit_words(text, SIMPLE_WORD_LIMIT) for text in texts]
        return texts[0], texts[1]


class DemoService:
    """The loaded pipeline, its compiled recipes and the optional captioner (see the module doc)."""

    def __init__(self, pipeline: XPSRPipeline, *, output_dir: str | Path | None = None,
                 captioner: PromptCaptioner | None = None):
        self.pipeline = pipeline
        self.config = pipeline.config
        self.captioner = captioner
        self._output_dir = tempfile.TemporaryDirectory(prefix="xpsr-demo-") if output_dir is None else None
        self.output_dir = Path(output_dir) if output_dir is not None else Path(self._output_dir.name)
        self._recipes: OrderedDict[Settings, XPSRPipeline] = OrderedDict()
        self._recipes[self._recipe_key(Settings.from_config(self.config))] = pipeline
        self._lock = threading.Lock()  # the device runs one request at a time
        self._count = 0

    @staticmethod
    def _recipe_key(settings: Settings) -> Settings:
        return Settings(settings.sampler, settings.steps, settings.guidance, 0, settings.color_fix, settings.tiling,
                        settings.latent_tile_size)

    def default_settings(self) -> Settings:
        return Settings.from_config(self.config)

    def pipeline_for(self, settings: Settings) -> XPSRPipeline:
        """The pipeline of `settings`' recipe: made from the loaded one on first use, kept for the
        last MAX_RECIPES recipes (the least recently used goes, with its compiled programs)."""
        key = self._recipe_key(settings)
        if key not in self._recipes:
            self._recipes[key] = self.pipeline.with_config(settings.recipe(self.config))
            while len(self._recipes) > MAX_RECIPES:
                self._recipes.popitem(last=False)
        self._recipes.move_to_end(key)
        return self._recipes[key]

    def read_upload(self, path: str | Path | None, name: str | None = None) -> np.ndarray:
        """The uploaded file as uint8 RGB; UploadError (naming the file as the user knows it) when
        there is none, it is not an image, or it is smaller than preprocess.MIN_SIDE or its output over
        max_output_pixels."""
        shown = name or (Path(path).name if path else "")
        if not path:
            raise UploadError("no image: upload one or pick an example")
        orientation = self.config.apply_exif_orientation
        try:
            # Sized from the header first: a huge image is refused without decoding it (a minute of
            # the one-at-a-time queue for a 9000 x 9000 px PNG).
            check_input_size(image_size(path, apply_exif_orientation=orientation), self.config,
                             remedy="this demo's limit: upload a smaller image")
            return read_rgb(path, apply_exif_orientation=orientation)
        except ImageReadError as error:
            reason = str(error.__cause__ or error).replace(str(path), shown)
            raise UploadError(f"{shown} is not an image this demo can read ({reason})") from None
        except InputImageError as error:
            raise UploadError(f"{shown}: {error}") from None

    def caption(self, lr: np.ndarray) -> tuple[str, str]:
        """(high-level, low-level) prompts of `lr` from the captioner."""
        if self.captioner is None:
            raise UploadError("no captioner: type the prompts, or start the demo with --captioner DIR")
        return self.captioner(lr)

    def super_resolve(self, lr: np.ndarray, highlevel: str, lowlevel: str, settings: Settings, *,
                      name: str = "image", report: Report | None = None) -> Result:
        """`lr` at x4 (bicubic and SR) with `settings`; empty prompts are captioned first when a
        captioner is loaded. `report(fraction, text)` hears each stage."""
        report = report or (lambda fraction, text: None)
        highlevel, lowlevel = _prompt("high-level prompt", highlevel), _prompt("low-level prompt", lowlevel)
        start = time.perf_counter()
        captioned = self.captioner is not None and not (highlevel.strip() and lowlevel.strip())
        if captioned:
            report(0.05, "captioning")
            made = self.caption(lr)
            highlevel, lowlevel = highlevel.strip() or made[0], lowlevel.strip() or made[1]
        with self._lock:
            pipeline = self.pipeline_for(settings)
            compiled_before = pipeline.compile_seconds
            pipeline.on_compile = lambda line: report(0.2, line)
            report(0.1, f"sampling ({settings.steps} steps, {settings.sampler})")
            try:
                image = pipeline([lr], [highlevel], [lowlevel], seeds=[settings.seed])[0]
            except NonFiniteOutputError:
                raise UploadError(str(non_finite_error(pipeline))) from None
            finally:
                pipeline.on_compile = None
            compile_seconds = pipeline.compile_seconds - compiled_before
            self._count += 1
            number = self._count
        height, width = image.shape[:2]
        bicubic = np.asarray(Image.fromarray(lr).resize((width, height), Image.BICUBIC))
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).stem)[:64] or "image"
        png = self.output_dir / f"{number:04d}-{stem}-xpsr-x{self.config.upscale}-seed{settings.seed}.png"
        bicubic_png = png.with_name(f"{number:04d}-{stem}-bicubic-x{self.config.upscale}.png")
        # Files of their own per request, written whole before the page links them (Gradio rewrites an
        # array it is given in place, under a name from its pixels, racing a browser still reading it).
        write_png_atomic(png, image)
        write_png_atomic(bicubic_png, bicubic)
        report(1.0, "done")
        return Result(bicubic, image, png, bicubic_png, time.perf_counter() - start, compile_seconds,
                      (highlevel, lowlevel), captioned)
