"""Sampling seeds: the range the samplers take, and each seed's PRNG key.

JAX's threefry key keeps a seed's low 32 bits (64-bit types are off), so seed 2**32 would draw the
image of seed 0 and 2**64 does not convert at all: a seed outside [0, MAX_SEED] is refused by name
rather than silently wrapped.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

MAX_SEED = 2**32 - 1
VALID_SEEDS = f"an integer in [0, {MAX_SEED}] (2**32 - 1: seeds are 32-bit)"


class SeedError(ValueError):
    """A seed outside the range the samplers take (the message names it and the range)."""


def is_valid_seed(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and 0 <= value <= MAX_SEED


def check_seed(value, name: str = "seed") -> int:
    """`value` as an int, or SeedError naming `name` and the valid range."""
    if not is_valid_seed(value):
        raise SeedError(f"{name}={value!r} is invalid; valid: {VALID_SEEDS}")
    return int(value)


def seed_key_data(seeds: Sequence[int]) -> np.ndarray:
    """uint32 (B, 2): the key data each image's draws come from, one per seed."""
    return np.stack([np.asarray(jax.random.key_data(jax.random.PRNGKey(check_seed(seed)))) for seed in seeds])
