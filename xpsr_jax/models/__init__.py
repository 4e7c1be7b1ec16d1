"""Flax NNX networks, NHWC throughout, with PyTorch (diffusers / transformers) checkpoint I/O."""

from xpsr_jax.models.attention import ATTENTION_BACKENDS, dot_product_attention
from xpsr_jax.models.clip import CLIPTextConfig, CLIPTextEncoder
from xpsr_jax.models.loading import (
    load_inference_checkpoint,
    load_xpsr,
    load_xpsr_networks,
)
from xpsr_jax.models.tokenizer import load_clip_tokenizer, tokenize
from xpsr_jax.models.unet import UNet2DCondition, UNet2DConditionConfig
from xpsr_jax.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from xpsr_jax.models.xpsr_controlnet import (
    XPSRControlNet,
    XPSRControlNetConfig,
    XPSRControlNetOutput,
)
from xpsr_jax.models.xpsr_unet import XPSRUNet, XPSRUNetConfig

__all__ = [
    "ATTENTION_BACKENDS",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "DiagonalGaussian",
    "UNet2DCondition",
    "UNet2DConditionConfig",
    "XPSRControlNet",
    "XPSRControlNetConfig",
    "XPSRControlNetOutput",
    "XPSRUNet",
    "XPSRUNetConfig",
    "dot_product_attention",
    "load_clip_tokenizer",
    "load_inference_checkpoint",
    "load_xpsr",
    "load_xpsr_networks",
    "tokenize",
]
