"""The one-step objective (xpsr_jax.training.one_step) against the official OSEDiff lines in PyTorch.

A tiny random XPSR setup (tests/helpers/training_fixtures.py) in the real formats, the SD 1.5
UNet of that setup as VSD's frozen score network and the regulariser's base, the `lpips` package
with random weights, and peft LoRA on the generator's UNet and VAE encoder and on the regulariser,
every LoRA tensor random (B is zero at peft's init). The PyTorch side is
tests/torch_reference/one_step.py; both sides get the same batch and draws.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
if importlib.util.find_spec("lpips") is None:
    pytest.skip("the lpips package is not installed", allow_module_level=True)

import diffusers  # noqa: E402
import jax  # noqa: E402
from flax import nnx  # noqa: E402

from tests.helpers.lpips_fixtures import write_random_lpips  # noqa: E402
from tests.helpers.parity_utils import nhwc_to_nchw  # noqa: E402
from tests.helpers.training_fixtures import (HEIGHT, SFA_EVERYWHERE, TOKENS, VOCAB, WIDTH, fixed_batch,  # noqa: E402
                                             write_tiny_training_models)
from tests.torch_reference import one_step as reference_lines  # noqa: E402
from xpsr_jax.models import UNet2DCondition  # noqa: E402
from xpsr_jax.models.lora import (from_peft_state_dict, lora_scaling, osediff_unet_targets,  # noqa: E402
                                  osediff_vae_encoder_targets, with_lora)
from xpsr_jax.models.lpips import load_lpips  # noqa: E402
from xpsr_jax.schedulers import load_scheduler_config, noise_schedule_from_config  # noqa: E402
from xpsr_jax.training import load_training_models  # noqa: E402
from xpsr_jax.training.one_step import (OneStepDraws, OneStepLoRA, OneStepNetworks, OneStepWeights,  # noqa: E402
                                        one_step_generator_loss, regulariser_loss)
from xpsr_jax.training.trainable import TRAINABLE_UNET_MODULES  # noqa: E402
from xpsr_jax.weights.convert import module_state_dict  # noqa: E402

RANK = 4
TERM_RTOL = 1e-5
GRAD_RTOL = 1e-4


def _randomize_lora(module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def _only_lora_trainable(module) -> None:
    for name, param in module.named_parameters():
        param.requires_grad_(".lora_" in name)
        param.grad = None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_step")
    nets = write_tiny_training_models(root)
    with pytest.MonkeyPatch.context() as patch:
        torch_lpips, _, backbone, lins = write_random_lpips(patch, root)
    models = load_training_models(str(nets.sd15), str(nets.release), SFA_EVERYWHERE, attention_backend="xla")
    sd_unet = UNet2DCondition.from_pretrained(nets.sd15, subfolder="unet", attention_backend="xla")
    networks = OneStepNetworks(unet=models.unet, controlnet=models.controlnet, vae=models.vae,
                               text_encoder=models.text_encoder, sd_unet=sd_unet, lpips=load_lpips(backbone, lins))
    schedule = noise_schedule_from_config(load_scheduler_config(nets.sd15 / "scheduler"))

    targets = {
        "unet": [m for group in osediff_unet_targets(module_state_dict(models.unet), TRAINABLE_UNET_MODULES).values()
                 for m in group],
        "vae": list(osediff_vae_encoder_targets(module_state_dict(models.vae))),
        "regulariser": [m for group in osediff_unet_targets(module_state_dict(sd_unet)).values() for m in group],
    }
    unet_fix = diffusers.UNet2DConditionModel.from_pretrained(nets.sd15, subfolder="unet").eval()
    unet_update = diffusers.UNet2DConditionModel.from_pretrained(nets.sd15, subfolder="unet").eval()
    torch_modules = {"unet": nets.unet, "vae": nets.vae, "regulariser": unet_update}
    for seed, (name, module) in enumerate(torch_modules.items()):
        reference_lines.add_lora(module, targets[name], RANK)
        _randomize_lora(module, seed=10 + seed)
    lora = OneStepLoRA(**{name: from_peft_state_dict(reference_lines.lora_state(module), reference_lines.ADAPTER)
                          for name, module in torch_modules.items()})
    scaling = {layer.scaling[reference_lines.ADAPTER] for module in torch_modules.values()
               for layer in module.modules() if hasattr(layer, "scaling")}

    batch = fixed_batch()
    rng = np.random.default_rng(7)
    latent = (2, HEIGHT // 8, WIDTH // 8, 4)
    draws = OneStepDraws(vae_sample=rng.standard_normal(latent).astype(np.float32),
                         vsd_timesteps=np.array([400, 903], np.int32),
                         vsd_noise=rng.standard_normal(latent).astype(np.float32),
                         regulariser_timesteps=np.array([3, 640], np.int32),
                         regulariser_noise=rng.standard_normal(latent).astype(np.float32))
    negative_ids = rng.integers(0, VOCAB, (1, TOKENS)).astype(np.int32)
    torch_nets = (nets.vae, nets.unet, nets.controlnet, nets.text_encoder,
                  reference_lines.one_step_scheduler(nets.scheduler), unet_fix, unet_update, torch_lpips)
    return dict(networks=networks, schedule=schedule, lora=lora, scaling=scaling, targets=targets, batch=batch,
                draws=draws, negative_ids=negative_ids, torch_nets=torch_nets, torch_modules=torch_modules)


@pytest.fixture(scope="module")
def ours(setup):
    """Both losses and their LoRA gradients from one jitted function."""
    networks, schedule = setup["networks"], setup["schedule"]
    (scaling,) = setup["scaling"]
    graphdefs, states = zip(*(nnx.split(module) for module in networks))

    @jax.jit
    def losses_and_grads(states, lora, batch, negative_ids, draws):
        nets = OneStepNetworks(*(nnx.merge(g, s) for g, s in zip(graphdefs, states)))

        def generator(unet_lora, vae_lora):
            return one_step_generator_loss(nets, OneStepLoRA(unet_lora, vae_lora, lora.regulariser), scaling, batch,
                                           negative_ids, draws, noise_schedule=schedule)

        (_, (terms, output)), generator_grads = jax.value_and_grad(generator, argnums=(0, 1), has_aux=True)(
            lora.unet, lora.vae)

        def regulariser(regulariser_lora):
            return regulariser_loss(with_lora(nets.sd_unet, regulariser_lora, scaling), output.latents,
                                    output.highlevel_prompt_embeds, draws.regulariser_timesteps,
                                    draws.regulariser_noise, noise_schedule=schedule)

        regulariser_value, regulariser_grads = jax.value_and_grad(regulariser)(lora.regulariser)
        return terms, regulariser_value, generator_grads, regulariser_grads

    terms, regulariser_value, (unet_grads, vae_grads), regulariser_grads = losses_and_grads(
        states, setup["lora"], setup["batch"], setup["negative_ids"], setup["draws"])
    terms = {k: float(v) for k, v in terms.items()}
    terms["regulariser"] = float(regulariser_value)
    grads = {"unet": unet_grads, "vae": vae_grads, "regulariser": regulariser_grads}
    return terms, jax.tree.map(np.asarray, grads)


def _replay(setup, dtype):
    """The official lines in `dtype` on copies of the PyTorch networks: the generator loss
    backward, then the regulariser's diff_loss backward. (terms, LoRA grads in our layout)."""
    torch_nets = [copy.deepcopy(m) for m in setup["torch_nets"]]
    for i, module in enumerate(torch_nets):
        if isinstance(module, torch.nn.Module):
            module.to(dtype).requires_grad_(False)
    vae, unet, _, _, scheduler, _, unet_update, _ = torch_nets
    modules = {"unet": unet, "vae": vae, "regulariser": unet_update}
    for module in modules.values():
        _only_lora_trainable(module)

    def tensors(arrays):
        return {k: torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(v))).to(dtype) if v.ndim == 4
                else torch.from_numpy(v).long() for k, v in arrays.items()}

    t, d = tensors(setup["batch"]), tensors(setup["draws"]._asdict())
    w = OneStepWeights()
    lambdas = {"l2": w.l2, "lpips": w.lpips, "vsd": w.vsd, "cfg_vsd": w.cfg_vsd}
    loss, terms, latents, high = reference_lines.generator_loss(
        torch_nets, t, torch.from_numpy(setup["negative_ids"]).long(), d, lambdas)
    loss.backward()
    loss_d = reference_lines.diff_loss(unet_update, scheduler, latents, high, d["regulariser_timesteps"],
                                       d["regulariser_noise"])
    loss_d.backward()
    terms = {k: float(v.detach()) for k, v in terms.items()}
    terms["regulariser"] = float(loss_d.detach())
    grads = {name: from_peft_state_dict(reference_lines.lora_state(module, grads=True), reference_lines.ADAPTER)
             for name, module in modules.items()}
    return terms, grads


@pytest.fixture(scope="module")
def reference(setup):
    return _replay(setup, torch.float32)


@pytest.fixture(scope="module")
def exact(setup):
    """The same lines in float64: the yardstick for gradients (see the gradient test)."""
    return _replay(setup, torch.float64)


def test_lora_targets_and_scaling_are_osediffs(setup):
    assert setup["scaling"] == {lora_scaling(RANK)} == {2.0}  # peft's lora_alpha 8 over rank 4
    unet_targets = setup["targets"]["unet"]
    assert "conv_in" in unet_targets and "conv_out" in unet_targets
    assert not any(part in TRAINABLE_UNET_MODULES for m in unet_targets for part in m.split("."))
    assert not any("norm" in m or "time_emb" in m for m in unet_targets)
    vae_targets = setup["targets"]["vae"]
    assert "quant_conv" in vae_targets and not any(m.startswith(("decoder.", "post_quant")) for m in vae_targets)


def test_every_loss_term_matches_the_official_lines(ours, reference):
    terms, _ = ours
    reference_terms, _ = reference
    assert set(terms) == set(reference_terms) == {"loss", "l2", "lpips", "vsd", "regulariser"}
    for key, value in reference_terms.items():
        print(f"{key}: ours {terms[key]:.8g} reference {value:.8g}")
        assert value > 0, key
        np.testing.assert_allclose(terms[key], value, rtol=TERM_RTOL, err_msg=key)


def test_lora_gradients_match_the_official_lines(ours, reference, exact):
    """Every LoRA tensor's gradient, generator (UNet, VAE encoder) and regulariser.

    The generator's gradient runs through x0 at t=999 (1 / sqrt(alpha_bar) ~ 15), the decoder,
    LPIPS and VSD's guided scores (x 7.5), so with random networks fp32 rounding alone moves a
    tensor's gradient by up to ~1% (PyTorch fp32 against PyTorch float64: median 0.2%). Each of our
    fp32 gradients is held to the float64 replay of the official lines: no further from it than
    twice the PyTorch fp32 replay's distance plus 1e-4, and the summed norm likewise."""
    _, grads = ours
    _, fp32_grads = reference
    _, exact_grads = exact
    for name in ("unet", "vae", "regulariser"):
        assert set(grads[name]) == set(exact_grads[name]), name
        ours_errors, torch_errors, total, total_torch, total_exact = [], [], 0.0, 0.0, 0.0
        for module, pair in exact_grads[name].items():
            for slot in ("down", "up"):
                expected = pair[slot].astype(np.float64)
                norm = np.linalg.norm(expected)
                assert norm > 0, f"{name}.{module}.{slot}: zero reference gradient"
                ours_error = float(np.linalg.norm(grads[name][module][slot] - expected) / norm)
                torch_error = float(np.linalg.norm(fp32_grads[name][module][slot] - expected) / norm)
                assert ours_error <= 2 * torch_error + GRAD_RTOL, (
                    f"{name}.{module}.{slot}: ours {ours_error:.2e} from float64, PyTorch fp32 {torch_error:.2e}")
                ours_errors.append(ours_error)
                torch_errors.append(torch_error)
                total += float(np.sum(np.square(grads[name][module][slot], dtype=np.float64)))
                total_torch += float(np.sum(np.square(fp32_grads[name][module][slot], dtype=np.float64)))
                total_exact += float(np.sum(np.square(expected)))
        print(f"{name}: {len(exact_grads[name])} LoRA modules; relative error from float64, ours median "
              f"{np.median(ours_errors):.2e} max {max(ours_errors):.2e}, PyTorch fp32 median "
              f"{np.median(torch_errors):.2e} max {max(torch_errors):.2e}; norm ours {np.sqrt(total):.8g} "
              f"PyTorch fp32 {np.sqrt(total_torch):.8g} float64 {np.sqrt(total_exact):.8g}")
        norm_error = abs(np.sqrt(total) / np.sqrt(total_exact) - 1)
        torch_norm_error = abs(np.sqrt(total_torch) / np.sqrt(total_exact) - 1)
        assert norm_error <= 2 * torch_norm_error + GRAD_RTOL, f"{name}: gradient norm off by {norm_error:.2e}"
