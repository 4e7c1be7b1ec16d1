"""The XPSR objective (xpsr_jax.training.xpsr_loss) against the official train.py loss lines in PyTorch.

A tiny random setup (tests/training_fixtures.py; every parameter random, zero convs included)
is written in the real formats and loaded by `load_training_models`. The PyTorch side replays
the official lines (diffusers AutoencoderKL + DDPMScheduler.add_noise, transformers
CLIPTextModel, the XPSR reference networks, F.interpolate bilinear) on the same batch and draws.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.helpers.parity_utils import nchw_to_nhwc, nhwc_to_nchw  # noqa: E402
from tests.helpers.training_fixtures import HEIGHT, SFA_EVERYWHERE, WIDTH, fixed_batch, write_tiny_training_models  # noqa: E402
from xpsr_jax.schedulers import load_scheduler_config, noise_schedule_from_config  # noqa: E402
from xpsr_jax.training import (LossDraws, load_training_models, merge_models, resize_bilinear,  # noqa: E402
                               sample_loss_draws, xpsr_loss)
from xpsr_jax.training.step import split_models  # noqa: E402
from xpsr_jax.training.trainable import TRAINABLE_UNET_MODULES  # noqa: E402
from xpsr_jax.weights.convert import module_state_dict  # noqa: E402

TERM_RTOL = 1e-5
GRAD_RTOL = 1e-4
TIMESTEPS = np.array([7, 801], np.int32)


def official_trainable_unet_names(unet: torch.nn.Module) -> set[str]:
    """train.py: unet.requires_grad_(False), then every module whose name ends in a trainable name."""
    names = set()
    for name, module in unet.named_modules():
        if name.endswith(TRAINABLE_UNET_MODULES):
            names.update(f"{name}.{p}" for p, _ in module.named_parameters())
    return names


def _nchw(array) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(array)))


def torch_official_loss(nets, batch, draws, lambda_d=0.05):
    """The official train.py loss lines, with the random draws injected."""
    t = {k: _nchw(v) if v.ndim == 4 else torch.from_numpy(v) for k, v in batch.items()}
    pixel_values = t["pixel_values"]
    with torch.no_grad():
        latent_dist = nets.vae.encode(pixel_values).latent_dist
        latents = latent_dist.mean + latent_dist.std * _nchw(draws.vae_sample)
    latents = latents * nets.vae.config.scaling_factor
    # The posterior mean is a channel slice; torch's CPU conv turns it into channels-last
    # activations, on which torch 2.13's GroupNorm backward segfaults when the input needs no
    # gradient (the frozen encoder path). Same values, standard strides:
    latents = latents.contiguous()
    noise = _nchw(draws.noise)
    timesteps = torch.from_numpy(np.asarray(draws.timesteps)).long()
    noisy_latents = nets.scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        encoder_hidden_states = nets.text_encoder(t["highlevel_input_ids"].long())[0]
        lowlevel_encoder_hidden_states = nets.text_encoder(t["lowlevel_input_ids"].long())[0]
    controlnet_image = t["conditioning_pixel_values"]
    degradation_rgb, degradation_rgb_mid, down_block_res_samples, mid_block_res_sample, controlnet_cond_mid = \
        nets.controlnet(noisy_latents, timesteps, encoder_hidden_states, lowlevel_encoder_hidden_states,
                        controlnet_image).to_official_tuple()
    model_pred = nets.unet(noisy_latents, timesteps, encoder_hidden_states, lowlevel_encoder_hidden_states,
                           down_block_res_samples, mid_block_res_sample)
    mse_loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    terms = {}
    degradation_loss = torch.tensor(0.0)
    for i, values in enumerate(controlnet_cond_mid):
        term = F.l1_loss(F.interpolate(pixel_values, size=values.shape[-2:], mode="bilinear").float(),
                         values.float(), reduction="mean")
        terms[f"dfc_rgb_{i}"] = term
        degradation_loss += lambda_d * term
    for i, values in enumerate(degradation_rgb):
        term = F.l1_loss(values.float(), F.interpolate(latents, size=values.shape[-2:], mode="bilinear").float(),
                         reduction="mean")
        terms[f"dfc_latent_{i}"] = term
        degradation_loss += lambda_d * term
    term = F.l1_loss(degradation_rgb_mid.float(),
                     F.interpolate(latents, size=degradation_rgb_mid.shape[-2:], mode="bilinear").float(),
                     reduction="mean")
    terms["dfc_latent_mid"] = term
    degradation_loss += lambda_d * term
    loss = mse_loss + degradation_loss
    return loss, {"loss": loss, "mse": mse_loss, "dfc": degradation_loss, **terms}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    nets = write_tiny_training_models(tmp_path_factory.mktemp("tiny_training"))
    models = load_training_models(str(nets.sd15), str(nets.release), SFA_EVERYWHERE, attention_backend="xla")
    schedule = noise_schedule_from_config(load_scheduler_config(nets.sd15 / "scheduler"))
    batch = fixed_batch()
    rng = np.random.default_rng(5)
    latent = (2, HEIGHT // 8, WIDTH // 8, 4)
    draws = LossDraws(timesteps=TIMESTEPS, noise=rng.standard_normal(latent).astype(np.float32),
                      vae_sample=rng.standard_normal(latent).astype(np.float32))
    return nets, models, schedule, batch, draws


@pytest.fixture(scope="module")
def ours(setup):
    """(loss, terms, grads as state dicts) from one jitted value_and_grad, as the train step takes it."""
    _, models, schedule, batch, draws = setup
    graphdefs, params, frozen = split_models(models)

    @jax.jit
    def loss_and_grads(params, frozen, batch, draws):
        def loss_fn(params):
            return xpsr_loss(merge_models(graphdefs, params, frozen), batch, draws, noise_schedule=schedule)
        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, terms), grads = loss_and_grads(params, frozen, batch, draws)
    grad_models = merge_models(graphdefs, grads, jax.tree.map(jnp.zeros_like, frozen))
    grad_dicts = {name: module_state_dict(getattr(grad_models, name)) for name in ("unet", "controlnet")}
    return loss, terms, grad_dicts, params


@pytest.fixture(scope="module")
def reference(setup):
    nets, _, _, batch, draws = setup
    trainable_unet = official_trainable_unet_names(nets.unet)
    for name, param in nets.unet.named_parameters():
        param.requires_grad_(name in trainable_unet)
        param.grad = None
    for param in nets.controlnet.parameters():
        param.requires_grad_(True)
        param.grad = None
    for module in (nets.vae, nets.text_encoder):
        module.requires_grad_(False)
    loss, terms = torch_official_loss(nets, batch, draws)
    loss.backward()
    grads = {"unet": {n: p.grad.numpy() for n, p in nets.unet.named_parameters() if p.grad is not None},
             "controlnet": {n: p.grad.numpy() for n, p in nets.controlnet.named_parameters()}}
    return {k: float(v) for k, v in terms.items()}, grads, trainable_unet


def test_every_loss_term_matches_the_official_lines(ours, reference):
    _, terms, _, _ = ours
    reference_terms, _, _ = reference
    assert set(terms) == set(reference_terms)
    # 3 rgb heads, one latent head per skip (conv_in + 2 levels x 1 layer + 1 downsampler), the mid head
    assert sum(k.startswith("dfc_rgb_") for k in terms) == 3
    assert sum(k.startswith("dfc_latent_") and k != "dfc_latent_mid" for k in terms) == 4
    for key, value in reference_terms.items():
        print(f"{key}: ours {float(terms[key]):.8g} reference {value:.8g}")
        np.testing.assert_allclose(float(terms[key]), value, rtol=TERM_RTOL, err_msg=key)


def test_gradient_norms_match_and_the_split_is_official(ours, reference):
    _, _, grads, params = ours
    _, reference_grads, trainable_unet = reference
    # The official split: torch has grads exactly for the trainable UNet modules.
    assert set(reference_grads["unet"]) == trainable_unet
    unet_trainable_keys = {k for k in grads["unet"] if any(f".{m}." in f".{k}" for m in TRAINABLE_UNET_MODULES)}
    assert unet_trainable_keys == trainable_unet
    assert sum(np.size(x) for x in jax.tree.leaves(params["unet"])) == sum(
        reference_grads["unet"][k].size for k in trainable_unet)
    for name, keys in (("unet", sorted(trainable_unet)), ("controlnet", sorted(reference_grads["controlnet"]))):
        ours_norm = np.sqrt(sum(np.sum(np.square(grads[name][k], dtype=np.float64)) for k in keys))
        reference_norm = np.sqrt(sum(np.sum(np.square(reference_grads[name][k], dtype=np.float64)) for k in keys))
        print(f"{name} gradient norm: ours {ours_norm:.8g} reference {reference_norm:.8g}")
        np.testing.assert_allclose(ours_norm, reference_norm, rtol=GRAD_RTOL, err_msg=name)
        worst = 0.0
        for key in keys:
            a = np.linalg.norm(grads[name][key].astype(np.float64))
            b = np.linalg.norm(reference_grads[name][key].astype(np.float64))
            assert b > 0, f"{name}.{key}: zero reference gradient"
            worst = max(worst, abs(a - b) / b)
        print(f"{name}: worst per-tensor gradient-norm relative error {worst:.2e} over {len(keys)} tensors")
        assert worst < GRAD_RTOL * 10, f"{name}: per-tensor gradient norm off by {worst:.2e}"


def test_every_trainable_parameter_gets_a_gradient(ours):
    _, _, grads, params = ours
    assert all(jax.tree.leaves(params[name]) for name in ("unet", "controlnet"))
    zero = [f"{name}.{k}" for name in ("controlnet",) for k, v in grads[name].items() if not np.any(v)]
    zero += [f"unet.{k}" for k, v in grads["unet"].items()
             if any(f".{m}." in f".{k}" for m in TRAINABLE_UNET_MODULES) and not np.any(v)]
    assert not zero, f"trainable tensors with an all-zero gradient: {zero}"
    frozen_with_grad = [k for k, v in grads["unet"].items()
                        if not any(f".{m}." in f".{k}" for m in TRAINABLE_UNET_MODULES) and np.any(v)]
    assert not frozen_with_grad, f"frozen UNet tensors with a gradient: {frozen_with_grad[:5]}"


@pytest.mark.parametrize("in_size,out_size", [((8, 8), (1, 1)), ((8, 12), (3, 5)), ((64, 64), (16, 32)),
                                              ((5, 7), (2, 3)), ((3, 4), (7, 9))])
def test_resize_matches_torch_bilinear(in_size, out_size):
    x = np.random.default_rng(0).standard_normal((2, 3, *in_size)).astype(np.float32)
    reference = F.interpolate(torch.from_numpy(x), size=out_size, mode="bilinear").numpy()
    ours = resize_bilinear(jnp.asarray(nchw_to_nhwc(x)), out_size)
    np.testing.assert_allclose(nhwc_to_nchw(ours), reference, rtol=1e-6, atol=1e-6)
    if out_size == (1, 1):
        np.testing.assert_allclose(np.asarray(ours)[:, 0, 0], nchw_to_nhwc(x)[:, 3:5, 3:5].mean(axis=(1, 2)),
                                   rtol=1e-6)


def test_sample_loss_draws_are_seeded_and_in_range():
    key = jax.random.PRNGKey(3)
    a = sample_loss_draws(key, 64, (8, 8, 4), 1000)
    b = sample_loss_draws(key, 64, (8, 8, 4), 1000)
    c = sample_loss_draws(jax.random.fold_in(key, 1), 64, (8, 8, 4), 1000)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a.timesteps.shape == (64,) and a.timesteps.dtype == jnp.int32
    assert 0 <= int(a.timesteps.min()) and int(a.timesteps.max()) < 1000
    assert len(np.unique(np.asarray(a.timesteps))) > 40
    assert a.noise.shape == a.vae_sample.shape == (64, 8, 8, 4)
    assert abs(float(jnp.corrcoef(a.noise.ravel(), a.vae_sample.ravel())[0, 1])) < 0.05  # separate streams
    assert not np.array_equal(a.noise, c.noise)
    assert abs(float(a.noise.std()) - 1) < 0.05


def test_init_from_sd_follows_the_official_rule(setup):
    """Without init_from: XPSRUNet.from_sd_unet + XPSRControlNet.from_unet, reports returned."""
    nets = setup[0]
    reports = {}
    models = load_training_models(str(nets.sd15), "", SFA_EVERYWHERE, attention_backend="xla", reports=reports)
    assert models.unet.config.up_use_lowlevel_prompt == (False, True)
    unet_report, controlnet_report = reports["unet"], reports["controlnet"]
    assert all("pixel_attentions" in k or "attentions_connect" in k for k in unet_report.fresh)
    assert any("pixel_attentions" in k for k in unet_report.fresh)
    # ControlNet SFA connect blocks attend to the block's own width: their attn2.to_k stays fresh
    assert any("attentions_connect" in k and k.endswith("attn2.to_k.weight") for k in controlnet_report.fresh)
    assert any(k.startswith("down_blocks.") for k in controlnet_report.copied)
    sd_state = {k: v.numpy() for k, v in nets.unet.state_dict().items()}
    state = module_state_dict(models.unet)
    for key, source_key in unet_report.copied.items():
        np.testing.assert_array_equal(state[key], sd_state[source_key], err_msg=key)
    zero_convs = module_state_dict(models.controlnet)
    assert not np.any(zero_convs["controlnet_mid_block.weight"])


def test_bad_paths_and_mismatched_release_config_are_named(setup, tmp_path):
    nets = setup[0]
    with pytest.raises(FileNotFoundError, match="base_model"):
        load_training_models(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="init_from"):
        load_training_models(str(nets.sd15), str(tmp_path))
    with pytest.raises(ValueError, match="model.mid_use_lowlevel_prompt"):
        load_training_models(str(nets.sd15), str(nets.release), dict(SFA_EVERYWHERE, mid_use_lowlevel_prompt=False))
