"""Reading and writing PyTorch state dicts on disk, without needing PyTorch for safetensors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file


class WeightFileError(FileNotFoundError):
    """A checkpoint folder lacks the file it needs, or a file cannot be read."""


_PICKLE_STEMS = {"model": "pytorch_model"}


def resolve_weights_file(folder: str | os.PathLike, stem: str) -> Path:
    """The weights file of `folder` for a diffusers/transformers `stem` (e.g. "diffusion_pytorch_model").

    Prefers `{stem}.safetensors`, then its sharded index, then `{stem}.bin` (PyTorch pickle;
    `pytorch_model.bin` for the transformers stem "model").
    """
    folder = Path(folder)
    # transformers names its pickles `pytorch_model.bin` next to `model.safetensors`
    bin_stem = _PICKLE_STEMS.get(stem, stem)
    candidates = [
        folder / f"{stem}.safetensors",
        folder / f"{stem}.safetensors.index.json",
        folder / f"{bin_stem}.bin",
        folder / f"{bin_stem}.bin.index.json",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    listing = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "folder does not exist"
    raise WeightFileError(
        f"{folder}: no weights file found; expected one of {[c.name for c in candidates]} (found: {listing})"
    )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    tensors = {}
    try:
        with safe_open(str(path), framework="numpy") as handle:
            for name in handle.keys():
                try:
                    tensors[name] = handle.get_tensor(name)
                except TypeError:  # numpy cannot hold bfloat16; go through JAX's ml_dtypes-backed arrays
                    with safe_open(str(path), framework="flax") as flax_handle:
                        tensors[name] = np.asarray(flax_handle.get_tensor(name))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightFileError(f"{path}: not a readable safetensors file ({path.stat().st_size} bytes; truncated or "
                              f"corrupt?): {error}") from error
    return tensors


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # lazy: optional; only legacy .bin checkpoints need PyTorch
    except ImportError as error:
        raise WeightFileError(
            f"{path}: reading PyTorch .bin checkpoints needs PyTorch; install it with "
            f"`pip install 'xpsr-jax[torch]'`, or convert the file to .safetensors"
        ) from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which would run the file's code.
        raise WeightFileError(
            f"{path}: refused for safety: the .bin file holds more than tensors (pickled objects or code), and "
            "only plain tensor checkpoints are read; ask for (or convert it to) .safetensors, the safe format"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise WeightFileError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    if not isinstance(state, dict):
        raise WeightFileError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            out[name] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[name] = tensor.numpy()
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `.safetensors`, `.bin` / `.ckpt` / `.pth` (PyTorch, tensors only), or sharded `*.index.json`
    file into name -> numpy array."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: file not found")
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise WeightFileError(f"{path}: index has an empty 'weight_map'")
        state = {}
        for shard in shards:
            state.update(read_state_dict(path.parent / shard))
        return state
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".bin", ".ckpt", ".pth"):  # PyTorch pickles, read with weights_only=True
        return _read_torch_bin(path)
    raise WeightFileError(f"{path}: unknown weights format (expected .safetensors, .bin, .ckpt, .pth or *.index.json)")


def write_state_dict(path: str | os.PathLike, state: dict[str, np.ndarray]) -> None:
    """Write a safetensors file atomically (temp file + rename: a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
