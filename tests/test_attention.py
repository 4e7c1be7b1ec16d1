"""The shared attention function: every backend agrees with PyTorch's scaled_dot_product_attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xpsr_jax.models.attention import dot_product_attention, resolve_backend

torch = pytest.importorskip("torch")


def _torch_sdpa(q, k, v, is_causal=False):
    to_torch = lambda x: torch.from_numpy(np.array(x)).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(to_torch(q), to_torch(k), to_torch(v), is_causal=is_causal)
    return out.transpose(1, 2).numpy()


@pytest.mark.parametrize("backend,chunk", [("xla", None), ("chunked", None), ("chunked", 96), ("auto", None)])
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
    for backend in ("xla", "chunked", "auto"):
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
    assert resolve_backend("auto", q, q) == ("chunked" if jax.default_backend() != "tpu" else "xla")
    assert resolve_backend("xla", q, q) == "xla"
    with pytest.raises(ValueError, match="attention_backend='flash'.*auto"):
        resolve_backend("flash", q, q)
