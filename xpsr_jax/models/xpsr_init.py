"""The official XPSR weight-initialisation rule, on PyTorch-layout state dicts.

`UNet2DConditionModel.from_pretrained_orig` and `ControlNetModel.from_unet` of the release copy
every target tensor whose name (and shape) exists in the source; a tensor of
`attentions_lowlevel` / `attentions_connect` is read from the `attentions` tensor of the same
name, even when the source has SFA tensors of its own; shape mismatches (the connect blocks'
attn2.to_k / to_v) and everything without a source (pixel attentions, ControlNet heads) keep
their fresh initialisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
from flax import nnx

from xpsr_jax.weights.convert import load_state_dict_into, module_state_dict

SFA_MODULE_NAMES = ("attentions_lowlevel", "attentions_connect")


def sfa_source_key(key: str) -> str:
    """The source key an SFA tensor is initialised from (`attentions_*` -> `attentions`)."""
    for name in SFA_MODULE_NAMES:
        if f".{name}." in key:
            return key.replace(f".{name}.", ".attentions.")
    return key


@dataclasses.dataclass
class InitReport:
    """copied: target key -> source key; fresh: target keys that kept their new value."""

    copied: dict[str, str] = dataclasses.field(default_factory=dict)
    fresh: list[str] = dataclasses.field(default_factory=list)


def apply_official_init(target: nnx.Module, source: Mapping[str, np.ndarray], *,
                        prefixes: Iterable[str] = ("",), source_name: str = "source") -> tuple[nnx.Module, InitReport]:
    """Copy `source` tensors into `target` by the official rule, for target keys under `prefixes`.

    Returns the updated module (a new object; `target` is not modified) and the report.
    """
    prefixes = tuple(prefixes)
    report = InitReport()
    state = module_state_dict(target)
    for key, tensor in state.items():
        if not key.startswith(prefixes):
            continue
        source_key = sfa_source_key(key)  # SFA tensors come from `attentions`, even if the source has SFA
        candidate = source.get(source_key)
        if candidate is not None and tuple(candidate.shape) == tuple(tensor.shape):
            state[key] = np.asarray(candidate)
            report.copied[key] = source_key
        else:
            report.fresh.append(key)
    graphdef, current = nnx.split(target)
    return load_state_dict_into(nnx.merge(graphdef, current), state, source=source_name), report
