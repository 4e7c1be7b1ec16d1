"""LoRA as a pure transform of a network's parameters, as peft's LoRA layers compute it.

peft wraps each target Conv2d / Linear so that `y = base(x) + scaling * lora_B(lora_A(x))`, with
lora_A a conv of the base's kernel size, stride and padding (in -> rank) or a Linear, lora_B a
1x1 conv or Linear (rank -> out), and `scaling = lora_alpha / rank`. Both paths are linear in x, so
the same output comes from the base layer with its kernel replaced by `kernel + scaling * B.A`:
`merge_lora` builds that kernel inside the traced function, which adds LoRA to any of our NNX
networks without a LoRA layer type, and `jax.grad` with respect to the LoRA tensors gives peft's
gradients. A LoRA set is a dict {module name (the PyTorch key without ".weight"): {"down", "up"}}
in our kernel layouts: conv down (kh, kw, in, rank), up (rank, out); Linear down (in, rank), up
(rank, out).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xpsr_jax.weights.convert import torch_key

# peft's LoraConfig default (`lora_alpha: int = 8`); OSEDiff leaves it unset.
PEFT_DEFAULT_ALPHA = 8.0

# OSEDiff's module-name patterns (osediff.py, initialize_unet / initialize_vae `l_grep`).
OSEDIFF_UNET_PATTERNS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                         "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
OSEDIFF_VAE_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v",
                        "to_out.0")


def lora_scaling(rank: int, alpha: float = PEFT_DEFAULT_ALPHA) -> float:
    return float(alpha) / int(rank)


def _weight_modules(weight_names: Iterable[str]) -> list[str]:
    """Module names of the weights OSEDiff considers: no bias, no norm."""
    return [name[: -len(".weight")] for name in weight_names
            if name.endswith(".weight") and "bias" not in name and "norm" not in name]


def osediff_unet_targets(weight_names: Iterable[str], exclude: Sequence[str] = ()) -> dict[str, tuple[str, ...]]:
    """OSEDiff's three UNet LoRA groups, {"encoder", "decoder", "others"} -> module names: the first
    pattern a weight name contains puts it in "encoder" when the name has down_blocks or conv_in,
    in "decoder" when it has up_blocks or conv_out, else in "others". Modules whose name has a part
    in `exclude` (e.g. XPSR's fully trained modules) get none."""
    groups: dict[str, list[str]] = {"encoder": [], "decoder": [], "others": []}
    for module in _weight_modules(weight_names):
        if any(part in exclude for part in module.split(".")):
            continue
        if not any(pattern in module for pattern in OSEDIFF_UNET_PATTERNS):
            continue
        if "down_blocks" in module or "conv_in" in module:
            groups["encoder"].append(module)
        elif "up_blocks" in module or "conv_out" in module:
            groups["decoder"].append(module)
        else:
            groups["others"].append(module)
    return {name: tuple(modules) for name, modules in groups.items()}


def osediff_vae_encoder_targets(weight_names: Iterable[str]) -> tuple[str, ...]:
    """OSEDiff's VAE LoRA targets: encoder modules matching a pattern, and quant_conv."""
    targets = []
    for module in _weight_modules(weight_names):
        in_encoder = module.startswith("encoder.") and any(p in module for p in OSEDIFF_VAE_PATTERNS)
        if in_encoder or module == "quant_conv":
            targets.append(module)
    return tuple(targets)


def _kernels(state: nnx.State) -> dict[str, tuple[tuple, Any]]:
    """{module name: (path, kernel variable)} of the conv / Linear kernels in `state`."""
    out = {}
    for path, variable in nnx.to_flat_state(state):
        if path[-1] == "kernel":
            out[torch_key(tuple(path))[: -len(".weight")]] = (tuple(path), variable)
    return out


def init_lora(state: nnx.State, targets: Iterable[str], rank: int, key: jax.Array,
              dtype: Any = jnp.float32) -> dict[str, dict[str, jax.Array]]:
    """peft's `init_lora_weights="gaussian"`: down ~ N(0, 1/rank), up = 0, for each target module
    of `state` (a network's nnx.State). A target the network lacks is an error naming it."""
    kernels = _kernels(state)
    targets = list(dict.fromkeys(targets))
    missing = [name for name in targets if name not in kernels]
    if missing:
        raise KeyError(f"LoRA targets not in the network: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    lora = {}
    for name, subkey in zip(targets, jax.random.split(key, max(len(targets), 1))):
        shape = kernels[name][1].get_value().shape
        down_shape = shape[:-1] + (rank,)
        lora[name] = {"down": jax.random.normal(subkey, down_shape, dtype) / rank,
                      "up": jnp.zeros((rank, shape[-1]), dtype)}
    return lora


def lora_delta(down: jax.Array, up: jax.Array, scaling: float) -> jax.Array:
    """scaling * B.A in the base kernel's layout ((kh, kw, in, out) or (in, out)), float32."""
    return scaling * jnp.einsum("...r,ro->...o", down.astype(jnp.float32), up.astype(jnp.float32))


def merge_lora(state: nnx.State, lora: Mapping[str, Mapping[str, jax.Array]], scaling: float) -> nnx.State:
    """`state` with every LoRA module's kernel replaced by kernel + scaling * B.A (in the kernel's
    dtype); pure, differentiable in both arguments."""
    kernels = _kernels(state)
    missing = [name for name in lora if name not in kernels]
    if missing:
        raise KeyError(f"LoRA modules not in the network: {missing[:10]}")
    flat = {tuple(path): variable for path, variable in nnx.to_flat_state(state)}
    merged = []
    for path, variable in flat.items():
        value = variable.get_value()
        if path[-1] == "kernel":
            name = torch_key(path)[: -len(".weight")]
            if name in lora:
                value = (value.astype(jnp.float32) + lora_delta(lora[name]["down"], lora[name]["up"], scaling)
                         ).astype(value.dtype)
        merged.append((path, variable.replace(value)))
    return nnx.from_flat_state(merged)


def with_lora(module: nnx.Module, lora: Mapping[str, Mapping[str, jax.Array]], scaling: float) -> nnx.Module:
    """A copy of `module` whose LoRA kernels are merged (see `merge_lora`)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return nnx.merge(graphdef, merge_lora(params, lora, scaling), rest)


def to_peft_state_dict(lora: Mapping[str, Mapping[str, Any]], adapter_name: str) -> dict[str, np.ndarray]:
    """peft's keys and layouts: `{module}.lora_A.{adapter}.weight` (rank, in[, kh, kw]) and
    `{module}.lora_B.{adapter}.weight` (out, rank[, 1, 1])."""
    out = {}
    for name, pair in lora.items():
        down, up = np.asarray(pair["down"]), np.asarray(pair["up"])
        if down.ndim == 4:
            out[f"{name}.lora_A.{adapter_name}.weight"] = np.ascontiguousarray(np.transpose(down, (3, 2, 0, 1)))
            out[f"{name}.lora_B.{adapter_name}.weight"] = np.ascontiguousarray(up.T[:, :, None, None])
        else:
            out[f"{name}.lora_A.{adapter_name}.weight"] = np.ascontiguousarray(down.T)
            out[f"{name}.lora_B.{adapter_name}.weight"] = np.ascontiguousarray(up.T)
    return out


def from_peft_state_dict(state_dict: Mapping[str, Any], adapter_name: str) -> dict[str, dict[str, np.ndarray]]:
    """The inverse of `to_peft_state_dict` for one adapter's tensors (other keys are ignored)."""
    lora: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        for part, slot in (("lora_A", "down"), ("lora_B", "up")):
            suffix = f".{part}.{adapter_name}.weight"
            if key.endswith(suffix):
                array = np.asarray(value)
                if part == "lora_A":
                    array = np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array.T
                else:
                    array = array[:, :, 0, 0].T if array.ndim == 4 else array.T
                lora.setdefault(key[: -len(suffix)], {})[slot] = array
    incomplete = [name for name, pair in lora.items() if set(pair) != {"down", "up"}]
    if incomplete:
        raise KeyError(f"LoRA adapter {adapter_name!r}: lora_A or lora_B missing for {incomplete[:10]}")
    return lora
