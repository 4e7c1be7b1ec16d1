"""UNet forward speed, xpsr-jax vs diffusers (PyTorch), at SD 1.5 size with random weights.

    python -m benchmarks.unet_speed --tiny                       # CPU smoke run
    python -m benchmarks.unet_speed --dtype bfloat16 --batch 2   # GPU: the XPSR CFG batch at 512 px

Prints compile time and median milliseconds per forward for each JAX attention backend and for
diffusers' UNet2DConditionModel (SDPA attention) in the same dtype when torch and diffusers
are installed.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import TINY_UNET, median_ms, torch_median_ms
from xpsr_jax.models.unet import UNet2DCondition, UNet2DConditionConfig

TINY = TINY_UNET




def bench_jax(config, backend, dtype, batch, latent, tokens, repeats):
    model = UNet2DCondition(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32,
                            attention_backend=backend)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, sample, timesteps, context):
        return nnx.merge(graphdef, state)(sample, timesteps, context)

    sample = jnp.ones((batch, latent, latent, config.in_channels), dtype)
    timesteps = jnp.full((batch,), 500, jnp.int32)
    context = jnp.ones((batch, tokens, config.cross_attention_dim), dtype)
    start = time.perf_counter()
    compiled = forward.lower(state, sample, timesteps, context).compile()
    compile_s = time.perf_counter() - start
    compiled(state, sample, timesteps, context).block_until_ready()
    ms = median_ms(lambda: compiled(state, sample, timesteps, context).block_until_ready(), repeats)
    return compile_s, ms


def bench_torch(config, dtype_name, batch, latent, tokens, repeats):
    try:
        import diffusers
        import torch
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    keys = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    model = diffusers.UNet2DConditionModel(**keys).to(device, dtype).eval()
    sample = torch.ones(batch, config.in_channels, latent, latent, device=device, dtype=dtype)
    timesteps = torch.full((batch,), 500, device=device)
    context = torch.ones(batch, tokens, config.cross_attention_dim, device=device, dtype=dtype)

    return torch_median_ms(lambda: model(sample, timesteps, context), repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny widths for a CPU smoke run")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backends", nargs="+", default=["auto", "xla", "chunked"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    config = UNet2DConditionConfig(**(TINY if args.tiny else {}))
    latent = 16 if args.tiny and args.latent == 64 else args.latent
    dtype = jnp.dtype(args.dtype)
    print(f"device: {jax.devices()[0].device_kind}; UNet {'tiny' if args.tiny else 'SD 1.5'}, batch {args.batch}, "
          f"latent {latent}x{latent}, {args.dtype}")
    for backend in args.backends:
        try:
            compile_s, ms = bench_jax(config, backend, dtype, args.batch, latent, 77, args.repeats)
            print(f"  jax  attention={backend:8s} compile {compile_s:6.1f} s, forward {ms:8.2f} ms")
        except Exception as error:  # a backend may not apply on this platform / dtype
            print(f"  jax  attention={backend:8s} failed: {type(error).__name__}: {str(error)[:200]}")
    torch_ms = bench_torch(config, args.dtype, args.batch, latent, 77, args.repeats)
    if torch_ms is not None:
        print(f"  torch diffusers (SDPA)          forward {torch_ms:8.2f} ms")


if __name__ == "__main__":
    main()
