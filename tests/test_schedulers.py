"""Samplers and the noise schedule against diffusers' PyTorch schedulers.

Trajectories: a fixed nonlinear "model" eps(x, t), the same in JAX and torch, is sampled for 20
steps from the same start, ours inside one jitted `lax.fori_loop`, diffusers' step by step in
torch float64 (DPM-Solver casts to float32 inside its step); every intermediate sample is compared.
DDPM's per-step noise is injected into diffusers by patching the `randn_tensor` its module calls.
"""

from __future__ import annotations

import functools
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm

from xpsr_jax.schedulers import (
    SAMPLERS, NoiseSchedule, add_noise, get_velocity, load_scheduler_config, make_sampler,
    noise_schedule_from_config)

# diffusers' own numpy-2 deprecation notices (np.array(tensor) in set_timesteps)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")

# Stable Diffusion 1.5's scheduler/scheduler_config.json (a PNDM config, no timestep_spacing key).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
DIFFUSERS_CLASSES = {
    "ddpm": diffusers.DDPMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "dpmsolver++": diffusers.DPMSolverMultistepScheduler,
    "unipc": diffusers.UniPCMultistepScheduler,
}
SAMPLE_SHAPE = (2, 8, 8, 4)  # NHWC latents
TRAJECTORY_TOLERANCE = 1e-5


def fixed_model_jax(x, t):
    s = t.astype(jnp.float32) / 1000.0
    return (0.8 + 0.15 * s) * x + 0.1 * jnp.tanh(3.0 * x) + 0.05 * jnp.cos(x)


def fixed_model_torch(x, t):
    s = float(t) / 1000.0
    return (0.8 + 0.15 * s) * x + 0.1 * torch.tanh(3.0 * x) + 0.05 * torch.cos(x)


def denoising_loop(sampler, x_init, step_noise, step_fn=None):
    """All steps in one `lax.fori_loop`; returns every intermediate sample (n, *shape)."""
    step_fn = sampler.step if step_fn is None else step_fn

    def body(i, carry):
        x, state, trajectory = carry
        eps = fixed_model_jax(x, sampler.timestep_at(i))
        noise = step_noise[i] if sampler.needs_step_noise else None
        x, state = step_fn(state, i, eps, x, noise)
        return x, state, trajectory.at[i].set(x)

    trajectory = jnp.zeros((sampler.num_inference_steps,) + x_init.shape, x_init.dtype)
    carry = (x_init, sampler.init_state(x_init), trajectory)
    return jax.lax.fori_loop(0, sampler.num_inference_steps, body, carry)[2]


run_sampler = jax.jit(denoising_loop, static_argnums=0)


def diffusers_trajectory(scheduler, num_steps, x_init, step_noise, monkeypatch, eta=None,
                         legacy_previous_timestep=False):
    """diffusers' loop in torch float64; returns (trajectory, number of noise draws made)."""
    scheduler.set_timesteps(num_steps)
    if legacy_previous_timestep:  # diffusers 0.21.4's DDPM rule: t' = t - T // n
        ratio = scheduler.config.num_train_timesteps // num_steps
        monkeypatch.setattr(scheduler, "previous_timestep", lambda t: t - ratio)
    current = {"step": 0, "draws": 0}

    def injected_randn(shape, generator=None, device=None, dtype=None, **_):
        current["draws"] += 1
        return torch.from_numpy(step_noise[current["step"]]).to(dtype)

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", injected_randn)
    x = torch.from_numpy(x_init).double()
    trajectory = []
    for i, t in enumerate(scheduler.timesteps):
        current["step"] = i
        kwargs = {}
        if eta:
            kwargs = {"eta": eta, "variance_noise": torch.from_numpy(step_noise[i]).double()}
        x = scheduler.step(fixed_model_torch(x, t), t, x, **kwargs).prev_sample
        trajectory.append(x.double().numpy())
    return np.stack(trajectory), current["draws"]


@pytest.fixture(scope="module")
def draws():
    rng = np.random.default_rng(7)
    x_init = rng.standard_normal(SAMPLE_SHAPE).astype(np.float32)
    step_noise = rng.standard_normal((20,) + SAMPLE_SHAPE).astype(np.float32)
    return x_init, step_noise


def config_with(**overrides):
    return {**SD15_SCHEDULER_CONFIG, **overrides}


# (sampler, scheduler config overrides, sampler options (also passed to diffusers), steps, extras)
TRAJECTORY_CASES = {
    "ddpm-sd15": ("ddpm", {}, {}, 20, {}),
    "ddpm-offset0-t0-fixed_large-clip": (
        "ddpm", {"steps_offset": 0, "clip_sample": True}, {"variance_type": "fixed_large"}, 20, {}),
    "ddpm-trailing-fixed_small_log": (
        "ddpm", {}, {"timestep_spacing": "trailing", "variance_type": "fixed_small_log"}, 20, {}),
    "ddpm-linspace-step_ratio-0.21.4": (
        "ddpm", {}, {"timestep_spacing": "linspace", "previous_timestep": "step_ratio"}, 20,
        {"legacy_previous_timestep": True}),
    "ddim-sd15": ("ddim", {}, {}, 20, {}),
    "ddim-eta-clip-trailing": (
        "ddim", {"clip_sample": True}, {"timestep_spacing": "trailing", "eta": 0.7}, 20, {}),
    "ddim-v_prediction-alpha_one": (
        "ddim", {"prediction_type": "v_prediction", "set_alpha_to_one": True}, {}, 20, {}),
    "dpmsolver++-sd15-zero": ("dpmsolver++", {}, {}, 20, {}),
    "dpmsolver++-sigma_min-7-steps": ("dpmsolver++", {}, {"final_sigmas_type": "sigma_min"}, 7, {}),
    "dpmsolver++-heun-leading": (
        "dpmsolver++", {}, {"solver_type": "heun", "timestep_spacing": "leading"}, 20, {}),
    "unipc-sd15-sigma_min": ("unipc", {}, {"final_sigmas_type": "sigma_min"}, 20, {}),
    "unipc-sd15-zero": ("unipc", {}, {"final_sigmas_type": "zero"}, 20, {}),
    "unipc-order3-bh1-disabled-corrector-7-steps": (
        "unipc", {}, {"solver_order": 3, "solver_type": "bh1", "disable_corrector": [2],
                      "final_sigmas_type": "sigma_min"}, 7, {}),
    "unipc-v_prediction-trailing": (
        "unipc", {"prediction_type": "v_prediction"},
        {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}, 20, {}),
}
DIFFUSERS_ONLY_OPTIONS = ("eta", "previous_timestep")


@pytest.mark.parametrize("case", list(TRAJECTORY_CASES))
def test_trajectory_matches_diffusers(case, draws, monkeypatch):
    name, config_overrides, options, steps, extras = TRAJECTORY_CASES[case]
    x_init, step_noise = draws
    config = config_with(**config_overrides)
    sampler = make_sampler(name, config, steps, **options)
    ours = np.asarray(run_sampler(sampler, jnp.asarray(x_init), jnp.asarray(step_noise)))

    scheduler_options = {k: v for k, v in options.items() if k not in DIFFUSERS_ONLY_OPTIONS}
    scheduler = DIFFUSERS_CLASSES[name].from_config(config, **scheduler_options)
    reference, noise_draws = diffusers_trajectory(
        scheduler, steps, x_init, step_noise, monkeypatch, eta=options.get("eta"), **extras)

    np.testing.assert_array_equal(sampler.timesteps, scheduler.timesteps.numpy())
    errors = np.abs(ours - reference).reshape(steps, -1).max(axis=1)
    print(f"{case}: max-abs error per step max {errors.max():.2e}, final {errors[-1]:.2e}, "
          f"sample scale {np.abs(reference).max():.2f}")
    assert errors.max() < TRAJECTORY_TOLERANCE, errors
    if name == "ddpm":  # ancestral noise at every step with t > 0, none at t = 0
        assert noise_draws == int(np.sum(sampler.timesteps > 0))


def test_final_sigmas_type_changes_only_the_last_unipc_step(draws):
    x_init, step_noise = map(jnp.asarray, draws)
    trajectories = {
        kind: np.asarray(run_sampler(make_sampler("unipc", SD15_SCHEDULER_CONFIG, 20,
                                                  final_sigmas_type=kind), x_init, step_noise))
        for kind in ("sigma_min", "zero")
    }
    np.testing.assert_array_equal(trajectories["sigma_min"][:-1], trajectories["zero"][:-1])
    last_min, last_zero = trajectories["sigma_min"][-1], trajectories["zero"][-1]
    relative = np.linalg.norm(last_min - last_zero) / np.linalg.norm(last_zero)
    print(f"unipc final step, sigma_min vs zero: relative difference {relative:.2e}")
    assert relative > 1e-3
    # the official default is diffusers 0.21.4's behaviour
    default = make_sampler("unipc", SD15_SCHEDULER_CONFIG, 20)
    assert default.settings["final_sigmas_type"] == "sigma_min"


def test_loop_traces_the_step_once(draws):
    sampler = make_sampler("unipc", SD15_SCHEDULER_CONFIG, 20)
    calls = []

    def counting_step(*args):
        calls.append(1)
        return sampler.step(*args)

    loop = jax.jit(functools.partial(denoising_loop, sampler, step_fn=counting_step))
    x_init, step_noise = map(jnp.asarray, draws)
    first = loop(x_init, step_noise)
    second = loop(x_init + 1.0, step_noise)
    assert len(calls) == 1  # 20 steps and two calls, one trace
    assert first.shape == (20,) + SAMPLE_SHAPE and not np.allclose(first, second)


@pytest.mark.parametrize("name", SAMPLERS)
def test_timesteps_match_diffusers(name):
    for spacing in ("leading", "linspace", "trailing"):
        for offset in (0, 1):
            for steps in (20, 7):
                config = config_with(steps_offset=offset)
                ours = make_sampler(name, config, steps, timestep_spacing=spacing).timesteps
                scheduler = DIFFUSERS_CLASSES[name].from_config(config, timestep_spacing=spacing)
                scheduler.set_timesteps(steps)
                assert ours.dtype == np.int32
                np.testing.assert_array_equal(ours, scheduler.timesteps.numpy(),
                                              err_msg=f"{name} {spacing} offset {offset} {steps}")


def test_default_spacing_per_sampler_on_the_sd15_file():
    leading = list(range(951, 0, -50))
    linspace = [999, 949, 899, 849, 799, 749, 699, 649, 599, 549,
                500, 450, 400, 350, 300, 250, 200, 150, 100, 50]
    expected = {"ddpm": leading, "ddim": leading, "dpmsolver++": linspace, "unipc": linspace}
    for name, timesteps in expected.items():
        assert make_sampler(name, SD15_SCHEDULER_CONFIG, 20).timesteps.tolist() == timesteps
    # an explicit option overrides the file's key
    config = config_with(timestep_spacing="trailing")
    assert make_sampler("ddpm", config, 20).timesteps[0] == 999
    assert make_sampler("ddpm", config, 20, timestep_spacing="leading").timesteps[0] == 951


def test_ddpm_previous_timestep_rules():
    leading = {rule: make_sampler("ddpm", SD15_SCHEDULER_CONFIG, 20, previous_timestep=rule)
               for rule in ("schedule", "step_ratio")}
    for key, table in leading["schedule"].tables.items():  # the rules agree on leading spacing
        np.testing.assert_array_equal(table, leading["step_ratio"].tables[key], err_msg=key)
    linspace = make_sampler("ddpm", SD15_SCHEDULER_CONFIG, 20, timestep_spacing="linspace",
                            previous_timestep="step_ratio")
    np.testing.assert_array_equal(linspace.prev_timesteps, linspace.timesteps - 50)


SCHEDULE_CASES = {
    "scaled_linear": ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                      1e-8, 1e-6),
    "linear": ({"beta_schedule": "linear"}, 1e-8, 1e-6),
    "squaredcos_cap_v2": ({"beta_schedule": "squaredcos_cap_v2"}, 1e-8, 1e-6),
    # diffusers rescales in float32; ours runs in float64
    "rescale_zero_snr": ({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                          "beta_end": 0.012, "rescale_betas_zero_snr": True}, 2e-5, 1e-6),
}


@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_noise_schedule_matches_diffusers(case):
    keys, betas_atol, alphas_cumprod_atol = SCHEDULE_CASES[case]
    schedule = noise_schedule_from_config({"num_train_timesteps": 1000, **keys})
    reference = diffusers.DDPMScheduler(**keys)
    assert schedule.alphas_cumprod.dtype == jnp.float32 and schedule.betas.shape == (1000,)
    np.testing.assert_allclose(schedule.betas, reference.betas.numpy(), rtol=1e-6, atol=betas_atol)
    # alphas ~ 1: compare absolutely (float32 1 - beta rounds at ~6e-8)
    np.testing.assert_allclose(schedule.alphas, reference.alphas.numpy(), rtol=0,
                               atol=max(betas_atol, 1e-7))
    np.testing.assert_allclose(schedule.alphas_cumprod, reference.alphas_cumprod.numpy(),
                               rtol=0, atol=alphas_cumprod_atol)


def test_noise_schedule_is_a_pytree_with_static_fields():
    schedule = noise_schedule_from_config(config_with(prediction_type="v_prediction"))
    leaves, treedef = jax.tree.flatten(schedule)
    assert len(leaves) == 3
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, NoiseSchedule)
    assert (rebuilt.num_train_timesteps, rebuilt.prediction_type) == (1000, "v_prediction")
    total = jax.jit(lambda s: s.alphas_cumprod.sum() * s.num_train_timesteps)(schedule)
    np.testing.assert_allclose(total, float(np.sum(schedule.alphas_cumprod)) * 1000, rtol=1e-6)


def test_add_noise_and_velocity_match_diffusers():
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal(SAMPLE_SHAPE).astype(np.float32)
    noise = rng.standard_normal(SAMPLE_SHAPE).astype(np.float32)
    timesteps = np.array([0, 999], dtype=np.int32)
    schedule = noise_schedule_from_config(SD15_SCHEDULER_CONFIG)
    reference = diffusers.DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(timesteps).long())
    noisy = add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(timesteps))
    assert noisy.dtype == jnp.float32 and noisy.shape == SAMPLE_SHAPE
    np.testing.assert_allclose(noisy, reference.add_noise(*args).numpy(), rtol=0, atol=2e-6)
    velocity = get_velocity(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(timesteps))
    np.testing.assert_allclose(velocity, reference.get_velocity(*args).numpy(), rtol=0, atol=2e-6)
    half = add_noise(schedule, jnp.asarray(x0, jnp.bfloat16), jnp.asarray(noise), timesteps)
    assert half.dtype == jnp.bfloat16


def test_bfloat16_samples_step_in_float32(draws):
    x_init, _ = draws
    sampler = make_sampler("unipc", SD15_SCHEDULER_CONFIG, 20)
    x = jnp.asarray(x_init)
    eps = fixed_model_jax(x, sampler.timestep_at(0))
    full, _ = sampler.step(sampler.init_state(x), 0, eps, x)
    half_x = x.astype(jnp.bfloat16)
    half, state = sampler.step(sampler.init_state(half_x), 0, eps.astype(jnp.bfloat16), half_x)
    assert half.dtype == jnp.bfloat16 and state["history"][0].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(half, np.float32), full, atol=0.05)


def test_load_scheduler_config_from_folder_and_model_root(tmp_path):
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, steps_offset=1, clip_sample=False)
    scheduler.save_pretrained(tmp_path / "scheduler")
    from_folder = load_scheduler_config(tmp_path / "scheduler")
    from_root = load_scheduler_config(str(tmp_path))
    from_file = load_scheduler_config(tmp_path / "scheduler" / "scheduler_config.json")
    assert from_folder == from_root == from_file
    assert from_folder["_class_name"] == "DDPMScheduler" and from_folder["steps_offset"] == 1
    # the saved file drives the sampler exactly like diffusers' own config
    assert make_sampler("ddpm", from_root, 20).timesteps.tolist() == list(range(951, 0, -50))


def test_load_scheduler_config_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere: scheduler folder does not exist"):
        load_scheduler_config(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no scheduler config; expected .*empty/"
                                                r"scheduler_config.json or .*empty/scheduler/"):
        load_scheduler_config(tmp_path / "empty")
    broken = tmp_path / "broken" / "scheduler"
    broken.mkdir(parents=True)
    (broken / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken/scheduler/scheduler_config.json: not a readable"):
        load_scheduler_config(tmp_path / "broken")
    (broken / "scheduler_config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        load_scheduler_config(broken)


@pytest.mark.parametrize("call, message", [
    (lambda: make_sampler("pndm", SD15_SCHEDULER_CONFIG, 20),
     r"unknown sampler 'pndm'; valid: ddpm \| ddim \| dpmsolver\+\+ \| unipc"),
    (lambda: make_sampler("ddpm", SD15_SCHEDULER_CONFIG, 0), r"num_inference_steps=0 must be in"),
    (lambda: make_sampler("unipc", SD15_SCHEDULER_CONFIG, 1001),
     r"num_inference_steps=1001 must be in \[1, num_train_timesteps=1000\]"),
    (lambda: make_sampler("ddim", SD15_SCHEDULER_CONFIG, 2.5),
     r"num_inference_steps=2.5 must be an integer"),
    (lambda: make_sampler("ddpm", SD15_SCHEDULER_CONFIG, 20, final_sigmas_type="zero"),
     r"ddpm sampler: unknown option\(s\) \['final_sigmas_type'\]; valid options: .*variance_type"),
    (lambda: make_sampler("unipc", SD15_SCHEDULER_CONFIG, 20, final_sigmas_type="last"),
     r"unipc sampler: option final_sigmas_type='last' is not supported; valid: 'zero' \| "
     r"'sigma_min'"),
    (lambda: make_sampler("ddpm", SD15_SCHEDULER_CONFIG, 20, timestep_spacing="uniform"),
     r"option timestep_spacing='uniform' is not supported; valid: 'leading' \| 'linspace'"),
    (lambda: make_sampler("ddim", SD15_SCHEDULER_CONFIG, 20, eta="big"),
     r"ddim sampler: option eta='big' must be a number"),
    (lambda: make_sampler("ddpm", config_with(beta_schedule="sigmoid"), 20),
     r"scheduler config key beta_schedule='sigmoid' is not supported; valid: 'linear' \| "
     r"'scaled_linear' \| 'squaredcos_cap_v2'"),
    (lambda: make_sampler("ddpm", config_with(prediction_type="flow_prediction"), 20),
     r"prediction_type='flow_prediction' is not supported"),
    (lambda: make_sampler("ddpm", config_with(thresholding=True), 20),
     r"scheduler config key thresholding=True is not supported"),
    (lambda: make_sampler("dpmsolver++", config_with(use_karras_sigmas=True), 20),
     r"use_karras_sigmas=True is not supported"),
    (lambda: make_sampler("ddpm", config_with(steps_offset=1), 1000),
     r"steps_offset=1 moves the timesteps to \[1, 1000\], outside the training range"),
    (lambda: make_sampler("ddpm", config_with(trained_betas=[0.1, 0.2]), 20),
     r"trained_betas has 2 values but num_train_timesteps=1000"),
    (lambda: noise_schedule_from_config({"beta_schedule": "cosine"}),
     r"noise schedule: scheduler config key beta_schedule='cosine' is not supported"),
    (lambda: make_sampler("ddpm", [("beta_schedule", "linear")], 20), r"must be a dict"),
])
def test_invalid_settings_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_step_checks_its_inputs():
    sampler = make_sampler("ddpm", SD15_SCHEDULER_CONFIG, 20)
    x = jnp.zeros(SAMPLE_SHAPE)
    with pytest.raises(ValueError, match=r"ddpm step: this sampler adds noise at every step; "
                                         r"pass step_noise"):
        sampler.step({}, 0, x, x)
    with pytest.raises(ValueError, match="model_output shape"):
        sampler.step({}, 0, x[:1], x, x)


def test_samplers_are_immutable_and_compare_by_settings():
    first = make_sampler("dpmsolver++", SD15_SCHEDULER_CONFIG, 20)
    second = make_sampler("dpmsolver++", dict(SD15_SCHEDULER_CONFIG), 20, timestep_spacing=None)
    other = make_sampler("dpmsolver++", SD15_SCHEDULER_CONFIG, 20, final_sigmas_type="sigma_min")
    assert first == second and hash(first) == hash(second) and first != other
    with pytest.raises(AttributeError):
        first.timesteps = None
    with pytest.raises(ValueError):
        first.timesteps[0] = 0
    with pytest.raises(ValueError):
        first.tables["sample_coef"][0] = 0.0
