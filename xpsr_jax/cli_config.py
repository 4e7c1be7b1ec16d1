"""`--config FILE.py[:variant]` plus `--config.KEY=VALUE` overrides, as ml_collections' config flags.

    config, rest = parse_config_flags(argv, default="configs/infer.py")
    args = parser.parse_args(rest)          # the command's own flags

The config flags are parsed by absl on a private FlagValues (no global state), so an unknown key,
a wrong type or a bad file is reported with the flag's name before anything else runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags


class ConfigFlagError(ValueError):
    """A bad --config file, variant, key or value (the message names it)."""


def parse_config_flags(argv: Sequence[str], *, default: str, prog: str = "xpsr_jax"):
    """(locked ConfigDict, the arguments that are not config flags)."""
    config_args, rest = split_config_args(argv)
    flag_values = flags.FlagValues()
    # The override flags are found in `sys_argv` (default: the real sys.argv), so pass ours.
    try:
        config_flags.DEFINE_config_file("config", default, "config file[:variant]", flag_values=flag_values,
                                        lock_config=True, sys_argv=[prog, *config_args])
        flag_values([prog, *config_args])
        config = flag_values.config
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError, FileNotFoundError, OSError) as error:
        message = str(error).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        raise ConfigFlagError(f"config flags: {message}") from error
    return config, rest


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the --config / --config.KEY arguments with their values, everything else)."""
    config_args, rest = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if name == "--config" or name.startswith("--config."):
            config_args.append(arg)
            takes_value = "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--")
            if takes_value:
                config_args.append(args[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return config_args, rest
