"""AutoencoderKL: parity with diffusers, weight import/export, and the shared loading errors.

A tiny random diffusers VAE (every parameter randomised) is saved with diffusers'
`save_pretrained` and loaded with ours. The checkpoint-loading error tests live here for every
model: the mechanism (`xpsr_jax.weights`) is shared, so one set covers all of them.
"""

from __future__ import annotations

import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers.parity_utils import assert_parity, nchw_to_nhwc, randomize_torch_parameters
from xpsr_jax.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from xpsr_jax.weights import WeightLoadError, module_state_dict, read_state_dict, write_state_dict
from xpsr_jax.weights.files import WeightFileError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

WEIGHTS = "diffusion_pytorch_model.safetensors"
# Two blocks (x2 downsampling), widths 8 -> 16 so both a plain and a conv_shortcut resnet exist.
TINY_VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=2,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=32,
)
# fp32: measured max-abs 1.4e-6 to 4.4e-6 (CPU, and H200 at "highest" precision). 2e-5 (tighter than
# the 1e-4 asked for) still fails a GroupNorm eps of 1e-5 instead of diffusers' 1e-6 (1.1e-4).
FP32_ATOL = 2e-5
# bf16 compute, fp32 params. Measured max-abs error over 4 random models on CPU (values up to
# ~3): mean <= 4.0e-2, logvar <= 3.4e-2, decode <= 4.6e-2, forward 9.3e-2 (relative 1-3 %);
# this test's model on an H200: 4.9e-2 / 3.2e-2 / 3.1e-2 / 7.9e-2.
BF16_ATOL = 0.15


def _tiny_torch_vae(seed: int = 0, **overrides):
    model = diffusers.AutoencoderKL(**{**TINY_VAE, **overrides})
    randomize_torch_parameters(model, seed=seed)
    return model.eval()


@pytest.fixture(scope="module")
def torch_vae():
    return _tiny_torch_vae()


@pytest.fixture(scope="module")
def vae_dir(torch_vae, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_vae")
    torch_vae.save_pretrained(folder, safe_serialization=True)
    assert (folder / WEIGHTS).is_file()
    return folder


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1.0, 1.0, (2, 3, 24, 16)).astype(np.float32)  # NCHW, H != W
    latents = rng.standard_normal((2, 4, 12, 8)).astype(np.float32)
    return images, latents


@pytest.fixture(scope="module")
def torch_outputs(torch_vae, inputs):
    images, latents = inputs
    with torch.no_grad():
        posterior = torch_vae.encode(torch.from_numpy(images)).latent_dist
        outputs = {
            "mean": posterior.mean,
            "logvar": posterior.logvar,
            "decode": torch_vae.decode(torch.from_numpy(latents)).sample,
            "forward": torch_vae(torch.from_numpy(images), sample_posterior=False).sample,
        }
    return {name: nchw_to_nhwc(value.numpy()) for name, value in outputs.items()}


def _run_jitted(model: AutoencoderKL, images: np.ndarray, latents: np.ndarray) -> dict[str, np.ndarray]:
    """encode / decode / __call__ in ONE compilation (jax.jit over the split state)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images, latents):
        vae = nnx.merge(graphdef, state)
        posterior = vae.encode(images)
        return {"mean": posterior.mean, "logvar": posterior.logvar, "decode": vae.decode(latents),
                "forward": vae(images)}

    return run(state, nchw_to_nhwc(images), nchw_to_nhwc(latents))


def _copy_with_weights(src, dst, state_dict, *, filename=WEIGHTS):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    if filename.endswith(".bin"):
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, dst / filename)
    else:
        write_state_dict(dst / filename, state_dict)
    return dst / filename


# ----------------------------------------------------------------------------------- parity


def test_fp32_parity_with_diffusers_non_square(vae_dir, inputs, torch_outputs):
    model = AutoencoderKL.from_pretrained(vae_dir)
    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: this checks the maths, not the chip
        ours = _run_jitted(model, *inputs)
    assert ours["mean"].shape == (2, 12, 8, 4)  # x2 downsampling of a 24x16 image, NHWC
    assert ours["decode"].shape == (2, 24, 16, 3)
    for name, reference in torch_outputs.items():
        assert_parity(ours[name], reference, atol=FP32_ATOL, label=f"fp32 {name}")


def test_bf16_compute_with_fp32module_state_dict(vae_dir, inputs, torch_outputs):
    model = AutoencoderKL.from_pretrained(vae_dir, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert {v.dtype for v in module_state_dict(model).values()} == {np.dtype(np.float32)}
    ours = _run_jitted(model, *inputs)
    assert ours["mean"].dtype == jnp.bfloat16 and ours["decode"].dtype == jnp.bfloat16
    for name, reference in torch_outputs.items():
        assert_parity(np.asarray(ours[name], np.float32), reference, atol=BF16_ATOL, label=f"bf16 {name}")


# ------------------------------------------------------------------------------- posterior


def test_posterior_sample_statistics_and_clipping():
    # One (mean, logvar) per channel, 2 x 64 x 64 draws each; logvar 25 / -40 exercise the clip.
    # (The std exp(-15) channel has mean 0: next to a mean of O(1) it would be below float32 ulp.)
    channel_mean = jnp.array([-1.0, 0.5, 2.0, 3.0, 0.0])
    channel_logvar = jnp.array([0.0, -2.0, 1.0, 25.0, -40.0])
    moments = jnp.concatenate([channel_mean, channel_logvar])
    posterior = DiagonalGaussian.from_moments(jnp.broadcast_to(moments, (2, 64, 64, 10)))

    np.testing.assert_allclose(posterior.logvar[0, 0, 0], [0.0, -2.0, 1.0, 20.0, -30.0])
    np.testing.assert_allclose(posterior.std[0, 0, 0], np.exp(0.5 * np.array([0.0, -2.0, 1.0, 20.0, -30.0])),
                               rtol=1e-6)
    np.testing.assert_array_equal(posterior.mode(), posterior.mean)

    draws = posterior.sample(jax.random.key(0))
    assert draws.shape == (2, 64, 64, 5) and draws.dtype == jnp.float32
    standardised = np.asarray((draws - posterior.mean) / posterior.std).reshape(-1, 5)
    n = standardised.shape[0]
    np.testing.assert_allclose(standardised.mean(0), 0.0, atol=4.0 / np.sqrt(n))  # 4 sigma of the mean
    np.testing.assert_allclose(standardised.std(0), 1.0, atol=0.03)
    # Channels are independent draws, and the key alone decides the noise.
    assert abs(np.corrcoef(standardised[:, 0], standardised[:, 1])[0, 1]) < 0.05
    np.testing.assert_array_equal(posterior.sample(jax.random.key(0)), draws)
    assert not np.allclose(posterior.sample(jax.random.key(1)), draws)


# ------------------------------------------------------------------------- weight import


def test_legacy_attention_key_names_load(vae_dir, tmp_path):
    """Old files name the mid attention query/key/value/proj_attn, sometimes as 1x1-conv kernels."""
    legacy = {}
    for name, array in read_state_dict(vae_dir / WEIGHTS).items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            name = name.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        if name.endswith(("query.weight", "key.weight", "value.weight")):
            array = array[:, :, None, None]
        legacy[name] = array
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    assert not any(".to_q." in name or ".to_out." in name for name in legacy)
    _copy_with_weights(vae_dir, tmp_path / "legacy", legacy, filename="diffusion_pytorch_model.bin")

    loaded = module_state_dict(AutoencoderKL.from_pretrained(tmp_path / "legacy"))
    reference = module_state_dict(AutoencoderKL.from_pretrained(vae_dir))
    assert loaded.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_variant_without_quant_convs_or_mid_attention(tmp_path):
    """use_quant_conv / use_post_quant_conv / mid_block_add_attention False: same params, same outputs."""
    torch_model = _tiny_torch_vae(seed=3, layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False,
                                  mid_block_add_attention=False)
    torch_model.save_pretrained(tmp_path)
    model = AutoencoderKL.from_pretrained(tmp_path)  # strict: any extra/missing parameter raises
    assert model.quant_conv is None and model.post_quant_conv is None
    images = np.random.default_rng(1).uniform(-1.0, 1.0, (1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(images), sample_posterior=False).sample.numpy()
    with jax.default_matmul_precision("highest"):
        ours = model(nchw_to_nhwc(images))
    assert_parity(ours, nchw_to_nhwc(reference), atol=FP32_ATOL, label="no-quant/no-attn")


# -------------------------------------------------------------- loading errors (all models)


def _load_error(folder) -> str:
    with pytest.raises((WeightLoadError, WeightFileError, FileNotFoundError)) as error:
        AutoencoderKL.from_pretrained(folder)
    return str(error.value)


def test_error_names_file_and_missing_tensor(vae_dir, tmp_path):
    state = read_state_dict(vae_dir / WEIGHTS)
    del state["decoder.up_blocks.1.resnets.2.conv1.weight"]
    path = _copy_with_weights(vae_dir, tmp_path / "missing", state)
    message = _load_error(path.parent)
    assert str(path) in message and "missing" in message
    assert "decoder.up_blocks.1.resnets.2.conv1.weight" in message


def test_error_names_file_and_unexpected_tensor(vae_dir, tmp_path):
    state = read_state_dict(vae_dir / WEIGHTS)
    state["encoder.mid_block.attentions.0.to_extra.weight"] = np.zeros((16, 16), np.float32)
    path = _copy_with_weights(vae_dir, tmp_path / "unexpected", state)
    message = _load_error(path.parent)
    assert str(path) in message and "unexpected" in message
    assert "encoder.mid_block.attentions.0.to_extra.weight" in message


def test_error_names_file_and_mis_shaped_tensor(vae_dir, tmp_path):
    state = read_state_dict(vae_dir / WEIGHTS)
    state["encoder.conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)
    path = _copy_with_weights(vae_dir, tmp_path / "shape", state)
    message = _load_error(path.parent)
    assert str(path) in message and "encoder.conv_in.weight" in message
    assert "(8, 3, 5, 5)" in message and "(8, 3, 3, 3)" in message


def test_error_names_missing_config_file(vae_dir, tmp_path):
    folder = tmp_path / "no_config"
    folder.mkdir()
    shutil.copy(vae_dir / WEIGHTS, folder / WEIGHTS)
    message = _load_error(folder)
    assert str(folder / "config.json") in message and "not found" in message


def test_error_bin_checkpoint_without_torch(vae_dir, tmp_path, monkeypatch):
    path = _copy_with_weights(vae_dir, tmp_path / "bin", read_state_dict(vae_dir / WEIGHTS),
                              filename="diffusion_pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    message = _load_error(path.parent)
    assert str(path) in message and "PyTorch" in message and ".safetensors" in message


# ----------------------------------------------------------------------------- round trip


def test_round_trip_ours_to_diffusers_is_bit_exact(vae_dir, torch_vae, tmp_path):
    AutoencoderKL.from_pretrained(vae_dir).save_pretrained(tmp_path / "ours")
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours")
    original, written = torch_vae.state_dict(), reloaded.state_dict()
    assert written.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(written[name], tensor), name
    assert reloaded.config.scaling_factor == torch_vae.config.scaling_factor
    assert tuple(reloaded.config.block_out_channels) == TINY_VAE["block_out_channels"]


def test_round_trip_ours_to_ours(vae_dir, tmp_path):
    first = AutoencoderKL.from_pretrained(vae_dir)
    first.save_pretrained(tmp_path / "ours")
    second = AutoencoderKL.from_pretrained(tmp_path / "ours")
    assert second.config == first.config
    before, after = module_state_dict(first), module_state_dict(second)
    assert before.keys() == after.keys()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize("key, value, fragment", [
    ("act_fn", "gelu", "act_fn='gelu'"),
    ("shift_factor", 0.1159, "shift_factor=0.1159"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], "down_block_types"),
    ("up_block_types", ["UpDecoderBlock2D"], "up_block_types has 1 entries"),
    ("norm_num_groups", 3, "norm_num_groups=3"),
])
def test_config_rejects_unsupported_values(key, value, fragment):
    raw = {**json.loads(json.dumps(TINY_VAE)), key: value}
    with pytest.raises(ValueError, match="vae/config.json") as error:
        AutoencoderKLConfig.from_dict(raw, source="vae/config.json")
    assert fragment in str(error.value)


def test_sd15_defaults_and_input_checks():
    config = AutoencoderKLConfig()
    assert config.downsample_factor == 8 and config.latent_channels == 4 and config.scaling_factor == 0.18215
    model = nnx.eval_shape(lambda: AutoencoderKL(AutoencoderKLConfig.from_dict(TINY_VAE), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"\(batch, height, width, 3\); got shape \(1, 3, 16, 16\)"):
        model.encode(jnp.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match=r"decode input .* got shape \(1, 8, 8, 3\)"):
        model.decode(jnp.zeros((1, 8, 8, 3)))
