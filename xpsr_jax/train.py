"""Command line of XPSR training (kept short on purpose: parse, then call the library).

    python -m xpsr_jax.train --config train.py[:variant] --workdir DIR [--config.KEY=VALUE ...]
    python train.py ...                               # the same, from the repository root

Multi-process (one process per host, or several on one machine): `--num-processes N
--process-id I --coordinator-address HOST:PORT` (or JAX_NUM_PROCESSES / JAX_PROCESS_ID /
JAX_COORDINATOR_ADDRESS), or `--distributed-auto` for JAX's cluster detection (TPU pods, SLURM);
the underscore spellings (`--num_processes`, ...) still work. Rerunning the same command resumes
from the latest checkpoint in DIR. Exit status: 0 done or stopped by SIGTERM with a checkpoint
saved, 1 diverged (non-finite step), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from ml_collections import config_dict

from xpsr_jax.cli_config import (
    CommandParser,
    ConfigError,
    add_distributed_arguments,
    load_config_file,
    parse_command_line,
    report_error,
)
from xpsr_jax.distributed import DistributedOptions
from xpsr_jax.training.loop import TrainingDiverged, train

PROG = "python -m xpsr_jax.train"
EPILOG = """config keys (the packaged train.py; reference: docs/configuration.md, docs/training.md):
  {keys}

example:
  {prog} --config train.py:tiny --workdir runs/tiny \\
      --config.base_model=tiny/sd15 --config.pipeline.data_dir=tfds

exit status: 0 done (or stopped by SIGTERM with a checkpoint saved), 1 diverged, 2 bad input."""


def config_keys_text() -> str:
    config = load_config_file("train.py")
    keys = [f"{key}.{{{', '.join(sorted(value.keys()))}}}" if isinstance(value, config_dict.ConfigDict) else key
            for key, value in sorted(config.items())]
    return textwrap.fill(", ".join(keys), 96, subsequent_indent="  ")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train XPSR (ControlNet + the UNet's SFA and pixel attentions) on a TFDS dataset; "
                    "rerunning the same command resumes from the latest checkpoint in --workdir.",
        epilog=EPILOG.format(keys=config_keys_text(), prog=PROG))
    parser.add_argument("--config", metavar="FILE.py[:VARIANT]",
                        help="training config (required); the packaged one is train.py (variants: tiny, "
                             "released_prompts); --config.KEY=VALUE overrides one value (the config is "
                             "locked: unknown keys fail)")
    parser.add_argument("--workdir", required=True,
                        help="run folder: checkpoints/, metrics.jsonl, tensorboard/, config.json")
    add_distributed_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`argv` as sys.argv (argv[0] is the program name)."""
    argv = list(sys.argv if argv is None else argv)
    parser = build_parser()
    try:
        config, args = parse_command_line(parser, argv[1:], default=None)
    except SystemExit as done:  # --help, or a bad flag already reported in one line
        return int(done.code or 0)
    try:
        train(config, args.workdir, distributed=DistributedOptions.from_args(args))
    except ConfigError as error:
        report_error(error)
        return 2
    except TrainingDiverged as error:
        report_error(error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
