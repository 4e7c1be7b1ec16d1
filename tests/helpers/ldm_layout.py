"""The tests' own writer of the original (CompVis LDM) single-file layout of Stable Diffusion 1.x,
from diffusers / transformers state dicts: the inverse of what `xpsr_jax.models.single_file`
reads, written independently from the layout's definition (ldm's openaimodel.py / model.py), so
a round trip checks the reader rather than repeating it.
"""

from __future__ import annotations

import re

import numpy as np

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_inside(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    raise KeyError(rest)


def unet_to_ldm(state: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    per_level = config["layers_per_block"] + 1
    out = {}
    for key, value in state.items():
        top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
        name = next((new + key[len(old):] for old, new in top.items() if key.startswith(old + ".")), None)
        if name is None and (m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            level, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + level * per_level + layer
            name = (f"input_blocks.{index}.0.{_rename_inside(rest, _UNET_RESNET)}" if kind == "resnets"
                    else f"input_blocks.{index}.1.{rest}")
        elif name is None and (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)):
            name = f"input_blocks.{1 + int(m[1]) * per_level + per_level - 1}.0.op.{m[2]}"
        elif name is None and (m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            kind, layer, rest = m[1], int(m[2]), m[3]
            name = (f"middle_block.{2 * layer}.{_rename_inside(rest, _UNET_RESNET)}" if kind == "resnets"
                    else f"middle_block.1.{rest}")
        elif name is None and (m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            level, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = level * per_level + layer
            name = (f"output_blocks.{index}.0.{_rename_inside(rest, _UNET_RESNET)}" if kind == "resnets"
                    else f"output_blocks.{index}.1.{rest}")
        elif name is None and (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)):
            level = int(m[1])
            has_attention = any(k.startswith(f"up_blocks.{level}.attentions.") for k in state)
            name = f"output_blocks.{level * per_level + per_level - 1}.{2 if has_attention else 1}.conv.{m[2]}"
        if name is None:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[UNET_PREFIX + name] = value
    return out


def vae_to_ldm(state: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        name = None
        if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            part, level = m[1], int(m[3])
            level = level if part == "encoder" else levels - 1 - level  # LDM numbers decoder levels from the bottom
            name = f"{part}.{m[2]}.{level}.block.{m[4]}.{_rename_inside(m[5], _VAE_RESNET)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            name = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            name = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            name = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_inside(m[3], _VAE_RESNET)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            name = f"{m[1]}.mid.attn_1.{_rename_inside(m[2], _VAE_ATTENTION)}"
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(.*)", key):
            name = f"{m[1]}.{'norm_out' if m[2] == 'conv_norm_out' else m[2]}.{m[3]}"
        elif key.startswith(("quant_conv.", "post_quant_conv.")):
            name = key
        if name is None:
            raise KeyError(f"no LDM name for VAE key {key}")
        out[VAE_PREFIX + name] = value
    return out


def clip_to_ldm(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {CLIP_PREFIX + key: value for key, value in state.items()}


def ema_copy(unet_ldm: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The full (non-"emaonly") file's EMA entries: `model_ema.` + the UNet key after `model.` with
    its dots removed (LitEma's buffer names)."""
    return {"model_ema." + key[len("model."):].replace(".", ""): value for key, value in unet_ldm.items()}
