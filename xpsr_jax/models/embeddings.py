"""Sinusoidal timestep features and the time-embedding MLP (diffusers `Timesteps`, `TimestepEmbedding`)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xpsr_jax.models.layers import linear


def timestep_features(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    downscale_freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
    """(batch,) timesteps -> (batch, dim) float32 sinusoidal features, as diffusers computes them."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    angles = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    features = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        features = jnp.pad(features, ((0, 0), (0, 1)))
    return features


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.linear_1 = linear(in_channels, time_embed_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_2 = linear(time_embed_dim, time_embed_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(features)))
