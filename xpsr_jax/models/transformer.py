"""diffusers' Transformer2DModel (SD 1.x / 2.x flavour) and its BasicTransformerBlock, NHWC."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xpsr_jax.models.attention import Attention
from xpsr_jax.models.layers import (
    GroupNorm,
    Identity,
    LayerNorm,
    conv2d,
    linear,
    tokens,
)


class GEGLU(nnx.Module):
    """`proj` to twice the width; value * GELU(gate) with exact (erf) GELU, as diffusers."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.proj = linear(dim_in, dim_out * 2, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """`net` = [GEGLU, Dropout slot, Linear], indices kept so keys read `ff.net.0.proj`, `ff.net.2`."""

    def __init__(self, dim: int, *, mult: int = 4, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        inner = dim * mult
        self.net = nnx.List([
            GEGLU(dim, inner, rngs=rngs, dtype=dtype, param_dtype=param_dtype),
            Identity(),
            linear(inner, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype),
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    """norm1 -> attn1 (self) -> +res; norm2 -> attn2 (cross on context) -> +res; norm3 -> ff -> +res."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, context_dim: int, attention_backend: str,
                 rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        attention = functools.partial(Attention, heads=heads, dim_head=dim_head, attention_backend=attention_backend,
                                      rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        norm = functools.partial(LayerNorm, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = norm(dim)
        self.attn1 = attention(dim)
        self.norm2 = norm(dim)
        self.attn2 = attention(dim, context_dim=context_dim)
        self.norm3 = norm(dim)
        self.ff = FeedForward(dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2D(nnx.Module):
    """GroupNorm -> proj_in -> transformer_blocks -> proj_out -> + input, on (B, H, W, C) features.

    `use_linear_projection` selects SD 2.x's Linear projections (applied to tokens) instead of
    SD 1.5's 1x1 convs; both act per pixel, only the weight shapes differ.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        num_heads: int,
        head_dim: int,
        context_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool = False,
        num_layers: int = 1,
        attention_backend: str = "auto",
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ):
        inner = num_heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_num_groups, in_channels, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype)
        if use_linear_projection:
            project = functools.partial(linear, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        else:
            project = functools.partial(conv2d, kernel_size=1, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj_in = project(in_channels, inner)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads=num_heads, dim_head=head_dim, context_dim=context_dim,
                                  attention_backend=attention_backend, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)
            for _ in range(num_layers)
        ])
        self.proj_out = project(inner, in_channels)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, _ = x.shape
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(tokens(h))
        else:
            h = tokens(self.proj_in(h))
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(batch, height, width, -1)
        else:
            h = self.proj_out(h.reshape(batch, height, width, -1))
        return h + x
