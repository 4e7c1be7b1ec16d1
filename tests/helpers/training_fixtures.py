"""Tiny XPSR training setups written in the real on-disk formats, random in every parameter.

`write_tiny_training_models(root)` writes
    root/sd15/     unet/ (diffusers UNet2DConditionModel), vae/ (diffusers AutoencoderKL, x8),
                   text_encoder/ (transformers CLIPTextModel), scheduler/ (DDPMScheduler, SD 1.5's)
    root/release/  unet/ + controlnet/ in the official XPSR layout (tests/torch_reference)
and returns the PyTorch modules. The UNet has SFA in its mid and last up block, so every trainable
module kind (pixel_attentions, attentions_lowlevel, attentions_connect) exists.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
from ml_collections import config_dict

from tests.helpers.parity_utils import randomize_torch_parameters
from tests.torch_reference import XPSRControlNetTorch, XPSRUNetTorch, randomize_all_parameters, tiny_unet_config
from xpsr_jax.weights.files import write_state_dict

# SFA in the UNet's mid and last up block covers every trainable module kind while keeping the
# XLA compile of the train step short on a 2-core CPU (SFA everywhere triples the attention ops).
SFA_EVERYWHERE = dict(down_use_lowlevel_prompt=False, mid_use_lowlevel_prompt=True,
                      up_use_lowlevel_prompt=[False, True])
# Two UNet levels (a cross-attention and a plain block each way, as SD's deepest and shallowest)
# hold every block type at half the train-step compile of SD's four; both 32 wide, since the
# first up block's pixel attentions need equal residual widths (as SD's are).
UNET_ARCHITECTURE = dict(layers_per_block=1, block_out_channels=[32, 32],
                         down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
CONTEXT_DIM = 24  # tiny_unet_config's cross_attention_dim
VOCAB, TOKENS = 100, 77
HEIGHT, WIDTH = 64, 128  # 8x16 latents: the mid block sees 4x8 tokens, so its self-attention keys get gradients
TINY_VAE = dict(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
                latent_channels=4, sample_size=HEIGHT)
TINY_CLIP = dict(vocab_size=VOCAB, hidden_size=CONTEXT_DIM, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=TOKENS, bos_token_id=98, eos_token_id=99,
                 pad_token_id=99)
# SD 1.5's scheduler/scheduler_config.json (a PNDM config; train.py reads it with DDPMScheduler).
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}


class TinyTorchModels(NamedTuple):
    unet: object
    controlnet: object
    vae: object
    text_encoder: object
    scheduler: object
    sd15: Path
    release: Path


def _save_official(model, folder: Path) -> None:
    folder.mkdir(parents=True)
    name = "UNet2DConditionModel" if isinstance(model, XPSRUNetTorch) else "ControlNetModel"
    (folder / "config.json").write_text(json.dumps({"_class_name": name, **model.config}))
    write_state_dict(folder / "diffusion_pytorch_model.safetensors",
                     {k: v.detach().numpy() for k, v in model.state_dict().items()})


def write_tiny_training_models(root: Path, seed: int = 0) -> TinyTorchModels:
    import diffusers
    import torch
    import transformers

    root = Path(root)
    torch.manual_seed(seed)
    unet = XPSRUNetTorch(tiny_unet_config(**SFA_EVERYWHERE, **UNET_ARCHITECTURE)).eval()
    randomize_all_parameters(unet, seed=seed, scale=0.5)
    controlnet = XPSRControlNetTorch.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 12, 16)).eval()
    randomize_all_parameters(controlnet, seed=seed + 1, scale=0.5)  # zero convs too
    _save_official(unet, root / "release" / "unet")
    _save_official(controlnet, root / "release" / "controlnet")

    sd15 = root / "sd15"
    accepted = inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters
    sd_unet = diffusers.UNet2DConditionModel(**{k: v for k, v in unet.config.items() if k in accepted})
    sd_keys = set(sd_unet.state_dict())
    sd_unet.load_state_dict({k: v for k, v in unet.state_dict().items() if k in sd_keys}, strict=True)
    sd_unet.save_pretrained(sd15 / "unet")

    vae = diffusers.AutoencoderKL(**TINY_VAE)
    randomize_torch_parameters(vae, seed=seed + 2)
    vae = vae.eval()
    vae.save_pretrained(sd15 / "vae")
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_CLIP)).eval()
    randomize_torch_parameters(text_encoder, seed=seed + 3)
    text_encoder.save_pretrained(sd15 / "text_encoder")
    (sd15 / "scheduler").mkdir()
    (sd15 / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    scheduler = diffusers.DDPMScheduler.from_pretrained(sd15, subfolder="scheduler")  # as train.py
    return TinyTorchModels(unet, controlnet, vae, text_encoder, scheduler, sd15, root / "release")


def fixed_batch(batch_size: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch as xpsr_jax.data.pipeline yields it (NHWC float32 images, int32 ids)."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, HEIGHT, WIDTH, 3)
    return {
        "pixel_values": rng.uniform(-1, 1, shape).astype(np.float32),
        "conditioning_pixel_values": rng.uniform(0, 1, shape).astype(np.float32),
        "highlevel_input_ids": rng.integers(0, VOCAB, (batch_size, TOKENS)).astype(np.int32),
        "lowlevel_input_ids": rng.integers(0, VOCAB, (batch_size, TOKENS)).astype(np.int32),
    }


def tiny_train_config(**mesh) -> config_dict.ConfigDict:
    """The keys of configs/train.py the training core reads, at tiny fp32 settings."""
    config = config_dict.ConfigDict()
    config.total_steps = 10
    config.seed = 0
    config.optimizer = dict(learning_rate=1e-3, b1=0.9, b2=0.999, weight_decay=1e-2, eps=1e-8,
                            schedule="constant", warmup_steps=0, grad_clip_norm=1.0,
                            gradient_accumulation_steps=1, ema_decay=0.0)
    config.loss = dict(dfc_weight=0.05)
    config.precision = dict(param_dtype="float32", compute_dtype="float32", frozen_dtype="float32",
                            loss_scaling="none")
    config.mesh = dict(data=-1, fsdp=1, shard_trainable=False, shard_frozen=False)
    config.mesh.update(mesh)
    config.remat = dict(unet="none", controlnet="none")
    config.attention_backend = "xla"
    return config
