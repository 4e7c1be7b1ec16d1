"""One-step XPSR against the 20-step CFG recipe, end to end from LR pixels to SR pixels.

    python -m benchmarks.one_step_cost --size sd15 --pixels 512 --flops-only   # FLOPs at SD 1.5 size
    python -m benchmarks.one_step_cost --size tiny --pixels 64                 # FLOPs + time here

FLOPs: XLA's cost analysis of each part, lowered from shapes (no weights, no compile): the VAE
encoder (both recipes encode the LR image), one ControlNet + UNet pass at batch 2 (the recipe's
classifier-free guidance) and at batch 1 (one step), the VAE decoder. The recipe is encode +
steps x guided pass + decode; one step is encode + one pass + decode (a loop's HLO holds its body
once, so the parts are counted, not the loop). Time: the compiled recipe of
benchmarks/sampling_speed.py (its sampler, colour fix and tiling plan) and the compiled one-step
generator, same networks, same run, with the VAE's share (encode + decode alone).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import median_ms
from benchmarks.sampling_speed import UNET_SIZES, build_jax_one_step, build_jax_sampler, model_keys
from xpsr_jax.inference.one_step import ONE_STEP_TIMESTEP
from xpsr_jax.models import AutoencoderKL, AutoencoderKLConfig, XPSRControlNet, XPSRUNet, XPSRUNetConfig
from xpsr_jax.weights.pretrained import eval_shape_model


def abstract_networks(size: str, dtype, backend: str):
    kwargs = dict(dtype=dtype, param_dtype=dtype, attention_backend=backend)
    unet_keys, vae_keys = model_keys(size)
    unet_config = XPSRUNetConfig(**unet_keys)
    unet = eval_shape_model(lambda: XPSRUNet(unet_config, rngs=nnx.Rngs(0), **kwargs))
    controlnet = eval_shape_model(lambda: XPSRControlNet.from_unet(
        XPSRUNet(unet_config, rngs=nnx.Rngs(0), **kwargs), rngs=nnx.Rngs(0), load_weights_from_unet=False,
        **kwargs)[0])
    vae = eval_shape_model(lambda: AutoencoderKL(AutoencoderKLConfig(**vae_keys), rngs=nnx.Rngs(0), **kwargs))
    return unet_config, unet, controlnet, vae


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def part_flops(size: str, pixels: int, dtype, backend: str) -> dict[str, float]:
    """FLOPs of each part for one image of `pixels` x `pixels` output."""
    unet_config, unet, controlnet, vae = abstract_networks(size, dtype, backend)
    (unet_def, unet_state), (cn_def, cn_state), (vae_def, vae_state) = (
        nnx.split(m) for m in (unet, controlnet, vae))
    factor = vae.config.downsample_factor
    latent = pixels // factor
    context = unet_config.cross_attention_dim

    def shape(*dims, dtype=dtype):
        return jax.ShapeDtypeStruct(dims, dtype)

    def encode(state, image):
        return nnx.merge(vae_def, state).encode(image).mean

    def decode(state, latents):
        return nnx.merge(vae_def, state).decode(latents)

    def denoise(unet_state, cn_state, latents, embeds, image):
        batch = latents.shape[0]
        t = jnp.full((batch,), ONE_STEP_TIMESTEP, jnp.int32)
        control = nnx.merge(cn_def, cn_state)(latents, t, embeds, embeds, image)
        return nnx.merge(unet_def, unet_state)(latents, t, embeds, embeds, control.down_block_res_samples,
                                               control.mid_block_res_sample)

    flops = {"vae_encode": _flops(encode, vae_state, shape(1, pixels, pixels, 3)),
             "vae_decode": _flops(decode, vae_state, shape(1, latent, latent, 4))}
    for batch, name in ((1, "pass_batch1"), (2, "pass_cfg_batch2")):
        flops[name] = _flops(denoise, unet_state, cn_state, shape(batch, latent, latent, 4),
                             shape(batch, 77, context), shape(batch, pixels, pixels, 3, dtype=jnp.float32))
    return flops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(UNET_SIZES), default="tiny")
    parser.add_argument("--pixels", type=int, default=None, help="output size; default 64 (tiny), 512 (sd15)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attention-backend", default="xla")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flops-only", action="store_true", help="no timing (the SD 1.5 size on a CPU)")
    args = parser.parse_args(argv)
    pixels = args.pixels or (512 if args.size == "sd15" else 64)
    dtype = jnp.dtype(args.dtype)
    print(f"device: {jax.devices()[0].device_kind}; XPSR {args.size}, {pixels} px output, {args.dtype}", flush=True)

    flops = part_flops(args.size, pixels, dtype, args.attention_backend)
    vae = flops["vae_encode"] + flops["vae_decode"]
    recipe = vae + args.steps * flops["pass_cfg_batch2"]
    one = vae + flops["pass_batch1"]
    giga = 1e9
    print(f"GFLOP per image (XLA cost analysis): VAE encode {flops['vae_encode'] / giga:,.1f}, decode "
          f"{flops['vae_decode'] / giga:,.1f}; ControlNet + UNet pass {flops['pass_batch1'] / giga:,.1f} "
          f"(with CFG, batch 2: {flops['pass_cfg_batch2'] / giga:,.1f})")
    print(f"  {args.steps}-step CFG recipe {recipe / giga:,.1f} | one step {one / giga:,.1f} | one / recipe "
          f"{one / recipe:.4f} (1/{recipe / one:.1f}); the VAE is {vae / one:.0%} of one step, "
          f"{vae / recipe:.1%} of the recipe", flush=True)
    if args.flops_only:
        return

    kwargs = dict(batch=1, pixels=pixels, dtype=dtype, backend=args.attention_backend)
    recipe_compile, recipe_run = build_jax_sampler(args.size, steps=args.steps, **kwargs)
    one_compile, one_run = build_jax_one_step(args.size, **kwargs)
    vae_model = abstract_networks(args.size, dtype, args.attention_backend)[3]
    vae_def, vae_state = nnx.split(vae_model)
    vae_state = jax.tree.map(lambda leaf: jnp.full(leaf.shape, 0.01, leaf.dtype), vae_state)
    image = jnp.full((1, pixels, pixels, 3), 0.5, jnp.float32)

    @jax.jit
    def vae_only(state, image):
        model = nnx.merge(vae_def, state)
        return model.decode(model.encode(image * 2 - 1).mean)

    vae_only(vae_state, image).block_until_ready()
    times = {}
    for name, run in (("recipe", recipe_run), ("one_step", one_run),
                      ("vae", lambda: vae_only(vae_state, image).block_until_ready())):
        times[name] = median_ms(run, args.repeats) / 1000
    # round-robin again so both see the same machine load; keep each one's best median
    for name, run in (("one_step", one_run), ("recipe", recipe_run)):
        times[name] = min(times[name], median_ms(run, args.repeats) / 1000)
    print(f"time per image ({args.repeats} repeats, median): {args.steps}-step CFG recipe {times['recipe']:.3f} s "
          f"(compile {recipe_compile:.0f} s) | one step {times['one_step']:.4f} s (compile {one_compile:.0f} s) | "
          f"one / recipe {times['one_step'] / times['recipe']:.4f} (1/{times['recipe'] / times['one_step']:.1f}); "
          f"VAE encode + decode {times['vae']:.4f} s = {times['vae'] / times['one_step']:.0%} of one step",
          flush=True)


if __name__ == "__main__":
    main()
