"""The optimizer on flat buffers (`xpsr_jax.training.flat`) gives the per-parameter updates.

The 4-device fsdp case (groups split over devices with no collective, partition specs, the
checkpoint form's round trip) runs in tests/helpers/training_multidevice.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers.training_fixtures import tiny_train_config
from xpsr_jax.training.flat import FlatLayout
from xpsr_jax.training.optimizer import ema_update, make_optimizer

# conv and dense are large enough (>= 4096 elements) to be split over fsdp; the rest stay replicated.
SHAPES = {"conv": (3, 3, 32, 64), "dense": (64, 128), "bias": (64,), "norm": {"scale": (64,), "bias": (64,)},
          "odd": (5, 7, 3), "scalar_like": (1,)}
SHARDED_ELEMENTS = 3 * 3 * 32 * 64 + 64 * 128


def _tree(rng: np.random.Generator, shapes=SHAPES, scale: float = 1.0):
    return jax.tree.map(lambda shape: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("fsdp_size, shard", [(1, False), (4, True), (2, True)])
def test_flatten_then_unflatten_gives_back_every_tensor_bit_for_bit(fsdp_size, shard):
    params = _tree(np.random.default_rng(0))
    layout = FlatLayout.for_params(params, fsdp_size=fsdp_size, shard=shard)
    flat = layout.flatten(params)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert sum(int(np.prod(x.shape)) for x in flat.values()) == total
    if shard:
        assert flat["float32/fsdp"].shape == (fsdp_size, SHARDED_ELEMENTS // fsdp_size)
        assert flat["float32"].shape == (total - SHARDED_ELEMENTS,)
    else:
        assert set(flat) == {"float32"}
    back = layout.unflatten(flat)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_each_device_row_of_a_sharded_group_is_that_devices_shard_of_every_tensor():
    params = {"dense": jnp.arange(16 * 512, dtype=jnp.float32).reshape(16, 512),
              "conv": jnp.arange(3 * 3 * 4 * 256, dtype=jnp.float32).reshape(3, 3, 4, 256)}
    layout = FlatLayout.for_params(params, fsdp_size=4, shard=True)
    rows = np.asarray(layout.flatten(params)["float32/fsdp"])
    places = {place.shape: place for place in layout.places}
    # dense splits on its largest divisible axis (512: columns), conv on its 256 output channels.
    for shape, axis in (((16, 512), 1), ((3, 3, 4, 256), 3)):
        place = places[shape]
        assert place.axis == axis and place.width == int(np.prod(shape)) // 4
        tensor = np.asarray(params["dense" if len(shape) == 2 else "conv"])
        for device, shard in enumerate(np.split(tensor, 4, axis=axis)):
            np.testing.assert_array_equal(rows[device, place.start:place.start + place.width],
                                          np.moveaxis(shard, axis, 0).ravel())


@pytest.mark.parametrize("accumulation, ema_decay", [(1, 0.9), (2, 0.0)])
def test_clip_adamw_and_ema_on_flat_buffers_equal_the_per_parameter_updates(accumulation, ema_decay):
    """Six updates from fixed gradients (one of them large enough to be clipped), through the
    real optimizer of the training config: parameters equal within 1e-6 relative."""
    config = tiny_train_config()
    config.optimizer.update(gradient_accumulation_steps=accumulation, ema_decay=ema_decay, warmup_steps=2,
                            schedule="cosine")
    tx = make_optimizer(config.optimizer, 12)
    rng = np.random.default_rng(1)
    params = _tree(rng)
    mixed = {**params, "half": jnp.asarray(rng.standard_normal((8, 4)), jnp.bfloat16)}  # a second dtype group
    layout = FlatLayout.for_params(mixed, fsdp_size=2, shard=True)
    assert set(layout.groups) == {"bfloat16", "float32", "float32/fsdp"}

    reference, reference_state, reference_ema = mixed, tx.init(mixed), mixed
    flat, flat_state, flat_ema = layout.flatten(mixed), tx.init(layout.flatten(mixed)), layout.flatten(mixed)
    for step in range(6):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), mixed)
        if step == 2:
            grads = jax.tree.map(lambda g: g * 100, grads)  # clipped
        updates, reference_state = tx.update(grads, reference_state, reference)
        reference = optax.apply_updates(reference, updates)
        updates, flat_state = tx.update(layout.flatten(grads), flat_state, flat)
        flat = optax.apply_updates(flat, updates)
        if ema_decay:
            reference_ema = ema_update(reference_ema, reference, ema_decay)
            flat_ema = ema_update(flat_ema, flat, ema_decay)
    moved = 0
    for (path, want), got, ema_want, ema_got, start in zip(
            jax.tree_util.tree_leaves_with_path(reference), jax.tree.leaves(layout.unflatten(flat)),
            jax.tree.leaves(reference_ema), jax.tree.leaves(layout.unflatten(flat_ema)), jax.tree.leaves(mixed)):
        want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
        tolerance = 1e-2 if jax.tree_util.keystr(path) == "['half']" else 1e-6  # bf16 rounding of the sums
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * np.abs(want).max(),
                                   err_msg=jax.tree_util.keystr(path))
        np.testing.assert_allclose(np.asarray(ema_got, np.float32), np.asarray(ema_want, np.float32),
                                   rtol=tolerance, atol=tolerance * np.abs(want).max())
        moved += not np.array_equal(want, np.asarray(start, np.float32))
    assert moved == len(jax.tree.leaves(mixed))


def test_optimizer_states_convert_to_per_parameter_trees_and_back():
    config = tiny_train_config()
    config.optimizer.gradient_accumulation_steps = 2  # MultiSteps: mu, nu and the accumulator
    params = _tree(np.random.default_rng(2))
    layout = FlatLayout.for_params(params, fsdp_size=2, shard=True)
    tx = make_optimizer(config.optimizer, 10)
    flat_state = tx.init(layout.flatten(params))
    grads = layout.flatten(_tree(np.random.default_rng(3)))
    _, flat_state = tx.update(grads, flat_state, layout.flatten(params))
    per_parameter = layout.to_per_parameter(flat_state)
    # The per-parameter form is exactly what the optimizer would hold without flattening.
    assert jax.tree.structure(per_parameter) == jax.tree.structure(tx.init(params))
    accumulated = per_parameter.acc_grads
    np.testing.assert_array_equal(np.asarray(accumulated["dense"]), np.asarray(layout.unflatten(grads)["dense"]))
    back = layout.from_per_parameter(per_parameter)
    assert jax.tree.structure(back) == jax.tree.structure(flat_state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(flat_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
