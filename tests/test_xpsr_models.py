"""XPSRUNet / XPSRControlNet: parity with the PyTorch reference (tests/torch_reference), the official
initialisation rules, and official-layout checkpoint I/O."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tests.helpers.parity_utils import assert_parity, nchw_to_nhwc, nhwc_to_nchw  # noqa: E402
from tests.torch_reference import (  # noqa: E402
    XPSRControlNetTorch, XPSRUNetTorch, randomize_all_parameters, tiny_unet_config,
)
from xpsr_jax.models import UNet2DCondition, XPSRControlNet, XPSRUNet, load_xpsr  # noqa: E402
from xpsr_jax.weights.convert import module_state_dict  # noqa: E402
from xpsr_jax.weights.files import read_state_dict, write_state_dict  # noqa: E402

SFA_EVERYWHERE = dict(down_use_lowlevel_prompt=True, mid_use_lowlevel_prompt=True,
                      up_use_lowlevel_prompt=[True] * 4)
ATOL = 1e-4


def _save_official(model: torch.nn.Module, folder) -> None:
    """Write a folder the way the official release stores one (config.json + safetensors)."""
    folder.mkdir(parents=True)
    config = {"_class_name": "UNet2DConditionModel" if isinstance(model, XPSRUNetTorch) else "ControlNetModel",
              **model.config}
    (folder / "config.json").write_text(json.dumps(config))
    write_state_dict(folder / "diffusion_pytorch_model.safetensors",
                     {k: v.detach().numpy() for k, v in model.state_dict().items()})


def _jitted(model: nnx.Module):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args)), state


class Release:
    """A tiny official-layout release (unet/ + controlnet/), random in every parameter."""

    def __init__(self, root, *, unet_overrides: dict, seed: int):
        torch.manual_seed(seed)
        self.torch_unet = XPSRUNetTorch(tiny_unet_config(**unet_overrides)).eval()
        randomize_all_parameters(self.torch_unet, seed=seed, scale=0.5)
        self.torch_controlnet = XPSRControlNetTorch.from_unet(
            self.torch_unet, conditioning_embedding_out_channels=(4, 8, 12, 16)).eval()
        randomize_all_parameters(self.torch_controlnet, seed=seed + 1, scale=0.5)
        self.root = root
        _save_official(self.torch_unet, root / "unet")
        _save_official(self.torch_controlnet, root / "controlnet")
        self.unet, self.controlnet = load_xpsr(root)
        self.run_unet, self.unet_state = _jitted(self.unet)
        self.run_controlnet, self.controlnet_state = _jitted(self.controlnet)

    def inputs(self, height: int, width: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        context = self.torch_unet.config["cross_attention_dim"]
        return dict(
            sample=torch.randn(2, 4, height, width, generator=generator),
            timesteps=torch.tensor([7, 801]),
            high=torch.randn(2, 6, context, generator=generator),
            low=torch.randn(2, 5, context, generator=generator),
            cond=torch.rand(2, 3, 8 * height, 8 * width, generator=generator),
        )


@pytest.fixture(scope="module")
def release_sfa(tmp_path_factory):
    return Release(tmp_path_factory.mktemp("xpsr_sfa"), unet_overrides=dict(SFA_EVERYWHERE, layers_per_block=1),
                   seed=11)


@pytest.fixture(scope="module")
def release_sd15(tmp_path_factory):
    # The released UNet: SD 1.5 shape without SFA; SD's 2 layers per block.
    return Release(tmp_path_factory.mktemp("xpsr_sd15"), unet_overrides={}, seed=21)


def _j(tensor, nhwc=True):
    return jnp.asarray(nchw_to_nhwc(tensor.numpy()) if nhwc else tensor.numpy())


def _check_step(release: Release, height: int, width: int, label: str, seed: int = 0):
    """ControlNet outputs, then the UNet with those residuals, against the PyTorch reference."""
    x = release.inputs(height, width, seed)
    with torch.no_grad():
        reference = release.torch_controlnet(x["sample"], x["timesteps"], x["high"], x["low"], x["cond"],
                                             conditioning_scale=0.7)
        reference_eps = release.torch_unet(x["sample"], x["timesteps"], x["high"], x["low"],
                                           reference.down_block_res_samples, reference.mid_block_res_sample)
    ours = release.run_controlnet(release.controlnet_state, _j(x["sample"]), _j(x["timesteps"], False),
                                  _j(x["high"], False), _j(x["low"], False), _j(x["cond"]), 0.7)
    assert len(ours.down_block_res_samples) == len(reference.down_block_res_samples)
    for i, (a, b) in enumerate(zip(ours.down_block_res_samples, reference.down_block_res_samples)):
        assert_parity(nhwc_to_nchw(a), b.numpy(), atol=ATOL, label=f"{label} residual {i}")
    assert_parity(nhwc_to_nchw(ours.mid_block_res_sample), reference.mid_block_res_sample.numpy(), atol=ATOL,
                  label=f"{label} mid residual")
    assert len(ours.latent_preds) == len(reference.latent_preds) > 0
    for i, (a, b) in enumerate(zip(ours.latent_preds, reference.latent_preds)):
        assert_parity(nhwc_to_nchw(a), b.numpy(), atol=ATOL, label=f"{label} latent head {i}")
    assert_parity(nhwc_to_nchw(ours.latent_pred_mid), reference.latent_pred_mid.numpy(), atol=ATOL,
                  label=f"{label} mid latent head")
    assert len(ours.rgb_preds) == len(reference.rgb_preds) == 3
    for i, (a, b) in enumerate(zip(ours.rgb_preds, reference.rgb_preds)):
        assert_parity(nhwc_to_nchw(a), b.numpy(), atol=ATOL, label=f"{label} rgb head {i}")
    eps = release.run_unet(release.unet_state, _j(x["sample"]), _j(x["timesteps"], False), _j(x["high"], False),
                           _j(x["low"], False), ours.down_block_res_samples, ours.mid_block_res_sample)
    assert_parity(nhwc_to_nchw(eps), reference_eps.numpy(), atol=ATOL, label=f"{label} UNet with residuals")


@pytest.mark.parametrize("height,width", [(8, 8), (8, 12)], ids=["square", "non-square"])
def test_sfa_everywhere_matches_reference(release_sfa, height, width):
    _check_step(release_sfa, height, width, f"SFA {height}x{width}")


def test_sd15_style_unet_matches_reference(release_sd15):
    _check_step(release_sd15, 8, 12, "SD1.5-style 8x12", seed=1)


def test_unet_zero_and_missing_residuals(release_sfa):
    x = release_sfa.inputs(8, 8, seed=2)
    args = (_j(x["sample"]), _j(x["timesteps"], False), _j(x["high"], False), _j(x["low"], False))
    with torch.no_grad():
        reference = release_sfa.torch_controlnet(x["sample"], x["timesteps"], x["high"], x["low"], x["cond"])
        zeros = [torch.zeros_like(r) for r in reference.down_block_res_samples]
        mid_zero = torch.zeros_like(reference.mid_block_res_sample)
        reference_zero = release_sfa.torch_unet(x["sample"], x["timesteps"], x["high"], x["low"], zeros, mid_zero)
        reference_none = release_sfa.torch_unet(x["sample"], x["timesteps"], x["high"], x["low"])
    ours_zero = release_sfa.run_unet(release_sfa.unet_state, *args, [_j(z) for z in zeros], _j(mid_zero))
    assert_parity(nhwc_to_nchw(ours_zero), reference_zero.numpy(), atol=ATOL, label="zero residuals")
    ours_none = release_sfa.run_unet(release_sfa.unet_state, *args)
    assert_parity(nhwc_to_nchw(ours_none), reference_none.numpy(), atol=ATOL, label="no residuals")
    # Pixel attentions run on zero residuals, so the two differ (the official semantics).
    assert float(jnp.max(jnp.abs(ours_zero - ours_none))) > 1e-3


def test_save_pretrained_loads_strictly_in_the_reference(release_sfa, tmp_path):
    release_sfa.unet.save_pretrained(tmp_path / "unet")
    release_sfa.controlnet.save_pretrained(tmp_path / "controlnet")
    for name, torch_model in (("unet", release_sfa.torch_unet), ("controlnet", release_sfa.torch_controlnet)):
        config = json.loads((tmp_path / name / "config.json").read_text())
        rebuilt = type(torch_model)(config)
        saved = {k: torch.from_numpy(v) for k, v in
                 read_state_dict(tmp_path / name / "diffusion_pytorch_model.safetensors").items()}
        rebuilt.load_state_dict(saved, strict=True)
        original = torch_model.state_dict()
        assert set(saved) == set(original)
        for key, tensor in rebuilt.state_dict().items():
            assert torch.equal(tensor, original[key]), f"{name}: {key}"


def _init_classes(keys_a: dict, keys_b: dict) -> None:
    assert set(keys_a.copied) == set(keys_b.copied)
    assert keys_a.copied == keys_b.copied
    assert sorted(keys_a.fresh) == sorted(keys_b.fresh)


def test_from_sd_unet_follows_the_official_rule(release_sd15, tmp_path):
    """A diffusers SD UNet checkpoint -> XPSR UNet with SFA: the reference's copied / fresh keys and values."""
    diffusers = pytest.importorskip("diffusers")
    torch_xpsr = release_sd15.torch_unet
    accepted = inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters
    torch_sd = diffusers.UNet2DConditionModel(**{k: v for k, v in torch_xpsr.config.items() if k in accepted})
    torch_sd.load_state_dict({k: v for k, v in torch_xpsr.state_dict().items() if "pixel_attentions" not in k},
                             strict=True)
    torch_sd.save_pretrained(tmp_path)
    sd_unet = UNet2DCondition.from_pretrained(tmp_path)

    ours, report = XPSRUNet.from_sd_unet(sd_unet, rngs=nnx.Rngs(0), **SFA_EVERYWHERE)
    reference = XPSRUNetTorch.from_sd_unet(torch_sd, config_overrides=SFA_EVERYWHERE)
    _init_classes(report, reference.init_report)
    torch_source = torch_sd.state_dict()
    state = module_state_dict(ours)
    for key, source_key in report.copied.items():
        np.testing.assert_array_equal(state[key], torch_source[source_key].numpy(), err_msg=key)
    assert all(key in report.fresh for key in state if "pixel_attentions" in key)
    assert any(key.endswith("attn2.to_k.weight") and "attentions_connect" in key for key in report.fresh)
    assert ours.config.mid_use_lowlevel_prompt and ours.config.up_use_lowlevel_prompt == (True,) * 4


def test_from_unet_follows_the_official_rule(release_sfa):
    """UNet with its own SFA -> ControlNet: SFA still copied from `attentions`; zero convs zero."""
    ours, report = XPSRControlNet.from_unet(release_sfa.unet, rngs=nnx.Rngs(0),
                                            conditioning_embedding_out_channels=(4, 8, 12, 16))
    reference = XPSRControlNetTorch.from_unet(release_sfa.torch_unet,
                                              conditioning_embedding_out_channels=(4, 8, 12, 16))
    # The reference reports only down/mid blocks; conv_in / time_embedding are strict copies.
    ours_blocks = {k: v for k, v in report.copied.items() if k.startswith(("down_blocks.", "mid_block."))}
    assert ours_blocks == reference.init_report.copied
    assert sorted(report.fresh) == sorted(reference.init_report.fresh)
    torch_source = release_sfa.torch_unet.state_dict()
    state = module_state_dict(ours)
    reference_state = reference.state_dict()
    assert set(state) == set(reference_state)
    for key in state:
        if key in report.copied:
            np.testing.assert_array_equal(state[key], torch_source[report.copied[key]].numpy(), err_msg=key)
        if key.startswith(("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out")):
            assert not np.any(state[key]) and not torch.any(reference_state[key]), key
    lowlevel = [k for k in report.copied if ".attentions_lowlevel." in k]
    assert lowlevel and all(".attentions." in report.copied[k] for k in lowlevel)


def test_release_config_keys_are_preserved(release_sfa, tmp_path):
    release_sfa.controlnet.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["_class_name"] == "ControlNetModel"
    assert written["conditioning_embedding_out_channels"] == [4, 8, 12, 16]
    assert written["use_lowlevel_prompt"] is True


def test_parameter_counts_match_the_reference():
    from tests.torch_reference import tiny_controlnet_config
    from xpsr_jax.models.param_count import parameter_counts
    from xpsr_jax.models.unet import UNet2DConditionConfig

    reference_config = tiny_unet_config(**SFA_EVERYWHERE)
    unet_keys = {k: v for k, v in reference_config.items() if k in UNet2DConditionConfig.__dataclass_fields__}
    counts = parameter_counts(UNet2DConditionConfig.from_dict(unet_keys), sfa=True)
    with torch.device("meta"):
        torch_unet = XPSRUNetTorch(reference_config)
        torch_controlnet = XPSRControlNetTorch(tiny_controlnet_config(conditioning_embedding_out_channels=[16, 32, 96, 256]))
    assert counts["XPSR UNet"] == sum(p.numel() for p in torch_unet.parameters())
    assert counts["XPSR ControlNet"] == sum(p.numel() for p in torch_controlnet.parameters())


def test_remat_gives_the_same_gradients():
    """Gradient checkpointing per block type changes memory, not maths."""
    from xpsr_jax.models.unet_blocks import BLOCK_TYPES
    # Two levels hold every block type (cross-attention and plain, down and up, mid): fewer ops to compile.
    config = XPSRUNet.config_class(block_out_channels=(8, 8), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                                   cross_attention_dim=8, attention_head_dim=2, layers_per_block=1,
                                   mid_use_lowlevel_prompt=True, up_use_lowlevel_prompt=(False, True))
    inputs = (jnp.ones((1, 8, 8, 4)), jnp.array([5]), jnp.ones((1, 3, 8)), jnp.ones((1, 3, 8)))
    model = XPSRUNet(config, rngs=nnx.Rngs(0))  # built once: eager init is slow
    blocks = (*model.down_blocks, model.mid_block, *model.up_blocks)
    assert {block.block_type for block in blocks} == set(BLOCK_TYPES)

    def grads(remat, trainable):
        """Under jit, as the train step: the model merged from differentiated params and, when
        `trainable` selects only some, closed-over frozen ones."""
        model.remat_block_types = remat  # a static attribute, as load_training_models sets it
        graphdef, params, frozen = nnx.split(model, nnx.All(nnx.Param, trainable), ...)
        loss = lambda p, f: jnp.mean(nnx.merge(graphdef, p, f)(*inputs) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params, frozen)

    every_param = lambda path, _: True  # noqa: E731
    sfa_only = lambda path, _: any(str(p).startswith("attentions_") for p in path)  # noqa: E731
    for trainable in (every_param, sfa_only):
        plain, rematerialised = nnx.to_flat_state(grads((), trainable)), nnx.to_flat_state(grads(BLOCK_TYPES, trainable))
        assert len(plain) == len(rematerialised) > 0
        for (path, a), (_, b) in zip(plain, rematerialised):
            np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=1e-5, atol=1e-6,
                                       err_msg=str(path))
    with pytest.raises(ValueError, match="remat_block_types.*NoSuchBlock"):
        XPSRUNet(config, rngs=nnx.Rngs(0), remat_block_types=("NoSuchBlock",))


def test_controlnet_switches_match_reference(tmp_path):
    """Official switches: RRDB preprocessor on, rgb and latent heads off, BGR input, pooled residuals."""
    from tests.torch_reference import tiny_controlnet_config

    config = tiny_controlnet_config(layers_per_block=1, use_rrdb=True, return_rgbs=False, use_latent_pred=False,
                                    controlnet_conditioning_channel_order="bgr", global_pool_conditions=True,
                                    use_lowlevel_prompt=False)
    torch_model = XPSRControlNetTorch(config).eval()
    randomize_all_parameters(torch_model, seed=5, scale=0.5)
    _save_official(torch_model, tmp_path / "controlnet")
    ours = XPSRControlNet.from_pretrained(tmp_path / "controlnet")
    generator = torch.Generator().manual_seed(3)
    sample, cond = torch.randn(1, 4, 8, 8, generator=generator), torch.rand(1, 3, 64, 64, generator=generator)
    high = torch.randn(1, 4, config["cross_attention_dim"], generator=generator)
    with torch.no_grad():
        reference = torch_model(sample, torch.tensor([9]), high, None, cond)
    out = ours(_j(sample), jnp.asarray([9]), _j(high, False), None, _j(cond))
    assert out.rgb_preds == () and out.latent_preds == () and out.latent_pred_mid is None
    for a, b in zip(out.down_block_res_samples + (out.mid_block_res_sample,),
                    reference.down_block_res_samples + (reference.mid_block_res_sample,)):
        assert a.shape[1:3] == (1, 1)
        assert_parity(nhwc_to_nchw(a), b.numpy(), atol=ATOL, label="switched ControlNet residual")
    assert any(".preprocesser.1.rdb3.conv5." in key for key in module_state_dict(ours))


def test_official_configs_are_validated():
    from xpsr_jax.models import XPSRControlNetConfig, XPSRUNetConfig

    with pytest.raises(ValueError, match="unet/config.json: up_use_lowlevel_prompt has 2 entries"):
        XPSRUNetConfig.from_dict({"up_use_lowlevel_prompt": [True, False]}, source="unet/config.json")
    with pytest.raises(ValueError, match="num_attention_heads"):
        XPSRUNetConfig.from_dict({"num_attention_heads": 8}, source="unet/config.json")
    with pytest.raises(ValueError, match="controlnet_conditioning_channel_order='rbg'"):
        XPSRControlNetConfig.from_dict({"controlnet_conditioning_channel_order": "rbg"}, source="cn")
    with pytest.raises(ValueError, match="mid_block_type"):
        XPSRControlNetConfig.from_dict({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, source="cn")
    with pytest.warns(UserWarning, match="cn: ignoring unknown config keys \\['fg_mask_mode'\\]"):
        config = XPSRControlNetConfig.from_dict({"fg_mask_mode": 1, "use_rrdb": True}, source="cn")
    assert config.use_rrdb and config.to_dict()["fg_mask_mode"] == 1
