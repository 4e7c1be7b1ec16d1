"""Stable Diffusion 1.x / 2.x UNet (diffusers `UNet2DConditionModel`) in Flax NNX, NHWC."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from xpsr_jax.models.attention import validate_backend
from xpsr_jax.models.embeddings import TimestepEmbedding, timestep_features
from xpsr_jax.models.layers import GroupNorm, conv2d
from xpsr_jax.models.model_config import ModelConfig
from xpsr_jax.models.unet_blocks import (
    DOWN_BLOCK_TYPES, MID_BLOCK_TYPES, UP_BLOCK_TYPES, BlockSpec, DownBlock, MidBlock, UpBlock,
)
from xpsr_jax.weights.pretrained import PretrainedMixin

# diffusers UNet2DConditionModel keys this port supports only at their SD value.
UNET_FIXED_KEYS = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
}


def _per_block(value, count: int, key: str, source: str) -> tuple:
    if isinstance(value, (tuple, list)):
        if len(value) != count:
            raise ValueError(f"{source}: {key} has {len(value)} entries, expected one per block ({count})")
        return tuple(value)
    return (value,) * count


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(ModelConfig):
    """diffusers UNet2DConditionModel config.json keys (defaults = SD 1.5)."""

    fixed_keys: ClassVar[dict] = UNET_FIXED_KEYS
    class_name: ClassVar[str] = "UNet2DConditionModel"

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int = 1
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    upcast_attention: bool = False  # accepted: attention logits are always computed in float32

    @property
    def heads_per_block(self) -> tuple:
        """diffusers' quirk: with `num_attention_heads` unset, `attention_head_dim` is the HEAD COUNT."""
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per_block(heads, len(self.down_block_types), "num_attention_heads", "config")

    def validate(self, source: str) -> None:
        count = len(self.block_out_channels)
        if len(self.down_block_types) != count or len(self.up_block_types) != count:
            raise ValueError(f"{source}: down_block_types / up_block_types / block_out_channels must have the "
                             f"same length, got {len(self.down_block_types)} / {len(self.up_block_types)} / {count}")
        for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            for value in getattr(self, key):
                if value not in allowed:
                    raise ValueError(f"{source}: {key} contains {value!r}; supported: {allowed}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"{source}: mid_block_type={self.mid_block_type!r}; supported: {MID_BLOCK_TYPES}")
        for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{source}: {key}={getattr(self, key)!r} must be a positive int "
                                 f"(per-block lists are not supported)")
        _per_block(self.attention_head_dim, count, "attention_head_dim", source)
        if self.num_attention_heads is not None:
            _per_block(self.num_attention_heads, count, "num_attention_heads", source)
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"{source}: block_out_channels entry {channels} is not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")


class UNet2DCondition(PretrainedMixin, nnx.Module):
    """SD UNet: `unet(sample, timesteps, encoder_hidden_states, *, down_block_additional_residuals=None,
    mid_block_additional_residual=None) -> noise prediction`.

    sample: (B, H, W, in_channels) latents; timesteps: (B,) int or float; encoder_hidden_states:
    (B, L, cross_attention_dim). The optional residuals (ControlNet outputs, NHWC, one per skip
    connection in down order, plus one for the mid block) are added as in diffusers.
    """

    config_class = UNet2DConditionConfig
    weights_stem = "diffusion_pytorch_model"

    def __init__(self, config: UNet2DConditionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, attention_backend: str = "auto"):
        self.config = config
        self.dtype = dtype
        channels = config.block_out_channels
        time_dim = channels[0] * 4
        heads = config.heads_per_block
        spec = BlockSpec(temb_channels=time_dim, norm_num_groups=config.norm_num_groups, norm_eps=config.norm_eps,
                         cross_attention_dim=config.cross_attention_dim,
                         use_linear_projection=config.use_linear_projection,
                         transformer_layers=config.transformer_layers_per_block,
                         attention_backend=validate_backend(attention_backend), dtype=dtype, param_dtype=param_dtype)
        self.conv_in = conv2d(config.in_channels, channels[0], 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.time_embedding = TimestepEmbedding(channels[0], time_dim, rngs=rngs, dtype=dtype,
                                                param_dtype=param_dtype)
        self.down_blocks = nnx.List(self._build_down_blocks(spec, rngs))
        self.mid_block = self._build_mid_block(spec, rngs)
        self.up_blocks = nnx.List(self._build_up_blocks(spec, rngs))
        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], epsilon=config.norm_eps, dtype=dtype,
                                       param_dtype=param_dtype)
        self.conv_out = conv2d(channels[0], config.out_channels, 3, rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype)

    # Block construction is split out so the XPSR UNet can build extended blocks.
    def _build_down_blocks(self, spec: BlockSpec, rngs: nnx.Rngs) -> list:
        config = self.config
        channels, heads = config.block_out_channels, config.heads_per_block
        blocks = []
        for i, block_type in enumerate(config.down_block_types):
            blocks.append(self.down_block_class(
                spec, channels[max(i - 1, 0)], channels[i], num_layers=config.layers_per_block,
                with_attention=block_type == "CrossAttnDownBlock2D", num_heads=heads[i],
                add_downsample=i < len(channels) - 1, downsample_padding=config.downsample_padding, rngs=rngs,
                **self._down_block_extras(i)))
        return blocks

    def _build_mid_block(self, spec: BlockSpec, rngs: nnx.Rngs):
        config = self.config
        return self.mid_block_class(spec, config.block_out_channels[-1], num_heads=config.heads_per_block[-1],
                                    rngs=rngs, **self._mid_block_extras())

    def _build_up_blocks(self, spec: BlockSpec, rngs: nnx.Rngs) -> list:
        config = self.config
        reversed_channels = tuple(reversed(config.block_out_channels))
        reversed_heads = tuple(reversed(config.heads_per_block))
        blocks = []
        for i, block_type in enumerate(config.up_block_types):
            blocks.append(self.up_block_class(
                spec, reversed_channels[min(i + 1, len(reversed_channels) - 1)],
                reversed_channels[max(i - 1, 0)], reversed_channels[i], num_layers=config.layers_per_block + 1,
                with_attention=block_type == "CrossAttnUpBlock2D", num_heads=reversed_heads[i],
                add_upsample=i < len(reversed_channels) - 1, rngs=rngs, **self._up_block_extras(i)))
        return blocks

    down_block_class = DownBlock
    mid_block_class = MidBlock
    up_block_class = UpBlock

    def _down_block_extras(self, index: int) -> dict:
        return {}

    def _mid_block_extras(self) -> dict:
        return {}

    def _up_block_extras(self, index: int) -> dict:
        return {}

    def time_embed(self, timesteps: jax.Array, batch: int) -> jax.Array:
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        features = timestep_features(timesteps, self.config.block_out_channels[0],
                                     flip_sin_to_cos=self.config.flip_sin_to_cos,
                                     downscale_freq_shift=self.config.freq_shift)
        return self.time_embedding(features.astype(self.dtype))

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        *,
        down_block_additional_residuals: Sequence[jax.Array] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
        **block_extras,
    ) -> jax.Array:
        temb = self.time_embed(timesteps, sample.shape[0])
        context = encoder_hidden_states.astype(self.dtype)
        hidden = self.conv_in(sample.astype(self.dtype))
        skips = [hidden]
        for block in self.down_blocks:
            hidden, block_skips = block(hidden, temb, context, **block_extras)
            skips.extend(block_skips)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                                 f"arrays, the UNet has {len(skips)} skip connections")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
        hidden = self.mid_block(hidden, temb, context, **block_extras)
        if mid_block_additional_residual is not None:
            hidden = hidden + mid_block_additional_residual.astype(hidden.dtype)
        hidden = self.run_up_blocks(hidden, skips, temb, context, down_block_additional_residuals, **block_extras)
        hidden = self.conv_out(jax.nn.silu(self.conv_norm_out(hidden)))
        return hidden

    def run_up_blocks(self, hidden, skips, temb, context, residuals, **block_extras):
        for i, block in enumerate(self.up_blocks):
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            upsample_size = tuple(skips[-1].shape[1:3]) if skips else None
            hidden = block(hidden, block_skips, temb, context, upsample_size=upsample_size, **block_extras)
        return hidden
