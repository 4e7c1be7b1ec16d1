"""Inference timesteps, exactly as diffusers' `set_timesteps` spaces them.

Two families differ: DDPM/DDIM space `n` points over the training range; the multistep solvers
(DPM-Solver++, UniPC) space `n + 1` points and drop the last (t = 0), so `linspace` gives
999, 949, ..., 50 there and 999, 946, ..., 0 for DDPM/DDIM.
"""

from __future__ import annotations

import numpy as np

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def _check(spacing: str, num_inference_steps: int, num_train_timesteps: int) -> None:
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"timestep_spacing={spacing!r} is not supported; valid: {' | '.join(TIMESTEP_SPACINGS)}"
        )
    steps = num_inference_steps
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must be in [1, num_train_timesteps="
            f"{num_train_timesteps}]"
        )


def _checked_range(timesteps: np.ndarray, num_train_timesteps: int,
                   steps_offset: int) -> np.ndarray:
    if len(timesteps) > 1 and np.any(np.diff(timesteps) >= 0):
        raise ValueError(
            f"{len(timesteps)} inference steps over {num_train_timesteps} training timesteps give "
            f"repeated timesteps {timesteps.tolist()}; use fewer steps or another timestep_spacing"
        )
    if timesteps.min() < 0 or timesteps.max() >= num_train_timesteps:
        raise ValueError(
            f"steps_offset={steps_offset} moves the timesteps to [{timesteps.min()}, "
            f"{timesteps.max()}], outside the training range [0, {num_train_timesteps - 1}]"
        )
    return timesteps.astype(np.int32)


def discrete_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int,
                       steps_offset: int = 0) -> np.ndarray:
    """DDPM/DDIM timesteps, descending, int32 (num_inference_steps,)."""
    _check(spacing, num_inference_steps, num_train_timesteps)
    n, total = int(num_inference_steps), int(num_train_timesteps)
    if spacing == "linspace":
        timesteps = np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        timesteps = (np.arange(n) * (total // n)).round()[::-1].astype(np.int64) + steps_offset
    else:
        timesteps = np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1
    return _checked_range(timesteps, total, steps_offset)


def multistep_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int,
                        steps_offset: int = 0, last_timestep: int | None = None) -> np.ndarray:
    """DPM-Solver++ / UniPC timesteps, descending, int32 (num_inference_steps,).

    `last_timestep` (default `num_train_timesteps`) is DPM-Solver's `lambda_min_clipped` cut.
    """
    _check(spacing, num_inference_steps, num_train_timesteps)
    n, total = int(num_inference_steps), int(num_train_timesteps)
    last = total if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last // (n + 1)
        timesteps = (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    else:
        timesteps = np.arange(last, 0, -total / n).round().astype(np.int64) - 1
    return _checked_range(timesteps, total, steps_offset)
