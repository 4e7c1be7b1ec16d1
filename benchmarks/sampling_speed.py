"""The whole 20-step XPSR sampling loop (VAE encode, ControlNet + UNet with CFG, DDPM, decode,
colour fix) per image: xpsr-jax (one jitted call) vs the same loop in PyTorch, same device.

    python benchmarks/sampling_speed.py --size tiny --batch 1            # CPU
    python benchmarks/sampling_speed.py --size sd15 --batch 1 8 --dtype bfloat16   # GPU, 512 px

Weights are constants (speed does not depend on them). The PyTorch side is tests/torch_reference
(official names, diffusers layers, SDPA) + diffusers' AutoencoderKL and DDPMScheduler, run
eagerly, the release's loop order. Prints compile time, seconds per image and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from timing import median_ms
from xpsr_step_speed import constant_model
from xpsr_jax.inference.sampling import PromptEmbeds, SamplingPlan, sample, split_networks
from xpsr_jax.models import AutoencoderKL, AutoencoderKLConfig, XPSRControlNet, XPSRUNet, XPSRUNetConfig
from xpsr_jax.schedulers import make_sampler, noise_schedule_from_config

SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}
TINY_UNET = dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4)
TINY_VAE = dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, layers_per_block=1)
CONTEXT_SD15 = 768


def build_jax(size: str, dtype, backend: str):
    kwargs = dict(dtype=dtype, param_dtype=dtype, attention_backend=backend)
    unet_config = XPSRUNetConfig(**(TINY_UNET if size == "tiny" else {}))
    vae_config = AutoencoderKLConfig(**(TINY_VAE if size == "tiny" else {}))
    unet = nnx.merge(*constant_model(lambda: XPSRUNet(unet_config, rngs=nnx.Rngs(0), **kwargs), dtype))
    controlnet = nnx.merge(*constant_model(
        lambda: XPSRControlNet.from_unet(unet, rngs=nnx.Rngs(0), load_weights_from_unet=False, **kwargs)[0], dtype))
    vae = nnx.merge(*constant_model(lambda: AutoencoderKL(vae_config, rngs=nnx.Rngs(0), **kwargs), dtype))
    return unet_config, unet, controlnet, vae


def bench_jax(size, *, batch, pixels, steps, dtype, backend, repeats):
    unet_config, unet, controlnet, vae = build_jax(size, dtype, backend)
    networks, states = split_networks(unet, controlnet, vae)
    sampler = make_sampler("ddpm", SD15_SCHEDULER, steps)
    plan = SamplingPlan(sampler=sampler, noise_schedule=noise_schedule_from_config(SD15_SCHEDULER),
                        guidance_scale=4.5, conditioning_scale=1.0, init="lr_latent", added_noise_level=800,
                        color_fix="adain", scaling_factor=0.18215, tiling=True, latent_tile_size=320,
                        latent_tile_overlap=8, tile_batch_size=8, vae_encoder_tile_size=1024,
                        vae_decoder_tile_size=224)
    context = unet_config.cross_attention_dim
    embeds = PromptEmbeds(*(jnp.full((batch, 77, context), 0.1, dtype) for _ in range(4)))
    conditioning = jnp.full((batch, pixels, pixels, 3), 0.5, jnp.float32)
    keys = jnp.stack([jax.random.key_data(jax.random.PRNGKey(i)) for i in range(batch)])
    fn = jax.jit(lambda states, c, e, k: sample(networks, plan, states, c, e, None, k).images)
    start = time.perf_counter()
    compiled = fn.lower(states, conditioning, embeds, keys).compile()
    compile_s = time.perf_counter() - start
    compiled(states, conditioning, embeds, keys).block_until_ready()
    ms = median_ms(lambda: compiled(states, conditioning, embeds, keys).block_until_ready(), repeats)
    return compile_s, ms / 1000 / batch


def bench_torch(size, *, batch, pixels, steps, dtype_name, repeats):
    try:
        import torch
        from diffusers import AutoencoderKL as TorchVAE
        from diffusers import DDPMScheduler
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from torch_reference import XPSRControlNetTorch, XPSRUNetTorch
    except ImportError as error:
        print(f"  torch reference unavailable: {error}")
        return None
    from timing import torch_median_ms

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    config = XPSRUNetConfig(**(TINY_UNET if size == "tiny" else {}))
    keys = {k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()
            if not k.startswith("_") and k != "sample_size"}
    unet = XPSRUNetTorch(keys).to(device, dtype).eval()
    controlnet = XPSRControlNetTorch.from_unet(unet, load_weights_from_unet=False).to(device, dtype).eval()
    vae_keys = dict(TINY_VAE if size == "tiny" else {})
    if "block_out_channels" in vae_keys:
        vae_keys["block_out_channels"] = list(vae_keys["block_out_channels"])
        vae_keys["down_block_types"] = ["DownEncoderBlock2D"] * 4
        vae_keys["up_block_types"] = ["UpDecoderBlock2D"] * 4
    else:
        vae_keys = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2)
    vae = TorchVAE(latent_channels=4, **vae_keys).to(device, dtype).eval()
    for model in (unet, controlnet, vae):
        for param in model.parameters():
            param.data.fill_(0.01)
    scheduler = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER.items() if k != "set_alpha_to_one"})
    context = config.cross_attention_dim
    embeds = torch.full((2 * batch, 77, context), 0.1, device=device, dtype=dtype)
    image = torch.full((2 * batch, 3, pixels, pixels), 0.5, device=device, dtype=dtype)

    def run():
        scheduler.set_timesteps(steps)
        latents = vae.encode(image[:batch] * 2 - 1).latent_dist.sample() * 0.18215
        latents = scheduler.add_noise(latents, torch.randn_like(latents), scheduler.timesteps[:1])
        for t in scheduler.timesteps:
            latent_in = torch.cat([latents] * 2)
            control = controlnet(latent_in, t, embeds, embeds, image)
            eps = unet(latent_in, t, embeds, embeds, list(control.down_block_res_samples),
                       control.mid_block_res_sample)
            uncond, text = eps.chunk(2)
            latents = scheduler.step(uncond + 4.5 * (text - uncond), t, latents).prev_sample
        return vae.decode(latents / 0.18215).sample

    return torch_median_ms(run, repeats) / 1000 / batch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--pixels", type=int, default=None, help="default: 64 (tiny), 512 (sd15)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args(argv)
    pixels = args.pixels or (64 if args.size == "tiny" else 512)
    print(f"device: {jax.devices()[0].device_kind}; XPSR {args.size}, {pixels} px, {args.steps} DDPM steps, "
          f"CFG, {args.dtype}", flush=True)
    for batch in args.batch:
        compile_s, ours = bench_jax(args.size, batch=batch, pixels=pixels, steps=args.steps,
                                    dtype=jnp.dtype(args.dtype), backend=args.attention_backend, repeats=args.repeats)
        line = f"  batch {batch}: xpsr-jax compile {compile_s:6.1f} s, {ours:8.3f} s/image"
        if not args.skip_torch:
            theirs = bench_torch(args.size, batch=batch, pixels=pixels, steps=args.steps, dtype_name=args.dtype,
                                 repeats=args.repeats)
            if theirs is not None:
                line += f" | PyTorch {theirs:8.3f} s/image | ours/PyTorch {ours / theirs:5.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
