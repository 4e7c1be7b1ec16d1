"""XPSR train step speed: xpsr-jax (sharded jitted step) vs the same step in PyTorch on the same device.

    python -m benchmarks.train_speed --dry-run                         # tiny, CPU, well under a minute
    python -m benchmarks.train_speed --size sd15 --batch 4 --remat attention   # GPU/TPU, 512 px
    python -m benchmarks.train_speed --size sd15 --batch 1 2 4 --remat none attention --compile-threads 6
    python -m benchmarks.train_speed --size sd15 --attention-backend cudnn --skip-torch

The step is the whole training step: VAE encode + two CLIP passes (frozen, no gradient),
ControlNet + UNet forward and backward for the trainable params, global-norm clip, AdamW. Weights
are constants (speed does not depend on their values). Prints compile time, steady step time,
images/s, peak device memory (where the backend reports it) and MFU from XLA's cost analysis
against the chip peak table below (dense bf16 FLOP/s per chip; CPU: n/a). The PyTorch side:
tests/torch_reference networks + diffusers AutoencoderKL + transformers CLIPTextModel, AdamW over
the trainable params, bf16 autocast on GPU / fp32 on CPU (eager; --torch-compile BACKEND adds
the same step with its ControlNet and UNet under torch.compile). Several --batch / --remat values
time every combination on one shared train state; --json FILE appends the results as records
for benchmarks/common.py (the table of benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import SIZES, TINY_CLIP, TINY_VAE, append_record, median_ms, time_limit
from xpsr_jax.models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    CLIPTextConfig,
    CLIPTextEncoder,
    XPSRControlNet,
    XPSRUNet,
    XPSRUNetConfig,
)
from xpsr_jax.schedulers import noise_schedule_from_config
from xpsr_jax.training import (
    XPSRModels,
    create_train_state,
    format_memory_estimate,
    global_batch,
    make_mesh,
    memory_estimate,
)
from xpsr_jax.training.models import remat_block_types

# Peak dense bf16 FLOP/s per chip, by substring of jax's device_kind.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
              "TPU v5p": 459e12, "TPU v5": 459e12}
UNET_SIZES = {size: unet for size, (unet, _, _) in SIZES.items()}
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def peak_flops(device) -> float | None:
    kind = device.device_kind
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_FLOPS[name]
    return None


def _constant(build):
    graphdef, state = nnx.split(nnx.eval_shape(build))
    state = jax.tree.map(lambda leaf: jnp.full(leaf.shape, 0.01, leaf.dtype), state)
    return nnx.merge(graphdef, state)


def build_models(size: str, *, dtype, backend: str, remat: str) -> XPSRModels:
    tiny = size != "sd15"  # micro and tiny share the tiny VAE and CLIP
    kwargs = dict(dtype=dtype, param_dtype=jnp.float32, attention_backend=backend)
    unet_config = XPSRUNetConfig(**UNET_SIZES[size])
    unet = _constant(lambda: XPSRUNet(unet_config, rngs=nnx.Rngs(0), **kwargs))
    controlnet = _constant(lambda: XPSRControlNet.from_unet(unet, rngs=nnx.Rngs(0), load_weights_from_unet=False,
                                                            **kwargs)[0])
    unet.remat_block_types = controlnet.remat_block_types = remat_block_types(remat)
    vae = _constant(lambda: AutoencoderKL(AutoencoderKLConfig(**(TINY_VAE if tiny else {})), rngs=nnx.Rngs(0),
                                          **kwargs))
    clip_config = CLIPTextConfig(**TINY_CLIP) if tiny else CLIPTextConfig.stable_diffusion_v1()
    text_encoder = _constant(lambda: CLIPTextEncoder(clip_config, rngs=nnx.Rngs(0), **kwargs))
    return XPSRModels(unet, controlnet, vae, text_encoder)


def train_config(args, compute: str):
    from ml_collections import config_dict

    config = config_dict.ConfigDict()
    config.total_steps, config.seed = 1000, 0
    config.optimizer = dict(learning_rate=5e-5, b1=0.9, b2=0.999, weight_decay=1e-2, eps=1e-8, schedule="constant",
                            warmup_steps=0, grad_clip_norm=1.0, gradient_accumulation_steps=1, ema_decay=0.0)
    config.loss = dict(dfc_weight=0.05)
    config.precision = dict(param_dtype="float32", compute_dtype=compute, frozen_dtype=compute, loss_scaling="none")
    config.mesh = dict(data=-1, fsdp=args.fsdp, shard_trainable=args.fsdp > 1, shard_frozen=False)
    return config


def random_batch(batch: int, resolution: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (batch, resolution, resolution, 3)
    return {"pixel_values": rng.uniform(-1, 1, shape).astype(np.float32),
            "conditioning_pixel_values": rng.uniform(0, 1, shape).astype(np.float32),
            "highlevel_input_ids": rng.integers(0, vocab, (batch, 77)).astype(np.int32),
            "lowlevel_input_ids": rng.integers(0, vocab, (batch, 77)).astype(np.int32)}


def peak_memory_bytes() -> int | None:
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s]
    return max(peaks) if peaks and all(p is not None for p in peaks) else None


def jax_steps(args, compute: str, batches, remats, *, threads: int = 1):
    """Compiled train steps for every (per-device batch, remat policy), sharing one train state.

    Returns (run, info): `run(batch, remat)` is a no-argument callable doing one step and
    `info[(batch, remat)]` holds compile seconds, XLA flops and XLA's memory figure. The remat
    policy is a static attribute of the networks, so only the graphdefs differ between policies
    and the (large) state exists once; the steps are compiled in `threads` threads (XLA compiles
    outside the GIL), then run one after another on the one state (each step donates it).
    """
    from concurrent.futures import ThreadPoolExecutor

    from xpsr_jax.training.step import compile_train_step, lower_train_step, split_models

    dtype = jnp.dtype(compute)
    models = build_models(args.size, dtype=dtype, backend=args.attention_backend, remat="none")
    config = train_config(args, compute)
    mesh = make_mesh(config.mesh)
    state, frozen, _ = create_train_state(models, config, mesh)
    print("  " + format_memory_estimate(memory_estimate(state, frozen, max(batches), args.resolution)), flush=True)
    graphdefs = {}
    for remat in remats:  # before any step runs: the steps donate the arrays the networks still hold
        models.unet.remat_block_types = models.controlnet.remat_block_types = remat_block_types(remat)
        graphdefs[remat] = split_models(models)[0]
    vocab = models.text_encoder.config.vocab_size
    data = {b: global_batch(random_batch(b * mesh.size // jax.process_count(), args.resolution, vocab), mesh)
            for b in batches}
    schedule = noise_schedule_from_config(SD15_SCHEDULER)
    keys = [(b, remat) for remat in remats for b in batches]
    # Tracing NNX modules is not thread-safe (two traces at once: TraceContextError), so every
    # step is lowered here, one after another, and only XLA's compiles run in the threads.
    lowered = [lower_train_step(config, graphdefs[remat], schedule, mesh, state, frozen, data[b])
               for b, remat in keys]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        steps = dict(zip(keys, pool.map(lambda item: compile_train_step(*item), lowered)))
    holder = {"state": state}

    def run(b, remat):
        step, batch = steps[(b, remat)], data[b]

        def one():
            holder["state"], metrics = step(holder["state"], frozen, batch)
            jax.block_until_ready(metrics["loss"])
        return one

    info = {key: dict(compile_s=steps[key].compile_seconds, flops=steps[key].flops, compiled=steps[key].compiled,
                      xla_bytes=xla_memory_bytes(steps[key].compiled), global_batch=key[0] * mesh.size,
                      devices=mesh.size) for key in keys}
    return run, info


def xla_memory_bytes(compiled) -> int | None:
    """XLA's own figure for one step: arguments + outputs - aliased (donated) + temporaries."""
    try:
        stats = compiled.memory_analysis()
        return int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
                   + stats.temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def _flops_text(flops) -> str:
    return "n/a" if flops is None else f"{flops:.3e}"


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def bench_jax(args, compute: str):
    """Times every (batch, remat) of args; returns {(batch, remat): images/s}. Steps are timed in
    ascending order of XLA's memory figure, so the device's running peak after each is its peak."""
    run, info = jax_steps(args, compute, args.batch, args.remat, threads=args.compile_threads)
    order = sorted(info, key=lambda key: info[key]["xla_bytes"] or 0)
    results, step_ms = {}, {}
    for key in order:
        b, remat = key
        one = run(b, remat)
        for _ in range(args.warmup):
            one()
        ms = median_ms(one, args.steps)
        item = info[key]
        images = item["global_batch"] / (ms / 1000)
        peak = peak_flops(jax.devices()[0])
        mfu = (f"{100 * item['flops'] / (ms / 1000) / peak:.1f}%" if item["flops"] and peak else "n/a")
        memory = peak_memory_bytes()
        print(f"  xpsr-jax batch {b} remat {remat}: compile {item['compile_s']:.1f} s, step {ms:.2f} ms, "
              f"{images:.2f} images/s (global batch {item['global_batch']} on {item['devices']} devices), peak "
              f"memory {_gib(memory)} (XLA: {_gib(item['xla_bytes'])}), XLA flops/step/device "
              f"{_flops_text(item['flops'])}, MFU {mfu}", flush=True)
        append_record(args.json, row=f"{_row(args, compute, b)}, remat {remat}", match=_row(args, compute, b),
                      impl="xpsr-jax", value=images / item["devices"], unit="images/s",
                      details=f"peak {_gib(memory)}, XLA {_gib(item['xla_bytes'])}, MFU {mfu}, "
                              f"compile {item['compile_s']:.0f} s")
        results[key] = images
        step_ms[key] = ms
    if args.profile:  # the largest batch under the first remat policy given: no extra compile
        from benchmarks.profile_summary import markdown, profile_compiled

        key = (max(args.batch), args.remat[0])
        summary = profile_compiled(run(*key), info[key]["compiled"], args.profile, "train",
                                   steps=args.profile_steps, step_ms=step_ms[key])
        print(markdown(summary), flush=True)
    return results


def _row(args, compute: str, batch: int) -> str:
    return f"train {args.resolution} px, {compute}, per-device batch {batch}"


def torch_trainer(args, compute: str, compile_backend: str | None = None):
    """`make_step(batch)` -> a no-argument callable doing one reference train step on a batch of
    that size. The networks and AdamW are built once; `compile_backend` (e.g. "inductor") wraps
    the ControlNet and UNet in torch.compile, compiled on the first call of each batch size."""
    import diffusers
    import torch
    import torch.nn.functional as F
    import transformers

    from benchmarks.common import torch_compiled
    from tests.torch_reference import XPSRControlNetTorch, XPSRUNetTorch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = device == "cuda" and compute != "float32"
    tiny = args.size != "sd15"
    unet_keys = {k: list(v) if isinstance(v, tuple) else v
                 for k, v in XPSRUNetConfig(**UNET_SIZES[args.size]).to_dict().items()
                 if not k.startswith("_") and k != "sample_size"}
    unet = XPSRUNetTorch(unet_keys).to(device)
    controlnet = XPSRControlNetTorch.from_unet(unet, load_weights_from_unet=False).to(device)
    vae_keys = dict(TINY_VAE, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4) if tiny else dict(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32)
    vae = diffusers.AutoencoderKL(**vae_keys).to(device).requires_grad_(False)
    clip = transformers.CLIPTextConfig(**TINY_CLIP) if tiny else transformers.CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12)
    text_encoder = transformers.CLIPTextModel(clip).to(device).requires_grad_(False)
    if autocast:
        vae.to(torch.bfloat16)
        text_encoder.to(torch.bfloat16)
    unet.requires_grad_(False)
    for name, module in unet.named_modules():
        if name.endswith(("pixel_attentions", "attentions_lowlevel", "attentions_connect")):
            module.requires_grad_(True)
    params = list(controlnet.parameters()) + [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scheduler = diffusers.DDPMScheduler(**SD15_SCHEDULER)
    weight_dtype = torch.bfloat16 if autocast else torch.float32
    unet_call, controlnet_call = torch_compiled(unet, compile_backend), torch_compiled(controlnet, compile_backend)

    def make_step(batch_size: int):
        batch = {k: torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2) if v.ndim == 4 else v)).to(device)
                 for k, v in random_batch(batch_size, args.resolution, clip.vocab_size).items()}

        def step():
            with torch.no_grad():
                latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample().contiguous()
                latents = latents * 0.18215
                high = text_encoder(batch["highlevel_input_ids"].long())[0]
                low = text_encoder(batch["lowlevel_input_ids"].long())[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (latents.shape[0],), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                out = controlnet_call(noisy, timesteps, high, low, batch["conditioning_pixel_values"].to(weight_dtype))
                pred = unet_call(noisy, timesteps, high, low, out.down_block_res_samples, out.mid_block_res_sample)
                loss = F.mse_loss(pred.float(), noise.float())
                pixels = batch["pixel_values"].float()
                for rgb in out.rgb_preds:
                    loss = loss + 0.05 * F.l1_loss(F.interpolate(pixels, size=rgb.shape[-2:], mode="bilinear"),
                                                   rgb.float())
                for pred_latent in list(out.latent_preds) + [out.latent_pred_mid]:
                    loss = loss + 0.05 * F.l1_loss(pred_latent.float(), F.interpolate(
                        latents.float(), size=pred_latent.shape[-2:], mode="bilinear"))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
        return step

    make_step.device, make_step.autocast = device, autocast
    return make_step


def torch_peak_bytes() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def bench_torch(args, compute: str, compile_backend: str | None = None):
    """Times the reference step at every args.batch; returns {batch: images/s} ({} if unavailable)."""
    import torch

    impl = "pytorch" if compile_backend is None else "pytorch-compile"
    label = "eager" if compile_backend is None else f"torch.compile({compile_backend})"
    try:
        make_step = torch_trainer(args, compute, compile_backend)
    except ImportError as error:
        print(f"  PyTorch reference unavailable: {error}")
        return {}
    if args.remat != ["none"]:
        print("  (PyTorch side runs without gradient checkpointing)")
    results = {}
    for b in args.batch:
        start = time.perf_counter()
        try:
            with time_limit(args.compile_timeout if compile_backend else None):
                step = make_step(b)
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(max(1, args.warmup)):  # the first call compiles (torch.compile)
                    step()
        except Exception as error:  # report, don't crash: torch.compile is optional
            text = f"failed after {time.perf_counter() - start:.0f} s: {type(error).__name__}: {str(error)[:80]}"
            print(f"  PyTorch {label} batch {b}: {text}", flush=True)
            append_record(args.json, row=_row(args, compute, b), impl=impl, value=None, unit="images/s", details=text)
            if compile_backend is None:
                raise
            continue
        ms = median_ms(step, args.steps)
        images = b / (ms / 1000)
        memory = torch_peak_bytes()
        print(f"  PyTorch ({make_step.device}, {'bf16 autocast' if make_step.autocast else 'fp32'}, {label}) "
              f"batch {b}: step {ms:.2f} ms, {images:.2f} images/s, peak memory {_gib(memory)}", flush=True)
        append_record(args.json, row=_row(args, compute, b), impl=impl, value=images, unit="images/s",
                      details=f"peak {_gib(memory)}")
        results[b] = images
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(UNET_SIZES), default="sd15",
                        help="sd15: SD 1.5 size; tiny: tiny widths; micro: tiny with two UNet levels")
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="per device, one or more; default 4 (sd15) / 2 (tiny, micro)")
    parser.add_argument("--resolution", type=int, default=None, help="default 512 (sd15) / 64 (tiny, micro)")
    parser.add_argument("--remat", choices=["none", "attention", "full"], nargs="+", default=["none"],
                        help="one or more remat policies (every batch runs under each)")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="compute dtype; default bfloat16 on accelerators, float32 on CPU")
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-torch", action="store_true", help="no eager PyTorch timing")
    parser.add_argument("--skip-jax", action="store_true", help="no xpsr-jax timing (PyTorch rows only)")
    parser.add_argument("--torch-compile", default=None, metavar="BACKEND",
                        help="also time the PyTorch step under torch.compile(backend=BACKEND), e.g. inductor")
    parser.add_argument("--compile-timeout", type=float, default=None,
                        help="seconds torch.compile + warm-up may take per batch before it is reported as failed")
    parser.add_argument("--compile-threads", type=int, default=1,
                        help="compile the xpsr-jax steps for the (batch, remat) matrix in this many threads")
    parser.add_argument("--json", default=None, metavar="FILE", help="append result records (benchmarks/common.py)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after timing, trace --profile-steps steps of the largest batch (first --remat) with "
                             "jax.profiler and write DIR/train_profile.{md,json}, the trace and the optimized HLO")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="tiny on CPU, 3 steps")
    args = parser.parse_args(argv)
    if args.dry_run:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_disable_most_optimizations", True)  # a smoke run: compile fast
        args.size, args.steps, args.warmup = "tiny", 3, 1
    args.batch = args.batch or [4 if args.size == "sd15" else 2]
    args.resolution = args.resolution or (512 if args.size == "sd15" else 64)
    return args


def default_compute(args) -> str:
    """args.dtype, else bfloat16 on an accelerator / float32 on CPU (without starting JAX when only
    PyTorch runs: JAX would reserve most of the GPU's memory)."""
    if args.dtype:
        return args.dtype
    if args.skip_jax:
        import torch

        return "bfloat16" if torch.cuda.is_available() else "float32"
    return "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"


def main(argv=None):
    args = parse_args(argv)
    compute = default_compute(args)
    where = "PyTorch only" if args.skip_jax else f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    print(f"devices: {where}; XPSR train step, size {args.size}, {args.resolution} px, per-device batch "
          f"{args.batch}, {compute} compute, remat {args.remat}, attention {args.attention_backend}; "
          f"peak table {PEAK_FLOPS}", flush=True)
    jax_images = {} if args.skip_jax else bench_jax(args, compute)
    torch_images = {} if args.skip_torch else bench_torch(args, compute)
    if args.torch_compile:
        bench_torch(args, compute, args.torch_compile)
    devices = 1 if args.skip_jax else jax.device_count()
    for (b, remat), images in jax_images.items():
        if torch_images.get(b):
            print(f"  ratio xpsr-jax / PyTorch images/s, batch {b}, remat {remat}: "
                  f"{images / (torch_images[b] * devices):.2f}x (per device)")


if __name__ == "__main__":
    main()
