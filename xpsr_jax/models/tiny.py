"""A complete tiny SD 1.5 + XPSR model with random weights, in the real on-disk formats.

    python -m xpsr_jax.models.tiny --out DIR [--seed N]

    paths = write_tiny_model("DIR", seed=0)    # TinyModelPaths(sd15=DIR/sd15, xpsr=DIR/xpsr)

`DIR/sd15/` is a diffusers Stable Diffusion 1.5 folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/) and `DIR/xpsr/` an official-layout XPSR release (unet/,
controlnet/). Every network has SD 1.5's structure (4 UNet blocks: 3 x CrossAttnDownBlock2D +
DownBlock2D, 12 skips; a 4-block x8 VAE with 4 latent channels; a quick-GELU CLIP text encoder
over 77 positions) at tiny widths, so it runs on a CPU in tests and loads in diffusers,
transformers, `xpsr_jax.models` and the PyTorch reference alike.

Weights. Every tensor is drawn from a numpy generator seeded by (seed, network, tensor name):
matrices and conv kernels 0.8 N(0, 1) / sqrt(fan_in), norm scales 1 + 0.1 N(0, 1), biases
0.1 N(0, 1), so activations stay O(1); the layers the official init zeroes get 0.05 of that
(see ZERO_INIT_SCALE). The same seed gives the same bytes.

The XPSR release follows the official initialisation rule (`xpsr_jax.models.xpsr_init`, the
rule of `XPSRUNet.from_sd_unet` and `XPSRControlNet.from_unet`) from the tiny SD UNet:
- XPSR UNet (release config: no SFA): every SD UNet tensor copied; the pixel attentions fresh.
- ControlNet: conv_in, time_embedding, down and mid blocks copied from that UNet, its SFA
  (`attentions_lowlevel` / `attentions_connect`) from the UNet's `attentions`; the connect
  blocks' attn2.to_k/to_v (shape mismatch, as in SD 1.5), the pyramid encoder, `to_rgbs`,
  the latent heads and the zero convs fresh.
"Fresh" here means random as above, NOT the official init: the official code leaves the zero
convs (`controlnet_down_blocks.*`, `controlnet_mid_block`), `controlnet_cond_embedding.conv_out`
and, in fresh layers, every norm bias at zero (norm scales at one). Randomising them makes every
path of the network matter, so a test comparing two implementations sees any wrong one; no
tensor of the release is all-zero (or constant).

The networks are built abstractly (`nnx.eval_shape`) and filled, as `from_pretrained` does,
rather than by calling `XPSRUNet.from_sd_unet` / `XPSRControlNet.from_unet`, whose eager random
initialisation compiles one kernel per tensor shape (about 40 s on a 2-core CPU); the configs
they derive come from `XPSRUNetConfig.from_sd` / `XPSRControlNetConfig.from_unet` and the copy rule is
theirs (`apply_official_init`). tests/test_tiny_model.py checks both against the PyTorch reference.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from flax import nnx

from xpsr_jax.cli_config import CommandParser
from xpsr_jax.models.clip import CLIPTextConfig, CLIPTextEncoder
from xpsr_jax.models.loading import abstract_network
from xpsr_jax.models.tiny_tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    tiny_clip_vocab,
    write_tiny_clip_tokenizer,
)
from xpsr_jax.models.unet import UNet2DCondition, UNet2DConditionConfig
from xpsr_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from xpsr_jax.models.xpsr_controlnet import XPSRControlNet, XPSRControlNetConfig
from xpsr_jax.models.xpsr_init import apply_official_init
from xpsr_jax.models.xpsr_unet import XPSRUNet, XPSRUNetConfig
from xpsr_jax.weights.convert import (
    load_state_dict_into,
    module_state_dict,
    to_torch_layout,
    torch_key,
)

SD_DOWN_BLOCKS = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
SD_UP_BLOCKS = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3

# The context width (CLIP hidden size) differs from every block width, as 768 does in SD 1.5,
# so the ControlNet's SFA connect blocks keep shape-mismatched (fresh) attn2.to_k / to_v.
CONTEXT_WIDTH = 24

# SD 1.5's unet/config.json keys, at tiny widths.
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 4,
    "block_out_channels": [32, 32, 64, 64],
    "center_input_sample": False,
    "cross_attention_dim": CONTEXT_WIDTH,
    "down_block_types": SD_DOWN_BLOCKS,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": SD_UP_BLOCKS,
}

# SD 1.5's vae/config.json keys: 4 blocks (x8 downsampling), 4 latent channels, SD's scaling factor.
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [16, 16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# SD 1.5's text_encoder/config.json keys (vocabulary and special-token ids from the tokenizer).
TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": CONTEXT_WIDTH,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4 * CONTEXT_WIDTH,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": CONTEXT_WIDTH,
    "torch_dtype": "float32",
}

# SD 1.5's scheduler/scheduler_config.json, key for key.
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# SD 1.5's model_index.json; no safety checker / feature extractor are written (null entries).
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# The ControlNet's pyramid encoder widths (official: (16, 32, 96, 256)).
CONDITIONING_EMBEDDING_OUT_CHANNELS = (8, 16, 32, 64)


class TinyModelPaths(NamedTuple):
    """sd15: the diffusers SD 1.5 folder; xpsr: the XPSR release folder (unet/, controlnet/)."""

    sd15: Path
    xpsr: Path


# Layers the official init leaves at zero: small but non-zero, so they matter without making the
# sampling dynamics chaotic. Measured on the 20-step DDPM recipe (guidance 4.5): with unit-gain
# kernels and full-size zero convs a 1e-5 change of the initial latent moved the final one by
# 12 (x1.2e6); with gain 0.8 and zero-init layers at 0.05 by 1.1e-4 (x11), so float rounding
# stays far below the pipeline parity tolerance.
ZERO_INIT_PREFIXES = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")
ZERO_INIT_SCALE = 0.05
KERNEL_GAIN = 0.8


def random_tensor(torch_name: str, leaf: str, shape: tuple[int, ...], *, seed: int, network: str) -> np.ndarray:
    """One PyTorch-layout tensor, from a generator seeded by (seed, network, tensor name)."""
    generator = np.random.default_rng([seed, zlib.crc32(network.encode()), zlib.crc32(torch_name.encode())])
    noise = generator.standard_normal(shape, dtype=np.float32)
    if torch_name.startswith(ZERO_INIT_PREFIXES):
        noise = noise * np.float32(ZERO_INIT_SCALE)
    if len(shape) >= 2:  # Linear (out, in), Conv (out, in, kh, kw), Embedding (rows, width)
        return noise * np.float32(KERNEL_GAIN / np.sqrt(np.prod(shape[1:])))
    if leaf == "scale":  # GroupNorm / LayerNorm scale
        return np.float32(1.0) + np.float32(0.1) * noise
    return np.float32(0.1) * noise


def randomized(abstract: nnx.Module, *, seed: int, network: str) -> nnx.Module:
    """`abstract` (from `abstract_network`) with every parameter random (see `random_tensor`)."""
    state_dict = {}
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        value = variable.get_value()
        torch_shape = to_torch_layout(path[-1], np.empty(value.shape, np.uint8)).shape
        name = torch_key(tuple(path))
        state_dict[name] = random_tensor(name, path[-1], tuple(torch_shape), seed=seed, network=network)
    return load_state_dict_into(abstract, state_dict, source=f"random {network} weights")


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def write_sd15(folder: str | os.PathLike, *, seed: int) -> UNet2DCondition:
    """The SD 1.5 folder; returns its UNet (the source of the XPSR release)."""
    folder = Path(folder)
    write_tiny_clip_tokenizer(folder / "tokenizer")
    vocab = tiny_clip_vocab()
    text_config = CLIPTextConfig.from_dict(
        {**TEXT_ENCODER_CONFIG, "vocab_size": len(vocab), "bos_token_id": vocab[BOS_TOKEN],
         "eos_token_id": vocab[EOS_TOKEN], "pad_token_id": vocab[EOS_TOKEN]},
        source=str(folder / "text_encoder"))
    text_encoder = abstract_network(CLIPTextEncoder, text_config)
    randomized(text_encoder, seed=seed, network="text_encoder").save_pretrained(folder / "text_encoder")

    vae_config = AutoencoderKLConfig.from_dict(VAE_CONFIG, source=str(folder / "vae"))
    vae = abstract_network(AutoencoderKL, vae_config)
    randomized(vae, seed=seed, network="vae").save_pretrained(folder / "vae")

    unet_config = UNet2DConditionConfig.from_dict(UNET_CONFIG, source=str(folder / "unet"))
    unet = randomized(abstract_network(UNet2DCondition, unet_config), seed=seed, network="unet")
    unet.save_pretrained(folder / "unet")
    _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    _write_json(folder / "model_index.json", MODEL_INDEX)
    return unet


def write_xpsr_release(folder: str | os.PathLike, sd_unet: UNet2DCondition, *, seed: int) -> None:
    """`folder/unet` and `folder/controlnet`, initialised from `sd_unet` by the official rule."""
    folder = Path(folder)
    unet_config = XPSRUNetConfig.from_sd(sd_unet.config)
    unet = randomized(abstract_network(XPSRUNet, unet_config), seed=seed, network="xpsr_unet")
    unet, _ = apply_official_init(unet, module_state_dict(sd_unet), source_name="SD UNet")
    unet.save_pretrained(folder / "unet")

    controlnet_config = XPSRControlNetConfig.from_unet(
        unet_config, conditioning_embedding_out_channels=CONDITIONING_EMBEDDING_OUT_CHANNELS)
    controlnet = randomized(abstract_network(XPSRControlNet, controlnet_config),
                            seed=seed, network="xpsr_controlnet")
    controlnet, _ = apply_official_init(controlnet, module_state_dict(unet), source_name="XPSR UNet",
                                        prefixes=("conv_in.", "time_embedding.", "down_blocks.", "mid_block."))
    controlnet.save_pretrained(folder / "controlnet")


def write_tiny_model(out_dir: str | os.PathLike, *, seed: int = 0) -> TinyModelPaths:
    """Write `out_dir/sd15` and `out_dir/xpsr` (see the module docstring); same seed, same bytes."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"write_tiny_model: seed={seed!r} must be a non-negative int")
    out_dir = Path(out_dir)
    paths = TinyModelPaths(sd15=out_dir / "sd15", xpsr=out_dir / "xpsr")
    sd_unet = write_sd15(paths.sd15, seed=seed)
    write_xpsr_release(paths.xpsr, sd_unet, seed=seed)
    return paths


def main(argv=None) -> TinyModelPaths:
    parser = CommandParser(prog="python -m xpsr_jax.models.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder; sd15/ and xpsr/ are written inside it")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same files)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = write_tiny_model(args.out, seed=args.seed)
    print(f"wrote {paths.sd15} and {paths.xpsr} in {time.perf_counter() - start:.1f} s")
    return paths


if __name__ == "__main__":
    main()
