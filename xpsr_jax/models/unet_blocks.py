"""The SD 1.x / 2.x UNet block family (diffusers names): down, mid and up blocks, NHWC.

Every block is built from a `BlockSpec`; a block "with attention" holds one Transformer2D per
resnet in `attentions`. The XPSR networks extend these blocks (see `xpsr_unet.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xpsr_jax.models.layers import resize_nearest
from xpsr_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from xpsr_jax.models.transformer import Transformer2D

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What every block of one UNet shares; built once from the UNet config."""

    temb_channels: int
    norm_num_groups: int
    norm_eps: float
    cross_attention_dim: int
    use_linear_projection: bool
    transformer_layers: int
    attention_backend: str
    dtype: Any
    param_dtype: Any

    def resnet(self, in_channels: int, out_channels: int, rngs: nnx.Rngs) -> ResnetBlock2D:
        return ResnetBlock2D(in_channels, out_channels, temb_channels=self.temb_channels,
                             groups=self.norm_num_groups, eps=self.norm_eps, rngs=rngs,
                             dtype=self.dtype, param_dtype=self.param_dtype)

    def transformer(self, channels: int, num_heads: int, rngs: nnx.Rngs,
                    context_dim: int | None = None) -> Transformer2D:
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} attention heads")
        return Transformer2D(channels, num_heads=num_heads, head_dim=channels // num_heads,
                             context_dim=self.cross_attention_dim if context_dim is None else context_dim,
                             norm_num_groups=self.norm_num_groups,
                             use_linear_projection=self.use_linear_projection,
                             num_layers=self.transformer_layers, attention_backend=self.attention_backend,
                             rngs=rngs, dtype=self.dtype, param_dtype=self.param_dtype)


class DownBlock(nnx.Module):
    """CrossAttnDownBlock2D (`with_attention=True`) or DownBlock2D.

    Returns the block output and the skip features of every resnet (and of the downsampler).
    """

    def __init__(self, spec: BlockSpec, in_channels: int, out_channels: int, *, num_layers: int,
                 with_attention: bool, num_heads: int, add_downsample: bool, downsample_padding: int,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([
            spec.resnet(in_channels if j == 0 else out_channels, out_channels, rngs) for j in range(num_layers)
        ])
        self.attentions = nnx.List([
            spec.transformer(out_channels, num_heads, rngs) for _ in range(num_layers)
        ]) if with_attention else None
        self.downsamplers = nnx.List([
            Downsample2D(out_channels, asymmetric_padding=False, rngs=rngs, dtype=spec.dtype,
                         param_dtype=spec.param_dtype)
        ]) if add_downsample else None
        if add_downsample and downsample_padding != 1:
            raise ValueError(f"downsample_padding={downsample_padding} is not supported (SD uses 1)")

    def attend(self, index: int, hidden: jax.Array, context: jax.Array, **extra) -> jax.Array:
        """The attention stage after resnet `index`; extended by XPSR blocks."""
        return self.attentions[index](hidden, context)

    def __call__(self, hidden: jax.Array, temb: jax.Array, context: jax.Array, **extra):
        skips = []
        for index, resnet in enumerate(self.resnets):
            hidden = resnet(hidden, temb)
            if self.attentions is not None:
                hidden = self.attend(index, hidden, context, **extra)
            skips.append(hidden)
        if self.downsamplers is not None:
            hidden = self.downsamplers[0](hidden)
            skips.append(hidden)
        return hidden, skips


class MidBlock(nnx.Module):
    """UNetMidBlock2DCrossAttn: resnet -> (attention -> resnet) x transformer count."""

    def __init__(self, spec: BlockSpec, channels: int, *, num_heads: int, rngs: nnx.Rngs):
        self.attentions = nnx.List([spec.transformer(channels, num_heads, rngs)])
        self.resnets = nnx.List([spec.resnet(channels, channels, rngs) for _ in range(2)])

    def attend(self, index: int, hidden: jax.Array, context: jax.Array, **extra) -> jax.Array:
        return self.attentions[index](hidden, context)

    def __call__(self, hidden: jax.Array, temb: jax.Array, context: jax.Array, **extra) -> jax.Array:
        hidden = self.resnets[0](hidden, temb)
        for index, resnet in enumerate(self.resnets[1:]):
            hidden = self.attend(index, hidden, context, **extra)
            hidden = resnet(hidden, temb)
        return hidden


class UpBlock(nnx.Module):
    """CrossAttnUpBlock2D (`with_attention=True`) or UpBlock2D: each resnet eats one skip."""

    def __init__(self, spec: BlockSpec, in_channels: int, prev_channels: int, out_channels: int, *,
                 num_layers: int, with_attention: bool, num_heads: int, add_upsample: bool, rngs: nnx.Rngs):
        self.skip_channels = tuple(
            in_channels if j == num_layers - 1 else out_channels for j in range(num_layers)
        )
        self.resnets = nnx.List([
            spec.resnet((prev_channels if j == 0 else out_channels) + self.skip_channels[j], out_channels, rngs)
            for j in range(num_layers)
        ])
        self.attentions = nnx.List([
            spec.transformer(out_channels, num_heads, rngs) for _ in range(num_layers)
        ]) if with_attention else None
        self.upsamplers = nnx.List([
            Upsample2D(out_channels, rngs=rngs, dtype=spec.dtype, param_dtype=spec.param_dtype)
        ]) if add_upsample else None

    def attend(self, index: int, hidden: jax.Array, context: jax.Array, **extra) -> jax.Array:
        if self.attentions is None:
            return hidden
        return self.attentions[index](hidden, context)

    def __call__(self, hidden: jax.Array, skips: list[jax.Array], temb: jax.Array, context: jax.Array,
                 upsample_size: tuple[int, int] | None = None, **extra) -> jax.Array:
        """`skips` are consumed from the end, as diffusers pops `res_hidden_states_tuple[-1]`."""
        for index, resnet in enumerate(self.resnets):
            skip = skips[-1 - index]
            hidden = resnet(jnp.concatenate([hidden, skip.astype(hidden.dtype)], axis=-1), temb)
            hidden = self.attend(index, hidden, context, **extra)
        if self.upsamplers is not None:
            target = upsample_size or (hidden.shape[1] * 2, hidden.shape[2] * 2)
            upsampler = self.upsamplers[0]
            hidden = upsampler.conv(resize_nearest(hidden, target))
        return hidden
