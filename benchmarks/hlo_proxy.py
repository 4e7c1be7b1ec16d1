"""CPU proxies for accelerator speed: what the XPSR denoising step lowers to, without a GPU.

    python -m benchmarks.hlo_proxy                       # SD 1.5 size, 512 px, CFG batch 2, bf16
    python -m benchmarks.hlo_proxy --tiny --json out.json

Lowers ControlNet + UNet on the CFG batch (abstract weights: nothing is allocated, nothing compiles)
and counts, in the StableHLO that every backend starts from: convolutions and dot_generals by
element type (in a bf16 run, anything in f32 is compute left on the slow path), converts by
(from -> to) type, transposes, reduces and custom calls; plus the FLOPs and unfused bytes of XLA's
cost analysis. Those are the figures an optimization of the step's dtype or layout changes before
any device time is spent; the attention backend is "xla" here (cuDNN needs a GPU to lower).
"""

from __future__ import annotations

import argparse
import collections
import json
import re

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import TINY_UNET
from xpsr_jax.models import XPSRControlNet, XPSRUNet, XPSRUNetConfig

TINY = TINY_UNET
_OP = re.compile(r"=\s*\"?stablehlo\.([a-z_]+)\"?[ (].*?->\s*(.*)$")
_ELEMENT = re.compile(r"tensor<(?:[\d?]+x)*([a-z]+\d*)>")


def lower_step(config: XPSRUNetConfig, *, dtype, batch: int, latent: int, backend: str = "xla"):
    """The jitted step lowered on abstract (shape-only) weights and inputs."""
    kwargs = dict(dtype=dtype, param_dtype=dtype, attention_backend=backend)
    unet = nnx.eval_shape(lambda: XPSRUNet(config, rngs=nnx.Rngs(0), **kwargs))
    controlnet = nnx.eval_shape(lambda: XPSRControlNet.from_unet(unet, rngs=nnx.Rngs(0), load_weights_from_unet=False,
                                                                 **kwargs)[0])
    unet_def, unet_state = nnx.split(unet)
    cn_def, cn_state = nnx.split(controlnet)

    def step(unet_state, cn_state, sample, timesteps, high, low, cond):
        control = nnx.merge(cn_def, cn_state)(sample, timesteps, high, low, cond)
        return nnx.merge(unet_def, unet_state)(sample, timesteps, high, low, control.down_block_res_samples,
                                              control.mid_block_res_sample)

    shape = jax.ShapeDtypeStruct
    context = config.cross_attention_dim
    args = (unet_state, cn_state, shape((batch, latent, latent, 4), dtype), shape((batch,), jnp.int32),
            shape((batch, 77, context), dtype), shape((batch, 77, context), dtype),
            shape((batch, 8 * latent, 8 * latent, 3), dtype))
    return jax.jit(step).lower(*args)


def op_counts(stablehlo: str) -> dict:
    """Counts of the ops that matter for speed, by element type (result type of each op)."""
    counts = collections.Counter()
    converts = collections.Counter()
    for line in stablehlo.splitlines():
        match = _OP.search(line)
        if not match:
            continue
        op, types = match.groups()
        elements = _ELEMENT.findall(types)
        result = elements[-1] if elements else "?"
        if op == "convert":
            source = _ELEMENT.findall(line.split("->")[0].split(":")[-1])
            converts[f"{source[-1] if source else '?'}->{result}"] += 1
        elif op in ("convolution", "dot_general"):
            counts[f"{op} {result}"] += 1
        elif op in ("transpose", "reduce", "custom_call", "while", "exponential", "rsqrt", "logistic"):
            counts[op] += 1
    return {"ops": dict(sorted(counts.items())), "converts": dict(sorted(converts.items()))}


def proxy(config, *, dtype, batch, latent, backend="xla") -> dict:
    lowered = lower_step(config, dtype=dtype, batch=batch, latent=latent, backend=backend)
    result = op_counts(lowered.as_text())
    cost = lowered.cost_analysis() or {}
    if isinstance(cost, list):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    result["gflops"] = round(float(cost.get("flops", 0.0)) / 1e9, 2)
    result["unfused_gbytes"] = round(float(cost.get("bytes accessed", 0.0)) / 1e9, 3)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny widths instead of SD 1.5")
    parser.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    config = XPSRUNetConfig(**(TINY if args.tiny else {}))
    result = proxy(config, dtype=jnp.dtype(args.dtype), batch=args.batch, latent=args.latent)
    print(f"XPSR step ({'tiny' if args.tiny else 'SD 1.5 size'}), batch {args.batch}, latent {args.latent}, "
          f"{args.dtype}: {result['gflops']} GFLOP, {result['unfused_gbytes']} GB unfused bytes")
    for name, count in result["ops"].items():
        print(f"  {name:28s} {count}")
    for name, count in result["converts"].items():
        print(f"  convert {name:20s} {count}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
