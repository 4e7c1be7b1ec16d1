"""AdamW with the official defaults, learning-rate schedules, clipping, accumulation, EMA.

Official (`train.py` + `configs/xpsr.yaml`): torch AdamW lr 5e-5, betas (0.9, 0.999), weight
decay 1e-2 on every trainable tensor, eps 1e-8, constant schedule, global-norm clip 1.0 on the
accumulated gradient, gradient accumulation 2. optax's adamw is the same update (decoupled decay
lr * wd * p, eps added to sqrt(v_hat)); clipping differs only in torch's +1e-6 in the divisor.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from xpsr_jax.cli_config import ConfigError, config_value, invalid_value

SCHEDULES = ("constant", "cosine")
OPTIMIZER_KEYS = ("learning_rate", "b1", "b2", "weight_decay", "eps", "schedule", "warmup_steps",
                  "grad_clip_norm", "gradient_accumulation_steps", "ema_decay")


def validate_optimizer_config(config: Any, total_steps: int) -> None:
    """The one check of the optimizer settings (the training config's validation calls it):
    ConfigError naming the key, the bad value and what is valid."""
    def bad(key: str, valid: str) -> ConfigError:
        return invalid_value(f"optimizer.{key}", config[key], valid)

    for key in OPTIMIZER_KEYS:
        config_value(config, key, "optimizer")
    for key in OPTIMIZER_KEYS:
        value = config[key]
        if key != "schedule" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise bad(key, "a finite number")
    for key in ("warmup_steps", "gradient_accumulation_steps"):
        if not isinstance(config[key], int):
            raise bad(key, "an integer")
    # 0 is allowed: the weights then stay as loaded (AdamW's decay is scaled by it too), which
    # checks a pipeline end to end (init_from -> train -> export gives the same bytes).
    if not float(config["learning_rate"]) >= 0:
        raise bad("learning_rate", "a float >= 0")
    for key in ("b1", "b2"):
        if not 0 <= float(config[key]) < 1:
            raise bad(key, "a float in [0, 1)")
    if not float(config["weight_decay"]) >= 0:
        raise bad("weight_decay", "a float >= 0")
    if not float(config["eps"]) > 0:
        raise bad("eps", "a positive float")
    if config["schedule"] not in SCHEDULES:
        raise bad("schedule", " | ".join(SCHEDULES))
    if not 0 <= int(config["warmup_steps"]) < int(total_steps):
        raise bad("warmup_steps", f"an integer >= 0 and < total_steps={total_steps}")
    if not float(config["grad_clip_norm"]) >= 0:
        raise bad("grad_clip_norm", "a float >= 0 (0 = off)")
    if int(config["gradient_accumulation_steps"]) < 1:
        raise bad("gradient_accumulation_steps", "an int >= 1")
    if not 0 <= float(config["ema_decay"]) < 1:
        raise bad("ema_decay", "a float in [0, 1) (0 = off)")


def make_learning_rate_schedule(config: Any, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer update (one update = gradient_accumulation_steps steps).

    constant: linear warmup from 0 over warmup_steps, then learning_rate (diffusers'
    constant_with_warmup; plain constant when warmup_steps is 0). cosine: the same warmup, then
    cosine decay to 0 at the last update.
    """
    peak = float(config["learning_rate"])
    warmup = int(config["warmup_steps"])
    updates = max(int(total_steps) // int(config["gradient_accumulation_steps"]), 1)
    if config["schedule"] == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(updates, warmup + 1), end_value=0.0)
    if warmup == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])


def make_optimizer(optimizer_config: Any, total_steps: int) -> optax.GradientTransformation:
    """Clip (global norm) -> AdamW, wrapped in optax.MultiSteps when accumulating gradients.

    With accumulation, `update` must be called once per micro-batch; the inner optimizer sees
    the mean gradient every gradient_accumulation_steps calls (as accelerate's accumulate).
    """
    validate_optimizer_config(optimizer_config, total_steps)
    config = optimizer_config
    parts = []
    if float(config["grad_clip_norm"]) > 0:
        parts.append(optax.clip_by_global_norm(float(config["grad_clip_norm"])))
    parts.append(optax.adamw(make_learning_rate_schedule(config, total_steps), b1=float(config["b1"]),
                             b2=float(config["b2"]), eps=float(config["eps"]),
                             weight_decay=float(config["weight_decay"])))
    tx = optax.chain(*parts)
    steps = int(config["gradient_accumulation_steps"])
    if steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=steps)
    return tx


def learning_rate_at(optimizer_config: Any, total_steps: int, step: jax.Array) -> jax.Array:
    """The learning rate the update of (0-based) micro-step `step` uses."""
    schedule = make_learning_rate_schedule(optimizer_config, total_steps)
    return jnp.asarray(schedule(step // int(optimizer_config["gradient_accumulation_steps"])), jnp.float32)


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
    """ema <- decay * ema + (1 - decay) * params, in the EMA's dtype."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
                        ema_params, params)
