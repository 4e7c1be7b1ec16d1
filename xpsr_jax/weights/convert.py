"""The 1:1 mapping between NNX parameter paths and PyTorch state-dict keys.

A module path ('down_blocks', 0, 'attentions', 1, 'proj_in', 'kernel') is the key
"down_blocks.0.attentions.1.proj_in.weight". Layouts differ only for kernels:
Linear (in, out) <-> (out, in); Conv (kh, kw, in, out) <-> (out, in, kh, kw).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

_TORCH_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class WeightLoadError(ValueError):
    """A state dict does not fit a module: missing, unexpected or mis-shaped tensors."""


def torch_key(path: tuple) -> str:
    *parents, leaf = path
    return ".".join([str(p) for p in parents] + [_TORCH_LEAF_NAMES.get(leaf, leaf)])


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def from_torch_layout(leaf: str, array: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        if len(flax_shape) == 2 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0]  # 1x1 conv stored where we use a Linear (old VAE attention)
        else:
            return np.transpose(array, (2, 3, 1, 0))
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def _flat_params(module_or_state) -> dict[tuple, nnx.Variable]:
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
    return {tuple(path): variable for path, variable in nnx.to_flat_state(state)}


def module_param_names(module: nnx.Module) -> list[str]:
    """The PyTorch keys of `module`'s parameters (real or abstract: no values are read)."""
    return [torch_key(tuple(path)) for path in _flat_params(module)]


def module_state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
    """All parameters of `module` as a PyTorch-layout state dict (numpy, parameter dtype)."""
    out = {}
    for path, variable in _flat_params(module).items():
        out[torch_key(path)] = np.ascontiguousarray(to_torch_layout(path[-1], np.asarray(variable.get_value())))
    return out


def _matched_tensors(module: nnx.Module, state_dict: dict[str, np.ndarray], *, source: str, ignore: Iterable[str],
                     rename: Callable[[str], str] | None):
    """(graphdef, params, rest, flat params, {path: the file's tensor in the module's layout}), or
    WeightLoadError naming `source` and every missing, unexpected or mis-shaped tensor."""
    ignore_patterns = [re.compile(p) for p in ignore]
    tensors = {}
    for name, array in state_dict.items():
        if any(p.fullmatch(name) for p in ignore_patterns):
            continue
        tensors[rename(name) if rename else name] = array

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    flat = _flat_params(params)
    expected = {torch_key(path): path for path in flat}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mis_shaped = []
    matched = {}
    for key, path in expected.items():
        if key not in tensors:
            continue
        flax_shape = tuple(flat[path].get_value().shape)
        array = np.asarray(tensors[key])
        converted = from_torch_layout(path[-1], array, flax_shape)
        if tuple(converted.shape) != flax_shape:
            torch_shape = tuple(to_torch_layout(path[-1], np.empty(flax_shape, np.uint8)).shape)
            mis_shaped.append(f"{key}: file has {tuple(array.shape)}, model expects {torch_shape}")
            continue
        matched[path] = converted

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): " + ", ".join(missing[:20])
                        + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): " + ", ".join(unexpected[:20])
                        + (" ..." if len(unexpected) > 20 else ""))
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} mis-shaped tensor(s): " + "; ".join(mis_shaped[:20]))
    if problems:
        raise WeightLoadError(f"{source}: state dict does not match {type(module).__name__}: "
                              + " | ".join(problems))
    return graphdef, params, rest, flat, matched


def check_state_dict_fits(module: nnx.Module, state_dict: dict[str, np.ndarray], *, source: str,
                          ignore: Iterable[str] = (), rename: Callable[[str], str] | None = None) -> None:
    """WeightLoadError naming `source` when `state_dict` would not load into `module` (real or
    abstract) with `load_state_dict_into`; nothing is loaded."""
    _matched_tensors(module, state_dict, source=source, ignore=ignore, rename=rename)


def load_state_dict_into(
    module: nnx.Module,
    state_dict: dict[str, np.ndarray],
    *,
    source: str,
    ignore: Iterable[str] = (),
    rename: Callable[[str], str] | None = None,
    dtype=None,
) -> nnx.Module:
    """Strictly load a PyTorch-layout state dict into `module` (real or `nnx.eval_shape`-abstract).

    Every module parameter must be present with the right shape, and every tensor in the file
    must be used, except keys matching an `ignore` regex (known buffers such as CLIP's
    `position_ids`). `rename` maps legacy key names to current ones. Raises `WeightLoadError`
    naming `source` and every offending tensor. Returns the module with the loaded parameters,
    cast to `dtype` (default: the module's parameter dtypes).
    """
    graphdef, params, rest, flat, matched = _matched_tensors(module, state_dict, source=source, ignore=ignore,
                                                             rename=rename)
    loaded = {path: jnp.asarray(array, dtype=dtype or flat[path].get_value().dtype)
              for path, array in matched.items()}

    for path, variable in flat.items():
        variable.set_value(loaded[path])
    return nnx.merge(graphdef, params, rest)

