"""Official XPSR weight-initialisation rules, and a parameter randomiser for parity tests.

    sfa_source_key(key: str) -> str
    load_with_official_rule(model, source_state_dict, prefixes=None) -> InitReport
    randomize_all_parameters(module, seed: int, scale: float = 1.0) -> module

The rule is the one of ``UNet2DConditionModel.from_pretrained_orig`` (models/xpsr/
unet_2d_condition.py) and of ``ControlNetModel.from_unet`` (models/xpsr/controlnet.py, applied
to ``down_blocks`` and ``mid_block``): SFA keys read the ``attentions`` tensor of the same name,
every target key whose source exists with the same shape is copied, everything else keeps the
value the model was constructed with ("fresh").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

SFA_MODULE_NAMES = ("attentions_lowlevel", "attentions_connect")


def sfa_source_key(key: str) -> str:
    """The source key an SFA tensor is initialised from (``attentions_*`` -> ``attentions``)."""
    for name in SFA_MODULE_NAMES:
        if name in key:
            return key.replace(name, "attentions")
    return key


@dataclass
class InitReport:
    """copied: target key -> source key; fresh: target keys left at their constructed value."""

    copied: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)


def load_with_official_rule(model: nn.Module, source_state_dict: Mapping[str, torch.Tensor],
                            prefixes: Iterable[str] | None = None) -> InitReport:
    """Copy tensors into ``model`` by the official rule; only keys under ``prefixes`` if given."""
    prefixes = tuple(prefixes) if prefixes is not None else ("",)
    report = InitReport()
    target = model.state_dict()
    with torch.no_grad():
        for key, tensor in target.items():
            if not key.startswith(prefixes):
                continue
            source_key = sfa_source_key(key)
            source = source_state_dict.get(source_key)
            if source is not None and tuple(source.shape) == tuple(tensor.shape):
                tensor.copy_(source)
                report.copied[key] = source_key
            else:
                report.fresh.append(key)
    return report


def _fan_in(param: torch.Tensor) -> int:
    return max(1, math.prod(param.shape[1:]))


def randomize_all_parameters(module: nn.Module, seed: int, scale: float = 1.0) -> nn.Module:
    """Overwrite EVERY parameter (zero-initialised convs, norms and biases included) in place.

    Matrices/kernels: N(0, 1) * scale / sqrt(fan_in), so each layer keeps activations O(1).
    Norm weights: 1 + 0.1 * scale * N(0, 1). Biases and norm shifts: 0.1 * scale * N(0, 1).
    Deterministic for a given module structure and seed. Returns the module.
    """
    norm_types = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.InstanceNorm2d)
    norm_weights = {
        id(sub.weight) for sub in module.modules()
        if isinstance(sub, norm_types) and sub.weight is not None
    }
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator).to(param.dtype)
            if id(param) in norm_weights:
                param.copy_(1.0 + 0.1 * scale * noise)
            elif param.ndim >= 2:
                param.copy_(noise * (scale / math.sqrt(_fan_in(param))))
            else:
                param.copy_(0.1 * scale * noise)
    return module
