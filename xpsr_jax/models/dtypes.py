"""The floating-point dtypes the networks compute and store in, by the names configs use."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from xpsr_jax.cli_config import invalid_value

DTYPES_BY_NAME = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPE_NAMES = tuple(DTYPES_BY_NAME)


def dtype_from_name(name: str, key: str) -> Any:
    """The jnp dtype called `name`; ConfigError naming the config key and the valid names."""
    if name not in DTYPES_BY_NAME:
        raise invalid_value(key, name, " | ".join(DTYPE_NAMES))
    return DTYPES_BY_NAME[name]
