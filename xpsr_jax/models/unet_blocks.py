"""The SD 1.x / 2.x UNet block family (diffusers names), NHWC, with XPSR's two additions.

Plain SD blocks are these with both additions off. XPSR adds, per block:
  - Semantic-Fusion Attention (`use_lowlevel_prompt`): `attentions_lowlevel[k]` attends to the
    low-level prompt, `attentions_connect[k]` fuses its tokens into the high-level result.
  - pixel-aware cross-attention (`pixel_context_widths`, up blocks only): `pixel_attentions[j]`
    attends to the tokens of the ControlNet residual that belongs to layer j's skip.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xpsr_jax.models.layers import resize_nearest, tokens
from xpsr_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from xpsr_jax.models.transformer import Transformer2D

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
BLOCK_TYPES = DOWN_BLOCK_TYPES + MID_BLOCK_TYPES + UP_BLOCK_TYPES


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What every block of one network shares; built once from its config."""

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

    def transformers(self, count: int, channels: int, num_heads: int, rngs: nnx.Rngs,
                     context_dim: int | None = None) -> nnx.List:
        return nnx.List([self.transformer(channels, num_heads, rngs, context_dim) for _ in range(count)])


class _AttentionStage(nnx.Module):
    """Layer k's attention: `attentions[k]`, or Semantic-Fusion Attention where it is built."""

    attentions: nnx.List | None
    attentions_lowlevel: nnx.List | None
    attentions_connect: nnx.List | None

    def _build_attentions(self, spec: BlockSpec, count: int, channels: int, num_heads: int, *,
                          with_attention: bool, use_lowlevel_prompt: bool, rngs: nnx.Rngs) -> None:
        self.attentions = spec.transformers(count, channels, num_heads, rngs) if with_attention else None
        sfa = with_attention and use_lowlevel_prompt
        self.attentions_lowlevel = spec.transformers(count, channels, num_heads, rngs) if sfa else None
        # The connect block's attn2 attends to the low-level branch's tokens: context width = channels.
        self.attentions_connect = (spec.transformers(count, channels, num_heads, rngs, context_dim=channels)
                                   if sfa else None)

    def attend(self, k: int, hidden: jax.Array, context: jax.Array,
               lowlevel_context: jax.Array | None) -> jax.Array:
        if self.attentions is None:
            return hidden
        high = self.attentions[k](hidden, context)
        if self.attentions_lowlevel is None or lowlevel_context is None:
            return high
        low = self.attentions_lowlevel[k](hidden, lowlevel_context)
        return self.attentions_connect[k](high, tokens(low))


class DownBlock(_AttentionStage):
    """CrossAttnDownBlock2D (`with_attention`) or DownBlock2D.

    Returns the block output and the skip features of every resnet and of the downsampler.
    """

    def __init__(self, spec: BlockSpec, in_channels: int, out_channels: int, *, num_layers: int,
                 with_attention: bool, num_heads: int, add_downsample: bool, downsample_padding: int = 1,
                 use_lowlevel_prompt: bool = False, rngs: nnx.Rngs):
        if add_downsample and downsample_padding != 1:
            raise ValueError(f"downsample_padding={downsample_padding} is not supported (SD uses 1)")
        self.block_type = DOWN_BLOCK_TYPES[0] if with_attention else DOWN_BLOCK_TYPES[1]
        self.resnets = nnx.List([
            spec.resnet(in_channels if j == 0 else out_channels, out_channels, rngs) for j in range(num_layers)
        ])
        self._build_attentions(spec, num_layers, out_channels, num_heads, with_attention=with_attention,
                               use_lowlevel_prompt=use_lowlevel_prompt, rngs=rngs)
        self.downsamplers = nnx.List([
            Downsample2D(out_channels, rngs=rngs, dtype=spec.dtype, param_dtype=spec.param_dtype)
        ]) if add_downsample else None

    def __call__(self, hidden, temb, context, lowlevel_context=None):
        skips = []
        for k, resnet in enumerate(self.resnets):
            hidden = self.attend(k, resnet(hidden, temb), context, lowlevel_context)
            skips.append(hidden)
        if self.downsamplers is not None:
            hidden = self.downsamplers[0](hidden)
            skips.append(hidden)
        return hidden, skips


class MidBlock(_AttentionStage):
    """UNetMidBlock2DCrossAttn: resnet, then (attention or SFA, resnet)."""

    block_type = MID_BLOCK_TYPES[0]

    def __init__(self, spec: BlockSpec, channels: int, *, num_heads: int, use_lowlevel_prompt: bool = False,
                 rngs: nnx.Rngs):
        self._build_attentions(spec, 1, channels, num_heads, with_attention=True,
                               use_lowlevel_prompt=use_lowlevel_prompt, rngs=rngs)
        self.resnets = nnx.List([spec.resnet(channels, channels, rngs) for _ in range(2)])

    def __call__(self, hidden, temb, context, lowlevel_context=None):
        hidden = self.resnets[0](hidden, temb)
        for k, resnet in enumerate(self.resnets[1:]):
            hidden = resnet(self.attend(k, hidden, context, lowlevel_context), temb)
        return hidden


class UpBlock(_AttentionStage):
    """CrossAttnUpBlock2D (`with_attention`) or UpBlock2D: each resnet eats one skip.

    `pixel_attention` (XPSR) builds `pixel_attentions[j]`, whose attn2 attends to the ControlNet
    residual of layer j's skip: context width = the skip width in CrossAttnUpBlock2D, and
    `out_channels` in UpBlock2D (the official code's choice; the two agree for SD shapes).
    """

    def __init__(self, spec: BlockSpec, in_channels: int, prev_channels: int, out_channels: int, *,
                 num_layers: int, with_attention: bool, num_heads: int, add_upsample: bool,
                 use_lowlevel_prompt: bool = False, pixel_attention: bool = False, rngs: nnx.Rngs):
        self.block_type = UP_BLOCK_TYPES[0] if with_attention else UP_BLOCK_TYPES[1]
        self.skip_channels = tuple(in_channels if j == num_layers - 1 else out_channels for j in range(num_layers))
        self.resnets = nnx.List([
            spec.resnet((prev_channels if j == 0 else out_channels) + self.skip_channels[j], out_channels, rngs)
            for j in range(num_layers)
        ])
        self._build_attentions(spec, num_layers, out_channels, num_heads, with_attention=with_attention,
                               use_lowlevel_prompt=use_lowlevel_prompt, rngs=rngs)
        pixel_context_widths = self.skip_channels if with_attention else (out_channels,) * num_layers
        self.pixel_attentions = nnx.List([
            spec.transformer(out_channels, num_heads, rngs, context_dim=width) for width in pixel_context_widths
        ]) if pixel_attention else None
        self.upsamplers = nnx.List([
            Upsample2D(out_channels, rngs=rngs, dtype=spec.dtype, param_dtype=spec.param_dtype)
        ]) if add_upsample else None

    def __call__(self, hidden, skips, temb, context, lowlevel_context=None, pixel_residuals=None,
                 upsample_size: tuple[int, int] | None = None):
        """`skips` (and `pixel_residuals`) are consumed from the end, as diffusers pops them."""
        for k, resnet in enumerate(self.resnets):
            skip = skips[-1 - k]
            hidden = resnet(jnp.concatenate([hidden, skip.astype(hidden.dtype)], axis=-1), temb)
            hidden = self.attend(k, hidden, context, lowlevel_context)
            if self.pixel_attentions is not None and pixel_residuals is not None:
                residual = pixel_residuals[-1 - k]
                hidden = self.pixel_attentions[k](hidden, tokens(residual.astype(hidden.dtype)))
        if self.upsamplers is not None:
            target = upsample_size or (hidden.shape[1] * 2, hidden.shape[2] * 2)
            hidden = self.upsamplers[0].conv(resize_nearest(hidden, target))
        return hidden
