"""The one attention function every attention layer calls, and diffusers' `Attention` layer.

Backends (`attention_backend` in every model config):
  - "xla":       plain softmax(QK^T)V, fully materialised logits.
  - "cudnn":     `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention on
                 NVIDIA GPUs; needs bf16/fp16 inputs and a head dim that is a multiple of 8
                 (<= 128, or <= 256 from Hopper on).
  - "chunked":   memory-efficient: queries processed in chunks of `query_chunk_size`, each chunk
                 rematerialised in the backward pass, so peak memory is O(chunk x keys) instead
                 of O(queries x keys).
  - "blockwise": flash-style: query blocks, and inside each an online softmax over key blocks
                 (running max, running sum, rescaled accumulator), so the logits block of
                 (batch x heads x query block x key block) stays in cache; block sizes chosen
                 from the shape (`blockwise_block_sizes`). Each query block is rematerialised
                 in the backward pass. On CPU this is what PyTorch's SDPA does.
  - "splash":    the Pallas TPU kernel `splash_attention` (flash-style, never materialises the
                 logits), under `shard_map` over the context mesh's axes when one is set
                 (`jax.set_mesh`: Mosaic kernels are not partitioned automatically). SD's head dims
                 (40 / 80 / 160) are zero-padded to the 128 lanes, sequences to the kernel's block
                 (padded keys masked by segment ids). Off TPU it runs in Pallas interpret mode
                 (slow; for tests).
  - "auto":      cudnn where it applies (GPU + half precision + supported head dim); on TPU
                 splash for self-attention of at least `TPU_SPLASH_MIN_TOKENS` tokens, else xla;
                 on CPU by shape, from the measured crossovers in `CPU_AUTO_CROSSOVERS`; chunked on
                 other GPUs and GPU fp32. The platform is that of the mesh being compiled for
                 (a compile-only TPU mesh on a CPU host counts as TPU).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu.splash_attention import (
    BlockSizes,
    FullMask,
    MultiHeadMask,
    SegmentIds,
    make_splash_mha,
)

from xpsr_jax.models.layers import linear

ATTENTION_BACKENDS = ("auto", "xla", "cudnn", "chunked", "blockwise", "splash")
# Query chunk of the "chunked" backend. Measured on a 2-core CPU, 2 x 8 heads x 40 dims:
# 4096 tokens take 652 ms with 128-query chunks, 1055 ms with 256+, 1854 ms unchunked (PyTorch
# SDPA 313 ms); on GPUs chunks only bound memory, so they stay large.
CPU_QUERY_CHUNK_SIZE = 128
ACCELERATOR_QUERY_CHUNK_SIZE = 1024

# "blockwise": queries per block, and the logits-block budget (batch x heads x query block x
# key block fp32 values) the key block is sized to. A prototype sweep on the 2-core CPU (AMD
# EPYC, 512 KiB L2 per core, 32 MiB L3), batch 2, ms for (query, key) blocks: 4 heads x 8 dims,
# 2304 tokens: (128, 512) 118, (128, 1024) 146, (256, 512) 300, (64, 512) 284; 4096 tokens:
# (128, 1024) 296, (256, 512) 232, (64, 512) 667; 8 heads x 40 dims, 4096 tokens: (128, 512)
# 2456, (256, 256) 2105, (128, 1024) 3499, (64, 512) 3334. Blocks of about 1 M values (4 MiB,
# in L3 next to the other core's) are the sweet spot; much smaller ones pay loop overhead.
BLOCKWISE_QUERY_BLOCK = 128
BLOCKWISE_LOGITS_BLOCK_VALUES = 1 << 20
BLOCKWISE_MIN_KEY_BLOCK = 128

# What "auto" runs on CPU, by logits per (batch, head) = queries x keys: the first row whose
# bound is >= the shape's. Measured with `python -m benchmarks.attention --heads 4 --head-dim
# {8,16} --tokens ... [--kv-tokens 77] --repeats 9` on the 2-core CPU (shared, load 7-9), fp32,
# batch 2; ms, medians of round-robin rounds, xla / chunked / blockwise (torch SDPA):
#   4 x 8,  64 x 64:       0.30 / 0.26 / 0.22  (19.6, overhead-bound)
#   4 x 8,  256 x 77:      1.03 / 0.98 / 1.57  (16.0)
#   4 x 8,  256 x 256:     1.84 / 2.32 / 2.40  (6.7)
#   4 x 16, 256 x 256:     4.64 / 3.07 / 3.17  (7.3)
#   4 x 8,  576 x 576:     448.6 / 44.0 / 16.1 (38.7)
#   4 x 8,  1024 x 77:     50.3 / 3.42 / 1.96  (26.9)
#   4 x 8,  1024 x 1024:   60.1 / 81.1 / 36.0  (79.1)
#   4 x 16, 1024 x 1024:   71.7 / 130.4 / 46.6 (56.1)
#   4 x 8,  2304 x 2304:   949.6 / 379.8 / 104.7 (345.6)
#   4 x 8,  4096 x 77:     370.1 / 38.4 / 15.4 (32.3)
#   4 x 8,  4096 x 4096:   4963 / 2292 / 664   (1728)
# Up to 256 x 256 the three are within noise and xla has no loop (nor remat in the backward
# pass); from 576 x 576 and 1024 x 77 on, blockwise is the fastest at every shape measured.
CPU_AUTO_CROSSOVERS: tuple[tuple[float, str], ...] = (
    (256 * 256, "xla"),
    (float("inf"), "blockwise"),
)


# "splash": sequences are padded to blocks of up to SPLASH_MAX_BLOCK tokens, head dims to the lanes.
SPLASH_LANES = 128
SPLASH_MAX_BLOCK = 512
# "auto" on TPU: splash for self-attention from this many tokens. Compiled for v5e (fwd + bwd, bf16,
# 2 images x 8 heads per chip; `python -m benchmarks.tpu_pods --rows attention`), XLA's attention
# needs no scratch up to 1024 tokens (it fuses), 486 MiB at 2304 (48x48 latents), 1,536 MiB at
# 4096; splash under 2 MiB at every length. No TPU was at hand to time them: the switch is where
# XLA starts to hold the logits.
TPU_SPLASH_MIN_TOKENS = 2048


def cpu_auto_backend(q_len: int, k_len: int) -> str:
    """The backend "auto" picks on CPU for this shape (`CPU_AUTO_CROSSOVERS`)."""
    logits = q_len * k_len
    return next(backend for bound, backend in CPU_AUTO_CROSSOVERS if logits <= bound)


def validate_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={backend!r} is not one of {ATTENTION_BACKENDS}")
    return backend


def _cudnn_applies(query: jax.Array, value: jax.Array) -> bool:
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)  # only CUDA devices have one
    if device.platform != "gpu" or capability is None:
        return False
    if query.dtype not in (jnp.bfloat16, jnp.float16) or value.dtype != query.dtype:
        return False
    head_dim = query.shape[-1]
    max_head_dim = 256 if float(capability) >= 9.0 else 128
    return head_dim % 8 == 0 and head_dim <= max_head_dim and value.shape[-1] == head_dim


def target_platform() -> str:
    """The platform the current computation is for: the context mesh's (`jax.set_mesh`), which may
    be compile-only TPU devices on a CPU host, else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve_backend(backend: str, query: jax.Array, value: jax.Array) -> str:
    """The concrete backend "auto" stands for, given the inputs and the target platform."""
    validate_backend(backend)
    if backend != "auto":
        return backend
    if _cudnn_applies(query, value):
        return "cudnn"
    platform = target_platform()
    if platform == "cpu":
        return cpu_auto_backend(query.shape[1], value.shape[1])
    if platform == "tpu":
        return "splash" if min(query.shape[1], value.shape[1]) >= TPU_SPLASH_MIN_TOKENS else "xla"
    return "chunked"


def _xla_attention(query, key, value, scale, is_causal):
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
    if is_causal:
        q_len, k_len = logits.shape[-2:]
        causal = jnp.tril(jnp.ones((q_len, k_len), dtype=bool), k=k_len - q_len)
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, value, preferred_element_type=jnp.float32).astype(query.dtype)


def _chunked_attention(query, key, value, scale, chunk_size):
    batch, q_len, heads, dim = query.shape
    chunk_size = min(chunk_size, q_len)
    attend = jax.checkpoint(lambda q: _xla_attention(q, key, value, scale, False))
    num_full = q_len // chunk_size
    full = query[:, : num_full * chunk_size].reshape(batch, num_full, chunk_size, heads, dim)
    out = jax.lax.map(attend, jnp.moveaxis(full, 1, 0))
    out = jnp.moveaxis(out, 0, 1).reshape(batch, num_full * chunk_size, heads, value.shape[-1])
    if num_full * chunk_size < q_len:
        out = jnp.concatenate([out, attend(query[:, num_full * chunk_size:])], axis=1)
    return out


def blockwise_block_sizes(batch: int, heads: int, q_len: int, k_len: int) -> tuple[int, int]:
    """(query block, key block) for the blockwise backend.

    Queries go in blocks of about `BLOCKWISE_QUERY_BLOCK`; keys in the fewest blocks whose
    logits block (batch x heads x query block x key block) fits `BLOCKWISE_LOGITS_BLOCK_VALUES`
    (at least `BLOCKWISE_MIN_KEY_BLOCK` keys). Both lengths are split into equal blocks rounded
    up to a multiple of 8, so padding stays below 8 per block (2304 keys: 3 x 768, not
    3 x 1024).
    """
    query_block = _even_block(q_len, BLOCKWISE_QUERY_BLOCK)
    fitting = BLOCKWISE_LOGITS_BLOCK_VALUES // (batch * heads * query_block)
    return query_block, _even_block(k_len, max(BLOCKWISE_MIN_KEY_BLOCK, fitting))


def _even_block(length: int, max_block: int) -> int:
    """The block size that splits `length` into ceil(length / max_block) near-equal blocks."""
    if length <= max_block:
        return length
    num_blocks = -(-length // max_block)
    return -(-(-(-length // num_blocks)) // 8) * 8


def _blockwise_attention(query, key, value, scale, query_block, key_block):
    batch, q_len, heads, _ = query.shape
    k_len, v_dim = key.shape[1], value.shape[-1]
    num_q, num_k = -(-q_len // query_block), -(-k_len // key_block)
    q_pad, k_pad = num_q * query_block - q_len, num_k * key_block - k_len

    def blocks(x, length_pad, block):  # (B, L, H, D) -> (num blocks, B, H, block, D)
        x = jnp.pad(x, ((0, 0), (0, length_pad), (0, 0), (0, 0))) if length_pad else x
        x = x.reshape(batch, -1, block, heads, x.shape[-1])
        return jnp.transpose(x, (1, 0, 3, 2, 4))

    if query.dtype == jnp.float32:
        query, scale = query * scale, 1.0  # one multiply per query instead of per logit
    query_blocks = blocks(query, q_pad, query_block)
    key_blocks, value_blocks = blocks(key, k_pad, key_block), blocks(value, k_pad, key_block)
    key_valid = (jnp.arange(num_k * key_block) < k_len).reshape(num_k, key_block)

    def attend_query_block(q_block):  # (B, H, query block, D) -> (B, H, query block, Dv)
        def key_step(carry, block):
            running_max, running_sum, acc = carry
            k_block, v_block, valid = block
            logits = jnp.einsum("bhqd,bhkd->bhqk", q_block, k_block,
                                preferred_element_type=jnp.float32)
            logits = logits * scale if scale != 1.0 else logits
            if k_pad:  # only the last block has padding, and never only padding
                logits = jnp.where(valid, logits, -jnp.inf)
            # The output does not depend on the shift, so its gradient is exactly zero: stop it.
            new_max = jax.lax.stop_gradient(jnp.maximum(running_max, logits.max(axis=-1)))
            probs = jnp.exp(logits - new_max[..., None])
            rescale = jnp.exp(running_max - new_max)
            running_sum = running_sum * rescale + probs.sum(axis=-1)
            acc = acc * rescale[..., None] + jnp.einsum(
                "bhqk,bhkd->bhqd", probs.astype(v_block.dtype), v_block,
                preferred_element_type=jnp.float32)
            return (new_max, running_sum, acc), None

        stats_shape = q_block.shape[:-1]
        init = (jnp.full(stats_shape, -jnp.inf, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
                jnp.zeros((*stats_shape, v_dim), jnp.float32))
        if num_k == 1:  # one key block: no loop
            (_, total, acc), _ = key_step(init, (key_blocks[0], value_blocks[0], key_valid[0]))
        else:
            (_, total, acc), _ = jax.lax.scan(key_step, init, (key_blocks, value_blocks, key_valid))
        return (acc / total[..., None]).astype(query.dtype)

    out = jax.lax.map(jax.checkpoint(attend_query_block), query_blocks)  # (nq, B, H, qb, Dv)
    out = jnp.transpose(out, (1, 0, 3, 2, 4)).reshape(batch, num_q * query_block, heads, v_dim)
    return out[:, :q_len] if q_pad else out


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def splash_block(length: int) -> int:
    """The splash kernel's block along a sequence of `length`: a multiple of the 128 lanes, at
    most SPLASH_MAX_BLOCK; the sequence is padded to a multiple of it."""
    return min(SPLASH_MAX_BLOCK, _round_up(length, SPLASH_LANES))


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, k_len: int, interpret: bool):
    """The splash kernel of one example (heads, padded lengths); built once per shape (its mask
    tables are computed in numpy at trace time)."""
    block_q, block_kv = splash_block(q_len), splash_block(k_len)
    blocks = BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
                        block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)
    mask = MultiHeadMask([FullMask((q_len, k_len)) for _ in range(heads)])
    return make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks, interpret=interpret)


def _splash_local(query, key, value, scale, interpret):
    """Splash attention on one device's examples (B, L, H, D) -> (B, Lq, H, D)."""
    batch, q_len, heads, dim = query.shape
    k_len = key.shape[1]
    lanes = _round_up(dim, SPLASH_LANES)
    q_pad = _round_up(q_len, splash_block(q_len)) - q_len
    k_pad = _round_up(k_len, splash_block(k_len)) - k_len

    def layout(x, length_pad):  # (B, L, H, D) -> (B, H, L + pad, lanes), zero padded
        x = jnp.pad(x, ((0, 0), (0, length_pad), (0, 0), (0, lanes - dim)))
        return jnp.transpose(x, (0, 2, 1, 3))

    # The kernel does not scale the logits: scale the queries (before the cast, as xla does).
    q = layout((query.astype(jnp.float32) * scale).astype(query.dtype), q_pad)
    k, v = layout(key, k_pad), layout(value, k_pad)
    kernel = _splash_kernel(heads, q_len + q_pad, k_len + k_pad, interpret)
    # Padded keys are in segment 0, every query in segment 1: they get no weight.
    segments = SegmentIds(q=jnp.ones((q_len + q_pad,), jnp.int32),
                          kv=(jnp.arange(k_len + k_pad) < k_len).astype(jnp.int32))
    out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=segments))(q, k, v)
    return jnp.transpose(out[:, :, :q_len, :dim], (0, 2, 1, 3)).astype(query.dtype)


def _splash_attention(query, key, value, scale):
    """Splash attention over the context mesh: each device runs the kernel on its own examples
    (shard_map over every mesh axis on the batch); xla where the batch does not split evenly (a
    tiled sampler's tile batch)."""
    interpret = target_platform() != "tpu"
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _splash_local(query, key, value, scale, interpret)
    if query.shape[0] % mesh.size:
        return _xla_attention(query, key, value, scale, False)
    spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    local = functools.partial(_splash_local, scale=scale, interpret=interpret)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        query, key, value)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    backend: str = "auto",
    is_causal: bool = False,
    scale: float | None = None,
    query_chunk_size: int | None = None,
) -> jax.Array:
    """Multi-head attention on (batch, length, heads, head_dim) arrays; returns the query's shape.

    `query_chunk_size` (chunked backend) defaults to 128 on CPU and 1024 on accelerators; the
    blockwise backend sizes its blocks from the shape (`blockwise_block_sizes`). Causal
    attention (CLIP's 77 tokens) always runs as xla or cudnn.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    backend = resolve_backend(backend, query, value)
    if backend in ("chunked", "blockwise", "splash") and is_causal:
        backend = "xla"  # causal attention here is CLIP's 77 tokens: nothing to save
    if backend == "cudnn":
        return jax.nn.dot_product_attention(
            query, key, value, scale=scale, is_causal=is_causal, implementation="cudnn"
        )
    if backend == "chunked":
        if query_chunk_size is None:
            on_cpu = jax.default_backend() == "cpu"
            query_chunk_size = CPU_QUERY_CHUNK_SIZE if on_cpu else ACCELERATOR_QUERY_CHUNK_SIZE
        return _chunked_attention(query, key, value, scale, query_chunk_size)
    if backend == "splash":
        return _splash_attention(query, key, value, scale)
    if backend == "blockwise":
        batch, q_len, heads, _ = query.shape
        query_block, key_block = blockwise_block_sizes(batch, heads, q_len, key.shape[1])
        return _blockwise_attention(query, key, value, scale, query_block, key_block)
    return _xla_attention(query, key, value, scale, is_causal)


class Attention(nnx.Module):
    """diffusers' `Attention` (to_q / to_k / to_v / to_out.0) on token sequences (B, L, C).

    `context` defaults to the input (self-attention). Heads x head_dim may differ from the
    query width, as in diffusers.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = True,
        attention_backend: str = "auto",
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ):
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        dense = functools.partial(linear, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.heads = heads
        self.attention_backend = validate_backend(attention_backend)
        self.to_q = dense(query_dim, inner, use_bias=qkv_bias)
        self.to_k = dense(context_dim, inner, use_bias=qkv_bias)
        self.to_v = dense(context_dim, inner, use_bias=qkv_bias)
        self.to_out = nnx.List([dense(inner, query_dim, use_bias=out_bias)])

    def __call__(self, hidden_states: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = hidden_states if context is None else context
        split = lambda x: x.reshape(x.shape[0], x.shape[1], self.heads, -1)  # noqa: E731
        out = dot_product_attention(
            split(self.to_q(hidden_states)),
            split(self.to_k(context)),
            split(self.to_v(context)),
            backend=self.attention_backend,
        )
        return self.to_out[0](out.reshape(out.shape[0], out.shape[1], -1))
