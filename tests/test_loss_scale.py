"""Dynamic loss scaling (float16 compute): the gradients it recovers, skipping on overflow, and the
scale's schedule, against torch.cuda.amp.GradScaler's rules."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np

from xpsr_jax.training.loss_scale import (INITIAL_SCALE, all_finite, initial_loss_scale, scaled_value_and_grad,
                                          update_loss_scale)



def _fp16_loss(params):
    """A float16 layer under a float32 loss (as in the model: activations float16, the loss
    reduced in float32) whose backward pass underflows without scaling: d/dw = 1e-4 x / 64."""
    x = jnp.full((64,), 1e-3, jnp.float16)
    activations = params["w"].astype(jnp.float16) * x
    loss = jnp.mean(activations.astype(jnp.float32)) * 1e-4
    return loss, {"mean_w": jnp.mean(params["w"])}


def test_scaling_recovers_float16_gradients_that_underflow_without_it():
    params = {"w": jnp.ones((64,), jnp.float32)}
    exact = 1e-3 * 1e-4 / 64  # ~1.6e-9: below float16's smallest subnormal (6e-8)
    (_, _), plain = jax.value_and_grad(_fp16_loss, has_aux=True)(params)
    assert float(jnp.max(jnp.abs(plain["w"]))) == 0.0  # the failure loss scaling exists for
    (loss, aux), scaled = jax.jit(scaled_value_and_grad(_fp16_loss, initial_loss_scale()))(params)
    np.testing.assert_allclose(np.asarray(scaled["w"]), exact, rtol=2e-2)
    assert float(loss) == float(_fp16_loss(params)[0])  # the loss comes back unscaled
    assert float(aux["mean_w"]) == 1.0


def test_overflow_halves_the_scale_and_finite_steps_grow_it_after_the_period():
    state = initial_loss_scale()
    state = update_loss_scale(state, jnp.asarray(False), period=3)
    assert float(state.scale) == INITIAL_SCALE / 2 and int(state.finite_steps) == 0
    scales = []
    for _ in range(7):
        state = update_loss_scale(state, jnp.asarray(True), period=3)
        scales.append(float(state.scale))
    half = INITIAL_SCALE / 2
    assert scales == [half, half, half * 2, half * 2, half * 2, half * 4, half * 4]
    floor = initial_loss_scale(2.0)
    for _ in range(3):
        floor = update_loss_scale(floor, jnp.asarray(False), min_scale=1.0)
    assert float(floor.scale) == 1.0


def test_all_finite_sees_one_bad_element_in_any_leaf():
    tree = {"a": jnp.ones(3), "b": {"c": jnp.asarray([1.0, 2.0], jnp.float16)}}
    assert bool(all_finite(tree))
    assert not bool(all_finite({**tree, "b": {"c": jnp.asarray([1.0, jnp.inf], jnp.float16)}}))
    assert not bool(all_finite({**tree, "a": jnp.asarray([jnp.nan, 0.0, 0.0])}))


def test_an_overflowing_scale_gives_non_finite_gradients_that_the_step_must_skip():
    params = {"w": jnp.ones((64,), jnp.float32)}
    huge = initial_loss_scale(2.0 ** 40)  # loss x scale overflows float16 in the backward pass

    def loss_fn(p):
        w = p["w"].astype(jnp.float16)
        return jnp.sum(w * w).astype(jnp.float32), {}

    def scaled_in_fp16(p):  # the scaled loss itself in float16, as a float16 model produces it
        (loss, aux), grads = scaled_value_and_grad(
            lambda q: (jnp.sum(q["w"].astype(jnp.float16) ** 2), {}), huge)(p)
        return loss, grads

    _, grads = scaled_in_fp16(params)
    assert not bool(all_finite(grads))
    assert float(update_loss_scale(huge, all_finite(grads)).scale) == 2.0 ** 39
    (_, _), fine = scaled_value_and_grad(loss_fn, initial_loss_scale(2.0 ** 4))(params)
    np.testing.assert_allclose(np.asarray(fine["w"]), 2.0, rtol=1e-3)


def test_train_step_applies_unscaled_gradients_and_skips_an_overflowing_step(monkeypatch):
    """`train_step`'s wiring of the scaling, with the networks and loss replaced by one float16
    layer (the loop's real loss compiles a whole model; the scaling logic does not need it)."""
    import optax
    from flax import nnx

    from xpsr_jax.configs import train as train_configs
    from xpsr_jax.training import step as step_lib
    from xpsr_jax.training.flat import FlatLayout

    monkeypatch.setattr(step_lib, "latent_shape_for", lambda vae, shape: (1, 1, 1))
    monkeypatch.setattr(step_lib, "sample_loss_draws", lambda *args: None)
    monkeypatch.setattr(step_lib, "merge_models", lambda graphdefs, params, frozen: params)
    monkeypatch.setattr(step_lib, "xpsr_loss", lambda models, batch, draws, **_: _fp16_loss(models["unet"]))
    vae_graphdef, vae_state = nnx.split(nnx.Linear(1, 1, rngs=nnx.Rngs(0)))
    config = train_configs.get_config("tiny")
    learning_rate = 1e6  # plain SGD: the update is -1e6 x the (tiny) gradient, visible in float32
    params = {"unet": {"w": jnp.ones((64,), jnp.float32)}}
    layout = FlatLayout.for_params(params)
    kwargs = dict(graphdefs={"vae": vae_graphdef}, tx=optax.sgd(learning_rate), layout=layout,
                  noise_schedule=types.SimpleNamespace(num_train_timesteps=1000),
                  dfc_weight=0.05, optimizer_config=config.optimizer, total_steps=10)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=optax.sgd(learning_rate).init(layout.flatten(params)),
                                rng=jax.random.PRNGKey(0), loss_scale=initial_loss_scale())
    batch = {"pixel_values": jnp.zeros((1,))}

    state, metrics = step_lib.train_step(state, {"vae": vae_state}, batch, **kwargs)
    exact_gradient = 1e-3 * 1e-4 / 64
    np.testing.assert_allclose(np.asarray(state.params["unet"]["w"]), 1.0 - learning_rate * exact_gradient,
                               rtol=1e-4)
    assert not bool(metrics["skipped"]) and float(metrics["loss_scale"]) == INITIAL_SCALE
    assert int(state.loss_scale.finite_steps) == 1

    before = np.asarray(state.params["unet"]["w"])
    state = state.replace(loss_scale=initial_loss_scale(2.0 ** 40))  # overflows float16
    state, metrics = step_lib.train_step(state, {"vae": vae_state}, batch, **kwargs)
    assert bool(metrics["skipped"]) and bool(metrics["is_finite"])  # skipped, not diverged
    np.testing.assert_array_equal(np.asarray(state.params["unet"]["w"]), before)
    assert float(state.loss_scale.scale) == 2.0 ** 39 and int(state.step) == 2


def test_float16_compute_without_dynamic_scaling_is_a_config_error():
    import pytest

    from xpsr_jax.configs import train as train_configs
    from xpsr_jax.training.config import ConfigError, validate_train_config

    config = train_configs.get_config("tiny")
    config.base_model = config.pipeline.data_dir = config.pipeline.tokenizer_path = "unused"
    config.precision.compute_dtype = "float16"
    with pytest.raises(ConfigError, match="precision.loss_scaling='dynamic'"):
        validate_train_config(config, check_paths=False)
    config.precision.loss_scaling = "dynamic"
    validate_train_config(config, check_paths=False)
