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

import importlib.util
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ml_collections import config_dict

USAGE = ("usage: python train.py --config configs/train.py[:variant] --workdir DIR "
         "[--config.KEY=VALUE ...]")


class UsageError(ValueError):
    """A bad command line; the message is one line."""


def load_config_file(spec: str) -> config_dict.ConfigDict:
    """`path.py[:variants]` -> get_config(variants) of that file."""
    path, _, variants = spec.partition(":")
    if not Path(path).is_file():
        raise UsageError(f"--config={spec!r}: no such config file {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"_xpsr_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UsageError(f"--config={spec!r}: {path} has no get_config()")
    try:
        return module.get_config(variants) if variants else module.get_config()
    except ValueError as error:  # e.g. an unknown variant
        raise UsageError(f"--config={spec!r}: {error}") from error


def _config_spec(argv: Sequence[str]) -> str:
    for index, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
    raise UsageError(f"--config is required; {USAGE}")


def _valid_keys(node: config_dict.ConfigDict) -> str:
    return ", ".join(sorted(node.keys()))


def check_override_keys(config: config_dict.ConfigDict, argv: Sequence[str]) -> None:
    """Every --config.KEY names a key of `config` (ml_collections' own error is a bare
    AttributeError): UsageError naming the flag and the valid keys at that level."""
    for arg in argv:
        match = re.match(r"^--(?:no)?config\.([^=\s]+)", arg)
        if not match:
            continue
        node, walked = config, []
        for part in match.group(1).split("."):
            if not isinstance(node, config_dict.ConfigDict) or part not in node:
                where = ".".join(walked) or "the top level"
                valid = _valid_keys(node) if isinstance(node, config_dict.ConfigDict) else "none"
                raise UsageError(f"{arg.split('=', 1)[0]}: unknown config key "
                                 f"{'.'.join(walked + [part])!r}; valid keys at {where}: {valid}")
            node, walked = node[part], walked + [part]


def parse_command_line(argv: Sequence[str]):
    """(config, workdir, DistributedOptions) from `argv` (argv[0] is the program name)."""
    from absl import flags
    from ml_collections import config_flags

    from xpsr_jax.training.loop import DistributedOptions

    argv = list(argv)
    check_override_keys(load_config_file(_config_spec(argv[1:])), argv[1:])
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
    from xpsr_jax.training.config import ConfigError
    from xpsr_jax.training.loop import TrainingDiverged, train

    argv = list(sys.argv if argv is None else argv)
    try:
        config, workdir, distributed = parse_command_line(argv)
        train(config, workdir, distributed=distributed)
    except (UsageError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
