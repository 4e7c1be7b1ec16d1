"""The one way every command reads its config: `--config FILE.py[:variant,...]` plus
`--config.KEY=VALUE` overrides, as ml_collections' config flags.

    config, rest = parse_config_flags(argv, default="infer.py")
    args = parser.parse_args(rest)          # the command's own flags
    config, args = parse_command_line(parser, argv, default="infer.py")    # both; bad flags exit 2
    parser = CommandParser(prog="python -m xpsr_jax.NAME", ...)   # every command's argparse parser
    config = load_config_file("train.py:tiny")

A FILE that does not exist as given but names one of the packaged config files (`train.py`,
`configs/train.py` or `train`: see `xpsr_jax/configs/`) means the packaged one, so the commands
work from any directory after `pip install .`. The config flags are parsed by absl on a private
FlagValues (no global state), so an unknown key, a wrong type or a bad file is reported with
the flag's name before anything else runs. Every error is a ConfigFlagError with one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import flags
from ml_collections import config_dict, config_flags

PACKAGED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# The small CPU variant is `tiny` everywhere; `runlocal` (data.py's old name) still works.
VARIANT_ALIASES = {"runlocal": "tiny"}


class ConfigError(ValueError):
    """A bad config value, from a file, a flag or a library caller: one line naming the key, the
    value and what is valid (`invalid_value`)."""


class ConfigFlagError(ConfigError):
    """A bad --config file, variant, key or value (the message names it)."""


def invalid_value(key: str, value: Any, valid: str, config_name: str = "") -> ConfigError:
    """The one message for a bad config value: "[NAME config: ]KEY=VALUE is invalid; valid: ..."."""
    where = f"{config_name} config: " if config_name else ""
    return ConfigError(f"{where}{key}={value!r} is invalid; valid: {valid}")


def config_value(config: Any, dotted_key: str, config_name: str = "") -> Any:
    """`config["a"]["b"]` for "a.b"; a missing key is a ConfigError naming it."""
    value = config
    try:
        for part in dotted_key.split("."):
            value = value[part]
    except (KeyError, AttributeError, TypeError):
        where = f"{config_name} config" if config_name else "config"
        raise ConfigError(f"{where}: missing key {dotted_key!r}") from None
    return value


class CommandParser(argparse.ArgumentParser):
    """argparse for every command: a bad flag is one line naming it, then where the help is (exit 2),
    instead of the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


class DeprecatedSpelling(argparse.Action):
    """Stores the value like "store"; used under an old flag spelling, says which one replaces it."""

    def __init__(self, option_strings, dest, preferred: str, **kwargs):
        self.preferred = preferred
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string != self.preferred:
            print(f"warning: {option_string} is deprecated; use {self.preferred}", file=sys.stderr)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags of every command that runs on several processes (train, infer), read
    by `xpsr_jax.distributed.DistributedOptions.from_args`; the underscore spellings still work."""
    group = parser.add_argument_group("multi-process (one process per host, or several on one machine)")
    flags_and_options = (
        ("--coordinator-address", dict(metavar="HOST:PORT",
                                       help="process 0's address (or JAX_COORDINATOR_ADDRESS)")),
        ("--num-processes", dict(type=int, metavar="N", help="number of processes (or JAX_NUM_PROCESSES)")),
        ("--process-id", dict(type=int, metavar="I", help="this process's index (or JAX_PROCESS_ID)")),
        ("--distributed-auto", dict(nargs=0, default=False, help="jax.distributed.initialize() with JAX's "
                                                                "cluster detection (TPU pods, SLURM)")))
    for flag, kwargs in flags_and_options:
        group.add_argument(flag, "--" + flag[2:].replace("-", "_"), action=DeprecatedSpelling,
                           preferred=flag, **kwargs)


def report_error(error: BaseException, prefix: str = "error") -> None:
    """The one line every command prints for bad input; XPSR_DEBUG=1 adds the traceback."""
    print(f"{prefix}: {error}", file=sys.stderr, flush=True)
    if os.environ.get("XPSR_DEBUG"):
        traceback.print_exception(error)


def packaged_config_names() -> list[str]:
    return sorted(p.name for p in PACKAGED_CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def resolve_config_path(path: str) -> Path:
    """`path` when it is a config file, else the packaged config file it names (`train.py`,
    `configs/train.py`, `train`); ConfigFlagError otherwise. In the repository root `train.py` and
    `infer.py` are the commands themselves, not configs: those names mean the packaged configs."""
    given = Path(path)
    name = given.name if given.suffix == ".py" else f"{given.name}.py"
    packaged = PACKAGED_CONFIG_DIR / name
    names_a_packaged_file = (given.parent in (Path("."), Path("configs")) and packaged.is_file()
                             and not name.startswith("_"))
    if given.is_file() and (not names_a_packaged_file or "def get_config" in given.read_text(errors="replace")):
        return given
    if names_a_packaged_file:
        return packaged
    raise ConfigFlagError(f"--config={path!r}: no such config file; the packaged ones are "
                          f"{', '.join(packaged_config_names())} (e.g. --config train.py:tiny)")


def split_spec(spec: str) -> tuple[Path, str]:
    """'FILE[:variants]' -> (the resolved file, the variants with aliases applied)."""
    path, _, variants = spec.partition(":")
    names = [v.strip() for v in variants.split(",") if v.strip()]
    for old in sorted(set(names) & set(VARIANT_ALIASES)):
        print(f"note: config variant {old!r} is now called {VARIANT_ALIASES[old]!r}", file=sys.stderr)
    return resolve_config_path(path), ",".join(VARIANT_ALIASES.get(name, name) for name in names)


def load_config_file(spec: str) -> config_dict.ConfigDict:
    """`FILE.py[:variants]` -> get_config(variants) of that file (big_vision style)."""
    path, variants = split_spec(spec)
    module_spec = importlib.util.spec_from_file_location(f"_xpsr_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001  (a user's config file may raise anything)
        raise ConfigFlagError(f"--config={spec!r}: cannot load {path}: {type(error).__name__}: {error}") from error
    if not hasattr(module, "get_config"):
        raise ConfigFlagError(f"--config={spec!r}: {path} has no get_config()")
    try:
        return module.get_config(variants) if variants else module.get_config()
    except ValueError as error:  # e.g. an unknown variant
        raise ConfigFlagError(f"--config={spec!r}: {error}") from error
    except Exception as error:  # noqa: BLE001  (a bug in a user's get_config: name it, no traceback)
        raise ConfigFlagError(f"--config={spec!r}: get_config() of {path} raised {type(error).__name__}: "
                              f"{error}") from error


def check_override_keys(config: config_dict.ConfigDict, argv: Sequence[str]) -> None:
    """Every --config.KEY names a key of `config` (ml_collections' own error is a bare
    AttributeError): ConfigFlagError naming the flag and the valid keys at that level."""
    for arg in argv:
        match = re.match(r"^--(?:no)?config\.([^=\s]+)", arg)
        if not match:
            continue
        node, walked = config, []
        for part in match.group(1).split("."):
            if not isinstance(node, config_dict.ConfigDict) or part not in node:
                where = ".".join(walked) or "the top level"
                valid = ", ".join(sorted(node.keys())) if isinstance(node, config_dict.ConfigDict) else "none"
                raise ConfigFlagError(f"{arg.split('=', 1)[0]}: unknown config key "
                                      f"{'.'.join(walked + [part])!r}; valid keys at {where}: {valid}")
            node, walked = node[part], walked + [part]


def parse_config_flags(argv: Sequence[str], *, default: str | None, prog: str = "xpsr_jax"):
    """(locked ConfigDict, the arguments that are not config flags). `default`: the config file
    spec used when argv has no --config (a packaged name such as "infer.py" works); None: --config
    is required."""
    config_args, rest = split_config_args(argv)
    config_args = resolve_config_args(config_args, default)
    flag_values = flags.FlagValues()
    # The override flags are found in `sys_argv` (default: the real sys.argv), so pass ours.
    try:
        config_flags.DEFINE_config_file("config", default and _resolved_spec(default), "config file[:variant]",
                                        flag_values=flag_values, lock_config=True, sys_argv=[prog, *config_args])
        flag_values([prog, *config_args])
        config = flag_values.config
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OverflowError, FileNotFoundError,
            OSError) as error:
        message = str(error).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        message = message.splitlines()[0] if message else type(error).__name__
        raise ConfigFlagError(f"config flags: {message}") from error
    return config, rest


def parse_command_line(parser, argv: Sequence[str] | None, *, default: str | None):
    """(config, the parser's namespace) from a command line (None: sys.argv[1:]); a bad config
    flag is reported as the parser's usage error (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        parser.parse_args(["--help"])  # before the config: --help works without --config
    try:
        config, rest = parse_config_flags(argv, default=default, prog=parser.prog)
    except ConfigFlagError as error:
        parser.error(str(error))
    return config, parser.parse_args(rest)


def _resolved_spec(spec: str) -> str:
    path, variants = split_spec(spec)
    return f"{path}:{variants}" if variants else str(path)


def resolve_config_args(config_args: list[str], default: str | None) -> list[str]:
    """--config values with packaged names and variant aliases resolved (absl needs real paths);
    overrides are checked against the file's keys first, for a message that lists the valid ones.
    `default`: the spec when there is no --config (None: --config is required)."""
    out, spec = [], default
    for index, arg in enumerate(config_args):
        if arg == "--config" and index + 1 < len(config_args):
            continue
        previous = config_args[index - 1] if index else ""
        if previous == "--config":
            spec = arg
            out += ["--config", _resolved_spec(arg)]
        elif arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
            out.append(f"--config={_resolved_spec(spec)}")
        else:
            out.append(arg)
    if spec is None:
        raise ConfigFlagError("--config is required (e.g. --config train.py:tiny; the packaged configs are "
                              f"{', '.join(packaged_config_names())})")
    config = load_config_file(spec)  # a bad file or variant: its own one-line message, before absl's
    check_override_keys(config, [arg for arg in out if arg.startswith(("--config.", "--noconfig."))])
    return out


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the --config / --config.KEY arguments with their values, everything else)."""
    config_args, rest = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if name == "--config" or name.startswith(("--config.", "--noconfig.")):
            config_args.append(arg)
            takes_value = ("=" not in arg and not name.startswith("--noconfig.") and i + 1 < len(args)
                           and not args[i + 1].startswith("--"))
            if takes_value:
                config_args.append(args[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return config_args, rest
