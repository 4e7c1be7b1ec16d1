"""One XPSR step (ControlNet + UNet forward) per attention backend vs PyTorch, timed round-robin.

    python -m benchmarks.xpsr_step_backends --tiny --latent 32      # 256 px, CPU
    python -m benchmarks.xpsr_step_backends --tiny --latent 48      # 384 px

The same step and models as benchmarks/xpsr_step_speed.py, but every backend and the PyTorch
reference are compiled / built first and then timed in rounds of one call each, so on a noisy
shared machine the ratios ours / PyTorch compare calls made under the same load. Prints one
table: median ms per step over --repeats rounds and the ratio to PyTorch.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.attention import round_robin_ms
from benchmarks.xpsr_step_speed import TINY, build_step
from xpsr_jax.models import XPSRUNetConfig


def jax_step(config, *, backend, batch, latent):
    """A no-argument callable running one compiled step with `backend` attention."""
    return build_step(config, dtype=jnp.float32, backend=backend, batch=batch, latent=latent)[1]


def torch_step(config, *, batch, latent):
    import torch

    from tests.torch_reference import XPSRControlNetTorch, XPSRUNetTorch

    keys = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    keys = {k: list(v) if isinstance(v, tuple) else v for k, v in keys.items() if k != "sample_size"}
    unet = XPSRUNetTorch(keys).eval()
    controlnet = XPSRControlNetTorch.from_unet(unet, load_weights_from_unet=False).eval()
    sample = torch.ones(batch, 4, latent, latent)
    timesteps = torch.full((batch,), 500)
    prompt = torch.ones(batch, 77, config.cross_attention_dim)
    cond = torch.full((batch, 3, 8 * latent, 8 * latent), 0.5)

    def step():
        with torch.no_grad():
            control = controlnet(sample, timesteps, prompt, prompt, cond)
            unet(sample, timesteps, prompt, prompt, control.down_block_res_samples, control.mid_block_res_sample)

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--backends", nargs="+", default=["auto", "xla", "chunked", "blockwise"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    config = XPSRUNetConfig(**(TINY if args.tiny else {}))
    calls = {f"xpsr-jax {backend}": jax_step(config, backend=backend, batch=args.batch, latent=args.latent)
             for backend in args.backends}
    calls["PyTorch (SDPA, eager)"] = torch_step(config, batch=args.batch, latent=args.latent)
    ms = round_robin_ms(calls, args.repeats)
    torch_ms = ms["PyTorch (SDPA, eager)"]
    print(f"device: {jax.devices()[0].device_kind}; XPSR {'tiny' if args.tiny else 'SD 1.5 size'}, "
          f"batch {args.batch}, latent {args.latent} ({8 * args.latent} px), fp32, "
          f"median of {args.repeats} round-robin rounds")
    print("| step | ms | ours / PyTorch |\n|---|---:|---:|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} | {value / torch_ms:.2f} |")


if __name__ == "__main__":
    main()
