"""The shared attention function: every backend agrees with PyTorch's scaled_dot_product_attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xpsr_jax.models import attention
from xpsr_jax.models.attention import blockwise_block_sizes, dot_product_attention, resolve_backend

torch = pytest.importorskip("torch")


def _torch_sdpa(q, k, v, is_causal=False):
    to_torch = lambda x: torch.from_numpy(np.array(x)).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(to_torch(q), to_torch(k), to_torch(v), is_causal=is_causal)
    return out.transpose(1, 2).numpy()


@pytest.mark.parametrize("backend,chunk", [("xla", None), ("chunked", None), ("chunked", 96), ("auto", None),
                                           ("blockwise", None)])
def test_backends_match_torch(backend, chunk):
    keys = jax.random.split(jax.random.key(0), 3)
    # 300 queries: chunk 96 leaves a remainder of 12; keys/values longer than the queries (cross-attention).
    q = jax.random.normal(keys[0], (2, 300, 3, 16))
    k = jax.random.normal(keys[1], (2, 77, 3, 16))
    v = jax.random.normal(keys[2], (2, 77, 3, 16))
    out = dot_product_attention(q, k, v, backend=backend, query_chunk_size=chunk)
    assert out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out), _torch_sdpa(q, k, v), atol=2e-6)


def test_causal_matches_torch():
    q = jax.random.normal(jax.random.key(1), (2, 77, 4, 8))
    for backend in ("xla", "chunked", "blockwise", "auto"):
        out = dot_product_attention(q, q, q, backend=backend, is_causal=True)
        np.testing.assert_allclose(np.asarray(out), _torch_sdpa(q, q, q, is_causal=True), atol=2e-6)


def test_bf16_keeps_float32_softmax():
    q = jax.random.normal(jax.random.key(2), (1, 64, 2, 16))
    exact = dot_product_attention(q, q, q, backend="xla")
    half = dot_product_attention(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16),
                                 backend="chunked", query_chunk_size=16)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(exact), atol=3e-2)


def test_backend_resolution_and_errors():
    q = jnp.zeros((1, 4, 1, 8))
    platform = jax.default_backend()
    expected = {"tpu": "xla", "gpu": "chunked"}.get(platform) or attention.cpu_auto_backend(4, 4)
    assert resolve_backend("auto", q, q) == expected
    assert resolve_backend("xla", q, q) == "xla"
    assert resolve_backend("blockwise", q, q) == "blockwise"
    with pytest.raises(ValueError, match="attention_backend='flash'.*auto"):
        resolve_backend("flash", q, q)


def test_cpu_auto_follows_the_crossover_table(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(attention, "_cudnn_applies", lambda query, value: False)
    for max_logits, backend in attention.CPU_AUTO_CROSSOVERS:
        tokens = int(min(max_logits, 4096 * 4096) ** 0.5)  # a self-attention shape inside the row
        q = jnp.zeros((2, tokens, 1, 8))
        assert attention.cpu_auto_backend(tokens, tokens) == backend
        assert resolve_backend("auto", q, q) == backend
    # Accelerator rules: TPU -> splash for long self-attention, else xla; GPU without cuDNN ->
    # chunked, else cuDNN.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_backend("auto", q, q) == "chunked"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_backend("auto", q, q) == ("splash" if tokens >= attention.TPU_SPLASH_MIN_TOKENS else "xla")
    assert resolve_backend("auto", q[:, :256], q[:, :256]) == "xla"
    monkeypatch.setattr(attention, "_cudnn_applies", lambda query, value: True)
    assert resolve_backend("auto", q, q) == "cudnn"


def test_blockwise_block_sizes_split_evenly():
    assert blockwise_block_sizes(2, 4, 2304, 2304) == (128, 768)  # 3 equal key blocks, no padding
    assert blockwise_block_sizes(2, 8, 4096, 4096) == (128, 512)
    assert blockwise_block_sizes(2, 4, 300, 77) == (104, 77)  # 3 query blocks; 77 keys in one block
    assert blockwise_block_sizes(1, 1, 40, 9) == (40, 9)


# (queries, keys, logits budget): the budget forces several key blocks, with padding when the
# lengths do not divide; 77 keys is the prompt cross-attention, 1 query block with odd sizes.
@pytest.mark.parametrize("q_len,k_len,budget", [(301, 301, 2 * 3 * 104 * 128), (300, 77, 1 << 20),
                                                (257, 1000, 2 * 3 * 88 * 256), (45, 45, 1 << 20)])
def test_blockwise_values_and_grads_match_xla(monkeypatch, q_len, k_len, budget):
    monkeypatch.setattr(attention, "BLOCKWISE_LOGITS_BLOCK_VALUES", budget)
    query_block, key_block = blockwise_block_sizes(2, 3, q_len, k_len)
    if budget < 1 << 20:
        assert k_len // key_block >= 2  # the online softmax really spans several key blocks
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (2, q_len, 3, 16)) * 2.0  # peaky softmax: the max matters
    k = jax.random.normal(keys[1], (2, k_len, 3, 16))
    v = jax.random.normal(keys[2], (2, k_len, 3, 16))
    weights = jax.random.normal(keys[3], (2, q_len, 3, 16))

    def output_and_grads(backend):  # one compilation: the output and its VJP with `weights`
        def run(q, k, v):
            attend = lambda q, k, v: dot_product_attention(q, k, v, backend=backend)  # noqa: E731
            out, vjp = jax.vjp(attend, q, k, v)
            return out, vjp(weights)
        return jax.jit(run)(q, k, v)

    out_xla, grads_xla = output_and_grads("xla")
    out_block, grads_block = output_and_grads("blockwise")
    np.testing.assert_allclose(np.asarray(out_block), np.asarray(out_xla), atol=5e-6)
    for name, exact, ours in zip("qkv", grads_xla, grads_block):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(exact), atol=2e-5,
                                   err_msg=f"d/d{name}")


def test_blockwise_bf16_keeps_float32_softmax(monkeypatch):
    monkeypatch.setattr(attention, "BLOCKWISE_LOGITS_BLOCK_VALUES", 2 * 2 * 64 * 128)
    q = jax.random.normal(jax.random.key(4), (2, 200, 2, 16))
    exact = dot_product_attention(q, q, q, backend="xla")
    half = dot_product_attention(*(q.astype(jnp.bfloat16),) * 3, backend="blockwise")
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(exact), atol=3e-2)
