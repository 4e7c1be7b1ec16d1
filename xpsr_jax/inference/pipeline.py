"""`XPSRPipeline`: load once, then super-resolve batches with one compiled call per image size.

    pipe = XPSRPipeline.from_pretrained("xpsr-release", sd15="stable-diffusion-v1-5")
    images = pipe(lr_images, highlevel_prompts, lowlevel_prompts)          # list of uint8, 4x each

    conditioning = preprocess_lr(lr, pipe.config.process_size)              # the reference's resizing
    embeds = pipe.encode_prompts([caption], [quality_description])
    out = pipe.sample(conditioning[None], embeds, seeds=[0])                 # SampleOutput

Batches are sharded over a `jax.sharding.Mesh` of this process's devices (axis "data"; the
batch is padded to a multiple of the device count), network states are replicated, and the
sampling function is compiled once per (batch, height, width, draw source) and reused. In a
multi-process run each process works on its own share of images with its own devices.
"""

from __future__ import annotations

import copy
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_dict

from xpsr_jax.cli_config import ConfigError
from xpsr_jax.compile_cache import watch_compile
from xpsr_jax.inference.batching import SampledBatch, finite_per_image, super_resolve
from xpsr_jax.inference.config import default_infer_config, validate_infer_config
from xpsr_jax.inference.memory import check_fits, device_free_bytes, program_bytes
from xpsr_jax.inference.sampling import (
    Networks,
    PromptEmbeds,
    SampleOutput,
    SamplingNoise,
    SamplingPlan,
    sample,
    split_networks,
)
from xpsr_jax.models import (
    AutoencoderKL,
    CLIPTextEncoder,
    load_clip_tokenizer,
    load_xpsr_networks,
    tokenize,
)
from xpsr_jax.models.loading import read_one_step_release
from xpsr_jax.models.lora import with_lora
from xpsr_jax.models.single_file import is_single_file, sd15_folder
from xpsr_jax.schedulers import (
    load_scheduler_config,
    make_sampler,
    noise_schedule_from_config,
)
from xpsr_jax.seeds import seed_key_data
from xpsr_jax.weights.formats import (
    MANIFEST,
    ONE_STEP_RECORD,
    SD15_INFERENCE_PARTS,
    STABLEHLO,
    WeightsFormatError,
    detect_weights_format,
)


class WeightsFolderError(FileNotFoundError):
    """A weights or base-model folder that is not what the pipeline needs (the message says why)."""


def resolve_sd15(weights: Path, sd15: str | os.PathLike | None, *, tokenizer: str | os.PathLike | None = None,
                 sd15_config: str | os.PathLike | None = None) -> Path:
    """The SD 1.5 base folder: `sd15`, else `weights` when it has every base subfolder. `sd15` may
    be a single original-layout checkpoint (`.safetensors` / `.ckpt`), converted once into a
    cached diffusers folder; `tokenizer` and `sd15_config` supply what the file lacks (see
    `xpsr_jax.models.single_file`)."""
    if sd15 is not None and is_single_file(sd15):
        return sd15_folder(sd15, tokenizer=tokenizer, config_folder=sd15_config)
    base = Path(sd15) if sd15 is not None else weights
    missing = [part for part in SD15_INFERENCE_PARTS if not (base / part).is_dir()]
    if missing:
        hint = "" if sd15 is not None else " (give the SD 1.5 folder: --sd15 on the command line, sd15= in Python)"
        raise WeightsFolderError(f"{base}: missing SD 1.5 subfolder(s) {missing}; the pipeline needs "
                                 f"{list(SD15_INFERENCE_PARTS)} (or give --sd15 the single-file checkpoint "
                                 f"v1-5-pruned-emaonly.safetensors){hint}")
    return base


def check_pretrained(weights: str | os.PathLike, sd15: str | os.PathLike | None = None, **single_file) -> Path:
    """What `from_pretrained` will read, checked without loading any network (a command checks it
    before slow work such as captioning): `weights` a release or orbax inference checkpoint, and
    the SD 1.5 base (`resolve_sd15`, which converts a single file once). WeightsFolderError says
    what is wrong; returns the SD 1.5 folder."""
    folder = Path(weights)
    try:
        kind = detect_weights_format(folder)
    except WeightsFormatError as error:
        raise WeightsFolderError(str(error)) from None
    if kind == STABLEHLO:
        raise WeightsFolderError(f"{folder}: a StableHLO artifact holds compiled programs, not networks")
    return resolve_sd15(folder, sd15, **single_file)


def load_sampling_networks(weights: str | os.PathLike, **model_kwargs):
    """(unet, controlnet) from an official-layout release folder (unet/ + controlnet/) or an
    orbax inference checkpoint (`python -m xpsr_jax.export orbax`); `model_kwargs`: dtype,
    param_dtype, attention_backend. WeightsFolderError says what is wrong with the folder."""
    folder = Path(weights)
    if not folder.is_dir():
        raise WeightsFolderError(f"{folder}: weights folder not found")
    try:
        return load_xpsr_networks(folder, **model_kwargs)
    except WeightsFormatError as error:
        if (folder / MANIFEST).is_file():  # a broken manifest or an artifact: say what is wrong with it
            raise WeightsFolderError(str(error)) from error
        raise WeightsFolderError(f"{folder}: not an XPSR release (needs unet/ and controlnet/ subfolders) nor an "
                                 "orbax inference checkpoint (python -m xpsr_jax.export orbax)") from error


def non_finite_tensors(state) -> list[str]:
    """The dotted paths of a network state's tensors that hold NaN or inf."""
    flat = list(nnx.to_flat_state(state))
    finite = jax.device_get([jnp.isfinite(variable.get_value()).all() for _, variable in flat])
    return [".".join(map(str, path)) for (path, _), ok in zip(flat, finite) if not ok]


def jit_sampler(networks: Networks, plan: SamplingPlan, mesh: Mesh, *, injected: bool = False,
                with_steps: bool = False, on_trace=None):
    """`sample` jitted over `mesh` (axis "data"): network states replicated, every batch input and
    output split over the devices. `fn(states, conditioning, embeds, noise, keys)`; `noise` is
    None unless `injected` (with per-step draws when `with_steps`), `keys` None when it is.
    `on_trace()` is called each time the function is traced."""
    def fn(states, conditioning, embeds, noise, keys):
        if on_trace is not None:
            on_trace()
        return sample(networks, plan, states, conditioning, embeds, noise, keys)

    batch = NamedSharding(mesh, P("data"))
    noise_sharding = SamplingNoise(batch, batch, batch, NamedSharding(mesh, P(None, "data")) if with_steps else None) \
        if injected else None
    return jax.jit(fn, in_shardings=(NamedSharding(mesh, P()), batch, PromptEmbeds(batch, batch, batch, batch),
                                     noise_sharding, None if injected else batch),
                   out_shardings=SampleOutput(batch, batch, batch, batch))


def sampling_plan(config: config_dict.ConfigDict, scheduler_config: dict, scaling_factor: float) -> SamplingPlan:
    """The static sampling plan of an inference `config` (sampler, steps, guidance, tiling, ...)
    for a model with `scheduler_config` and the VAE's `scaling_factor`."""
    options = {"final_sigmas_type": config.final_sigmas_type} if config.sampler == "unipc" else {}
    if config.timestep_spacing:
        options["timestep_spacing"] = config.timestep_spacing
    tiling = config.tiling
    return SamplingPlan(
        sampler=make_sampler(config.sampler, scheduler_config, config.num_inference_steps, **options),
        noise_schedule=noise_schedule_from_config(scheduler_config), guidance_scale=float(config.guidance_scale),
        conditioning_scale=float(config.conditioning_scale), init=config.init,
        added_noise_level=int(config.added_noise_level), color_fix=config.color_fix, scaling_factor=scaling_factor,
        tiling=bool(tiling.enabled), latent_tile_size=tiling.latent_tile_size,
        latent_tile_overlap=tiling.latent_tile_overlap, tile_batch_size=tiling.tile_batch_size,
        vae_encoder_tile_size=tiling.vae_encoder_tile_size, vae_decoder_tile_size=tiling.vae_decoder_tile_size,
        vae_streaming=tiling.get("vae_streaming", True))


def check_recipe_fits_weights(config: config_dict.ConfigDict, one_step_weights: bool, weights=None) -> None:
    """ConfigError when one-step weights meet a sampling recipe or the reverse (either way the
    images would be wrong, not an error)."""
    where = f"{weights}: " if weights is not None else ""
    if one_step_weights and config.init != "one_step":
        raise ConfigError(f"{where}one-step XPSR weights ({ONE_STEP_RECORD}) with init={config.init!r}; run them "
                          "with --config infer.py:one_step (init='one_step')")
    if config.init == "one_step" and not one_step_weights:
        raise ConfigError(f"{where}init='one_step' needs one-step XPSR weights (a release with {ONE_STEP_RECORD}, "
                          "from python -m xpsr_jax.export torch of a one-step run); these are multi-step weights")


def _as_config(config: config_dict.ConfigDict | None) -> config_dict.ConfigDict:
    config = default_infer_config() if config is None else config
    validate_infer_config(config)
    return config


class XPSRPipeline:
    """The XPSR super-resolution pipeline (see the module docstring)."""

    def __init__(self, *, unet, controlnet, vae, text_encoder, tokenizer, scheduler_config: dict,
                 config: config_dict.ConfigDict | None = None, devices: Sequence[jax.Device] | None = None,
                 one_step_weights: bool = False):
        self.tokenizer = tokenizer
        self.one_step_weights = bool(one_step_weights)  # the networks are a one-step XPSR release's
        self.scheduler_config = dict(scheduler_config)
        self.noise_schedule = noise_schedule_from_config(self.scheduler_config)
        self.mesh = Mesh(np.asarray(devices if devices is not None else jax.local_devices()), ("data",))
        self._replicated = NamedSharding(self.mesh, P())
        self._batch_sharding = NamedSharding(self.mesh, P("data"))
        self._step_sharding = NamedSharding(self.mesh, P(None, "data"))
        self.networks, states = split_networks(unet, controlnet, vae)
        self.states = jax.device_put(states, self._replicated)
        self.text_encoder_def, text_state = nnx.split(text_encoder)
        self.text_encoder_state = jax.device_put(text_state, self._replicated)
        self._scaling_factor = float(vae.config.scaling_factor)
        self._set_recipe(config)
        # Called with one line before and after each sampler compile (infer.py prints them).
        self.on_compile = None
        self._encode_text = jax.jit(lambda state, ids: nnx.merge(self.text_encoder_def, state)(ids))

    def _set_recipe(self, config: config_dict.ConfigDict | None) -> None:
        """The sampler, the sampling plan and an empty table of compiled programs for `config`."""
        self.config = _as_config(config)
        check_recipe_fits_weights(self.config, self.one_step_weights)
        self.plan = sampling_plan(self.config, self.scheduler_config, self._scaling_factor)
        self.sampler = self.plan.sampler
        self._compiled: OrderedDict = OrderedDict()  # (shape, injected, with_steps) -> jit / compiled
        self.compile_seconds = 0.0  # spent compiling (tracing + XLA or the cache), all shapes
        self.trace_count = 0  # times the sampling function was traced (one per compiled shape)

    def with_config(self, config: config_dict.ConfigDict) -> "XPSRPipeline":
        """This pipeline with another recipe (sampler, steps, guidance, colour fix, tiling, prompts,
        ...) on the same loaded weights: nothing is reloaded or copied, and the new pipeline
        compiles its own programs. The model settings (dtype, param_dtype, attention_backend)
        fixed at load time cannot change here."""
        config = _as_config(config)
        changed = [key for key in ("dtype", "param_dtype", "attention_backend") if config[key] != self.config[key]]
        if changed:
            raise ValueError(f"with_config: {', '.join(f'{k}={config[k]!r}' for k in changed)} differ from the loaded "
                             f"networks' ({', '.join(f'{k}={self.config[k]!r}' for k in changed)}); load a new "
                             "pipeline with XPSRPipeline.from_pretrained")
        other = copy.copy(self)
        other._set_recipe(config)
        return other

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike, sd15: str | os.PathLike | None = None,
                        config: config_dict.ConfigDict | None = None, *, tokenizer: str | os.PathLike | None = None,
                        sd15_config: str | os.PathLike | None = None, **kwargs) -> "XPSRPipeline":
        """`weights`: an official-layout release (unet/, controlnet/) or an orbax inference
        checkpoint (python -m xpsr_jax.export orbax); `sd15`: the base folder with
        vae/, text_encoder/, tokenizer/, scheduler/ (default: `weights`, when it has them), or the
        single-file checkpoint with `tokenizer` (and `sd15_config`; see `resolve_sd15`). A one-step
        release (one_step.json) gets its VAE-encoder LoRA merged into SD 1.5's VAE and needs
        `config.init == "one_step"` (configs/infer.py:one_step); the reverse is refused too."""
        config = _as_config(config)
        weights = Path(weights)
        base = resolve_sd15(weights, sd15, tokenizer=tokenizer, sd15_config=sd15_config)
        model_kwargs = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
        try:  # a mismatch of weights and recipe is refused before the networks load
            one_step = read_one_step_release(weights)
        except WeightsFormatError as error:
            raise WeightsFolderError(str(error)) from None
        check_recipe_fits_weights(config, one_step is not None, weights)
        unet, controlnet = load_sampling_networks(weights, attention_backend=config.attention_backend,
                                                  **model_kwargs)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", attention_backend=config.attention_backend,
                                            **model_kwargs)
        if one_step is not None:  # the release's VAE-encoder LoRA, merged into SD 1.5's VAE
            vae = with_lora(vae, one_step.vae_lora, one_step.scaling)
        text_encoder = CLIPTextEncoder.from_pretrained(base, subfolder="text_encoder",
                                                       attention_backend=config.attention_backend, **model_kwargs)
        return cls(unet=unet, controlnet=controlnet, vae=vae, text_encoder=text_encoder,
                   tokenizer=load_clip_tokenizer(base / "tokenizer"),
                   scheduler_config=load_scheduler_config(base / "scheduler"), config=config,
                   one_step_weights=one_step is not None, **kwargs)

    def update_weights(self, unet, controlnet, vae) -> None:
        """Sample with new weights of the same architecture (training's validation each time):
        the compiled programs are kept, only the states change."""
        networks, states = split_networks(unet, controlnet, vae)
        if networks != self.networks:
            raise ValueError("update_weights: the networks' structure differs from the pipeline's; "
                             "build a new XPSRPipeline")
        self.states = jax.device_put(states, self._replicated)

    # ------------------------------------------------------------------ prompts

    def highlevel_prompt(self, caption: str) -> str:
        """The high-level prompt as the reference builds it: caption + " " + added prompt."""
        return f"{caption} {self.config.added_prompt}" if self.config.added_prompt else caption

    def _embed(self, texts: Sequence[str]) -> jax.Array:
        ids = tokenize(self.tokenizer, list(texts))
        return self._encode_text(self.text_encoder_state, jnp.asarray(ids))

    def encode_prompts(self, highlevel_prompts: Sequence[str], lowlevel_prompts: Sequence[str]) -> PromptEmbeds:
        """Text embeddings (B, 77, D) of the high-level prompts (with the added prompt), the
        low-level prompts and both negatives from the config."""
        highlevel_prompts, lowlevel_prompts = list(highlevel_prompts), list(lowlevel_prompts)
        if len(highlevel_prompts) != len(lowlevel_prompts):
            raise ValueError(f"encode_prompts: {len(highlevel_prompts)} high-level prompts but "
                             f"{len(lowlevel_prompts)} low-level prompts; give one of each per image")
        count = len(highlevel_prompts)
        embeds = self._embed([self.highlevel_prompt(p) for p in highlevel_prompts] + list(lowlevel_prompts)
                             + [self.config.negative_prompt, self.config.lowlevel_negative_prompt])
        negative = jnp.broadcast_to(embeds[2 * count], (count,) + embeds.shape[1:])
        lowlevel_negative = jnp.broadcast_to(embeds[2 * count + 1], (count,) + embeds.shape[1:])
        return PromptEmbeds(embeds[:count], negative, embeds[count:2 * count], lowlevel_negative)

    # ------------------------------------------------------------------ sampling

    def _sample_fn(self, shape: tuple[int, ...], injected: bool, with_steps: bool):
        key = (shape, injected, with_steps)
        if key not in self._compiled:
            def counted():
                self.trace_count += 1

            self._compiled[key] = jit_sampler(self.networks, self.plan, self.mesh, injected=injected,
                                              with_steps=with_steps, on_trace=counted)
        return self._compiled[key]

    def _padded(self, array, count: int, axis: int = 0):
        """Pad the batch axis to `count` by repeating the last entry (dropped afterwards)."""
        missing = count - np.shape(array)[axis]
        if missing == 0:
            return array
        array = np.asarray(array)
        return np.concatenate([array, np.repeat(np.take(array, [-1], axis=axis), missing, axis=axis)], axis=axis)

    def sample_on_devices(self, conditioning_uint8, prompt_embeds: PromptEmbeds, *,
                          seeds: Sequence[int] | None = None, noise: SamplingNoise | None = None):
        """`sample`, returning (SampleOutput of sharded device arrays padded to a multiple of the
        device count, the real batch size)."""
        conditioning_uint8 = np.asarray(conditioning_uint8)
        if conditioning_uint8.dtype != np.uint8 or conditioning_uint8.ndim != 4 or conditioning_uint8.shape[-1] != 3:
            raise ValueError(f"sample: conditioning must be uint8 (B, H, W, 3); got {conditioning_uint8.dtype} "
                             f"{conditioning_uint8.shape}")
        batch, height, width = conditioning_uint8.shape[:3]
        if height % 8 or width % 8:
            raise ValueError(f"sample: conditioning is {width}x{height}; both sides must be multiples of 8 "
                             f"(use preprocess_lr)")
        for name, array in zip(PromptEmbeds._fields, prompt_embeds):
            if array.shape[0] != batch:
                raise ValueError(f"sample: prompt_embeds.{name} has batch {array.shape[0]}, images {batch}")
        latent_shape = (batch, height // 8, width // 8, 4)
        if noise is not None:
            self._check_noise(noise, latent_shape)
            keys = None
        else:
            seeds = [self.config.seed] * batch if seeds is None else list(seeds)
            if len(seeds) != batch:
                raise ValueError(f"sample: {len(seeds)} seeds for {batch} images")
            keys = seed_key_data(seeds)
        devices = self.mesh.devices.size
        padded_batch = -(-batch // devices) * devices
        pad = lambda a, axis=0: self._padded(a, padded_batch, axis)  # noqa: E731
        conditioning = pad(conditioning_uint8.astype(np.float32) / 255.0)
        embeds = PromptEmbeds(*(pad(e) for e in prompt_embeds))
        with_steps = noise is not None and noise.steps is not None
        if noise is not None:
            noise = SamplingNoise(pad(noise.vae_sample), pad(noise.first), pad(noise.added),
                                  pad(noise.steps, axis=1) if with_steps else None)
        else:
            keys = pad(keys)
        put = lambda tree: jax.device_put(tree, self._batch_sharding)  # noqa: E731
        if noise is not None:
            noise = SamplingNoise(*(put(a) for a in noise[:3]),
                                  jax.device_put(noise.steps, self._step_sharding) if with_steps else None)
        args = (self.states, put(conditioning), put(embeds), noise, None if keys is None else put(keys))
        fn = self._compiled_sample_fn((padded_batch, height, width), noise is not None, with_steps, args)
        return fn(*args), batch

    def _compiled_sample_fn(self, shape: tuple[int, ...], injected: bool, with_steps: bool, args):
        """The sampler compiled ahead of its first call (so the compile is timed and reported
        apart from sampling), once per (shape, draw source)."""
        key = (shape, injected, with_steps)
        jitted = self._sample_fn(shape, injected, with_steps)
        if isinstance(jitted, jax.stages.Compiled):
            return jitted
        what = f"the sampler for batch {shape[0]} at {shape[1]}x{shape[2]} px"
        if self.on_compile is not None:
            self.on_compile(f"compiling {what} ...")
        start = time.perf_counter()
        lowered = jitted.lower(*args)
        lowered_at = time.perf_counter()
        with watch_compile() as record:
            compiled = lowered.compile()
        seconds = time.perf_counter() - start
        self.compile_seconds += seconds
        self._compiled[key] = compiled
        if self.on_compile is not None:
            self.on_compile(f"compiled {what} in {seconds:.1f} s (tracing and lowering {lowered_at - start:.1f} s, "
                            f"XLA {seconds - (lowered_at - start):.1f} s, {record.describe()})")
        self.check_memory(compiled, what)
        return compiled

    def check_memory(self, compiled, what: str) -> None:
        """DeviceMemoryError (before anything runs) when XLA's plan for `compiled` needs more than
        the first device has free, with the settings that would shrink it."""
        config, tiling = self.config, self.config.tiling
        if not tiling.enabled:
            advice = "Set tiling.enabled=True"
        else:
            advice = (f"Lower batch_size (now {config.batch_size}) or the tiles (now tiling.latent_tile_size="
                      f"{tiling.latent_tile_size}, tiling.tile_batch_size={tiling.tile_batch_size}, "
                      f"tiling.vae_decoder_tile_size={tiling.vae_decoder_tile_size})")
            if not tiling.get("vae_streaming", True):
                advice += ", or set tiling.vae_streaming=True"
        if config.dtype == "float32":
            advice += "; dtype=bfloat16 halves the activations"
        check_fits(program_bytes(compiled), device_free_bytes(self.mesh.devices.flat[0]), what, advice)

    def sample(self, conditioning_uint8, prompt_embeds: PromptEmbeds, *, seeds: Sequence[int] | None = None,
               noise: SamplingNoise | None = None) -> SampleOutput:
        """Sample a batch of preprocessed conditioning images (B, H, W, 3) uint8 (see `preprocess_lr`).

        Draws come from `noise` when given (every draw injected), else from keys derived from each
        image's seed (default: config.seed), so an image's result does not depend on its batch.
        Returns numpy arrays.
        """
        out, batch = self.sample_on_devices(conditioning_uint8, prompt_embeds, seeds=seeds, noise=noise)
        return SampleOutput(*(np.asarray(a)[:batch] for a in out))

    def _check_noise(self, noise: SamplingNoise, latent_shape: tuple[int, ...]) -> None:
        for name in ("vae_sample", "first", "added"):
            array = getattr(noise, name)
            if tuple(np.shape(array)) != latent_shape:
                raise ValueError(f"sample: noise.{name} must have shape {latent_shape} (NHWC latents); "
                                 f"got {tuple(np.shape(array))}")
        if self.sampler.needs_step_noise and self.plan.init != "one_step":
            expected = (len(self.sampler.timesteps),) + latent_shape
            if noise.steps is None or tuple(np.shape(noise.steps)) != expected:
                got = None if noise.steps is None else tuple(np.shape(noise.steps))
                raise ValueError(f"sample: the {self.config.sampler} sampler draws noise at every step; "
                                 f"noise.steps must have shape {expected}, got {got}")

    # ------------------------------------------------------------------ images in, images out

    @property
    def batch_size(self) -> int:
        return int(self.config.batch_size)

    def sample_batch(self, conditioning: np.ndarray, highlevel: list[str], lowlevel: list[str],
                     seeds: list[int], noise: SamplingNoise | None) -> SampledBatch:
        """uint8 SR images at the processed size for one batch, and which of them are finite (the
        `Runner` of `batching`)."""
        out = self.sample(conditioning, self.encode_prompts(highlevel, lowlevel), seeds=seeds, noise=noise)
        return SampledBatch(out.images, finite_per_image(out.latents, out.decoded))

    def non_finite_cause(self) -> str:
        """Why an image came out NaN or inf: the weights that hold non-finite values, else the
        settings that can overflow (for the message of a failed image)."""
        states = {**self.states, "text_encoder": self.text_encoder_state}
        broken = {name: non_finite_tensors(state) for name, state in states.items()}
        broken = {name: paths for name, paths in broken.items() if paths}
        if broken:
            listed = "; ".join(f"{name}: {', '.join(paths[:3])}" + (f" and {len(paths) - 3} more" if len(paths) > 3
                                                                    else "") for name, paths in broken.items())
            return f"the weights hold NaN or inf ({listed}): check or replace those files"
        cfg = self.config
        return (f"the weights are finite, so the settings overflowed: guidance_scale={cfg.guidance_scale}, "
                f"conditioning_scale={cfg.conditioning_scale}, dtype={cfg.dtype} (float32 and the official "
                "recipe's guidance_scale=4.5 are safe)")

    def __call__(self, lr_images: Sequence[np.ndarray], highlevel_prompts: Sequence[str],
                 lowlevel_prompts: Sequence[str], *, seeds: Sequence[int] | None = None,
                 noise: Sequence[SamplingNoise] | None = None) -> list[np.ndarray]:
        """Super-resolve LR images (uint8 (H, W, 3) each); returns uint8 images of exactly
        upscale x each input. Images of the same processed size are batched together
        (config.batch_size per call); `noise`, if given, is one single-image SamplingNoise
        (batch 1) per input."""
        return super_resolve(self, lr_images, highlevel_prompts, lowlevel_prompts, seeds=seeds, noise=noise)
