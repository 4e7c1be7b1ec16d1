"""One XPSR denoising step (ControlNet + UNet on the CFG-doubled batch), xpsr-jax vs the PyTorch reference.

    python -m benchmarks.xpsr_step_speed --tiny                  # CPU smoke run
    python -m benchmarks.xpsr_step_speed --dtype bfloat16        # GPU: SD 1.5 size, 512 px, batch 2

Weights are constants (speed does not depend on their values); the PyTorch side is
tests/torch_reference (official layer names, diffusers layers with SDPA attention) when torch
and diffusers are installed. Prints compile time and median ms per step.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import TINY_UNET, median_ms, torch_compiled, torch_median_ms
from xpsr_jax.models import XPSRControlNet, XPSRUNet, XPSRUNetConfig
from xpsr_jax.weights.pretrained import eval_shape_model

TINY = TINY_UNET


def constant_model(build, dtype):
    """(graphdef, state) of `build()` with every parameter 0.01, built abstractly (no random init)."""
    abstract = eval_shape_model(build)
    graphdef, state = nnx.split(abstract)
    state = jax.tree.map(lambda leaf: jnp.full(leaf.shape, 0.01, dtype), state)
    return graphdef, state


def build_step(config, *, dtype, backend, batch, latent):
    """(compile seconds, a no-argument callable running one compiled step)."""
    kwargs = dict(dtype=dtype, param_dtype=dtype, attention_backend=backend)
    unet_def, unet_state = constant_model(lambda: XPSRUNet(config, rngs=nnx.Rngs(0), **kwargs), dtype)
    unet = nnx.merge(unet_def, unet_state)
    cn_def, cn_state = constant_model(
        lambda: XPSRControlNet.from_unet(unet, rngs=nnx.Rngs(0), load_weights_from_unet=False, **kwargs)[0], dtype)

    @jax.jit
    def step(unet_state, cn_state, sample, timesteps, high, low, cond):
        control = nnx.merge(cn_def, cn_state)(sample, timesteps, high, low, cond)
        return nnx.merge(unet_def, unet_state)(sample, timesteps, high, low, control.down_block_res_samples,
                                              control.mid_block_res_sample)

    args = (unet_state, cn_state, jnp.ones((batch, latent, latent, 4), dtype), jnp.full((batch,), 500),
            jnp.ones((batch, 77, config.cross_attention_dim), dtype),
            jnp.ones((batch, 77, config.cross_attention_dim), dtype),
            jnp.full((batch, 8 * latent, 8 * latent, 3), 0.5, dtype))
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - start
    compiled(*args).block_until_ready()
    return compile_s, lambda: compiled(*args).block_until_ready()


def bench_jax(config, *, dtype, backend, batch, latent, repeats):
    compile_s, run = build_step(config, dtype=dtype, backend=backend, batch=batch, latent=latent)
    return compile_s, median_ms(run, repeats)


def torch_reference():
    """(torch, XPSRControlNetTorch, XPSRUNetTorch) from tests/torch_reference (needs diffusers)."""
    import torch

    from tests.torch_reference import XPSRControlNetTorch, XPSRUNetTorch
    return torch, XPSRControlNetTorch, XPSRUNetTorch


def torch_unet_keys(config) -> dict:
    """The diffusers-style config dict of an XPSRUNetConfig for the PyTorch reference."""
    keys = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in keys.items() if k != "sample_size"}


def build_torch_step(config, *, dtype_name, batch, latent, compile_backend=None):
    """A no-argument callable running one reference step (no autograd); `compile_backend` (e.g.
    "inductor") wraps both networks in torch.compile, which compiles on the first call."""
    torch, XPSRControlNetTorch, XPSRUNetTorch = torch_reference()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    unet = XPSRUNetTorch(torch_unet_keys(config)).to(device, dtype).eval()
    controlnet = XPSRControlNetTorch.from_unet(unet, load_weights_from_unet=False).to(device, dtype).eval()
    unet_call, controlnet_call = torch_compiled(unet, compile_backend), torch_compiled(controlnet, compile_backend)
    sample = torch.ones(batch, 4, latent, latent, device=device, dtype=dtype)
    timesteps = torch.full((batch,), 500, device=device)
    high = torch.ones(batch, 77, config.cross_attention_dim, device=device, dtype=dtype)
    cond = torch.full((batch, 3, 8 * latent, 8 * latent), 0.5, device=device, dtype=dtype)

    def step():
        with torch.no_grad():
            control = controlnet_call(sample, timesteps, high, high, cond)
            unet_call(sample, timesteps, high, high, control.down_block_res_samples, control.mid_block_res_sample)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def bench_torch(config, *, dtype_name, batch, latent, repeats):
    try:
        step = build_torch_step(config, dtype_name=dtype_name, batch=batch, latent=latent)
    except ImportError as error:
        print(f"  torch reference unavailable: {error}")
        return None
    return torch_median_ms(step, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    parser.add_argument("--latent", type=int, default=64, help="latent side; 64 = 512 px")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backends", nargs="+", default=["auto"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args(argv)
    config = XPSRUNetConfig(**(TINY if args.tiny else {}))
    latent = 8 if args.tiny and args.latent == 64 else args.latent
    print(f"device: {jax.devices()[0].device_kind}; XPSR {'tiny' if args.tiny else 'SD 1.5 size'}, batch {args.batch}, "
          f"latent {latent}x{latent} ({8 * latent} px), {args.dtype}", flush=True)
    for backend in args.backends:
        compile_s, ms = bench_jax(config, dtype=jnp.dtype(args.dtype), backend=backend, batch=args.batch,
                                  latent=latent, repeats=args.repeats)
        print(f"  xpsr-jax  attention={backend:8s} compile {compile_s:6.1f} s, step {ms:8.2f} ms", flush=True)
    if not args.skip_torch:
        ms = bench_torch(config, dtype_name=args.dtype, batch=args.batch, latent=latent, repeats=args.repeats)
        if ms is not None:
            print(f"  PyTorch reference (diffusers layers, SDPA)   step {ms:8.2f} ms", flush=True)


if __name__ == "__main__":
    main()
