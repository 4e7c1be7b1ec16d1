"""`python -m xpsr_jax.models.tiny`: the tiny SD 1.5 + XPSR model in the real on-disk formats."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from tests.torch_reference import (  # noqa: E402
    XPSRControlNetTorch, XPSRUNetTorch, resolve_controlnet_config, resolve_unet_config,
)
from xpsr_jax.models import load_xpsr  # noqa: E402
from xpsr_jax.models.tiny import (  # noqa: E402
    CONDITIONING_EMBEDDING_OUT_CHANNELS, KERNEL_GAIN, ZERO_INIT_SCALE, main, write_sd15, write_tiny_model,
)
from xpsr_jax.weights.files import read_state_dict  # noqa: E402

SD15_FILES = [
    "model_index.json", "scheduler/scheduler_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
]
XPSR_FILES = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors"]
WEIGHT_FILES = ([f"sd15/{name}" for name in SD15_FILES if name.endswith(".safetensors")]
                + [f"xpsr/{name}" for name in XPSR_FILES if name.endswith(".safetensors")])


def _digests(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _torch_state(path: pathlib.Path) -> dict:
    return {k: torch.from_numpy(v) for k, v in read_state_dict(path).items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return root, main(["--out", str(root), "--seed", "0"])


@pytest.fixture(scope="module")
def torch_sd_unet(tiny):
    _, paths = tiny
    unet, info = diffusers.UNet2DConditionModel.from_pretrained(paths.sd15, subfolder="unet",
                                                                output_loading_info=True)
    return unet.eval(), info


def test_cli_writes_both_folders(tiny):
    root, paths = tiny
    assert paths.sd15 == root / "sd15" and paths.xpsr == root / "xpsr"
    missing = [f"sd15/{n}" for n in SD15_FILES if not (paths.sd15 / n).is_file()]
    missing += [f"xpsr/{n}" for n in XPSR_FILES if not (paths.xpsr / n).is_file()]
    assert not missing
    scheduler = json.loads((paths.sd15 / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == {
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
        "trained_betas": None}
    index = json.loads((paths.sd15 / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_sd15_loads_in_diffusers_and_transformers(tiny, torch_sd_unet):
    _, paths = tiny
    unet, info = torch_sd_unet
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert list(unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    vae, vae_info = diffusers.AutoencoderKL.from_pretrained(paths.sd15, subfolder="vae", output_loading_info=True)
    assert not any(vae_info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), vae_info
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == 0.18215
    text_encoder, text_info = transformers.CLIPTextModel.from_pretrained(
        paths.sd15, subfolder="text_encoder", output_loading_info=True)
    assert not text_info["missing_keys"] and not text_info["unexpected_keys"], text_info
    tokenizer = transformers.CLIPTokenizer.from_pretrained(paths.sd15, subfolder="tokenizer")
    scheduler = diffusers.PNDMScheduler.from_pretrained(paths.sd15, subfolder="scheduler")
    assert scheduler.config.steps_offset == 1 and scheduler.config.skip_prk_steps
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(paths.sd15)  # reads model_index.json
    assert pipeline.safety_checker is None and isinstance(pipeline.scheduler, diffusers.PNDMScheduler)

    # The whole pipeline: text -> context -> one UNet step -> decode; all O(1), not degenerate.
    ids = tokenizer(["a photo of the image", ""], padding="max_length", max_length=77, return_tensors="pt")
    assert ids.input_ids.shape == (2, 77)
    with torch.no_grad():
        context = text_encoder(ids.input_ids).last_hidden_state
        assert context.shape == (2, 77, unet.config.cross_attention_dim)
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        eps = unet(latents, torch.tensor([10, 900]), context).sample
        image = vae.decode(latents / vae.config.scaling_factor).sample
        posterior = vae.encode(image).latent_dist
    assert image.shape == (2, 3, 64, 64)
    for name, value in (("context", context), ("eps", eps), ("image", image), ("latent mean", posterior.mean)):
        assert torch.isfinite(value).all(), name
        assert 0.05 < float(value.std()) < 20, f"{name}: std {float(value.std())}"
    assert float((eps[0] - eps[1]).abs().max()) > 1e-2  # the prompt and timestep reach the output


def test_release_loads_strictly_in_ours_and_the_reference(tiny):
    _, paths = tiny
    unet, controlnet = load_xpsr(paths.xpsr)  # strict: any missing / unexpected tensor raises
    assert controlnet.config.conditioning_embedding_out_channels == CONDITIONING_EMBEDDING_OUT_CHANNELS
    for name, cls in (("unet", XPSRUNetTorch), ("controlnet", XPSRControlNetTorch)):
        folder = paths.xpsr / name
        model = cls(json.loads((folder / "config.json").read_text()))
        model.load_state_dict(_torch_state(folder / "diffusion_pytorch_model.safetensors"), strict=True)
    # The release config: SD 1.5's UNet, SFA off in the UNet and on in the ControlNet.
    assert not unet.config.mid_use_lowlevel_prompt and not any(unet.config.up_use_lowlevel_prompt)
    assert controlnet.config.use_lowlevel_prompt and controlnet.config.return_rgbs


def test_release_follows_the_official_init_rule(tiny, torch_sd_unet):
    """Against the PyTorch reference's own implementation of from_pretrained_orig / from_unet."""
    _, paths = tiny
    sd_unet, _ = torch_sd_unet
    reference_unet = XPSRUNetTorch.from_sd_unet(sd_unet)
    unet_config = json.loads((paths.xpsr / "unet" / "config.json").read_text())
    ours = resolve_unet_config(unet_config)  # the reference also keeps diffusers-only keys
    assert ours == {key: reference_unet.config[key] for key in ours}
    unet_state = read_state_dict(paths.xpsr / "unet" / "diffusion_pytorch_model.safetensors")
    sd_state = sd_unet.state_dict()
    report = reference_unet.init_report
    assert report.copied and all("pixel_attentions" in key for key in report.fresh)
    for key, source_key in report.copied.items():
        np.testing.assert_array_equal(unet_state[key], sd_state[source_key].numpy(), err_msg=key)

    torch_unet = XPSRUNetTorch(unet_config)
    torch_unet.load_state_dict({k: torch.from_numpy(v) for k, v in unet_state.items()}, strict=True)
    reference_controlnet = XPSRControlNetTorch.from_unet(
        torch_unet, conditioning_embedding_out_channels=CONDITIONING_EMBEDDING_OUT_CHANNELS)
    controlnet_config = json.loads((paths.xpsr / "controlnet" / "config.json").read_text())
    ours = resolve_controlnet_config(controlnet_config)
    assert ours == {key: reference_controlnet.config[key] for key in ours}
    controlnet_state = read_state_dict(paths.xpsr / "controlnet" / "diffusion_pytorch_model.safetensors")
    copied = dict(reference_controlnet.init_report.copied)
    copied.update({k: k for k in controlnet_state if k.startswith(("conv_in.", "time_embedding."))})
    assert any("attentions_lowlevel" in k for k in copied)  # SFA copied from the UNet's `attentions`
    for key, source_key in copied.items():
        np.testing.assert_array_equal(controlnet_state[key], unet_state[source_key], err_msg=key)
    fresh = set(reference_controlnet.init_report.fresh)
    assert any("attentions_connect" in k and k.endswith("attn2.to_k.weight") for k in fresh)


def test_no_tensor_is_all_zero_or_constant(tiny):
    _, paths = tiny
    constant = []
    for name in WEIGHT_FILES:
        for key, value in read_state_dict(paths.sd15.parent / name).items():
            if value.size > 1 and np.all(value == value.flat[0]):
                constant.append(f"{name}: {key}")
    assert not constant, constant[:20]
    controlnet = read_state_dict(paths.xpsr / "controlnet" / "diffusion_pytorch_model.safetensors")
    for key in ("controlnet_mid_block.weight", "controlnet_down_blocks.0.weight",
                "controlnet_cond_embedding.conv_out.weight"):  # zero in the official init: small, not zero
        fan_in = np.prod(controlnet[key].shape[1:])
        expected_std = ZERO_INIT_SCALE * KERNEL_GAIN / np.sqrt(fan_in)
        assert 0.5 * expected_std < float(np.std(controlnet[key])) < 2 * expected_std, key


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    root, paths = tiny
    write_tiny_model(tmp_path / "again", seed=0)
    assert _digests(tmp_path / "again") == _digests(root)
    # Another seed: every SD weight file differs (the release draws from the same generator; only
    # the SD half is rewritten to keep the test short).
    write_sd15(tmp_path / "other", seed=1)
    other, reference = _digests(tmp_path / "other"), _digests(paths.sd15)
    assert set(other) == set(reference)
    assert [name for name in other if name.endswith(".safetensors") and other[name] == reference[name]] == []
    assert [name for name in other if name.endswith(".json") and other[name] != reference[name]] == []
