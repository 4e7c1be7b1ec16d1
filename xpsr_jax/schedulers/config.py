"""Reading a diffusers `scheduler_config.json`, and resolving sampler settings from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

SCHEDULER_CONFIG_NAME = "scheduler_config.json"


def load_scheduler_config(folder: str | os.PathLike) -> dict:
    """The parsed `scheduler_config.json` of a diffusers `scheduler/` folder or of a model root.

    `folder` may be the `scheduler/` folder itself, a model root holding `scheduler/`, or the
    JSON file. Raises FileNotFoundError / ValueError naming the path.
    """
    path = Path(folder)
    if path.is_file():
        config_path = path
    elif path.is_dir():
        candidates = [path / SCHEDULER_CONFIG_NAME, path / "scheduler" / SCHEDULER_CONFIG_NAME]
        config_path = next((c for c in candidates if c.is_file()), None)
        if config_path is None:
            raise FileNotFoundError(
                f"{path}: no scheduler config; expected {candidates[0]} or {candidates[1]}"
            )
    else:
        raise FileNotFoundError(f"{path}: scheduler folder does not exist")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{config_path}: not a readable JSON scheduler config ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(
            f"{config_path}: a scheduler config must be a JSON object, got {type(config).__name__}"
        )
    return config


def resolve_settings(
    owner: str,
    defaults: Mapping[str, Any],
    choices: Mapping[str, tuple],
    scheduler_config: Mapping[str, Any],
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """Each setting from `options`, else from the file, else the diffusers class default.

    `owner` names the caller in error messages ("ddpm sampler").

    Like diffusers' `from_config`, a file key counts whatever `_class_name` the file has (SD 1.5
    ships a PNDM config); keys the sampler does not know are ignored, options it does not know are
    an error. Options set to None are treated as not given. Values are checked against `choices`
    and against the type of their default.
    """
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"{owner}: unknown option(s) {unknown}; valid options: {sorted(defaults)}"
        )
    settings = {}
    for key, default in defaults.items():
        if options.get(key) is not None:
            value, source = options[key], "option"
        elif scheduler_config.get(key) is not None:
            value, source = scheduler_config[key], "scheduler config key"
        else:
            value, source = default, "default"
        settings[key] = _checked(owner, source, key, value, default, choices.get(key))
    return settings


def _checked(owner: str, source: str, key: str, value, default, valid: tuple | None):
    where = f"{owner}: {source} {key}={value!r}"
    if valid is not None:
        if value not in valid:
            raise ValueError(f"{where} is not supported; valid: {' | '.join(map(repr, valid))}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false")
    elif isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{where} must be an integer")
    elif isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{where} must be a number")
        value = float(value)
    elif isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ValueError(f"{where} must be a list of integers")
        value = tuple(value)
    return value
