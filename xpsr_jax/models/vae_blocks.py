"""The blocks of diffusers' AutoencoderKL (SD VAE) in NHWC: Encoder, Decoder and their parts.

Attribute names equal diffusers' submodule names, so state-dict keys map 1:1
("encoder.down_blocks.0.resnets.1.conv2.weight", "decoder.mid_block.attentions.0.to_q.bias", ...).
Every GroupNorm of the VAE uses eps 1e-6 and the activation is SiLU.

Encoder and Decoder run as a list of `Stage`s (one resnet, attention, resampler or the output
head each); the forward pass folds over it, and the streaming tiled VAE
(`xpsr_jax.inference.tiling`) runs the same list one stage at a time.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from xpsr_jax.models.attention import Attention
from xpsr_jax.models.layers import GroupNorm, Identity, conv2d, tokens
from xpsr_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

VAE_NORM_EPS = 1e-6


class Stage(NamedTuple):
    """One step of a VAE forward pass and the GroupNorms it applies, in call order."""

    fn: Callable[[jax.Array], jax.Array]
    norms: tuple[GroupNorm, ...]


def module_stage(module: nnx.Module) -> Stage:
    """A resnet, attention or resampler as a stage; its GroupNorms in call order (norm1 before norm2)."""
    norms = sorted(((path, m) for path, m in nnx.iter_modules(module) if isinstance(m, GroupNorm)),
                   key=lambda item: item[0])
    return Stage(module, tuple(m for _, m in norms))


def run_stages(stages: list[Stage], x: jax.Array) -> jax.Array:
    for stage in stages:
        x = stage.fn(x)
    return x


def _resnet(in_channels: int, out_channels: int, groups: int, **kwargs) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels, out_channels, temb_channels=None, groups=groups, eps=VAE_NORM_EPS, **kwargs)


class SpatialSelfAttention(Attention):
    """The VAE mid-block attention: GroupNorm -> single-head self-attention over all H*W
    positions -> + input (diffusers `Attention(residual_connection=True, bias=True)` with
    `rescale_output_factor` 1). `group_norm` sits beside `to_q/to_k/to_v/to_out.0`.

    `__call__(x: (B, H, W, C)) -> (B, H, W, C)`.
    """

    def __init__(self, channels: int, *, groups: int, attention_backend: str, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        # diffusers builds this with heads = channels // attention_head_dim and
        # attention_head_dim = channels: one head as wide as the block.
        super().__init__(channels, heads=1, dim_head=channels, qkv_bias=True, out_bias=True,
                         attention_backend=attention_backend, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.group_norm = GroupNorm(groups, channels, epsilon=VAE_NORM_EPS, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        attended = super().__call__(tokens(self.group_norm(x)))
        return x + attended.reshape(x.shape).astype(x.dtype)


class UNetMidBlock2D(nnx.Module):
    """resnets[0] -> attentions[0] -> resnets[1]. Without attention the slot is an `Identity`
    (diffusers keeps a `None` there), so indices and keys stay aligned."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool, attention_backend: str,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([_resnet(channels, channels, groups, **common) for _ in range(2)])
        self.attentions = nnx.List([
            SpatialSelfAttention(channels, groups=groups, attention_backend=attention_backend, **common)
            if add_attention else Identity()
        ])

    def stages(self) -> list[Stage]:
        stages = [module_stage(self.resnets[0])]
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            stages += [module_stage(attention), module_stage(resnet)]
        return stages

    def __call__(self, x: jax.Array) -> jax.Array:
        return run_stages(self.stages(), x)


class DownEncoderBlock2D(nnx.Module):
    """`num_layers` resnets, then (except in the last block) a stride-2 conv that pads (0, 1)."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, add_downsample: bool,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([
            _resnet(in_channels if i == 0 else out_channels, out_channels, groups, **common) for i in range(num_layers)
        ])
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, asymmetric_padding=True, **common)]) if add_downsample else None
        )

    def stages(self) -> list[Stage]:
        return [module_stage(m) for m in (*self.resnets, *(self.downsamplers or ()))]

    def __call__(self, x: jax.Array) -> jax.Array:
        return run_stages(self.stages(), x)


class UpDecoderBlock2D(nnx.Module):
    """`num_layers` resnets, then (except in the last block) nearest x2 upsampling + conv."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, add_upsample: bool,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([
            _resnet(in_channels if i == 0 else out_channels, out_channels, groups, **common) for i in range(num_layers)
        ])
        self.upsamplers = nnx.List([Upsample2D(out_channels, **common)]) if add_upsample else None

    def stages(self) -> list[Stage]:
        return [module_stage(m) for m in (*self.resnets, *(self.upsamplers or ()))]

    def __call__(self, x: jax.Array) -> jax.Array:
        return run_stages(self.stages(), x)


class Encoder(nnx.Module):
    """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels), f = 2**(blocks-1).

    conv_in -> down_blocks -> mid_block -> conv_norm_out -> SiLU -> conv_out.
    """

    def __init__(self, *, in_channels: int, latent_channels: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int, groups: int, add_attention: bool, attention_backend: str,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        conv = functools.partial(conv2d, **common)
        self.conv_in = conv(in_channels, block_out_channels[0], 3)
        blocks = []
        for i, out_channels in enumerate(block_out_channels):
            in_block = block_out_channels[max(i - 1, 0)]
            blocks.append(DownEncoderBlock2D(in_block, out_channels, num_layers=layers_per_block, groups=groups,
                                             add_downsample=i < len(block_out_channels) - 1, **common))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = UNetMidBlock2D(block_out_channels[-1], groups=groups, add_attention=add_attention,
                                        attention_backend=attention_backend, **common)
        self.conv_norm_out = GroupNorm(groups, block_out_channels[-1], epsilon=VAE_NORM_EPS, dtype=dtype,
                                       param_dtype=param_dtype)
        self.conv_out = conv(block_out_channels[-1], 2 * latent_channels, 3)

    def _head(self, x: jax.Array) -> jax.Array:
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))

    def stages(self) -> list[Stage]:
        stages = [Stage(self.conv_in, ())]
        for block in self.down_blocks:
            stages += block.stages()
        return stages + self.mid_block.stages() + [Stage(self._head, (self.conv_norm_out,))]

    def __call__(self, x: jax.Array) -> jax.Array:
        return run_stages(self.stages(), x)


class Decoder(nnx.Module):
    """Latent (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels).

    conv_in -> mid_block -> up_blocks (widest first, layers_per_block + 1 resnets each)
    -> conv_norm_out -> SiLU -> conv_out.
    """

    def __init__(self, *, out_channels: int, latent_channels: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int, groups: int, add_attention: bool, attention_backend: str,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        conv = functools.partial(conv2d, **common)
        reversed_channels = tuple(reversed(block_out_channels))
        self.conv_in = conv(latent_channels, reversed_channels[0], 3)
        self.mid_block = UNetMidBlock2D(reversed_channels[0], groups=groups, add_attention=add_attention,
                                        attention_backend=attention_backend, **common)
        blocks = []
        for i, out_block in enumerate(reversed_channels):
            in_block = reversed_channels[max(i - 1, 0)]
            blocks.append(UpDecoderBlock2D(in_block, out_block, num_layers=layers_per_block + 1, groups=groups,
                                           add_upsample=i < len(reversed_channels) - 1, **common))
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = GroupNorm(groups, block_out_channels[0], epsilon=VAE_NORM_EPS, dtype=dtype,
                                       param_dtype=param_dtype)
        self.conv_out = conv(block_out_channels[0], out_channels, 3)

    def _head(self, x: jax.Array) -> jax.Array:
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))

    def stages(self) -> list[Stage]:
        stages = [Stage(self.conv_in, ())] + self.mid_block.stages()
        for block in self.up_blocks:
            stages += block.stages()
        return stages + [Stage(self._head, (self.conv_norm_out,))]

    def __call__(self, z: jax.Array) -> jax.Array:
        return run_stages(self.stages(), z)
