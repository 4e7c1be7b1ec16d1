"""Large outputs: wall time, compile time and peak memory of one image per output size.

    python -m benchmarks.large_image                          # tiny model, CPU tiles, 512 1024 2048 px
    python -m benchmarks.large_image --sizes 512 1024 2048 4096 --timeout 1800
    python -m benchmarks.large_image --tiles tiny             # the tiny config's own (16-latent-px) tiles

Each size runs in a fresh process (its peak memory is its own): the tiny model of
`xpsr_jax.models.tiny` through `XPSRPipeline` with `configs/infer.py:tiny` (4 DDPM steps, CFG,
fp32) on one random LR of side size / 4. `--tiles cpu` (default) uses the CPU-sized tiles
`tiling.latent_tile_size=64`, `latent_tile_overlap=8`, `vae_encoder_tile_size=512`,
`vae_decoder_tile_size=64`; `--tiles tiny` keeps the config's. Figures: the tile counts, seconds
to compile (tracing + XLA) and to sample, and peak memory: the device's `peak_bytes_in_use` where
the backend reports it, else the process's peak RSS (CPU: everything, model and compiler
included). A size that runs past `--timeout` is reported as such.
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


def worker(size: int, tiles: str) -> dict:
    import jax
    import numpy as np

    from xpsr_jax.configs.infer import get_config
    from xpsr_jax.inference.pipeline import XPSRPipeline
    from xpsr_jax.inference.tiling import (
        VAE_DECODER_PAD,
        VAE_ENCODER_PAD,
        latent_tile_offsets,
        latent_tiling_applies,
        vae_tiles,
    )
    from xpsr_jax.models.tiny import write_tiny_model

    jax.config.update("jax_enable_compilation_cache", False)
    paths = write_tiny_model(tempfile.mkdtemp(prefix="large_image_"))
    config = get_config("tiny")
    if tiles == "cpu":
        config.tiling.update(CPU_TILES)
    pipeline = XPSRPipeline.from_pretrained(paths.xpsr, paths.sd15, config=config)
    latent = size // 8
    tiling = config.tiling
    counts = {
        "latent_tiles": len(latent_tile_offsets(latent, latent, tiling.latent_tile_size, tiling.latent_tile_overlap)[1])
        if latent_tiling_applies(latent, latent, tiling.latent_tile_size) else 1,
        "encoder_tiles": len(vae_tiles(size, size, tiling.vae_encoder_tile_size, VAE_ENCODER_PAD, align=8) or [0]),
        "decoder_tiles": len(vae_tiles(latent, latent, tiling.vae_decoder_tile_size, VAE_DECODER_PAD) or [0]),
    }  # 1 = run whole
    print("TILES " + json.dumps(counts), flush=True)
    lr = np.random.default_rng(0).integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
    start = time.perf_counter()
    (image,) = pipeline([lr], ["a photo"], ["sharp"], seeds=[0])
    total = time.perf_counter() - start
    assert image.shape == (size, size, 3), image.shape
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {**counts, "compile_s": pipeline.compile_seconds, "sample_s": total - pipeline.compile_seconds,
            "peak_bytes": peak if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_kind": "device" if peak else "RSS"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="output sides, px")
    parser.add_argument("--tiles", choices=("cpu", "tiny"), default="cpu")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per size")
    parser.add_argument("--json", help="append one record per size here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("ROW " + json.dumps(worker(args.worker, args.tiles)), flush=True)
        return 0
    print(f"Large outputs, tiny model, {args.tiles} tiles, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f} at start\n")
    print("| output px | latent / encoder / decoder tiles | compile s | sampling s | peak memory |")
    print("|---:|---|---:|---:|---:|")
    for size in args.sizes:
        command = [sys.executable, "-m", "benchmarks.large_image", "--worker", str(size), "--tiles", args.tiles]
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
            print(f"| {size} | {tiles} | did not finish within {args.timeout:.0f} s | | |", flush=True)
            record = {"size": size, "error": f"timeout {args.timeout:.0f} s"}
        elif not rows:
            error = (done.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"| {size} | {tiles} | error: {error} | | |", flush=True)
            record = {"size": size, "error": error}
        else:
            row = rows[0]
            print(f"| {size} | {tiles} | {row['compile_s']:.1f} | {row['sample_s']:.1f} | "
                  f"{row['peak_bytes'] / 2**30:.2f} GiB ({row['peak_kind']}) |", flush=True)
            record = {"size": size, **row}
        if args.json:
            with open(args.json, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"tiles": args.tiles, **record}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
