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
    BLOCK_TYPES,
    DOWN_BLOCK_TYPES,
    MID_BLOCK_TYPES,
    UP_BLOCK_TYPES,
    BlockSpec,
    DownBlock,
    MidBlock,
    UpBlock,
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
class EncoderConfig(ModelConfig):
    """The config.json keys of the UNet encoder, shared by the UNet and the ControlNet (SD 1.5 defaults)."""

    fixed_keys: ClassVar[dict] = UNET_FIXED_KEYS

    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
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
        if len(self.down_block_types) != count:
            raise ValueError(f"{source}: down_block_types has {len(self.down_block_types)} entries, "
                             f"block_out_channels {count}; they must match")
        for value in self.down_block_types:
            if value not in DOWN_BLOCK_TYPES:
                raise ValueError(f"{source}: down_block_types contains {value!r}; supported: {DOWN_BLOCK_TYPES}")
        for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{source}: {key}={getattr(self, key)!r} must be a positive int "
                                 f"(per-block lists are not supported)")
        heads = _per_block(self.attention_head_dim, count, "attention_head_dim", source)
        if self.num_attention_heads is not None:
            heads = _per_block(self.num_attention_heads, count, "num_attention_heads", source)
        for channels, head_count in zip(self.block_out_channels, heads):
            if channels % self.norm_num_groups:
                raise ValueError(f"{source}: block_out_channels entry {channels} is not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")
            if channels % head_count:
                raise ValueError(f"{source}: block width {channels} is not divisible by its head count "
                                 f"{head_count} (attention_head_dim is the number of heads in SD 1.x/2.x)")


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(EncoderConfig):
    """diffusers UNet2DConditionModel config.json keys (defaults = SD 1.5)."""

    class_name: ClassVar[str] = "UNet2DConditionModel"

    sample_size: Any = 64
    out_channels: int = 4
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

    def validate(self, source: str) -> None:
        super().validate(source)
        if len(self.up_block_types) != len(self.block_out_channels):
            raise ValueError(f"{source}: up_block_types has {len(self.up_block_types)} entries, "
                             f"block_out_channels {len(self.block_out_channels)}; they must match")
        for value in self.up_block_types:
            if value not in UP_BLOCK_TYPES:
                raise ValueError(f"{source}: up_block_types contains {value!r}; supported: {UP_BLOCK_TYPES}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"{source}: mid_block_type={self.mid_block_type!r}; supported: {MID_BLOCK_TYPES}")


def make_block_spec(config: EncoderConfig, *, dtype: Any, param_dtype: Any,
                    attention_backend: str) -> BlockSpec:
    return BlockSpec(temb_channels=config.block_out_channels[0] * 4, norm_num_groups=config.norm_num_groups,
                     norm_eps=config.norm_eps, cross_attention_dim=config.cross_attention_dim,
                     use_linear_projection=config.use_linear_projection,
                     transformer_layers=config.transformer_layers_per_block,
                     attention_backend=validate_backend(attention_backend), dtype=dtype, param_dtype=param_dtype)


def validate_remat(remat_block_types: Sequence[str]) -> tuple[str, ...]:
    for name in remat_block_types:
        if name not in BLOCK_TYPES:
            raise ValueError(f"remat_block_types contains {name!r}; valid block types: {BLOCK_TYPES}")
    return tuple(remat_block_types)


class UNetEncoder(nnx.Module):
    """conv_in, time embedding, down blocks and mid block: what the UNet and ControlNet share.

    `remat_block_types` names block types (e.g. "CrossAttnDownBlock2D") whose activations are
    rematerialised in the backward pass (gradient checkpointing) to save training memory.
    """

    config: EncoderConfig

    def _build_encoder(self, spec: BlockSpec, rngs: nnx.Rngs, *, down_lowlevel: bool, mid_lowlevel: bool,
                       remat_block_types: Sequence[str]) -> None:
        config = self.config
        channels, heads = config.block_out_channels, config.heads_per_block
        self.dtype = spec.dtype
        self.remat_block_types = validate_remat(remat_block_types)
        self.conv_in = conv2d(config.in_channels, channels[0], 3, rngs=rngs, dtype=spec.dtype,
                              param_dtype=spec.param_dtype)
        self.time_embedding = TimestepEmbedding(channels[0], spec.temb_channels, rngs=rngs, dtype=spec.dtype,
                                                param_dtype=spec.param_dtype)
        self.down_blocks = nnx.List([
            DownBlock(spec, channels[max(i - 1, 0)], channels[i], num_layers=config.layers_per_block,
                      with_attention=block_type == "CrossAttnDownBlock2D", num_heads=heads[i],
                      add_downsample=i < len(channels) - 1, downsample_padding=config.downsample_padding,
                      use_lowlevel_prompt=down_lowlevel, rngs=rngs)
            for i, block_type in enumerate(config.down_block_types)
        ])
        self.mid_block = MidBlock(spec, channels[-1], num_heads=heads[-1], use_lowlevel_prompt=mid_lowlevel,
                                  rngs=rngs)

    def call_block(self, block: nnx.Module, *args, **static_kwargs):
        """Run `block(*args)`, rematerialised if its type is in `remat_block_types`."""
        if block.block_type not in self.remat_block_types:
            return block(*args, **static_kwargs)
        # jax.checkpoint of a pure function of the block's state, not nnx.remat: in training the
        # block is merged from differentiated and closed-over (frozen) arrays, and nnx.remat then
        # refuses to write its Variables back ("Cannot mutate Param from a different trace level").
        # The blocks' forward pass changes no state, so nothing needs writing back.
        graphdef, state = nnx.split(block)
        return jax.checkpoint(lambda state, *inputs: nnx.merge(graphdef, state)(*inputs, **static_kwargs))(
            state, *args)

    def time_embed(self, timesteps: jax.Array, batch: int) -> jax.Array:
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        features = timestep_features(timesteps, self.config.block_out_channels[0],
                                     flip_sin_to_cos=self.config.flip_sin_to_cos,
                                     downscale_freq_shift=self.config.freq_shift)
        return self.time_embedding(features.astype(self.dtype))

    def encode(self, hidden: jax.Array, temb: jax.Array, context: jax.Array,
               lowlevel_context: jax.Array | None) -> tuple[jax.Array, list[jax.Array]]:
        """Down blocks + mid block on conv_in features; returns (mid output, skips in down order)."""
        skips = [hidden]
        for block in self.down_blocks:
            hidden, block_skips = self.call_block(block, hidden, temb, context, lowlevel_context)
            skips.extend(block_skips)
        return self.call_block(self.mid_block, hidden, temb, context, lowlevel_context), skips


class UNet2DCondition(PretrainedMixin, UNetEncoder):
    """SD UNet: `unet(sample, timesteps, encoder_hidden_states, *, down_block_additional_residuals=None,
    mid_block_additional_residual=None) -> noise prediction`.

    sample: (B, H, W, in_channels) latents; timesteps: (B,) int or float (or a scalar);
    encoder_hidden_states: (B, L, cross_attention_dim). The optional residuals (ControlNet
    outputs, NHWC, one per skip connection in down order, plus one for the mid block) are added
    as in diffusers.
    """

    config_class = UNet2DConditionConfig
    weights_stem = "diffusion_pytorch_model"
    pixel_attention = False  # XPSR's pixel-aware cross-attention (see XPSRUNet)

    def __init__(self, config: UNet2DConditionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, attention_backend: str = "auto",
                 remat_block_types: Sequence[str] = ()):
        self.config = config
        spec = make_block_spec(config, dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend)
        self._build_encoder(spec, rngs, down_lowlevel=self._uses_lowlevel("down"),
                            mid_lowlevel=self._uses_lowlevel("mid"), remat_block_types=remat_block_types)
        channels = config.block_out_channels
        reversed_channels = tuple(reversed(channels))
        reversed_heads = tuple(reversed(config.heads_per_block))
        self.up_blocks = nnx.List([
            UpBlock(spec, reversed_channels[min(i + 1, len(channels) - 1)], reversed_channels[max(i - 1, 0)],
                    reversed_channels[i], num_layers=config.layers_per_block + 1,
                    with_attention=block_type == "CrossAttnUpBlock2D", num_heads=reversed_heads[i],
                    add_upsample=i < len(channels) - 1, use_lowlevel_prompt=self._uses_lowlevel("up", i),
                    pixel_attention=self.pixel_attention, rngs=rngs)
            for i, block_type in enumerate(config.up_block_types)
        ])
        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], epsilon=config.norm_eps, dtype=dtype,
                                       param_dtype=param_dtype)
        self.conv_out = conv2d(channels[0], config.out_channels, 3, rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype)

    def _uses_lowlevel(self, where: str, index: int = 0) -> bool:
        """Whether Semantic-Fusion Attention is built there (never in plain SD)."""
        return False

    def __call__(self, sample, timesteps, encoder_hidden_states, *, down_block_additional_residuals=None,
                 mid_block_additional_residual=None) -> jax.Array:
        return self.forward(sample, timesteps, encoder_hidden_states, None, down_block_additional_residuals,
                            mid_block_additional_residual)

    def forward(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        lowlevel_encoder_hidden_states: jax.Array | None,
        down_block_additional_residuals: Sequence[jax.Array] | None,
        mid_block_additional_residual: jax.Array | None,
    ) -> jax.Array:
        temb = self.time_embed(timesteps, sample.shape[0])
        context = encoder_hidden_states.astype(self.dtype)
        lowlevel = None if lowlevel_encoder_hidden_states is None else lowlevel_encoder_hidden_states.astype(
            self.dtype)
        hidden, skips = self.encode(self.conv_in(sample.astype(self.dtype)), temb, context, lowlevel)
        residuals = down_block_additional_residuals
        if residuals is not None:
            residuals = list(residuals)
            if len(residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(residuals)} arrays, the UNet has "
                                 f"{len(skips)} skip connections")
            for i, (skip, residual) in enumerate(zip(skips, residuals)):
                if skip.shape != residual.shape:
                    raise ValueError(f"down_block_additional_residuals[{i}] has shape {residual.shape}, "
                                     f"skip {i} has {skip.shape}")
            skips = [skip + residual.astype(skip.dtype) for skip, residual in zip(skips, residuals)]
        if mid_block_additional_residual is not None:
            hidden = hidden + mid_block_additional_residual.astype(hidden.dtype)
        for block in self.up_blocks:
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            block_residuals = None
            if residuals is not None:
                block_residuals, residuals = residuals[-count:], residuals[:-count]
            upsample_size = tuple(skips[-1].shape[1:3]) if skips else None
            hidden = self.call_block(block, hidden, block_skips, temb, context, lowlevel, block_residuals,
                                     upsample_size=upsample_size)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(hidden)))
