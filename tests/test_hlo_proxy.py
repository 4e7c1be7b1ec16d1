"""benchmarks/hlo_proxy.py on the tiny XPSR step: in a bf16 run every convolution and every matmul
outside attention stays bf16, and the only transposes are XLA attention's (the CPU proxies that the
accelerator issue's dtype / layout work is measured with)."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parent.parent
from benchmarks import hlo_proxy
from xpsr_jax.models import XPSRUNetConfig


def test_bf16_step_has_no_f32_convolutions_or_layout_transposes():
    config = XPSRUNetConfig(**hlo_proxy.TINY)
    lowered = hlo_proxy.lower_step(config, dtype=jnp.bfloat16, batch=2, latent=8)
    counts = hlo_proxy.op_counts(lowered.as_text())["ops"]
    assert counts["convolution bf16"] > 20 and "convolution f32" not in counts, counts
    # f32 dots are XLA attention's logits and outputs (preferred f32 accumulation): 2 per attention.
    attention_dots = counts.get("dot_general f32", 0)
    assert attention_dots % 2 == 0 and counts["dot_general bf16"] > attention_dots, counts
    # xla attention transposes its (b, h, q, d) output back once per call; nothing else does.
    assert counts.get("transpose", 0) == attention_dots // 2, counts


def test_op_counts_reads_types_and_converts():
    text = """
    %0 = stablehlo.convolution(%a, %b) dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f] : (tensor<1x8x8x4xbf16>, tensor<3x3x4x4xbf16>) -> tensor<1x8x8x4xbf16>
    %1 = stablehlo.convert %0 : (tensor<1x8x8x4xbf16>) -> tensor<1x8x8x4xf32>
    %2 = stablehlo.dot_general %1, %1, contracting_dims = [3] x [3] : (tensor<1x8x8x4xf32>, tensor<1x8x8x4xf32>) -> tensor<1x8x8x8x8xf32>
    %3 = stablehlo.transpose %2, dims = [0, 2, 1, 3, 4] : (tensor<1x8x8x8x8xf32>) -> tensor<1x8x8x8x8xf32>
    """
    result = hlo_proxy.op_counts(text)
    assert result["ops"] == {"convolution bf16": 1, "dot_general f32": 1, "transpose": 1}
    assert result["converts"] == {"bf16->f32": 1}
