"""Dynamic loss scaling for float16 compute: pure functions over a small array state.

float16 gradients of small losses underflow to zero; scaling the loss by S before the backward
pass and dividing the gradients by S afterwards keeps them representable. S starts high, is
halved (and the update skipped) whenever a gradient overflows, and doubled after `period`
finite steps in a row, the scheme of NVIDIA's AMP / torch.cuda.amp.GradScaler (init 2^16,
growth 2, backoff 0.5, interval 2000). bfloat16 has float32's exponent range and needs none.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

LOSS_SCALINGS = ("none", "dynamic")  # precision.loss_scaling
INITIAL_SCALE = 2.0 ** 16
GROWTH_PERIOD = 2000
MIN_SCALE = 1.0


@struct.dataclass
class LossScaleState:
    """scale: float32 scalar; finite_steps: int32 finite steps since the last change."""

    scale: jax.Array
    finite_steps: jax.Array


def initial_loss_scale(scale: float = INITIAL_SCALE) -> LossScaleState:
    return LossScaleState(scale=jnp.asarray(scale, jnp.float32), finite_steps=jnp.zeros((), jnp.int32))


def all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def scaled_value_and_grad(loss_fn: Callable, scale_state: LossScaleState) -> Callable:
    """Like jax.value_and_grad(loss_fn, has_aux=True), differentiating loss x scale and returning
    the unscaled loss and gradients (float32 division, so no precision is lost)."""

    def scaled(params):
        loss, aux = loss_fn(params)
        return loss * scale_state.scale.astype(loss.dtype), (loss, aux)

    def run(params):
        (_, (loss, aux)), grads = jax.value_and_grad(scaled, has_aux=True)(params)
        inverse = 1.0 / scale_state.scale
        grads = jax.tree.map(lambda g: (g.astype(jnp.float32) * inverse).astype(g.dtype), grads)
        return (loss, aux), grads

    return run


def update_loss_scale(scale_state: LossScaleState, grads_finite: jax.Array, *,
                      period: int = GROWTH_PERIOD, min_scale: float = MIN_SCALE) -> LossScaleState:
    """Halve on overflow (not below min_scale), double after `period` finite steps in a row."""
    grown = scale_state.finite_steps + 1 >= period
    scale = jnp.where(grads_finite, jnp.where(grown, scale_state.scale * 2.0, scale_state.scale),
                      jnp.maximum(scale_state.scale * 0.5, min_scale))
    finite_steps = jnp.where(grads_finite & ~grown, scale_state.finite_steps + 1, 0)
    return LossScaleState(scale=scale.astype(jnp.float32), finite_steps=finite_steps.astype(jnp.int32))
