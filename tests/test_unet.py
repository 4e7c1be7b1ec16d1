"""UNet2DCondition: parity with diffusers' UNet2DConditionModel and checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tests.helpers.parity_utils import assert_parity, nchw_to_nhwc, nhwc_to_nchw, randomize_torch_parameters  # noqa: E402
from xpsr_jax.models.unet import UNet2DCondition, UNet2DConditionConfig  # noqa: E402
from xpsr_jax.weights.convert import module_state_dict  # noqa: E402

# SD-shaped (3 cross-attention down blocks + a plain one, mirrored up path), tiny widths, 4 groups.
TINY_SD15 = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(16, 16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    norm_num_groups=4, cross_attention_dim=24, attention_head_dim=2,
)
# SD 2.x flavour: linear projections and a per-block head list.
TINY_SD2 = dict(TINY_SD15, use_linear_projection=True, attention_head_dim=(2, 2, 4, 4), layers_per_block=1)


def _torch_unet(config: dict, folder, seed: int):
    model = diffusers.UNet2DConditionModel(**config).eval()
    randomize_torch_parameters(model, seed=seed)
    model.save_pretrained(folder)
    return model


def _run_both(torch_model, flax_model, *, height, width, seed=0, **flax_kwargs):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, height, width, generator=generator)
    context = torch.randn(2, 5, torch_model.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([3, 917])
    with torch.no_grad():
        reference = torch_model(sample, timesteps, context).sample.numpy()
    forward = nnx.jit(lambda m, x, t, c: m(x, t, c))
    ours = forward(flax_model, jnp.asarray(nchw_to_nhwc(sample)), jnp.asarray(timesteps.numpy()),
                   jnp.asarray(context.numpy()))
    return nhwc_to_nchw(ours), reference


@pytest.mark.parametrize("name,config", [("sd15-conv-proj", TINY_SD15), ("sd2-linear-proj", TINY_SD2)])
def test_unet_matches_diffusers_fp32(tmp_path, name, config):
    torch_model = _torch_unet(config, tmp_path, seed=1)
    unet = UNet2DCondition.from_pretrained(tmp_path)
    # 24 x 40 latents: non-square, and 40 / 8 = 5 exercises non-power-of-two skips.
    ours, reference = _run_both(torch_model, unet, height=24, width=40)
    assert_parity(ours, reference, atol=1e-4, label=f"unet {name} fp32")


def test_unet_odd_latent_size_uses_upsample_size(tmp_path):
    # 20 x 14 latents are not multiples of 8: diffusers upsamples to the skip's size.
    torch_model = _torch_unet(dict(TINY_SD15, layers_per_block=1), tmp_path, seed=2)
    unet = UNet2DCondition.from_pretrained(tmp_path)
    ours, reference = _run_both(torch_model, unet, height=20, width=14)
    assert_parity(ours, reference, atol=1e-4, label="unet odd size")


def test_unet_bf16_compute_within_tolerance(tmp_path):
    torch_model = _torch_unet(TINY_SD15, tmp_path, seed=3)
    unet = UNet2DCondition.from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    ours, reference = _run_both(torch_model, unet, height=16, width=16)
    # bf16 keeps 8 mantissa bits: measured max-abs 3.9e-2 (relative 1.9e-2) on outputs of size ~2.
    assert_parity(ours, reference, atol=1.2e-1, label="unet bf16 compute")
    assert unet.conv_in.kernel.get_value().dtype == jnp.float32


def test_unet_residuals_match_diffusers(tmp_path):
    torch_model = _torch_unet(dict(TINY_SD15, layers_per_block=1), tmp_path, seed=4)
    unet = UNet2DCondition.from_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 5, 24, generator=generator)
    residuals = [torch.randn(*s, generator=generator) for s in _skip_shapes(torch_model, sample)]
    mid = torch.randn(1, 32, 2, 2, generator=generator)
    with torch.no_grad():
        reference = torch_model(sample, torch.tensor([10]), context, down_block_additional_residuals=residuals,
                                mid_block_additional_residual=mid).sample.numpy()
    ours = unet(jnp.asarray(nchw_to_nhwc(sample)), jnp.asarray([10]), jnp.asarray(context.numpy()),
                down_block_additional_residuals=[jnp.asarray(nchw_to_nhwc(r)) for r in residuals],
                mid_block_additional_residual=jnp.asarray(nchw_to_nhwc(mid)))
    assert_parity(nhwc_to_nchw(ours), reference, atol=1e-4, label="unet with residuals")


def _skip_shapes(torch_model, sample):
    """Shapes of the skip connections, in down order: conv_in, every resnet, every downsampler."""
    channels = torch_model.config.block_out_channels
    height, width = sample.shape[2:]
    shapes = [(1, channels[0], height, width)]
    for i, block in enumerate(torch_model.down_blocks):
        shapes.extend([(1, channels[i], height, width)] * len(block.resnets))
        if block.downsamplers is not None:
            height, width = (height + 1) // 2, (width + 1) // 2
            shapes.append((1, channels[i], height, width))
    return shapes


def test_unet_save_pretrained_round_trips_bit_exactly(tmp_path):
    torch_model = _torch_unet(TINY_SD2, tmp_path / "src", seed=6)
    unet = UNet2DCondition.from_pretrained(tmp_path / "src")
    unet.save_pretrained(tmp_path / "out")
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out")
    original = torch_model.state_dict()
    assert set(reloaded.state_dict()) == set(original)
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    ours_again = module_state_dict(UNet2DCondition.from_pretrained(tmp_path / "out"))
    for key, array in module_state_dict(unet).items():
        np.testing.assert_array_equal(ours_again[key], array)


def test_unet_config_rejects_unsupported_architecture():
    with pytest.raises(ValueError, match="class_embed_type"):
        UNet2DConditionConfig.from_dict({"class_embed_type": "timestep"}, source="unet/config.json")
    with pytest.raises(ValueError, match="down_block_types.*SimpleCrossAttnDownBlock2D"):
        UNet2DConditionConfig.from_dict({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4},
                                        source="unet/config.json")
    with pytest.warns(UserWarning, match="some_future_key"):
        UNet2DConditionConfig.from_dict({"some_future_key": 1}, source="unet/config.json")


def test_unet_config_head_count_quirk():
    config = UNet2DConditionConfig.from_dict({"attention_head_dim": 8}, source="x")
    assert config.heads_per_block == (8, 8, 8, 8)
    config = UNet2DConditionConfig.from_dict({"attention_head_dim": [5, 10, 20, 20]}, source="x")
    assert config.heads_per_block == (5, 10, 20, 20)
