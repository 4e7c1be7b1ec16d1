"""Small building blocks shared by every network: convs with PyTorch padding, norms, identity.

Parameter names follow PyTorch (`weight` -> `kernel`/`scale`, `bias` -> `bias`) so a
state-dict key maps to a module path 1:1 (see `xpsr_jax.weights.convert`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any

# PyTorch's default Conv/Linear initialisation (kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)),
# bias U(+-1/sqrt(fan_in))), so freshly initialised layers start where the reference's do.
torch_default_kernel_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
    bound = 1.0 / float(fan_in) ** 0.5 if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    rngs: nnx.Rngs,
    stride: int = 1,
    padding: int | tuple[tuple[int, int], tuple[int, int]] | None = None,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nnx.Conv:
    """NHWC conv with PyTorch's padding semantics.

    `padding=None` means kernel_size // 2 on every side. Explicit symmetric padding is
    required: Flax 'SAME' pads stride-2 convs asymmetrically, PyTorch does not.
    """
    if padding is None:
        padding = kernel_size // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=torch_default_kernel_init,
        bias_init=torch_default_bias_init(in_channels * kernel_size * kernel_size),
        rngs=rngs,
    )


def linear(
    in_features: int,
    out_features: int,
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nnx.Linear:
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=torch_default_kernel_init, bias_init=torch_default_bias_init(in_features), rngs=rngs,
    )


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over the channel (last) axis of NHWC / NLC input.

    Statistics are always computed in float32 (two-pass variance), as PyTorch autocast does,
    so bf16 compute does not lose the normalisation. Two ways to take the statistics over more
    than the input, both for the tiled VAE: with `stats_axis_name` set (on a copy) they are pooled
    over that vmapped axis with `lax.pmean`; with `statistics_source` set, it is called as
    `source(norm, mean, var) -> (mean, var)` with this input's own (N, 1, groups, 1) statistics
    and returns the ones to normalise with (the streaming tiled VAE's pooled values).
    """

    stats_axis_name: str | None = None
    statistics_source: Any = None

    def __init__(self, num_groups: int, num_channels: int, *, epsilon: float, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        channels = shape[-1]
        grouped = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, channels // self.num_groups)
        mean = grouped.mean(axis=(1, 3), keepdims=True)
        if self.stats_axis_name is not None:
            mean = jax.lax.pmean(mean, self.stats_axis_name)
        var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
        if self.stats_axis_name is not None:
            var = jax.lax.pmean(var, self.stats_axis_name)
        if self.statistics_source is not None:
            mean, var = self.statistics_source(self, mean, var)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(shape)
        out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis, statistics in float32."""

    def __init__(self, num_features: int, *, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
        out = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        out = out * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(self.dtype)


class Identity(nnx.Module):
    """Parameter-free slot that keeps list indices aligned with PyTorch (e.g. Dropout in `ff.net`)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """F.interpolate(scale_factor=2, mode='nearest') for NHWC."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def tokens(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H*W, C): the token layout PyTorch gets from x.permute(0, 2, 3, 1).reshape."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """F.interpolate(size=size, mode='nearest') for NHWC: source index floor(dst * in / out).

    Exact 2x upsampling is a plain repeat; other sizes occur when latent sides are not
    multiples of the UNet's total downsampling (diffusers' `upsample_size`).
    """
    height, width = x.shape[1:3]
    if size == (2 * height, 2 * width):
        return upsample_nearest_2x(x)
    rows = jnp.minimum(jnp.floor(jnp.arange(size[0]) * (height / size[0])).astype(jnp.int32), height - 1)
    cols = jnp.minimum(jnp.floor(jnp.arange(size[1]) * (width / size[1])).astype(jnp.int32), width - 1)
    return x[:, rows][:, :, cols]


def interleave(first: jax.Array, second: jax.Array) -> jax.Array:
    """(B, ...) x 2 -> (2B, ...) as [first_0, second_0, first_1, ...]: a batch sharded over devices
    keeps each example's pair on its device (concatenating the batches would move data)."""
    return jnp.stack([first, second], axis=1).reshape((-1,) + first.shape[1:])


def deinterleave(pairs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse of `interleave`."""
    pairs = pairs.reshape((-1, 2) + pairs.shape[1:])
    return pairs[:, 0], pairs[:, 1]
