"""The four networks of XPSR training, initialised by the official rules or from a release.

From an SD 1.5 folder (`base_model`: unet/, vae/, text_encoder/), as the official `train.py`:
`XPSRUNet.from_sd_unet` (SD weights copied, SFA tensors copied from `attentions`, pixel
attentions fresh) and `XPSRControlNet.from_unet` of that UNet. With `init_from` (a release folder:
unet/ + controlnet/, or an orbax inference checkpoint of `python -m xpsr_jax.export orbax`) the UNet
and ControlNet come from it as stored (fine-tuning, or continuing
from the official weights); the VAE and text encoder always come from `base_model`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
from flax import nnx

from xpsr_jax.models import (
    AutoencoderKL,
    CLIPTextEncoder,
    UNet2DCondition,
    XPSRControlNet,
    XPSRUNet,
    load_xpsr_networks,
)
from xpsr_jax.models.unet_blocks import BLOCK_TYPES
from xpsr_jax.models.xpsr_init import InitReport
from xpsr_jax.weights.formats import SD15_TRAINING_PARTS

logger = logging.getLogger(__name__)

UNET_SFA_KEYS = ("down_use_lowlevel_prompt", "mid_use_lowlevel_prompt", "up_use_lowlevel_prompt")
# remat policy -> block types wrapped in nnx.remat ("attention": the blocks with attention).
REMAT_POLICIES = {
    "none": (),
    "attention": ("CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D"),
    "full": BLOCK_TYPES,
}


class XPSRModels(NamedTuple):
    unet: XPSRUNet
    controlnet: XPSRControlNet
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder


def remat_block_types(policy: str, key: str = "remat") -> tuple[str, ...]:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"{key}={policy!r} is not a remat policy; valid: {sorted(REMAT_POLICIES)}")
    return tuple(REMAT_POLICIES[policy])


def sfa_overrides(model_config: Mapping[str, Any] | None) -> dict[str, Any]:
    if model_config is None:
        return {}
    values = dict(model_config)
    unknown = sorted(set(values) - set(UNET_SFA_KEYS))
    if unknown:
        raise ValueError(f"model config: unknown keys {unknown}; valid: {list(UNET_SFA_KEYS)}")
    for key, value in values.items():
        values[key] = tuple(bool(v) for v in value) if key == "up_use_lowlevel_prompt" else bool(value)
    return values


def _check_folder(folder: Path, subfolders: tuple[str, ...], what: str, key: str) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{key}={str(folder)!r}: no such folder ({what})")
    missing = [name for name in subfolders if not (folder / name / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{key}={str(folder)!r}: {what} needs {', '.join(f'{m}/config.json' for m in missing)}")


def init_xpsr_from_sd(sd_unet: UNet2DCondition, model_config: Mapping[str, Any] | None = None, *, seed: int = 0,
                      dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, attention_backend: str = "auto",
                      ) -> tuple[XPSRUNet, XPSRControlNet, dict[str, InitReport]]:
    """The official initialisation: (unet, controlnet, {"unet": report, "controlnet": report})."""
    rngs = nnx.Rngs(seed)
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend)
    unet, unet_report = XPSRUNet.from_sd_unet(sd_unet, rngs=rngs, **kwargs, **sfa_overrides(model_config))
    controlnet, controlnet_report = XPSRControlNet.from_unet(unet, rngs=rngs, **kwargs)
    return unet, controlnet, {"unet": unet_report, "controlnet": controlnet_report}


def check_release_config(unet: XPSRUNet, model_config: Mapping[str, Any] | None, init_from: str) -> None:
    for key, wanted in sfa_overrides(model_config).items():
        stored = getattr(unet.config, key)
        normalised = tuple(bool(v) for v in stored) if isinstance(stored, (list, tuple)) else bool(stored)
        if normalised != wanted:
            raise ValueError(f"model.{key}={wanted!r} but the release init_from={init_from!r} has "
                             f"{key}={stored!r} in unet/config.json; set model.{key} to match")


def load_training_models(base_model: str, init_from: str = "", model_config: Mapping[str, Any] | None = None, *,
                         dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, attention_backend: str = "auto",
                         remat_unet: str = "none", remat_controlnet: str = "none", seed: int = 0,
                         reports: dict | None = None) -> XPSRModels:
    """XPSRModels for training; `dtype` is the compute dtype, `param_dtype` the stored dtype.

    `model_config` holds the UNet's SFA switches (`down_use_lowlevel_prompt`, ...) used when
    initialising from SD; with `init_from` they must match the release. `remat_*` are the
    REMAT_POLICIES keys. `seed` draws the fresh layers. Pass a dict as `reports` to receive the
    InitReports ({"unet": ..., "controlnet": ...}; empty with `init_from`).
    """
    base = Path(base_model)
    _check_folder(base, SD15_TRAINING_PARTS, "an SD 1.5 folder", "base_model")
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **kwargs)
    text_encoder = CLIPTextEncoder.from_pretrained(base, subfolder="text_encoder", **kwargs)
    if init_from:
        _check_folder(Path(init_from), ("unet", "controlnet"), "an XPSR release or orbax inference checkpoint",
                      "init_from")
        unet, controlnet = load_xpsr_networks(init_from, **kwargs)
        check_release_config(unet, model_config, init_from)
        init_reports: dict[str, InitReport] = {}
        logger.info("UNet and ControlNet loaded from %s", init_from)
    else:
        sd_unet = UNet2DCondition.from_pretrained(base, subfolder="unet", param_dtype=param_dtype)
        unet, controlnet, init_reports = init_xpsr_from_sd(sd_unet, model_config, seed=seed, **kwargs)
        del sd_unet
        for name, report in init_reports.items():
            logger.info("%s initialised from %s/unet: %d tensors copied, %d fresh", name, base,
                        len(report.copied), len(report.fresh))
    # remat is a static attribute read at call time, so it can be set after construction.
    unet.remat_block_types = remat_block_types(remat_unet, "remat.unet")
    controlnet.remat_block_types = remat_block_types(remat_controlnet, "remat.controlnet")
    if reports is not None:
        reports.update(init_reports)
    return XPSRModels(unet=unet, controlnet=controlnet, vae=vae, text_encoder=text_encoder)
