"""The inference recipe as one locked ConfigDict, and its validation (errors name the key)."""

from __future__ import annotations

import math

import numpy as np
from ml_collections import config_dict

from xpsr_jax.captions.config import DTYPES as CAPTION_DTYPES
from xpsr_jax.captions.config import QUESTION_PRESETS
from xpsr_jax.captions.transforms import parse_transforms
from xpsr_jax.cli_config import ConfigError, config_value, invalid_value
from xpsr_jax.models.attention import ATTENTION_BACKENDS
from xpsr_jax.models.dtypes import DTYPE_NAMES, DTYPES_BY_NAME
from xpsr_jax.schedulers import SAMPLERS
from xpsr_jax.seeds import VALID_SEEDS, is_valid_seed

INIT_MODES = ("lr_latent", "noise", "one_step")
COLOR_FIXES = ("adain", "wavelet", "none")
FINAL_SIGMAS_TYPES = ("sigma_min", "zero")
TIMESTEP_SPACINGS = ("", "leading", "linspace", "trailing")

# The official test script's prompts (configs/xpsr_test.yaml and pipeline_xpsr.py).
ADDED_PROMPT = "clean, high-resolution, 8k, high quality, clear text."
NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed."
LOWLEVEL_NEGATIVE_PROMPT = "high resolution, best quality, clear"


def default_infer_config() -> config_dict.ConfigDict:
    """The official test recipe (test.py + configs/xpsr_test.yaml of the release)."""
    config = config_dict.ConfigDict()
    config.sampler = "ddpm"  # one of xpsr_jax.schedulers.SAMPLERS
    config.num_inference_steps = 20
    # "" keeps the scheduler file's timestep_spacing (or each sampler's diffusers default).
    config.timestep_spacing = ""
    # UniPC last step: "sigma_min" = diffusers 0.21.4, which the release pins (current default "zero").
    config.final_sigmas_type = "sigma_min"
    config.guidance_scale = 4.5  # classifier-free guidance; <= 1 runs without the negative batch
    config.conditioning_scale = 1.0  # ControlNet residual scale
    # "lr_latent": VAE latent of the upscaled LR, noised; "noise": pure noise; "one_step": one-step
    # XPSR weights (one pass at t=999, no sampler: configs/infer.py:one_step, docs/one_step.md)
    config.init = "lr_latent"
    config.added_noise_level = 800  # second noising level of the LR latent; -1 = off
    config.process_size = 512  # the x4 image's short side is raised to this when smaller
    config.upscale = 4
    config.added_prompt = ADDED_PROMPT  # appended to every high-level prompt after one space
    config.negative_prompt = NEGATIVE_PROMPT
    config.lowlevel_negative_prompt = LOWLEVEL_NEGATIVE_PROMPT
    config.color_fix = "adain"  # "adain" | "wavelet" | "none", against the upscaled LR
    config.tiling = config_dict.ConfigDict()
    config.tiling.enabled = True
    config.tiling.latent_tile_size = 320  # latent px; the reference tiles when h * w > size ** 2
    config.tiling.latent_tile_overlap = 8
    config.tiling.tile_batch_size = 8  # latent tiles per UNet call (tiles of one image batched)
    config.tiling.vae_encoder_tile_size = 1024  # image px; tiles padded by 32 px
    config.tiling.vae_decoder_tile_size = 224  # latent px; tiles padded by 11 latent px
    # VAE tiles one at a time, peak memory of one tile whatever the image (GroupNorm statistics
    # still pooled over all tiles: a pass per GroupNorm, the VAE ~4x slower); False runs all tiles
    # at once (faster; memory grows with the image).
    config.tiling.vae_streaming = True
    # Captions on the fly (infer.py --captioner): an image without a prompt from --captions, the
    # official layout or the prompt flags gets both kinds from an MLLM (PyTorch, batched), saved to
    # OUTPUT/captions.jsonl as they are made (a rerun reuses them); the MLLM is freed before sampling.
    config.captioner = config_dict.ConfigDict()
    config.captioner.model = ""  # an image-text-to-text model folder (LLaVA-1.5 -hf); "" = off
    config.captioner.lowlevel_model = ""  # for the low-level prompts (Q-Instruct); "" = model answers both
    config.captioner.caption_transform = ""  # what the MLLM sees, e.g. "downscale:64,upscale:256"
    config.captioner.question_preset = "official"  # "simple": at most 20 words
    config.captioner.batch_size = 8
    config.captioner.max_new_tokens = 200
    config.captioner.dtype = "auto"  # auto | bf16 | fp16 | fp32 (auto: bf16 on a GPU, fp32 on CPU)
    config.captioner.device = ""  # "" = cuda when PyTorch sees a GPU, else cpu
    config.dtype = "float32"  # compute dtype of every network (the official test runs fp32)
    config.param_dtype = "float32"
    config.attention_backend = "auto"
    config.batch_size = 8  # images per jitted call (rounded up to a multiple of the device count)
    # Largest image sampled or written, in pixels (width x height): an input that would make a
    # larger one is refused by name before any model loads. 4096 x 4096 by default.
    config.max_output_pixels = 4096 * 4096
    config.seed = 0  # every image's draws come from this seed (so results do not depend on batching)
    # Read inputs as a viewer shows them (EXIF orientation applied); False keeps the stored pixels.
    config.apply_exif_orientation = True
    # XLA's persistent compilation cache: "default" = the user cache folder
    # ($XDG_CACHE_HOME/xpsr_jax/jax_cache), a folder, or "" for none.
    config.compile_cache = "default"
    config.lock()
    return config


def validate_infer_config(config: config_dict.ConfigDict) -> None:
    """Raises ConfigError (a ValueError) naming the first bad key, its value and what is valid."""
    def bad(key: str, valid: str) -> ConfigError:
        return invalid_value(key, config_value(config, key, "inference"), valid, "inference")

    def positive_int(key: str, value) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(key, "an integer >= 1")

    if config.sampler not in SAMPLERS:
        raise bad("sampler", " | ".join(SAMPLERS))
    positive_int("num_inference_steps", config.num_inference_steps)
    if config.num_inference_steps > 1000:
        raise bad("num_inference_steps", "at most the number of training timesteps (1000)")
    if config.timestep_spacing not in TIMESTEP_SPACINGS:
        raise bad("timestep_spacing", " | ".join(repr(s) for s in TIMESTEP_SPACINGS))
    if config.final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise bad("final_sigmas_type", " | ".join(FINAL_SIGMAS_TYPES))
    for key in ("dtype", "param_dtype"):
        if config[key] not in DTYPE_NAMES:
            raise bad(key, " | ".join(DTYPE_NAMES))
    # NaN fails every comparison, and a value that overflows the dtype it is computed in (1e39 in
    # float32) becomes inf there: both would make black images, so both are refused by name.
    # Guidance mixes the float32 noise predictions; the ControlNet scale multiplies residuals in
    # the compute dtype.
    if not finite_in(config.guidance_scale, "float32") or not config.guidance_scale >= 0:
        raise bad("guidance_scale", f"a finite number >= 0 and at most {float_max('float32'):.4g} (float32; "
                                    "<= 1 disables classifier-free guidance)")
    if not finite_in(config.conditioning_scale, config.dtype):
        raise bad("conditioning_scale", f"a finite number of magnitude at most {float_max(config.dtype):.4g} "
                                        f"(dtype={config.dtype})")
    if config.init not in INIT_MODES:
        raise bad("init", " | ".join(INIT_MODES))
    if config.init == "one_step" and config.guidance_scale > 1:
        raise bad("guidance_scale", '<= 1 with init "one_step" (one-step weights run one unguided pass)')
    if not isinstance(config.added_noise_level, int) or not -1 <= config.added_noise_level < 1000:
        raise bad("added_noise_level", "an integer timestep in [0, 999], or -1 for none")
    positive_int("process_size", config.process_size)
    if config.process_size % 8:
        raise bad("process_size", "a multiple of 8")
    positive_int("upscale", config.upscale)
    for key in ("added_prompt", "negative_prompt", "lowlevel_negative_prompt"):
        if not isinstance(config[key], str):
            raise bad(key, "a string")
    if config.color_fix not in COLOR_FIXES:
        raise bad("color_fix", " | ".join(COLOR_FIXES))
    tiling = config.tiling
    for key in ("latent_tile_size", "tile_batch_size", "vae_encoder_tile_size", "vae_decoder_tile_size"):
        positive_int(f"tiling.{key}", tiling[key])
    if not isinstance(tiling.latent_tile_overlap, int) or not 0 <= tiling.latent_tile_overlap < tiling.latent_tile_size:
        raise bad("tiling.latent_tile_overlap", f"an integer in [0, tiling.latent_tile_size={tiling.latent_tile_size})")
    if tiling.vae_encoder_tile_size % 8:
        raise bad("tiling.vae_encoder_tile_size", "a multiple of 8 (the VAE's downsampling)")
    if not isinstance(tiling.get("vae_streaming", True), bool):
        raise bad("tiling.vae_streaming", "True | False")
    validate_captioner(config.get("captioner") or default_infer_config().captioner, bad)
    if config.attention_backend not in ATTENTION_BACKENDS:
        raise bad("attention_backend", " | ".join(ATTENTION_BACKENDS))
    positive_int("batch_size", config.batch_size)
    positive_int("max_output_pixels", config.get("max_output_pixels", 4096 * 4096))
    if not is_valid_seed(config.seed):
        raise bad("seed", VALID_SEEDS)
    if not isinstance(config.apply_exif_orientation, bool):
        raise bad("apply_exif_orientation", "True | False")
    if not isinstance(config.get("compile_cache", "default"), str):
        raise bad("compile_cache", '"default" (the user cache folder), a folder, or "" (off)')


def float_max(dtype_name: str) -> float:
    """The largest finite value of the dtype called `dtype_name`."""
    return float(np.finfo(DTYPES_BY_NAME[dtype_name]).max)


def finite_in(value, dtype_name: str) -> bool:
    """`value` is a real number (not bool) that stays finite in `dtype_name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and abs(value) <= float_max(dtype_name)
    except OverflowError:  # an int too large for a float
        return False


def validate_captioner(captioner, bad) -> None:
    for key in ("model", "lowlevel_model", "caption_transform", "device"):
        if not isinstance(captioner[key], str):
            raise bad(f"captioner.{key}", "a string")
    if captioner.question_preset not in QUESTION_PRESETS:
        raise bad("captioner.question_preset", " | ".join(QUESTION_PRESETS))
    if captioner.dtype not in CAPTION_DTYPES:
        raise bad("captioner.dtype", " | ".join(CAPTION_DTYPES))
    for key in ("batch_size", "max_new_tokens"):
        if isinstance(captioner[key], bool) or not isinstance(captioner[key], int) or captioner[key] < 1:
            raise bad(f"captioner.{key}", "an integer >= 1")
    try:
        parse_transforms(captioner.caption_transform)
    except ValueError as error:
        raise bad("captioner.caption_transform", str(error).split(": ", 1)[-1]) from None
