"""The floating-point dtypes the networks compute and store in, by the names configs use."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

DTYPES_BY_NAME = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPE_NAMES = tuple(DTYPES_BY_NAME)


def dtype_from_name(name: str, key: str) -> Any:
    """The jnp dtype called `name`; ValueError naming the config key and the valid names."""
    if name not in DTYPES_BY_NAME:
        raise ValueError(f"{key}={name!r} is not a supported dtype; valid: {' | '.join(DTYPE_NAMES)}")
    return DTYPES_BY_NAME[name]
