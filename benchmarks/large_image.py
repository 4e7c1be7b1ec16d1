"""Large outputs: wall time, compile time and peak memory of one image per output size.

    python -m benchmarks.large_image                          # tiny model, CPU tiles, 512 1024 2048 px
    python -m benchmarks.large_image --sizes 512 1024 2048 4096 --timeout 2400
    python -m benchmarks.large_image --tiles config           # the tiny config's own (16-latent-px) tiles
    python -m benchmarks.large_image --vae all_tiles          # the VAE's tiles all at once (faster, more memory)
    python -m benchmarks.large_image --model sd15 --sizes 2048 4096   # GPU: SD 1.5 size, bf16, 20 steps

Each size runs in a fresh process (its peak memory is its own). `--model tiny` (default): the
tiny model of `xpsr_jax.models.tiny` through `XPSRPipeline` with `configs/infer.py:tiny` (4 DDPM
steps, CFG, fp32) on one random LR of side size / 4. `--model sd15` / `micro`: constant-weight
networks of that size (`benchmarks/sampling_speed.py`; nothing to download) in the jitted
sampling loop, `--steps` DDPM steps (default 20) in `--dtype` (default bfloat16), with the default
config's tiles (the release's). `--tiles cpu` (the default for tiny and micro) uses the CPU-sized
tiles `tiling.latent_tile_size=64`, `latent_tile_overlap=8`, `vae_encoder_tile_size=512`,
`vae_decoder_tile_size=64`; `--tiles config` keeps the config's. Figures: the tile counts, seconds
to compile (tracing + XLA) and to sample, and peak memory: the device's `peak_bytes_in_use` where
the backend reports it, else the process's peak RSS (CPU: everything, model and compiler
included). "XLA scratch": the compiled sampler's temporary buffers by XLA's own plan
(`memory_analysis().temp_size_in_bytes`: exact and noise-free, weights and outputs excluded).
"less image buffers" subtracts the image's own full-size arrays, 9 bytes per output
pixel and channel (the x4-upscaled conditioning and the decoded image in float32, the uint8
result): what is left is what tiling has to bound. A size that runs past `--timeout` is reported
as such.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CPU_TILES = {"latent_tile_size": 64, "latent_tile_overlap": 8, "vae_encoder_tile_size": 512,
             "vae_decoder_tile_size": 64}


def image_buffer_bytes(size: int) -> int:
    return size * size * 3 * (4 + 4 + 1)


def worker(size: int, args) -> dict:
    import jax

    from xpsr_jax.configs.infer import get_config
    from xpsr_jax.inference.tiling import (
        VAE_DECODER_PAD,
        VAE_ENCODER_PAD,
        latent_tile_offsets,
        latent_tiling_applies,
        vae_tiles,
    )

    jax.config.update("jax_enable_compilation_cache", False)
    config = get_config("tiny" if args.model == "tiny" else None)
    if args.tiles == "cpu":
        config.tiling.update(CPU_TILES)
    config.tiling.vae_streaming = args.vae == "streaming"
    latent = size // 8
    tiling = config.tiling
    counts = {
        "latent_tiles": len(latent_tile_offsets(latent, latent, tiling.latent_tile_size, tiling.latent_tile_overlap)[1])
        if latent_tiling_applies(latent, latent, tiling.latent_tile_size) else 1,
        "encoder_tiles": len(vae_tiles(size, size, tiling.vae_encoder_tile_size, VAE_ENCODER_PAD, align=8) or [0]),
        "decoder_tiles": len(vae_tiles(latent, latent, tiling.vae_decoder_tile_size, VAE_DECODER_PAD) or [0]),
    }  # 1 = run whole
    print("TILES " + json.dumps(counts), flush=True)
    compile_s, sample_s, compiled = (run_tiny if args.model == "tiny" else run_constant)(size, config, args)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {**counts, "compile_s": compile_s, "sample_s": sample_s,
            "xla_temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            "peak_bytes": peak if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_kind": "device" if peak else "RSS"}


def run_tiny(size: int, config, args):
    """The tiny release through XPSRPipeline: (compile s, sampling s, the compiled sampler) of one image."""
    import numpy as np

    from xpsr_jax.inference.pipeline import XPSRPipeline
    from xpsr_jax.models.tiny import write_tiny_model

    paths = write_tiny_model(tempfile.mkdtemp(prefix="large_image_"))
    pipeline = XPSRPipeline.from_pretrained(paths.xpsr, paths.sd15, config=config)
    lr = np.random.default_rng(0).integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
    start = time.perf_counter()
    (image,) = pipeline([lr], ["a photo"], ["sharp"], seeds=[0])
    total = time.perf_counter() - start
    assert image.shape == (size, size, 3), image.shape
    (compiled,) = pipeline._compiled.values()
    return pipeline.compile_seconds, total - pipeline.compile_seconds, compiled


def run_constant(size: int, config, args):
    """Constant-weight networks of `args.model`'s size in the jitted loop: (compile s, sampling s,
    the compiled sampler)."""
    import jax.numpy as jnp

    from benchmarks.sampling_speed import build_jax_sampler

    tiling = config.tiling
    compile_s, run = build_jax_sampler(
        args.model, batch=1, pixels=size, steps=args.steps, dtype=jnp.dtype(args.dtype), backend="auto",
        plan_overrides=dict(latent_tile_size=tiling.latent_tile_size, latent_tile_overlap=tiling.latent_tile_overlap,
                            tile_batch_size=tiling.tile_batch_size, vae_encoder_tile_size=tiling.vae_encoder_tile_size,
                            vae_decoder_tile_size=tiling.vae_decoder_tile_size, vae_streaming=tiling.vae_streaming))
    start = time.perf_counter()
    run()  # build_jax_sampler ran it once already (the warm-up)
    return compile_s, time.perf_counter() - start, run.compiled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="output sides, px")
    parser.add_argument("--model", choices=("tiny", "micro", "sd15"), default="tiny")
    parser.add_argument("--tiles", choices=("cpu", "config"), default=None,
                        help="default: cpu for tiny and micro, config for sd15")
    parser.add_argument("--steps", type=int, default=20, help="micro / sd15 only (tiny: its config's 4)")
    parser.add_argument("--dtype", default="bfloat16", help="micro / sd15 only (tiny: float32)")
    parser.add_argument("--vae", choices=("streaming", "all_tiles"), default="streaming",
                        help="tiling.vae_streaming on (one VAE tile at a time) or off")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per size")
    parser.add_argument("--json", help="append one record per size here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tiles = args.tiles or ("config" if args.model == "sd15" else "cpu")
    if args.worker:
        print("ROW " + json.dumps(worker(args.worker, args)), flush=True)
        return 0
    recipe = "4 steps, float32" if args.model == "tiny" else f"{args.steps} steps, {args.dtype}"
    print(f"Large outputs, {args.model} model ({recipe}), {args.tiles} tiles, VAE {args.vae}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start\n")
    print("| output px | latent / encoder / decoder tiles | compile s | sampling s | peak memory | less image buffers "
          "| XLA scratch |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        command = [sys.executable, "-m", "benchmarks.large_image", "--worker", str(size), "--tiles", args.tiles,
                   "--vae", args.vae, "--model", args.model, "--steps", str(args.steps), "--dtype", args.dtype]
        tiles = "?"
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            output = done.stdout
        except subprocess.TimeoutExpired as error:
            done, output = None, error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        for line in output.splitlines():
            if line.startswith("TILES "):
                counts = json.loads(line[6:])
                tiles = f"{counts['latent_tiles']} / {counts['encoder_tiles']} / {counts['decoder_tiles']}"
                tiles = "untiled" if tiles == "1 / 1 / 1" else tiles
        rows = [json.loads(line[4:]) for line in output.splitlines() if line.startswith("ROW ")]
        if done is None:
            print(f"| {size} | {tiles} | did not finish within {args.timeout:.0f} s | | | | |", flush=True)
            record = {"size": size, "error": f"timeout {args.timeout:.0f} s"}
        elif not rows:
            error = (done.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"| {size} | {tiles} | error: {error} | | | | |", flush=True)
            record = {"size": size, "error": error}
        else:
            row = rows[0]
            print(f"| {size} | {tiles} | {row['compile_s']:.1f} | {row['sample_s']:.1f} | "
                  f"{row['peak_bytes'] / 2**30:.2f} GiB ({row['peak_kind']}) | "
                  f"{(row['peak_bytes'] - image_buffer_bytes(size)) / 2**30:.2f} GiB | "
                  f"{row['xla_temp_bytes'] / 2**30:.2f} GiB |", flush=True)
            record = {"size": size, **row}
        if args.json:
            with open(args.json, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"benchmark": "large_image", "model": args.model, "tiles": args.tiles,
                                         "vae": args.vae, "recipe": recipe, **record}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
