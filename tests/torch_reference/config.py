"""Config dicts of the XPSR PyTorch reference, in the official ``config.json`` vocabulary.

The keys and defaults are those of the official XPSR release (``models/xpsr/unet_2d_condition.py``
``UNet2DConditionModel.__init__`` and ``models/xpsr/controlnet.py`` ``ControlNetModel.__init__``,
both modified copies of diffusers 0.21.4). A config is resolved once into a plain dict holding
every supported key:

    resolve_unet_config(raw: Mapping, source="unet config") -> dict
    resolve_controlnet_config(raw: Mapping, source="controlnet config") -> dict
    tiny_unet_config(**overrides) -> dict
    tiny_controlnet_config(**overrides) -> dict
    sd15_unet_config() -> dict          # Stable Diffusion 1.5's unet/config.json

Resolution rules (same policy as ``xpsr_jax.models.model_config``): keys starting with ``_`` are
file metadata and skipped; keys of the official format that this reference builds at one value
only (``FIXED``) are an error at any other value; keys that have no effect on the block types
built here (``IGNORED``) are kept but unused; other unknown keys warn.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

SD_DOWN_BLOCKS = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
SD_UP_BLOCKS = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# Keys shared by the UNet and the ControlNet encoder, with the official defaults.
_ENCODER_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": SD_DOWN_BLOCKS,
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
}

UNET_DEFAULTS: dict[str, Any] = {
    **_ENCODER_DEFAULTS,
    "sample_size": None,
    "out_channels": 4,
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": SD_UP_BLOCKS,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    # XPSR additions (official defaults: no Semantic-Fusion Attention anywhere in the UNet).
    "down_use_lowlevel_prompt": False,
    "mid_use_lowlevel_prompt": False,
    "up_use_lowlevel_prompt": [False, False, False, False],
}

CONTROLNET_DEFAULTS: dict[str, Any] = {
    **_ENCODER_DEFAULTS,
    "conditioning_channels": 3,
    "controlnet_conditioning_channel_order": "rgb",
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "global_pool_conditions": False,
    # XPSR additions (official defaults).
    "return_rgbs": True,
    "use_rrdb": False,
    "use_lowlevel_prompt": True,
    "use_latent_pred": True,
}

_FIXED_COMMON = {
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
}
UNET_FIXED: dict[str, Any] = {
    **_FIXED_COMMON,
    "dual_cross_attention": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    # Keys newer diffusers versions write (not in the official signature), at their neutral value.
    "dropout": 0.0,
    "reverse_transformer_layers_per_block": None,
}
CONTROLNET_FIXED: dict[str, Any] = {**_FIXED_COMMON, "mid_block_type": "UNetMidBlock2DCrossAttn"}

# Official keys that only reach block types / embeddings this reference does not build
# (get_down_block/get_up_block drop them for CrossAttn*/Down/Up blocks).
UNET_IGNORED = {
    "resnet_skip_time_act",
    "resnet_out_scale_factor",
    "cross_attention_norm",
    "mid_block_only_cross_attention",
    "addition_embed_type_num_heads",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
}
CONTROLNET_IGNORED = {
    "addition_embed_type_num_heads",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
}


def _normalise(value: Any) -> Any:
    """Tuples become lists, as in a config.json."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def _resolve(raw: Mapping, defaults: dict, fixed: dict, ignored: set, source: str) -> dict:
    if not isinstance(raw, Mapping):
        raise TypeError(f"{source}: expected a dict of config.json keys, got {type(raw).__name__}")
    config = copy.deepcopy(defaults)
    unknown = []
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        if key in fixed:
            if _normalise(value) != fixed[key]:
                raise ValueError(
                    f"{source}: {key}={value!r} is not supported by the XPSR reference; "
                    f"only {key}={fixed[key]!r} is built"
                )
        elif key in defaults or key in ignored:
            config[key] = _normalise(value)
        else:
            unknown.append(key)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown config keys {sorted(unknown)}", stacklevel=3)
    return config


def per_block(config: dict, key: str, num_blocks: int, source: str) -> list:
    """An int/bool/None config value repeated per block, or a per-block list checked for length."""
    value = config[key]
    if isinstance(value, list):
        if len(value) != num_blocks:
            raise ValueError(
                f"{source}: {key} has {len(value)} entries but there are {num_blocks} down blocks"
            )
        return list(value)
    return [value] * num_blocks


def _check_encoder(config: dict, source: str) -> None:
    down = config["down_block_types"]
    channels = config["block_out_channels"]
    for name in down:
        if name not in DOWN_BLOCK_TYPES:
            raise ValueError(
                f"{source}: down_block_types entry {name!r} is not one of {DOWN_BLOCK_TYPES}"
            )
    if len(channels) != len(down):
        raise ValueError(
            f"{source}: block_out_channels {channels} must have one entry per down block "
            f"({len(down)})"
        )
    groups = config["norm_num_groups"]
    if not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"{source}: norm_num_groups={groups!r} must be a positive int")
    heads = config["num_attention_heads"] or config["attention_head_dim"]
    heads = heads if isinstance(heads, list) else [heads] * len(down)
    if len(heads) != len(down):
        raise ValueError(f"{source}: attention_head_dim {heads} must have one entry per down block")
    for width, head_count in zip(channels, heads):
        if width % groups:
            raise ValueError(
                f"{source}: block width {width} in block_out_channels is not divisible by "
                f"norm_num_groups={groups}"
            )
        if width % head_count:
            raise ValueError(
                f"{source}: block width {width} is not divisible by its head count {head_count} "
                "(attention_head_dim is the number of heads in SD 1.x/2.x configs)"
            )
    if config["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        raise ValueError(
            f"{source}: resnet_time_scale_shift={config['resnet_time_scale_shift']!r} must be "
            "'default' or 'scale_shift'"
        )


def resolve_unet_config(raw: Mapping, source: str = "unet config") -> dict:
    """Every supported official UNet key, filled with the official defaults, validated."""
    config = _resolve(raw, UNET_DEFAULTS, UNET_FIXED, UNET_IGNORED, source)
    _check_encoder(config, source)
    num_blocks = len(config["down_block_types"])
    if config["num_attention_heads"] is not None:
        # The official UNet raises here too (diffusers issue 2011 naming problem).
        raise ValueError(
            f"{source}: num_attention_heads={config['num_attention_heads']!r} is rejected by the "
            "official UNet; give the head count as attention_head_dim"
        )
    for name in config["up_block_types"]:
        if name not in UP_BLOCK_TYPES:
            raise ValueError(
                f"{source}: up_block_types entry {name!r} is not one of {UP_BLOCK_TYPES}"
            )
    if len(config["up_block_types"]) != num_blocks:
        raise ValueError(
            f"{source}: {len(config['up_block_types'])} up_block_types but {num_blocks} "
            "down_block_types"
        )
    if config["mid_block_type"] != "UNetMidBlock2DCrossAttn":
        raise ValueError(
            f"{source}: mid_block_type={config['mid_block_type']!r}; only "
            "'UNetMidBlock2DCrossAttn' is built"
        )
    flags = config["up_use_lowlevel_prompt"]
    if not isinstance(flags, list) or len(flags) != num_blocks:
        raise ValueError(
            f"{source}: up_use_lowlevel_prompt={flags!r} must be a list of {num_blocks} bools, "
            "one per up block (the official code indexes it by up-block position)"
        )
    for key in ("down_use_lowlevel_prompt", "mid_use_lowlevel_prompt"):
        if not isinstance(config[key], bool):
            raise ValueError(
                f"{source}: {key}={config[key]!r} must be a bool (one switch for all blocks)"
            )
    for key in ("only_cross_attention", "cross_attention_dim", "layers_per_block",
                "transformer_layers_per_block"):
        per_block(config, key, num_blocks, source)
    return config


def resolve_controlnet_config(raw: Mapping, source: str = "controlnet config") -> dict:
    """Every supported official ControlNet key, filled with the official defaults, validated."""
    config = _resolve(raw, CONTROLNET_DEFAULTS, CONTROLNET_FIXED, CONTROLNET_IGNORED, source)
    _check_encoder(config, source)
    num_blocks = len(config["down_block_types"])
    # The official ControlNet uses these two as plain ints (range(layers_per_block), one context).
    for key in ("layers_per_block", "cross_attention_dim"):
        if not isinstance(config[key], int):
            raise ValueError(
                f"{source}: {key}={config[key]!r} must be an int in the official ControlNet"
            )
    for key in ("only_cross_attention", "transformer_layers_per_block"):
        per_block(config, key, num_blocks, source)
    widths = config["conditioning_embedding_out_channels"]
    if not isinstance(widths, list) or len(widths) < 1:
        raise ValueError(
            f"{source}: conditioning_embedding_out_channels={widths!r} must be a list of widths"
        )
    order = config["controlnet_conditioning_channel_order"]
    if order not in ("rgb", "bgr"):
        raise ValueError(
            f"{source}: controlnet_conditioning_channel_order={order!r} must be 'rgb' or 'bgr'"
        )
    switches = ("return_rgbs", "use_rrdb", "use_lowlevel_prompt", "use_latent_pred",
                "global_pool_conditions")
    for key in switches:
        if not isinstance(config[key], bool):
            raise ValueError(f"{source}: {key}={config[key]!r} must be a bool")
    return config


# Tiny SD-shaped networks for CPU tests: 3 x CrossAttnDownBlock2D + DownBlock2D, 2 layers per
# block (so the 12-skip topology of SD is kept), 4 GroupNorm groups, 2 heads, context width 24
# (different from every block width, so SFA connect blocks have shape-mismatched attn2.to_k/to_v).
_TINY_ARCHITECTURE: dict[str, Any] = {
    "in_channels": 4,
    "down_block_types": SD_DOWN_BLOCKS,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 2,
    "norm_num_groups": 4,
    "cross_attention_dim": 24,
    "attention_head_dim": 2,
    "use_linear_projection": False,
}


def _tiny(defaults: dict, architecture: dict, overrides: dict, resolve, source: str) -> dict:
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(
            f"{source}: unknown override keys {unknown}; valid keys: {sorted(defaults)}"
        )
    return resolve({**architecture, **overrides}, source)


def tiny_unet_config(**overrides) -> dict:
    """Tiny SD-shaped UNet config (official keys): tiny_unet_config(use_linear_projection=True).

    SFA is off by default, as in the official defaults; switch it on with the official keys
    down_use_lowlevel_prompt / mid_use_lowlevel_prompt (bools) and up_use_lowlevel_prompt (4 bools).
    """
    architecture = {**_TINY_ARCHITECTURE, "sample_size": 8, "out_channels": 4,
                    "up_block_types": SD_UP_BLOCKS}
    return _tiny(UNET_DEFAULTS, architecture, overrides, resolve_unet_config, "tiny_unet_config")


def tiny_controlnet_config(**overrides) -> dict:
    """Tiny XPSR ControlNet config with tiny_unet_config's encoder; pyramid widths (4, 8, 12, 16).

    XPSR switches at the official defaults (SFA, rgb heads, latent heads on; no RRDB).
    """
    architecture = {**_TINY_ARCHITECTURE, "conditioning_embedding_out_channels": [4, 8, 12, 16]}
    return _tiny(CONTROLNET_DEFAULTS, architecture, overrides, resolve_controlnet_config,
                 "tiny_controlnet_config")


def sd15_unet_config() -> dict:
    """The keys of Stable Diffusion 1.5's unet/config.json (all else: official defaults)."""
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": list(SD_DOWN_BLOCKS),
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": list(SD_UP_BLOCKS),
    }
