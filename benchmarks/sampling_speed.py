"""The whole 20-step XPSR sampling loop (VAE encode, ControlNet + UNet with CFG, DDPM, decode,
colour fix) per image: xpsr-jax (one jitted call) vs the same loop in PyTorch, same device.

    python -m benchmarks.sampling_speed --size tiny --batch 1            # CPU
    python -m benchmarks.sampling_speed --size sd15 --batch 1 8 --dtype bfloat16   # GPU, 512 px
    python -m benchmarks.sampling_speed --size tiny --one-step           # one-step XPSR, both sides

Weights are constants (speed does not depend on them). The PyTorch side is tests/torch_reference
(official names, diffusers layers, SDPA) + diffusers' AutoencoderKL and DDPMScheduler, run
eagerly (or, with --torch-compile BACKEND, its UNet and ControlNet under torch.compile), the
release's loop order. Prints compile time, seconds per image and the ratio; --json FILE appends
the results as records for benchmarks/common.py (the table of benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import SIZES, TINY_VAE, append_record, median_ms, time_limit, torch_compiled, torch_median_ms
from benchmarks.xpsr_step_speed import constant_model
from xpsr_jax.inference.one_step import one_step_generate
from xpsr_jax.inference.sampling import PromptEmbeds, SamplingPlan, sample, split_networks
from xpsr_jax.models import AutoencoderKL, AutoencoderKLConfig, XPSRControlNet, XPSRUNet, XPSRUNetConfig
from xpsr_jax.schedulers import make_sampler, noise_schedule_from_config

SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}
UNET_SIZES = {size: unet for size, (unet, _, _) in SIZES.items()}
CONTEXT_SD15 = 768


def model_keys(size: str, unet: dict | None = None, vae: dict | None = None) -> tuple[dict, dict]:
    """(UNet, VAE) config overrides: `unet` / `vae` when given, else those of `size` (sd15: {})."""
    return (dict(UNET_SIZES[size]) if unet is None else dict(unet),
            dict(TINY_VAE if size != "sd15" else {}) if vae is None else dict(vae))


def build_jax(size: str, dtype, backend: str, unet: dict | None = None, vae: dict | None = None):
    kwargs = dict(dtype=dtype, param_dtype=dtype, attention_backend=backend)
    unet_keys, vae_keys = model_keys(size, unet, vae)
    unet_config = XPSRUNetConfig(**unet_keys)
    vae_config = AutoencoderKLConfig(**vae_keys)
    unet = nnx.merge(*constant_model(lambda: XPSRUNet(unet_config, rngs=nnx.Rngs(0), **kwargs), dtype))
    controlnet = nnx.merge(*constant_model(
        lambda: XPSRControlNet.from_unet(unet, rngs=nnx.Rngs(0), load_weights_from_unet=False, **kwargs)[0], dtype))
    vae = nnx.merge(*constant_model(lambda: AutoencoderKL(vae_config, rngs=nnx.Rngs(0), **kwargs), dtype))
    return unet_config, unet, controlnet, vae


def build_jax_sampler(size, *, batch, pixels, steps, dtype, backend, unet=None, vae=None, plan_overrides=None):
    """(compile seconds, a no-argument callable running the compiled loop once for `batch` images);
    `plan_overrides`: SamplingPlan fields to change (tile sizes, vae_streaming)."""
    unet_config, unet, controlnet, vae = build_jax(size, dtype, backend, unet, vae)
    networks, states = split_networks(unet, controlnet, vae)
    sampler = make_sampler("ddpm", SD15_SCHEDULER, steps)
    plan = SamplingPlan(sampler=sampler, noise_schedule=noise_schedule_from_config(SD15_SCHEDULER),
                        guidance_scale=4.5, conditioning_scale=1.0, init="lr_latent", added_noise_level=800,
                        color_fix="adain", scaling_factor=0.18215, tiling=True, latent_tile_size=320,
                        latent_tile_overlap=8, tile_batch_size=8, vae_encoder_tile_size=1024,
                        vae_decoder_tile_size=224)
    plan = dataclasses.replace(plan, **(plan_overrides or {}))
    context = unet_config.cross_attention_dim
    embeds = PromptEmbeds(*(jnp.full((batch, 77, context), 0.1, dtype) for _ in range(4)))
    conditioning = jnp.full((batch, pixels, pixels, 3), 0.5, jnp.float32)
    keys = jnp.stack([jax.random.key_data(jax.random.PRNGKey(i)) for i in range(batch)])
    fn = jax.jit(lambda states, c, e, k: sample(networks, plan, states, c, e, None, k).images)
    start = time.perf_counter()
    compiled = fn.lower(states, conditioning, embeds, keys).compile()
    compile_s = time.perf_counter() - start
    compiled(states, conditioning, embeds, keys).block_until_ready()

    def run():
        compiled(states, conditioning, embeds, keys).block_until_ready()
    run.compiled = compiled  # for --profile
    return compile_s, run


def build_jax_one_step(size, *, batch, pixels, dtype, backend, unet=None, vae=None):
    """(compile seconds, a no-argument callable running one-step XPSR once for `batch` images):
    VAE encode, one ControlNet + UNet pass at t=999, decode (xpsr_jax.inference.one_step)."""
    unet_config, unet, controlnet, vae = build_jax(size, dtype, backend, unet, vae)
    graphdefs, states = zip(*(nnx.split(module) for module in (unet, controlnet, vae)))
    schedule = noise_schedule_from_config(SD15_SCHEDULER)
    context = unet_config.cross_attention_dim
    high, low = (jnp.full((batch, 77, context), 0.1, dtype) for _ in range(2))
    conditioning = jnp.full((batch, pixels, pixels, 3), 0.5, jnp.float32)

    def generate(states, conditioning, high, low):
        nets = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]
        return one_step_generate(*nets, conditioning, high, low, None, noise_schedule=schedule)[0]

    start = time.perf_counter()
    compiled = jax.jit(generate).lower(states, conditioning, high, low).compile()
    compile_s = time.perf_counter() - start
    compiled(states, conditioning, high, low).block_until_ready()

    def run():
        compiled(states, conditioning, high, low).block_until_ready()
    run.compiled = compiled
    return compile_s, run


def build_torch_sampler(size, *, batch, pixels, steps, dtype_name, unet=None, vae=None, compile_backend=None,
                        one_step=False):
    """A no-argument callable running the reference loop once for `batch` images (no autograd);
    `compile_backend` wraps the UNet and ControlNet in torch.compile (compiled on the first call)."""
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import DDPMScheduler

    from benchmarks.xpsr_step_speed import torch_reference, torch_unet_keys

    _, XPSRControlNetTorch, XPSRUNetTorch = torch_reference()
    unet_keys, vae_keys = model_keys(size, unet, vae)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    config = XPSRUNetConfig(**unet_keys)
    unet = XPSRUNetTorch(torch_unet_keys(config)).to(device, dtype).eval()
    controlnet = XPSRControlNetTorch.from_unet(unet, load_weights_from_unet=False).to(device, dtype).eval()
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

    unet_call, controlnet_call = torch_compiled(unet, compile_backend), torch_compiled(controlnet, compile_backend)

    @torch.no_grad()
    def run_one_step():  # OSEDiff_test.forward with XPSR's denoiser (tests/torch_reference/one_step.py)
        latents = vae.encode(image[:batch] * 2 - 1).latent_dist.mean * 0.18215
        t = torch.full((batch,), 999, device=device)
        control = controlnet_call(latents, t, embeds[:batch], embeds[:batch], image[:batch])
        eps = unet_call(latents, t, embeds[:batch], embeds[:batch], list(control.down_block_res_samples),
                        control.mid_block_res_sample)
        alpha_bar = scheduler.alphas_cumprod[999].to(device, dtype)
        x0 = (latents - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5
        images = vae.decode(x0 / 0.18215).sample.clamp(-1, 1)
        if device == "cuda":
            torch.cuda.synchronize()
        return images

    @torch.no_grad()
    def run():
        scheduler.set_timesteps(steps)
        latents = vae.encode(image[:batch] * 2 - 1).latent_dist.sample() * 0.18215
        latents = scheduler.add_noise(latents, torch.randn_like(latents), scheduler.timesteps[:1])
        for t in scheduler.timesteps:
            latent_in = torch.cat([latents] * 2)
            control = controlnet_call(latent_in, t, embeds, embeds, image)
            eps = unet_call(latent_in, t, embeds, embeds, list(control.down_block_res_samples),
                            control.mid_block_res_sample)
            uncond, text = eps.chunk(2)
            latents = scheduler.step(uncond + 4.5 * (text - uncond), t, latents).prev_sample
        images = vae.decode(latents / 0.18215).sample
        if device == "cuda":
            torch.cuda.synchronize()
        return images

    return run_one_step if one_step else run


def bench_torch(size, *, batch, pixels, steps, dtype_name, repeats, compile_backend=None, one_step=False):
    try:
        run = build_torch_sampler(size, batch=batch, pixels=pixels, steps=steps, dtype_name=dtype_name,
                                  compile_backend=compile_backend, one_step=one_step)
    except ImportError as error:
        print(f"  torch reference unavailable: {error}")
        return None
    return torch_median_ms(run, repeats) / 1000 / batch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(UNET_SIZES), default="tiny",
                        help="sd15: SD 1.5 size; tiny: tiny widths; micro: tiny with two UNet levels")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--pixels", type=int, default=None, help="default: 64 (tiny, micro), 512 (sd15)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-torch", action="store_true", help="no eager PyTorch timing")
    parser.add_argument("--skip-jax", action="store_true", help="no xpsr-jax timing (PyTorch rows only)")
    parser.add_argument("--torch-compile", default=None, metavar="BACKEND",
                        help="also time the PyTorch loop with torch.compile(backend=BACKEND), e.g. inductor")
    parser.add_argument("--compile-timeout", type=float, default=None,
                        help="seconds the torch.compile build + first call may take before it is reported as failed")
    parser.add_argument("--compile-threads", type=int, default=1, help="compile the batch sizes in parallel")
    parser.add_argument("--one-step", action="store_true",
                        help="time one-step XPSR (encode, one ControlNet + UNet pass, decode) instead of the "
                             "--steps CFG loop")
    parser.add_argument("--json", default=None, metavar="FILE", help="append result records (benchmarks/common.py)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after timing, trace one call of the largest batch's loop with jax.profiler and write "
                             "DIR/sampling_profile.{md,json}, the trace and the optimized HLO")
    args = parser.parse_args(argv)
    pixels = args.pixels or (512 if args.size == "sd15" else 64)
    # A PyTorch-only run leaves JAX unstarted: on a GPU it would reserve most of the memory.
    where = "PyTorch only" if args.skip_jax else jax.devices()[0].device_kind
    recipe = "one step (t=999, no CFG)" if args.one_step else f"{args.steps} DDPM steps, CFG"
    print(f"device: {where}; XPSR {args.size}, {pixels} px, {recipe}, {args.dtype}", flush=True)
    samplers = {}
    if not args.skip_jax:  # compiled up front, in threads (XLA compiles outside the GIL)
        def build(batch):
            kwargs = dict(batch=batch, pixels=pixels, dtype=jnp.dtype(args.dtype), backend=args.attention_backend)
            if args.one_step:
                return build_jax_one_step(args.size, **kwargs)
            return build_jax_sampler(args.size, steps=args.steps, **kwargs)

        with ThreadPoolExecutor(max(1, args.compile_threads)) as pool:
            samplers = dict(zip(args.batch, pool.map(build, args.batch)))
    loop_ms = {}
    for batch in args.batch:
        ours = theirs = compiled = None
        line = f"  batch {batch}:"
        if not args.skip_jax:
            compile_s, run = samplers[batch]
            ours = median_ms(run, args.repeats) / 1000 / batch
            line += f" xpsr-jax compile {compile_s:6.1f} s, {ours:8.3f} s/image"
        if not args.skip_torch:
            theirs = bench_torch(args.size, batch=batch, pixels=pixels, steps=args.steps, dtype_name=args.dtype,
                                 repeats=args.repeats, one_step=args.one_step)
            if theirs is not None:
                line += f" | PyTorch {theirs:8.3f} s/image"
                if ours is not None:
                    line += f" | ours/PyTorch {ours / theirs:5.2f}"
        if args.torch_compile:
            compiled = torch_compile_seconds(args, batch, pixels)
            line += f" | PyTorch torch.compile({args.torch_compile}) " + (
                f"{compiled:8.3f} s/image" if isinstance(compiled, float) else compiled)
        print(line, flush=True)
        row = (f"one-step sampling {pixels} px, {args.dtype}, batch {batch}" if args.one_step
               else f"sampling {pixels} px, {args.steps} steps, {args.dtype}, batch {batch}")
        if ours is not None:
            append_record(args.json, row=row, impl="xpsr-jax", value=ours, unit="s/image",
                          details=f"compile {compile_s:.0f} s")
        if theirs is not None:
            append_record(args.json, row=row, impl="pytorch", value=theirs, unit="s/image")
        if compiled is not None:
            append_record(args.json, row=row, impl="pytorch-compile", unit="s/image",
                          **(dict(value=compiled) if isinstance(compiled, float) else dict(value=None, details=compiled)))
        if ours is not None:
            loop_ms[batch] = ours * batch * 1000
    if args.profile and samplers:
        from benchmarks.profile_summary import markdown, profile_compiled

        batch = max(args.batch)
        run = samplers[batch][1]
        print(markdown(profile_compiled(run, run.compiled, args.profile, "sampling", steps=1,
                                        step_ms=loop_ms.get(batch))), flush=True)


def torch_compile_seconds(args, batch, pixels):
    """Seconds per image of the torch.compile'd loop, or a short 'failed: ...' text."""
    start = time.perf_counter()
    try:
        with time_limit(args.compile_timeout):
            run = build_torch_sampler(args.size, batch=batch, pixels=pixels, steps=args.steps, dtype_name=args.dtype,
                                      compile_backend=args.torch_compile,
                                      one_step=args.one_step)
            run()  # the first call compiles
        return median_ms(run, args.repeats) / 1000 / batch
    except Exception as error:  # report, don't crash: torch.compile is optional
        return f"failed after {time.perf_counter() - start:.0f} s: {type(error).__name__}: {str(error)[:80]}"


if __name__ == "__main__":
    main()
