"""CPU head-to-head, one table: xpsr-jax (jitted) vs the PyTorch reference, same architecture.

    python -m benchmarks.cpu_head_to_head                      # tiny widths, 128 px, batch 2, fp32
    python -m benchmarks.cpu_head_to_head --pixels 256 --repeats 7
    python -m benchmarks.cpu_head_to_head --no-compile         # eager PyTorch only

Three rows, each the same networks on both sides (the tiny widths of benchmarks/train_speed.py:
UNet / ControlNet (32, 32, 64, 64), one layer per block; VAE (8, 8, 16, 16); a 2-layer CLIP):
  - forward: one XPSR ControlNet + UNet call on batch 2 (= one image with CFG), as
    benchmarks/xpsr_step_speed.py;
  - train step: VAE encode + 2 CLIP passes + ControlNet / UNet forward and backward + clip + AdamW on
    batch 2, as benchmarks/train_speed.py;
  - sampling: the whole 20-step loop for one image (CFG: batch 2 through the networks), as
    benchmarks/sampling_speed.py.
PyTorch runs eagerly and, where it works, with its ControlNet and UNet under torch.compile
(inductor); a compile that fails or takes longer than --compile-timeout is reported in its cell.
Every variant of a row is built first and then timed round-robin (one call each per round), so
on a shared machine all of them run under the same load; cells are medians over --repeats rounds
and the ratio is ours / PyTorch (< 1: xpsr-jax is faster). Weights are constants or random:
speed does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks.attention import round_robin_ms
from benchmarks.common import TINY_UNET, TINY_VAE, time_limit
from benchmarks.sampling_speed import build_jax_sampler, build_torch_sampler
from benchmarks.train_speed import jax_steps, torch_trainer
from benchmarks.train_speed import parse_args as train_args
from benchmarks.xpsr_step_speed import build_step, build_torch_step
from xpsr_jax.models import XPSRUNetConfig

ROWS = ("forward", "train", "sampling")


def row_builders(args):
    """{row: {variant: zero-argument builder of a no-argument timed call}} for the requested rows."""
    config = XPSRUNetConfig(**TINY_UNET)
    latent = args.pixels // 8
    train = train_args(["--size", "tiny", "--resolution", str(args.pixels), "--batch", str(args.batch),
                        "--attention-backend", args.attention_backend])
    builders = {
        "forward": {
            "xpsr-jax": lambda: build_step(config, dtype=jnp.float32, backend=args.attention_backend,
                                           batch=args.batch, latent=latent)[1],
            "eager": lambda: build_torch_step(config, dtype_name="float32", batch=args.batch, latent=latent),
            "compile": lambda: build_torch_step(config, dtype_name="float32", batch=args.batch, latent=latent,
                                                compile_backend=args.compile_backend),
        },
        "train": {
            "xpsr-jax": lambda: jax_steps(train, "float32", [args.batch], ["none"])[0](args.batch, "none"),
            "eager": lambda: torch_trainer(train, "float32")(args.batch),
            "compile": lambda: torch_trainer(train, "float32", args.compile_backend)(args.batch),
        },
        "sampling": {
            "xpsr-jax": lambda: build_jax_sampler("tiny", batch=args.batch // 2, pixels=args.pixels,
                                                  steps=args.steps, dtype=jnp.float32,
                                                  backend=args.attention_backend, unet=TINY_UNET, vae=TINY_VAE)[1],
            "eager": lambda: build_torch_sampler("tiny", batch=args.batch // 2, pixels=args.pixels, steps=args.steps,
                                                 dtype_name="float32", unet=TINY_UNET, vae=TINY_VAE),
            "compile": lambda: build_torch_sampler("tiny", batch=args.batch // 2, pixels=args.pixels,
                                                   steps=args.steps, dtype_name="float32", unet=TINY_UNET,
                                                   vae=TINY_VAE, compile_backend=args.compile_backend),
        },
    }
    return {name: builders[name] for name in args.rows}


def build_variant(name, build, timeout):
    """(call, None, build seconds) or (None, 'failed ...' text, seconds). The first call runs inside
    the limit: that is where jit / torch.compile compile."""
    start = time.perf_counter()
    try:
        with time_limit(timeout):
            call = build()
            call()
        return call, None, time.perf_counter() - start
    except Exception as error:  # one variant failing (torch.compile) must not lose the row
        seconds = time.perf_counter() - start
        text = f"failed after {seconds:.0f} s: {type(error).__name__}: {str(error).splitlines()[0][:90]}"
        print(f"  {name}: {text}", file=sys.stderr, flush=True)
        return None, text.replace("|", "/"), seconds


def measure(args):
    """{row: {variant: ms or failure text}} and {row: {variant: build seconds}}."""
    results, builds = {}, {}
    for row, variants in row_builders(args).items():
        calls, cells, seconds = {}, {}, {}
        for variant, build in variants.items():
            if variant == "compile" and args.no_compile:
                continue
            timeout = args.compile_timeout if variant == "compile" else args.build_timeout
            call, failure, seconds[variant] = build_variant(f"{row} {variant}", build, timeout)
            if call is None:
                cells[variant] = failure
            else:
                calls[variant] = call
            print(f"  built {row} {variant} in {seconds[variant]:.0f} s", file=sys.stderr, flush=True)
        cells.update(round_robin_ms(calls, args.repeats) if calls else {})
        results[row], builds[row] = cells, seconds
        print(f"  {row}: " + ", ".join(f"{k} {_ms(v)}" for k, v in cells.items()), file=sys.stderr, flush=True)
    return results, builds


def _ms(cell) -> str:
    return f"{cell:,.1f}" if isinstance(cell, float) else (cell or "not run")


def _ratio(ours, theirs) -> str:
    return f"{ours / theirs:.2f}" if isinstance(ours, float) and isinstance(theirs, float) else "n/a"


LABELS = {"forward": "ControlNet + UNet forward, batch {batch}",
          "train": "train step (VAE + CLIP + fwd/bwd + AdamW), batch {batch}",
          "sampling": "{steps}-step sampling loop, {images} image (CFG batch {batch})"}


def markdown(args, results, builds) -> str:
    lines = ["| step | xpsr-jax (jit) ms | PyTorch eager ms | ours / eager | PyTorch torch.compile ms "
             "| ours / compile | build + first call s (ours / eager / compile) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row, cells in results.items():
        label = LABELS[row].format(batch=args.batch, steps=args.steps, images=args.batch // 2)
        ours, eager, compiled = cells.get("xpsr-jax"), cells.get("eager"), cells.get("compile")
        build = " / ".join(f"{builds[row][v]:.0f}" if v in builds[row] else "-" for v in ("xpsr-jax", "eager", "compile"))
        lines.append(f"| {label} | {_ms(ours)} | {_ms(eager)} | {_ratio(ours, eager)} | "
                     f"{'not run (--no-compile)' if args.no_compile else _ms(compiled)} | {_ratio(ours, compiled)} "
                     f"| {build} |")
    return "\n".join(lines)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return (f"{model}, {os.cpu_count()} cores (PyTorch threads {torch.get_num_threads()}); jax {jax.__version__}, "
            f"torch {torch.__version__}")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, default=128, help="image side (latent = pixels / 8); multiple of 64")
    parser.add_argument("--batch", type=int, default=2, help="network batch (sampling: batch / 2 images with CFG)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--repeats", type=int, default=5, help="round-robin rounds per row (the median is shown)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--compile-timeout", type=float, default=300,
                        help="seconds a torch.compile build + first call may take before it is reported as failed")
    parser.add_argument("--build-timeout", type=float, default=None, help="the same limit for jit / eager builds")
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    if args.pixels % 64 or args.batch % 2 or args.batch < 2:
        parser.error(f"--pixels must be a multiple of 64 (got {args.pixels}: the tiny UNet halves the latent "
                     f"3 times) and --batch an even number >= 2 (got {args.batch}: sampling runs CFG pairs)")
    return args


def main(argv=None):
    args = parse(argv)
    jax.config.update("jax_platforms", "cpu")
    load_before = os.getloadavg()
    results, builds = measure(args)
    load_after = os.getloadavg()
    command = "python -m benchmarks.cpu_head_to_head " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        f"machine: {machine()}",
        f"load average (1/5/15 min) before {' '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{' '.join(f'{x:.2f}' for x in load_after)}",
        f"config: tiny widths, {args.pixels} px, fp32, attention {args.attention_backend}, median of {args.repeats} "
        f"round-robin rounds; command: `{command.strip()}`",
        "",
        markdown(args, results, builds),
    ])
    print(text, flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
