"""The official trainable / frozen split, as NNX filters over parameter paths.

The release's training config (`configs/xpsr.yaml`: `trainable_modules`) trains the whole
ControlNet and, in the UNet, every module whose name ends in one of `TRAINABLE_UNET_MODULES`
(`train.py` sets `requires_grad` on `unet.named_modules()` matching `name.endswith(...)`). The
VAE, the text encoder and the rest of the UNet are frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

TRAINABLE_UNET_MODULES = ("pixel_attentions", "attentions_lowlevel", "attentions_connect")
MODEL_NAMES = ("unet", "controlnet", "vae", "text_encoder")


def is_trainable_unet_path(path: Sequence[Any]) -> bool:
    """True for a UNet parameter path (e.g. ('up_blocks', 0, 'pixel_attentions', 1, ...)) under a
    trainable module: some path component is one of TRAINABLE_UNET_MODULES."""
    return any(str(part) in TRAINABLE_UNET_MODULES for part in path)


def _unet_filter(path, _value) -> bool:
    return is_trainable_unet_path(path)


def trainable_filter(model_name: str):
    """The nnx filter of the trainable parameters of `model_name` (one of MODEL_NAMES)."""
    if model_name == "controlnet":
        return nnx.Param
    if model_name == "unet":
        return nnx.All(nnx.Param, _unet_filter)
    if model_name in ("vae", "text_encoder"):
        return nnx.Nothing
    raise ValueError(f"unknown model name {model_name!r}; valid: {MODEL_NAMES}")


def split_trainable(module: nnx.Module, model_name: str) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable, frozen) of one model; frozen holds everything the filter leaves out.

    `nnx.merge(graphdef, trainable, frozen)` rebuilds the module.
    """
    graphdef, trainable, frozen = nnx.split(module, trainable_filter(model_name), ...)
    return graphdef, trainable, frozen
