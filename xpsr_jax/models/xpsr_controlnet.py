"""XPSR's ControlNet: UNet-encoder copy with SFA, pyramid image encoder, zero convs, latent heads."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from xpsr_jax.models.layers import conv2d
from xpsr_jax.models.unet import EncoderConfig, UNetEncoder, make_block_spec
from xpsr_jax.models.xpsr_init import InitReport, apply_official_init
from xpsr_jax.weights.convert import module_state_dict
from xpsr_jax.weights.pretrained import PretrainedMixin

CONTROLNET_FIXED_KEYS = {
    **EncoderConfig.fixed_keys,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}


@dataclasses.dataclass(frozen=True)
class XPSRControlNetConfig(EncoderConfig):
    """The official XPSR ControlNet config.json (encoder keys + conditioning and XPSR switches)."""

    fixed_keys: ClassVar[dict] = CONTROLNET_FIXED_KEYS
    class_name: ClassVar[str] = "ControlNetModel"

    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    return_rgbs: bool = True
    use_rrdb: bool = False
    use_lowlevel_prompt: bool = True
    use_latent_pred: bool = True

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"{source}: controlnet_conditioning_channel_order="
                             f"{self.controlnet_conditioning_channel_order!r} must be 'rgb' or 'bgr'")
        if len(self.conditioning_embedding_out_channels) < 2:
            raise ValueError(f"{source}: conditioning_embedding_out_channels="
                             f"{self.conditioning_embedding_out_channels!r} needs at least 2 widths")

    @classmethod
    def from_unet(cls, unet_config: EncoderConfig, **overrides: Any) -> "XPSRControlNetConfig":
        """The config of the official `ControlNetModel.from_unet`: the UNet's encoder keys, the XPSR
        switches at their defaults unless overridden. The one derivation every builder uses."""
        encoder_fields = {f.name for f in dataclasses.fields(EncoderConfig)} - {"raw"}
        values = {name: getattr(unet_config, name) for name in encoder_fields}
        values.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
        config = cls(**values, raw=None)
        config.validate("XPSRControlNetConfig.from_unet")
        return config

    @property
    def skip_widths(self) -> tuple[int, ...]:
        """Channel count of every UNet skip connection, in down order (conv_in, layers, downsamplers)."""
        widths = [self.block_out_channels[0]]
        for i, width in enumerate(self.block_out_channels):
            widths += [width] * self.layers_per_block + ([width] if i < len(self.block_out_channels) - 1 else [])
        return tuple(widths)


class XPSRControlNetOutput(NamedTuple):
    """down_block_res_samples: one residual per UNet skip, times conditioning_scale;
    mid_block_res_sample: likewise; latent_preds: `conv_degradation[i]` on each UNSCALED residual
    (empty when use_latent_pred is off); latent_pred_mid: `conv_degradation_mid` (or None);
    rgb_preds: `to_rgbs` outputs at 1/2, 1/4, 1/8 of the conditioning image (empty when
    return_rgbs is off)."""

    down_block_res_samples: tuple
    mid_block_res_sample: jax.Array
    latent_preds: tuple
    latent_pred_mid: jax.Array | None
    rgb_preds: tuple


class ResidualDenseBlock(nnx.Module):
    """ESRGAN dense block: conv1..conv5 over growing concatenations, LeakyReLU(0.2), x + 0.2 * out."""

    def __init__(self, channels: int, growth: int, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        # basicsr's default_init_weights: kaiming-normal * 0.1, zero bias (for fresh models).
        init = jax.nn.initializers.variance_scaling(0.02, "fan_in", "normal")
        for i in range(5):
            conv = nnx.Conv(channels + i * growth, channels if i == 4 else growth, (3, 3), padding=((1, 1), (1, 1)),
                            kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            setattr(self, f"conv{i + 1}", conv)

    def __call__(self, x: jax.Array) -> jax.Array:
        features = [x]
        for i in range(1, 5):
            features.append(jax.nn.leaky_relu(getattr(self, f"conv{i}")(jnp.concatenate(features, -1)), 0.2))
        return self.conv5(jnp.concatenate(features, -1)) * 0.2 + x


class RRDB(nnx.Module):
    """Residual-in-residual dense block: x + 0.2 * rdb3(rdb2(rdb1(x)))."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        make = functools.partial(ResidualDenseBlock, channels, channels, rngs=rngs, dtype=dtype,
                                 param_dtype=param_dtype)
        self.rdb1, self.rdb2, self.rdb3 = make(), make(), make()

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class PyramidConditioningEmbedding(nnx.Module):
    """`controlnet_cond_embedding`: image (B, H, W, 3) in [0, 1] -> (embedding at H/8, rgb predictions).

    conv_in + SiLU, [two RRDBs if use_rrdb], then per stage a 3x3 conv + SiLU and a 3x3 stride-2
    conv (1 pixel of padding on every side, as PyTorch) + SiLU; after each stride-2 conv `to_rgbs`
    predicts the HR image at that scale; `conv_out` (zero-initialised) maps to the UNet width.
    """

    def __init__(self, embedding_channels: int, conditioning_channels: int, widths: tuple[int, ...], *,
                 return_rgbs: bool, use_rrdb: bool, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        conv = functools.partial(conv2d, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv_in = conv(conditioning_channels, widths[0], 3)
        self.preprocesser = nnx.List([
            RRDB(widths[0], rngs=rngs, dtype=dtype, param_dtype=param_dtype) for _ in range(2)
        ]) if use_rrdb else None
        blocks, to_rgbs = [], []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            blocks += [conv(width_in, width_in, 3), conv(width_in, width_out, 3, stride=2)]
            if return_rgbs:
                to_rgbs.append(conv(width_out, 3, 3))
        self.blocks = nnx.List(blocks)
        self.to_rgbs = nnx.List(to_rgbs) if return_rgbs else None
        self.conv_out = conv(widths[-1], embedding_channels, 3)
        _zero(self.conv_out)

    def __call__(self, image: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        hidden = jax.nn.silu(self.conv_in(image))
        for rrdb in self.preprocesser or ():
            hidden = rrdb(hidden)
        rgb_preds = []
        for i, block in enumerate(self.blocks):
            hidden = jax.nn.silu(block(hidden))
            if i % 2 == 1 and self.to_rgbs is not None:
                rgb_preds.append(self.to_rgbs[i // 2](hidden))
        return self.conv_out(hidden), tuple(rgb_preds)


def _zero(module: nnx.Module) -> None:
    for _, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        variable.set_value(jnp.zeros_like(variable.get_value()))


class XPSRControlNet(PretrainedMixin, UNetEncoder):
    """`controlnet(sample, timesteps, encoder_hidden_states, lowlevel_encoder_hidden_states,
    controlnet_cond, conditioning_scale=1.0) -> XPSRControlNetOutput`.

    sample: noisy latents (B, h, w, 4); controlnet_cond: the x4-upscaled LR image (B, 8h, 8w, 3)
    in [0, 1], NHWC. SFA runs in every cross-attention down block and the mid block when
    `use_lowlevel_prompt` (official default) and a low-level embedding is given.
    """

    config_class = XPSRControlNetConfig
    weights_stem = "diffusion_pytorch_model"

    def __init__(self, config: XPSRControlNetConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, attention_backend: str = "auto",
                 remat_block_types: tuple[str, ...] = ()):
        self.config = config
        spec = make_block_spec(config, dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend)
        self._build_encoder(spec, rngs, down_lowlevel=config.use_lowlevel_prompt,
                            mid_lowlevel=config.use_lowlevel_prompt, remat_block_types=remat_block_types)
        conv = functools.partial(conv2d, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        widths = config.block_out_channels
        latent_channels = config.in_channels
        self.controlnet_cond_embedding = PyramidConditioningEmbedding(
            widths[0], config.conditioning_channels, config.conditioning_embedding_out_channels,
            return_rgbs=config.return_rgbs, use_rrdb=config.use_rrdb, rngs=rngs, dtype=dtype,
            param_dtype=param_dtype)
        self.controlnet_down_blocks = nnx.List([conv(w, w, 1) for w in config.skip_widths])
        self.controlnet_mid_block = conv(widths[-1], widths[-1], 1)
        for zero_conv in list(self.controlnet_down_blocks) + [self.controlnet_mid_block]:
            _zero(zero_conv)
        # Heads are one-conv Sequentials in the official code, hence the ".0" in their keys.
        if config.use_latent_pred:
            self.conv_degradation = nnx.List([nnx.List([conv(w, latent_channels, 3)]) for w in config.skip_widths])
            self.conv_degradation_mid = nnx.List([conv(widths[-1], latent_channels, 3)])
        else:
            self.conv_degradation = self.conv_degradation_mid = None

    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 lowlevel_encoder_hidden_states: jax.Array | None, controlnet_cond: jax.Array,
                 conditioning_scale: float | jax.Array = 1.0) -> XPSRControlNetOutput:
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]
        temb = self.time_embed(timesteps, sample.shape[0])
        hidden = self.conv_in(sample.astype(self.dtype))
        cond_embedding, rgb_preds = self.controlnet_cond_embedding(controlnet_cond.astype(self.dtype))
        if cond_embedding.shape != hidden.shape:
            raise ValueError(f"controlnet_cond of shape {controlnet_cond.shape} embeds to {cond_embedding.shape}, "
                             f"but the latent sample {sample.shape} gives {hidden.shape}: the image must be "
                             f"{2 ** (len(self.controlnet_cond_embedding.blocks) // 2)}x the latent size")
        lowlevel = (None if lowlevel_encoder_hidden_states is None
                    else lowlevel_encoder_hidden_states.astype(self.dtype))
        hidden, skips = self.encode(hidden + cond_embedding, temb, encoder_hidden_states.astype(self.dtype),
                                    lowlevel)
        residuals = [zero_conv(skip) for zero_conv, skip in zip(self.controlnet_down_blocks, skips)]
        mid_residual = self.controlnet_mid_block(hidden)
        latent_preds, latent_pred_mid = (), None
        if self.conv_degradation is not None:
            latent_preds = tuple(head[0](r) for head, r in zip(self.conv_degradation, residuals))
            latent_pred_mid = self.conv_degradation_mid[0](mid_residual)
        residuals = [r * conditioning_scale for r in residuals]
        mid_residual = mid_residual * conditioning_scale
        if self.config.global_pool_conditions:
            residuals = [r.mean(axis=(1, 2), keepdims=True) for r in residuals]
            mid_residual = mid_residual.mean(axis=(1, 2), keepdims=True)
        return XPSRControlNetOutput(tuple(residuals), mid_residual, latent_preds, latent_pred_mid, rgb_preds)

    @classmethod
    def from_unet(cls, unet: UNetEncoder, *, rngs: nnx.Rngs, load_weights_from_unet: bool = True,
                  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                  dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, attention_backend: str = "auto",
                  **config_overrides: Any) -> tuple["XPSRControlNet", InitReport | None]:
        """The official `ControlNetModel.from_unet`: the encoder config comes from `unet.config`,
        XPSR switches take their official defaults unless overridden. Weights: conv_in and
        time_embedding copied; down/mid blocks by the official rule (SFA tensors copied from the
        UNet's `attentions` EVEN WHEN the UNet has SFA of its own); zero convs zero; the pyramid
        encoder and latent heads fresh (its conv_out zero)."""
        config = XPSRControlNetConfig.from_unet(
            unet.config, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            **config_overrides)
        controlnet = cls(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                         attention_backend=attention_backend)
        if not load_weights_from_unet:
            return controlnet, None
        source = module_state_dict(unet)
        controlnet, report = apply_official_init(controlnet, source, source_name="UNet",
                                                 prefixes=("conv_in.", "time_embedding.", "down_blocks.",
                                                           "mid_block."))
        return controlnet, report

