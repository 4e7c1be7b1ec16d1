"""diffusers' AutoencoderKL (the Stable Diffusion VAE) in Flax NNX, NHWC, loading diffusers weights.

    vae = AutoencoderKL.from_pretrained("sd15", subfolder="vae")      # or dtype=jnp.bfloat16
    posterior = vae.encode(images)                  # images (B, H, W, 3) in [-1, 1]
    latents = posterior.sample(rng) * vae.config.scaling_factor       # what the UNet sees
    images = vae.decode(latents / vae.config.scaling_factor)          # (B, H, W, 3), ~[-1, 1]

As in diffusers, `encode`/`decode` do NOT apply `scaling_factor` (0.18215 for SD 1.5): the
caller multiplies after encoding and divides before decoding. Tiled encode/decode for large
images lives with the inference code, not here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from xpsr_jax.models.attention import validate_backend
from xpsr_jax.models.layers import conv2d
from xpsr_jax.models.model_config import ModelConfig
from xpsr_jax.models.vae_blocks import Decoder, Encoder, Stage, run_stages
from xpsr_jax.weights import PretrainedMixin

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers clamps the log-variance to this range

# Old diffusers (AttentionBlock) names of the mid-block attention, still found in SD 1.5 VAE files.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(ModelConfig):
    """The keys of a diffusers `vae/config.json`; defaults are Stable Diffusion 1.5's."""

    class_name: ClassVar[str] = "AutoencoderKL"
    # Keys of the diffusers format this implementation builds at one value only.
    fixed_keys: ClassVar[dict[str, Any]] = {
        "act_fn": "silu",
        "shift_factor": None,
        "latents_mean": None,
        "latents_std": None,
    }
    supported_down_block: ClassVar[str] = "DownEncoderBlock2D"
    supported_up_block: ClassVar[str] = "UpDecoderBlock2D"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    force_upcast: bool = True  # accepted for compatibility; precision is chosen with `dtype`
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent position along each side (8 for SD 1.5)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self, source: str) -> None:
        blocks = len(self.block_out_channels)
        if blocks < 1:
            raise ValueError(f"{source}: block_out_channels must list at least one width")
        for key, types, supported in (("down_block_types", self.down_block_types, self.supported_down_block),
                                      ("up_block_types", self.up_block_types, self.supported_up_block)):
            if len(types) != blocks:
                raise ValueError(f"{source}: {key} has {len(types)} entries but block_out_channels has {blocks}")
            if any(t != supported for t in types):
                raise ValueError(f"{source}: {key}={list(types)!r} is not supported; every entry must be "
                                 f"{supported!r}")
        for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            if getattr(self, key) < 1:
                raise ValueError(f"{source}: {key}={getattr(self, key)!r} must be >= 1")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"{source}: block_out_channels {list(self.block_out_channels)} must all be divisible "
                             f"by norm_num_groups={self.norm_num_groups} (not: {bad})")


@struct.dataclass
class DiagonalGaussian:
    """The VAE posterior N(mean, exp(logvar)) per latent element (a pytree: jit can return it).

    Build it with `DiagonalGaussian.from_moments(moments)`; arrays are (B, h, w, latent_channels)
    in the dtype the encoder computed in.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Split (..., 2C) encoder output into mean (first C channels) and clipped log-variance."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """`sample(rng) -> mean + std * N(0, 1)`, the noise drawn in float32 from the key `rng`."""
        noise = jax.random.normal(rng, self.mean.shape, jnp.float32)
        return (self.mean + self.std * noise.astype(self.mean.dtype)).astype(self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


class AutoencoderKL(nnx.Module, PretrainedMixin):
    """`AutoencoderKL(config, *, rngs, dtype=float32, param_dtype=float32, attention_backend="auto")`.

    `encode(x) -> DiagonalGaussian`, `decode(z) -> image`, `__call__(x, rng=None) -> image`.
    Images are NHWC in [-1, 1]; latents are unscaled (see the module docstring). `dtype` is the
    compute dtype (bf16 with fp32 params works; GroupNorm statistics and attention softmax stay
    fp32); `attention_backend` picks the kernel of the mid-block attention over H*W tokens.
    """

    config_class: ClassVar[type] = AutoencoderKLConfig
    weights_stem: ClassVar[str] = "diffusion_pytorch_model"

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, attention_backend: str = "auto"):
        self.config = config
        self.dtype = dtype
        common = dict(
            latent_channels=config.latent_channels,
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            groups=config.norm_num_groups,
            add_attention=config.mid_block_add_attention,
            attention_backend=validate_backend(attention_backend),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        moments = 2 * config.latent_channels
        self.encoder = Encoder(in_channels=config.in_channels, **common)
        self.decoder = Decoder(out_channels=config.out_channels, **common)
        conv = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.quant_conv = conv2d(moments, moments, 1, **conv) if config.use_quant_conv else None
        self.post_quant_conv = (
            conv2d(config.latent_channels, config.latent_channels, 1, **conv) if config.use_post_quant_conv else None
        )

    @staticmethod
    def rename_legacy_key(key: str) -> str:
        """`*.attentions.0.query.weight` -> `*.attentions.0.to_q.weight` (and key/value/proj_attn)."""
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION_NAMES and "attentions" in parts:
            return ".".join(parts[:-2] + [_LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
        return key

    def _check_input(self, array: jax.Array, channels: int, what: str) -> None:
        if array.ndim != 4 or array.shape[-1] != channels:
            raise ValueError(f"AutoencoderKL: {what} must be NHWC (batch, height, width, {channels}); "
                             f"got shape {tuple(array.shape)}")

    def encode_stages(self) -> list[Stage]:
        """Image (in `dtype`) -> moments (B, H/f, W/f, 2 * latent_channels), stage by stage."""
        quant = [Stage(self.quant_conv, ())] if self.quant_conv is not None else []
        return self.encoder.stages() + quant

    def decode_stages(self) -> list[Stage]:
        """Unscaled latents (in `dtype`) -> image, stage by stage."""
        post_quant = [Stage(self.post_quant_conv, ())] if self.post_quant_conv is not None else []
        return post_quant + self.decoder.stages()

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """`encode(x: (B, H, W, in_channels) in [-1, 1]) -> DiagonalGaussian` over
        (B, H/f, W/f, latent_channels), f = `config.downsample_factor` (each stride-2 stage floors
        odd sizes, as diffusers). The latents are unscaled."""
        self._check_input(x, self.config.in_channels, "encode input")
        return DiagonalGaussian.from_moments(run_stages(self.encode_stages(), x.astype(self.dtype)))

    def decode(self, z: jax.Array) -> jax.Array:
        """`decode(z: (B, h, w, latent_channels), unscaled) -> image (B, h*f, w*f, out_channels)`."""
        self._check_input(z, self.config.latent_channels, "decode input")
        return run_stages(self.decode_stages(), z.astype(self.dtype))

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Reconstruct `x`: decode a posterior sample when `rng` is given, else the mean (the mode)."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if rng is None else posterior.sample(rng))
