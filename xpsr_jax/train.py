"""Command line of XPSR training (kept short on purpose: parse, then call the library).

    python train.py --config configs/train.py[:variant] --workdir DIR [--config.KEY=VALUE ...]
    python -m xpsr_jax.train ...                      # the same

Multi-process (one process per host, or several on one machine): `--num_processes N
--process_id I --coordinator_address HOST:PORT` (or JAX_NUM_PROCESSES / JAX_PROCESS_ID /
JAX_COORDINATOR_ADDRESS), or `--distributed_auto` for JAX's cluster detection (TPU pods, SLURM).
Rerunning the same command resumes from the latest checkpoint in DIR. Exit status: 0 done or
stopped by SIGTERM with a checkpoint saved, 1 diverged (non-finite step), 2 bad input.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Sequence

from absl import flags
from ml_collections import config_dict, config_flags

from xpsr_jax.cli_config import (
    ConfigFlagError,
    load_config_file,
    report_error,
    resolve_config_args,
    split_config_args,
)
from xpsr_jax.distributed import DistributedOptions
from xpsr_jax.training.config import ConfigError
from xpsr_jax.training.loop import TrainingDiverged, train

USAGE = ("usage: python train.py --config configs/train.py[:variant] --workdir DIR "
         "[--config.KEY=VALUE ...]")


class UsageError(ValueError):
    """A bad command line; the message is one line."""


HELP = """{usage}

Train XPSR (ControlNet + the UNet's SFA and pixel attentions) on a TFDS dataset; rerunning the
same command resumes from the latest checkpoint in --workdir.

flags:
  --config FILE.py[:variant]   training config (required); the packaged one is configs/train.py,
                               variants: tiny, released_prompts
  --config.KEY=VALUE           override a config value (the config is locked: unknown keys fail)
  --workdir DIR                run folder: checkpoints/, metrics.jsonl, tensorboard/, config.json
  --coordinator_address H:P  multi-process: process 0's address (or JAX_COORDINATOR_ADDRESS)
  --num_processes N            multi-process: number of processes (or JAX_NUM_PROCESSES)
  --process_id I               multi-process: this process's index (or JAX_PROCESS_ID)
  --distributed_auto           jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM)

config keys (configs/train.py; reference: docs/configuration.md, docs/training.md):
  {keys}

example:
  python train.py --config configs/train.py:tiny --workdir runs/tiny \\
      --config.base_model=tiny/sd15 --config.pipeline.data_dir=tfds

exit status: 0 done (or stopped by SIGTERM with a checkpoint saved), 1 diverged, 2 bad input."""


def help_text() -> str:
    config = load_config_file("configs/train.py")
    keys = []
    for key, value in sorted(config.items()):
        if isinstance(value, config_dict.ConfigDict):
            keys.append(f"{key}.{{{', '.join(sorted(value.keys()))}}}")
        else:
            keys.append(key)
    return HELP.format(usage=USAGE, keys=textwrap.fill(", ".join(keys), 96, subsequent_indent="  "))


def parse_command_line(argv: Sequence[str]):
    """(config, workdir, DistributedOptions) from `argv` (argv[0] is the program name)."""
    config_args, rest = split_config_args(list(argv[1:]))
    try:
        config_args = resolve_config_args(config_args, default=None)
    except ConfigFlagError as error:
        raise UsageError(str(error)) from error
    argv = [argv[0], *config_args, *rest]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "training config file[:variants]",
                                    flag_values=values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, config",
                        flag_values=values)
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process)",
                        flag_values=values)
    flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)",
                         flag_values=values)
    flags.DEFINE_integer("process_id", None, "this process's index (multi-process)",
                         flag_values=values)
    flags.DEFINE_bool("distributed_auto", False, "jax.distributed.initialize() with cluster "
                      "auto-detection", flag_values=values)
    try:
        rest = values(argv)
    except flags.Error as error:
        raise UsageError(str(error).strip().splitlines()[0]) from error
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}; {USAGE}")
    if not values.workdir:
        raise UsageError(f"--workdir is required; {USAGE}")
    distributed = DistributedOptions(coordinator_address=values.coordinator_address,
                                     num_processes=values.num_processes,
                                     process_id=values.process_id, auto=values.distributed_auto)
    return values.config, values.workdir, distributed


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in argv[1:]):
        print(help_text())
        return 0
    try:
        config, workdir, distributed = parse_command_line(argv)
        train(config, workdir, distributed=distributed)
    except (UsageError, ConfigError) as error:
        report_error(error)
        return 2
    except TrainingDiverged as error:
        report_error(error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
