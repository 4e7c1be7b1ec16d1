"""`python -m xpsr_jax.export torch|orbax|stablehlo ...`: one subcommand per output format.

    python -m xpsr_jax.export torch --workdir runs/xpsr --out xpsr-release
    python -m xpsr_jax.export orbax --weights xpsr-release --out xpsr-orbax
    python -m xpsr_jax.export stablehlo --weights xpsr-release --sd15 sd15 \
        --config configs/infer.py --config.num_inference_steps=20 --out xpsr-stablehlo

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from xpsr_jax.cli_config import CommandParser, report_error, split_config_args
from xpsr_jax.export import inference_checkpoint, stablehlo, torch_layout
from xpsr_jax.export.output import ExportError
from xpsr_jax.weights.formats import WeightsFormatError

SUBCOMMANDS = {
    "torch": (torch_layout, "a training checkpoint -> the official PyTorch release layout"),
    "orbax": (inference_checkpoint, "a release folder -> an inference-only orbax checkpoint"),
    "stablehlo": (stablehlo, "a release -> serialized StableHLO of the sampling function"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m xpsr_jax.export", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="format", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # --config.KEY=VALUE overrides (the stablehlo recipe) are ml_collections flags, not argparse's.
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [arg for arg in split_config_args(argv)[0] if arg.startswith(("--config.", "--noconfig."))]
    rest = [arg for arg in argv if arg not in overrides]
    args = build_parser().parse_args(rest)
    if overrides and args.format != "stablehlo":
        report_error(ValueError(f"{overrides[0]}: only `stablehlo` takes a config"), f"export {args.format}: error")
        return 2
    args.config_overrides = overrides
    module = SUBCOMMANDS[args.format][0]
    try:
        return int(module.run(args) or 0)
    except (ExportError, WeightsFormatError) as error:
        report_error(error, f"export {args.format}: error")
        return 2


if __name__ == "__main__":
    sys.exit(main())
