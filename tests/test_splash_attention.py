"""The "splash" attention backend (Pallas TPU splash_attention) against the xla backend, run here
in Pallas interpret mode: forward and gradients, fp32 and bf16, SD's head dims 40 / 80 / 160
(padded to the 128 lanes), sequences that fill the kernel's blocks and sequences that are padded
(the padded keys must get no weight), and the shard_map over a mesh of several devices.

Tolerances: fp32 2e-6 (outputs) and 1e-5 relative to the largest gradient; bf16 2e-2 and 2e-2
(the kernel and xla round the probabilities to bf16 at different points).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xpsr_jax.models.attention import dot_product_attention, resolve_backend, splash_block

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = {jnp.float32: (2e-6, 1e-5), jnp.bfloat16: (2e-2, 2e-2)}


def inputs(batch, q_len, k_len, heads, dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, dim)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, k_len, heads, dim)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, k_len, heads, dim)).astype(dtype)
    weights = jax.random.normal(keys[3], (batch, q_len, heads, dim))
    return q, k, v, weights


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dim", [40, 80, 160])
@pytest.mark.parametrize("q_len, k_len", [(256, 256), (200, 200), (300, 77)], ids=["no-pad", "pad", "cross-pad"])
def test_splash_matches_xla_forward_and_gradients(dtype, dim, q_len, k_len):
    assert (splash_block(256), splash_block(200), splash_block(300)) == (256, 256, 384)
    q, k, v, weights = inputs(2, q_len, k_len, 2, dim, dtype)
    output_tolerance, gradient_tolerance = TOLERANCE[dtype]

    def loss(backend):
        return lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, backend=backend).astype(jnp.float32) * weights)

    expected = dot_product_attention(q, k, v, backend="xla")
    got = dot_product_attention(q, k, v, backend="splash")
    assert got.shape == expected.shape and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               atol=output_tolerance * 10 if dtype == jnp.bfloat16 else output_tolerance,
                               rtol=output_tolerance)
    expected_grads = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    grads = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
    for name, want, have in zip("qkv", expected_grads, grads):
        want, have = np.asarray(want, np.float32), np.asarray(have, np.float32)
        scale = np.abs(want).max()
        assert np.abs(want - have).max() <= gradient_tolerance * scale, (name, np.abs(want - have).max(), scale)


def test_padded_keys_get_no_weight():
    """Keys past the real length must not count: a padded key with a huge value would show."""
    q, k, v, _ = inputs(1, 100, 100, 1, 40, jnp.float32)
    out = dot_product_attention(q, k, v, backend="splash")
    shorter = dot_product_attention(q, k[:, :60], v[:, :60], backend="splash")
    np.testing.assert_allclose(np.asarray(shorter), np.asarray(dot_product_attention(q, k[:, :60], v[:, :60],
                                                                                     backend="xla")), atol=2e-6)
    assert not np.allclose(np.asarray(out), np.asarray(shorter))


def test_auto_picks_splash_on_tpu_only_for_long_self_attention(monkeypatch):
    from xpsr_jax.models import attention

    monkeypatch.setattr(attention, "target_platform", lambda: "tpu")
    long = jnp.zeros((1, attention.TPU_SPLASH_MIN_TOKENS, 1, 8))
    short = jnp.zeros((1, attention.TPU_SPLASH_MIN_TOKENS - 1, 1, 8))
    context = jnp.zeros((1, 77, 1, 8))
    assert resolve_backend("auto", long, long) == "splash"
    assert resolve_backend("auto", short, short) == "xla"
    assert resolve_backend("auto", long, context) == "xla"  # cross-attention to the 77 prompt tokens


SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from xpsr_jax.models.attention import dot_product_attention
mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "fsdp"))
keys = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(key, (4, 200, 2, 40)) for key in keys)
with jax.set_mesh(mesh):
    sharded = jax.device_put((q, k, v), NamedSharding(mesh, P(("data", "fsdp"))))
    splash = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, backend="splash"))
    text = splash.lower(*sharded).as_text()
    out = splash(*sharded)
expected = dot_product_attention(q, k, v, backend="xla")
assert "shard_map" in text or "sdy.manual_computation" in text, "no shard_map in the program"
np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-6)
print("ok", out.sharding.spec)
"""


def test_splash_runs_per_device_under_shard_map_over_the_mesh():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]
