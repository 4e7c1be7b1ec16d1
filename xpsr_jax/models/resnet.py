"""diffusers' ResnetBlock2D, Downsample2D and Upsample2D in NHWC."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xpsr_jax.models.layers import GroupNorm, conv2d, linear, upsample_nearest_2x


class ResnetBlock2D(nnx.Module):
    """norm1 -> SiLU -> conv1 (+ time_emb_proj(SiLU(temb))) -> norm2 -> SiLU -> conv2, plus shortcut.

    `temb_channels=None` builds the VAE flavour (no time embedding). The 1x1 `conv_shortcut`
    exists only when the channel count changes, as in diffusers.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ):
        conv = functools.partial(conv2d, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        norm = functools.partial(GroupNorm, epsilon=eps, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = norm(groups, in_channels)
        self.conv1 = conv(in_channels, out_channels, 3)
        self.time_emb_proj = (
            linear(temb_channels, out_channels, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            if temb_channels is not None else None
        )
        self.norm2 = norm(groups, out_channels)
        self.conv2 = conv(out_channels, out_channels, 3)
        self.conv_shortcut = conv(in_channels, out_channels, 1) if in_channels != out_channels else None

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class Downsample2D(nnx.Module):
    """3x3 stride-2 `conv`. `asymmetric_padding` pads (0, 1) like the VAE encoder's F.pad; the
    UNet pads 1 on every side."""

    def __init__(self, channels: int, out_channels: int | None = None, *, asymmetric_padding: bool = False,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        padding = ((0, 1), (0, 1)) if asymmetric_padding else 1
        self.conv = conv2d(channels, out_channels or channels, 3, stride=2, padding=padding, rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest x2 upsampling followed by a 3x3 `conv`."""

    def __init__(self, channels: int, out_channels: int | None = None, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.conv = conv2d(channels, out_channels or channels, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(upsample_nearest_2x(x))
