"""Public API of the PyTorch reference of the XPSR networks (parity oracle for xpsr_jax).

    XPSRUNetTorch(config)              XPSRUNetTorch.from_sd_unet(unet_or_state_dict, overrides)
    XPSRControlNetTorch(config)        XPSRControlNetTorch.from_unet(unet, ...)
    XPSRControlNetOutput               randomize_all_parameters(module, seed, scale=1.0)
    tiny_unet_config(**overrides)      tiny_controlnet_config(**overrides)
    resolve_unet_config(raw)           resolve_controlnet_config(raw)
    sd15_unet_config()                 load_with_official_rule(model, state_dict, prefixes)
    tokens(x)                          sfa_source_key(key)

Built from diffusers' public layers (ResnetBlock2D, Downsample2D, Upsample2D, Transformer2DModel,
Timesteps, TimestepEmbedding); state-dict names and config keys are those of the official release
(github.com/qyp2000/XPSR, models/xpsr/*.py, a modified diffusers 0.21.4).
"""

from .blocks import tokens
from .config import (
    resolve_controlnet_config,
    resolve_unet_config,
    sd15_unet_config,
    tiny_controlnet_config,
    tiny_unet_config,
)
from .controlnet import XPSRControlNetOutput, XPSRControlNetTorch
from .init_rules import (
    InitReport,
    load_with_official_rule,
    randomize_all_parameters,
    sfa_source_key,
)
from .unet import XPSRUNetTorch

__all__ = [
    "InitReport",
    "XPSRControlNetOutput",
    "XPSRControlNetTorch",
    "XPSRUNetTorch",
    "load_with_official_rule",
    "randomize_all_parameters",
    "resolve_controlnet_config",
    "resolve_unet_config",
    "sd15_unet_config",
    "sfa_source_key",
    "tiny_controlnet_config",
    "tiny_unet_config",
    "tokens",
]
