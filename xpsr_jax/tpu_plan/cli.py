"""`python -m xpsr_jax.tpu_plan`: compile a program of ours for a TPU topology, on this machine,
and say before anyone pays for the pod whether and how it runs.

    python -m xpsr_jax.tpu_plan --topology v5e:2x2 --program train --config configs/train.py:tiny \\
        --json plan.json

Exit status 0 when the program fits every chip's HBM, 1 when it does not (with the figures), 2 on
bad input. Needs the [tpu] extra (libtpu); no TPU is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from xpsr_jax.cli_config import (
    CommandParser,
    ConfigFlagError,
    parse_config_flags,
    report_error,
    split_config_args,
    split_spec,
)
from xpsr_jax.files import write_bytes_atomic
from xpsr_jax.inference.config import validate_infer_config
from xpsr_jax.models.architectures import NAMED_ARCHITECTURES, architecture
from xpsr_jax.tpu_plan.plan import PlanResult, SearchRow, compile_plan, peak_rss_bytes, search_batch
from xpsr_jax.tpu_plan.programs import sample_program, train_program
from xpsr_jax.tpu_plan.topology import TopologyError, load_topology
from xpsr_jax.training.config import ConfigError, validate_train_config

PROGRAMS = {"train": "configs/train.py", "sample": "configs/infer.py"}
GiB = 2**30


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m xpsr_jax.tpu_plan", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile the train step or the sampler for a TPU topology with XLA:TPU on this machine (no "
                    "TPU needed: pip install -e \".[tpu]\") and report per-chip memory against HBM, FLOPs, "
                    "collectives and a step-time lower bound.",
        epilog="Example:\n  python -m xpsr_jax.tpu_plan --topology v5e:2x2 --program train --config "
               "configs/train.py:tiny --json plan.json\n\nConfig: --config FILE.py[:variant] and "
               "--config.KEY=VALUE, as for train.py (train) and infer.py (sample).\nExit status: 0 fits, 1 does "
               "not fit, 2 bad input.")
    parser.add_argument("--topology", required=True, help="TPU generation and shape, e.g. v5e:2x2, v5e:16x16, "
                        "v5p:4x4x4, v6e:16x16")
    parser.add_argument("--num-slices", type=int, default=1, help="slices joined over the data-centre network "
                        "(multi-slice; default 1)")
    parser.add_argument("--program", choices=tuple(PROGRAMS), default="train",
                        help="train: train.py's step over every chip; sample: infer.py's sampler on one host's "
                             "chips (default train)")
    parser.add_argument("--config", metavar="FILE.py[:VARIANT]", help="default: configs/train.py for train, "
                        "configs/infer.py for sample; --config.KEY=VALUE overrides a value")
    parser.add_argument("--model", help=f"network shapes: {' | '.join(NAMED_ARCHITECTURES)} | an SD 1.5 folder "
                        "(default: tiny with a :tiny config, else sd15)")
    parser.add_argument("--batch-per-chip", type=int, default=1, help="images per chip per step (train) or per "
                        "sampling call (sample); default 1")
    parser.add_argument("--size", help="sample: the processed image size, HxW or one side (default: the "
                        "config's process_size)")
    parser.add_argument("--search-batch", action="store_true", help="find the largest per-chip batch that fits, "
                        "per remat policy of --remat (train)")
    parser.add_argument("--remat", default="", help="with --search-batch: comma-separated policies for both "
                        "networks, none | attention | full (default: the config's)")
    parser.add_argument("--max-batch", type=int, default=64, help="with --search-batch: the largest batch tried "
                        "(default 64)")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON (atomically)")
    return parser


class PlanInputError(ValueError):
    """Bad input to the command (the message names it)."""


def _config(program: str, argv: list[str]):
    config_args, rest = split_config_args(argv)
    try:
        config, _ = parse_config_flags(config_args, default=PROGRAMS[program], prog="python -m xpsr_jax.tpu_plan")
    except ConfigFlagError as error:
        raise PlanInputError(str(error)) from None
    spec = next((arg.split("=", 1)[1] for arg in config_args if arg.startswith("--config=")), None)
    if spec is None and "--config" in config_args:
        spec = config_args[config_args.index("--config") + 1]
    variants = split_spec(spec or PROGRAMS[program])[1].split(",")
    return config, "tiny" in variants


def _validate(program: str, config) -> None:
    if program == "train":
        for key in ("data_dir", "tokenizer_path"):  # required by a run; a plan reads no data
            config.pipeline[key] = config.pipeline[key] or "(not read by a plan)"
        try:
            validate_train_config(config, check_paths=False)
        except ConfigError as error:
            raise PlanInputError(str(error)) from None
    else:
        validate_infer_config(config)


def _size(spec: str | None, config) -> tuple[int, int]:
    if not spec:
        return int(config.process_size), int(config.process_size)
    parts = spec.lower().split("x")
    try:
        height, width = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        height = width = None
    if height is None or height < 8 or width < 8 or height % 8 or width % 8:
        raise PlanInputError(f"--size {spec!r}: give HxW or one side, multiples of 8 of at least 8 px (e.g. 512 or "
                             "2048x2048)")
    return height, width


def run(args, argv: list[str]) -> int:
    if args.batch_per_chip < 1:
        raise PlanInputError(f"--batch-per-chip {args.batch_per_chip}: give an integer >= 1")
    if args.max_batch < 1:
        raise PlanInputError(f"--max-batch {args.max_batch}: give an integer >= 1")
    config, tiny_variant = _config(args.program, argv)
    _validate(args.program, config)
    size = _size(args.size, config) if args.program == "sample" else None
    policies = [p.strip() for p in args.remat.split(",") if p.strip()] or (
        [config.remat.unet] if args.program == "train" else [])
    if args.search_batch and args.program != "train":
        raise PlanInputError("--search-batch plans the train step; give --program train (the sampler's batch is "
                             "--batch-per-chip)")
    try:
        arch = architecture(args.model or ("tiny" if tiny_variant else "sd15"))
    except (FileNotFoundError, ValueError) as error:
        raise PlanInputError(f"--model: {error}") from None
    topology = load_topology(args.topology, args.num_slices)
    print(f"topology {topology.name} x {topology.num_slices} slice(s): {topology.chips} chips ({topology.device_kind}), "
          f"{topology.hosts} host(s); {topology.generation.hbm_bytes / GiB:.2f} GiB HBM per chip", flush=True)

    def build(config, batch):
        if args.program == "train":
            return train_program(config, arch, topology, batch_per_chip=batch)
        return sample_program(config, arch, topology, batch_per_chip=batch, size=size)

    if args.search_batch:
        rows = [search_batch(build, config, topology, policy, max_batch=args.max_batch) for policy in policies]
        print(format_search(rows, topology))
        _write_json(args.json, {"search": [_row_json(row) for row in rows], "host_peak_rss_bytes": peak_rss_bytes()})
        return 0 if any(row.largest_batch for row in rows) else 1
    print(f"compiling for {topology.name} ...", flush=True)
    result = compile_plan(build(config, args.batch_per_chip), topology)
    print(format_plan(result))
    _write_json(args.json, result.to_json())
    return 0 if result.fits else 1


def _row_json(row: SearchRow) -> dict:
    return {"remat": row.remat, "largest_batch_per_chip": row.largest_batch,
            "tried": [{"batch_per_chip": b, "fits": f} for b, f in row.tried],
            "at_largest": row.at_largest.to_json() if row.at_largest else None}


def _write_json(path: str | None, content: dict) -> None:
    if path:
        write_bytes_atomic(Path(path), (json.dumps(content, indent=1) + "\n").encode())
        print(f"wrote {path}")


def format_plan(result: PlanResult) -> str:
    generation = result.topology.generation
    lines = [result.description,
             f"compiled here in {result.compile_seconds:.1f} s (tracing and lowering {result.lower_seconds:.1f} s), "
             f"host peak memory {result.host_peak_rss_bytes / GiB:.1f} GiB"]
    if result.figures is None:
        exhausted = result.exhausted
        lines.append(f"DOES NOT FIT: XLA:TPU refused it: {exhausted.message}")
        return "\n".join(lines)
    figures, memory = result.figures, result.figures.memory
    verdict = "fits" if figures.fits else "DOES NOT FIT"
    unit = "step" if result.program == "train" else "sampling call"
    lines += ["per-chip memory (GiB)",
              *(f"  {name:<34}{value / GiB:9.3f}" for name, value in (
                  ("arguments", memory.arguments), ("outputs", memory.outputs),
                  ("outputs in argument buffers (less)", memory.aliased), ("temp", memory.temp),
                  ("code", memory.code))),
              f"  {'total':<34}{memory.total / GiB:9.3f}  of {figures.hbm_bytes / GiB:.2f} HBM ({generation.name}): "
              f"{verdict}",
              f"FLOPs per chip per {unit}: {figures.flops:.4g}" if figures.flops else "FLOPs: not reported",
              f"collectives per chip per {unit}: kind, count, MiB of results, element types"]
    for kind, collective in figures.collectives.items():
        types = ", ".join(f"{dtype} {size / 2**20:.2f}" for dtype, size in collective.bytes_by_dtype.most_common())
        lines.append(f"  {kind:<19}{collective.count:5d}{collective.bytes / 2**20:12.3f}  {types}")
    if figures.custom_calls:
        lines.append("custom calls: " + ", ".join(f"{target} x{count}" for target, count in
                                                  figures.custom_calls.most_common()))
    if figures.step_seconds:
        compute = f"{figures.compute_seconds * 1e3:.2f} ms at {generation.peak_bf16_flops / 1e12:.0f} TFLOP/s" \
            if figures.compute_seconds else "no FLOP count"
        lines.append(f"roofline lower bound: {figures.step_seconds * 1e3:.2f} ms per {unit} (compute {compute}; "
                     f"collectives {figures.collective_seconds * 1e3:.2f} ms at "
                     f"{generation.ici_bytes_per_second / 1e9:.0f} GB/s ICI) -> at most "
                     f"{figures.images_per_second:.1f} images/s per chip")
    lines.append(f"hardware figures: {generation.source}")
    return "\n".join(lines)


def format_search(rows: list[SearchRow], topology) -> str:
    lines = [f"largest per-chip batch that fits, {topology.name} ({topology.generation.hbm_bytes / GiB:.2f} GiB HBM "
             "per chip)", f"  {'remat':<10}{'batch':>6}{'GiB':>9}{'img/s/chip bound':>18}  tried"]
    for row in rows:
        figures = row.at_largest.figures if row.at_largest else None
        memory = f"{figures.memory.total / GiB:9.2f}" if figures else f"{'-':>9}"
        bound = f"{figures.images_per_second:18.1f}" if figures and figures.images_per_second else f"{'-':>18}"
        tried = ", ".join(f"{b}{'' if f else ' (no)'}" for b, f in row.tried)
        lines.append(f"  {row.remat:<10}{row.largest_batch:>6}{memory}{bound}  {tried}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(split_config_args(argv)[1])
    try:
        return run(args, argv)
    except (PlanInputError, TopologyError, ValueError) as error:
        report_error(error)
        return 2
