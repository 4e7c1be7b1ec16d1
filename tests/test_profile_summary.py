"""benchmarks/profile_summary.py: a real jax.profiler trace of a small jitted program on the CPU,
summarised per op and per kind (the GPU check's profile row uses the same code on device traces)."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
from benchmarks import profile_summary
from xpsr_jax.models.attention import dot_product_attention
from xpsr_jax.models.layers import GroupNorm


def _block(x, kernel, weight, norm):
    """conv -> GroupNorm + SiLU -> projection -> attention -> transpose: one op of every kind."""
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.silu(norm(y))
    tokens = y.reshape(y.shape[0], -1, y.shape[-1]) @ weight
    heads = tokens.reshape(*tokens.shape[:2], 2, tokens.shape[-1] // 2)
    attended = dot_product_attention(heads, heads, heads, backend="xla")
    return jnp.transpose(attended, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    norm = GroupNorm(4, 16, epsilon=1e-5)
    args = (jnp.ones((2, 32, 32, 16)), jnp.ones((3, 3, 16, 16)) / 144, jnp.ones((16, 16)) / 16)
    compiled = jax.jit(lambda x, k, w: _block(x, k, w, norm)).lower(*args).compile()
    compiled(*args).block_until_ready()
    summary = profile_summary.profile_compiled(lambda: compiled(*args).block_until_ready(), compiled, str(out),
                                               "block", steps=2, step_ms=50.0)
    return summary, out


def test_every_kind_of_the_program_is_found(traced):
    summary, _ = traced
    kinds = summary["kinds"]
    for kind in ("attention", "convolution", "matmul", "normalization"):
        assert kinds[kind]["ms_per_step"] > 0, (kind, summary)
    assert kinds["collectives"]["ms_per_step"] == 0
    assert summary["module_match"] == "matched"
    assert summary["steps"] == 2 and summary["source"] == "CPU runtime op events"
    total = sum(entry["percent_of_device_time"] for entry in kinds.values())
    assert total == pytest.approx(100, abs=0.1)
    busy = summary["device_busy_ms_per_step"]
    assert sum(entry["ms_per_step"] for entry in kinds.values()) == pytest.approx(busy, rel=1e-3)
    assert kinds["convolution"]["percent_of_step"] == pytest.approx(
        100 * kinds["convolution"]["ms_per_step"] / 50.0, abs=0.02)
    ranked = [op["ms_per_step"] for op in summary["top_ops"]]
    assert ranked == sorted(ranked, reverse=True) and summary["top_ops"][0]["calls_per_step"] >= 1


def test_files_and_markdown(traced):
    summary, out = traced
    assert json.loads((out / "block_profile.json").read_text())["kinds"] == summary["kinds"]
    text = (out / "block_profile.md").read_text()
    assert text.startswith("### Profile: block") and "| attention |" in text and "| top op |" in text
    assert (out / "block.hlo.txt").read_text().startswith("HloModule")
    assert list((out / "block_trace").rglob("*.xplane.pb"))


def test_kind_rules_on_hand_written_hlo():
    text = """HloModule jit_step, is_scheduled=true

FileNames
1 "xpsr_jax/models/attention.py"
2 "xpsr_jax/models/layers.py"

FunctionNames
1 "_xla_attention"
2 "GroupNorm.__call__"
3 "Attention.__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=1 end_line=1 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=1 end_line=1 column=1 end_column=2}
3 {file_name_id=1 function_name_id=3 line=1 end_line=1 column=1 end_column=2}

StackFrames
1 {file_location_id=3 parent_frame_id=1}
2 {file_location_id=1 parent_frame_id=1}
3 {file_location_id=2 parent_frame_id=1}

%fused_softmax (p: f32[4,8]) -> f32[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %e = f32[4,8]{1,0} exponential(%p), metadata={op_name="exp" stack_frame_id=2}
}

%fused_norm (p: f32[4,8]) -> f32[4,8] {
  %p.1 = f32[4,8]{1,0} parameter(0)
  ROOT %r = f32[4,8]{1,0} rsqrt(%p.1), metadata={op_name="rsqrt" stack_frame_id=3}
}

%fused_copy (p: f32[4,8]) -> f32[8,4] {
  %p.2 = f32[4,8]{1,0} parameter(0)
  ROOT %t = f32[8,4]{0,1} transpose(%p.2), dimensions={1,0}
}

ENTRY %main (a: f32[4,8], b: f32[8,8]) -> (f32[4,8], f32[4,8]) {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,8]{1,0} parameter(1)
  %projection = f32[4,8]{1,0} custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={stack_frame_id=1}
  %softmax = f32[4,8]{1,0} fusion(%projection), kind=kLoop, calls=%fused_softmax
  %norm = f32[4,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_norm
  %copy = f32[8,4]{0,1} fusion(%a), kind=kLoop, calls=%fused_copy
  %conv = (bf16[1,4,4,8]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), custom_call_target="__cudnn$convForward"
  %fmha = (bf16[1,4,4,8]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), custom_call_target="__cudnn$fmhaSoftmax"
  %sum = f32[4,8]{1,0} all-reduce(%a), to_apply=%fused_norm
  ROOT %out = (f32[4,8]{1,0}, f32[4,8]{1,0}) tuple(%softmax, %norm)
}
"""
    module = profile_summary.parse_hlo(text)
    assert module.name == "jit_step"
    assert module.functions[2] == ["_xla_attention", "Attention.__call__"]
    kinds = {op: module.kind(op) for op in ("projection", "softmax", "norm", "copy", "conv", "fmha", "sum", "nope")}
    assert kinds == {"projection": "matmul", "softmax": "attention", "norm": "normalization",
                     "copy": "copies/transposes", "conv": "convolution", "fmha": "attention",
                     "sum": "collectives", "nope": "other"}
