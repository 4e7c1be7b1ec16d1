"""Fingerprints of weight folders: cheap sha256 digests that change whenever any weights change.

A training checkpoint stores the fingerprints of the frozen base it was trained on (`base_model`,
`init_from`); resuming and exporting check them, so a swapped or re-trained base is caught
before it silently produces wrong networks.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from xpsr_jax.files import update_sampled
from xpsr_jax.weights.formats import (
    ORBAX_INFERENCE,
    SD15_TRAINING_PARTS,
    WeightsFormatError,
    detect_weights_format,
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def weights_fingerprint(folder: str | os.PathLike, subfolders=SD15_TRAINING_PARTS) -> str:
    """sha256 over the names, sizes, configs, headers and 16 evenly spaced 64 KiB chunks of the
    weight files of `subfolders` (whole files when small). Any re-trained or swapped weights
    change it; it reads a few MiB of a 4 GB SD 1.5 folder."""
    digest = hashlib.sha256()
    for sub in subfolders:
        part = Path(folder) / sub
        if not part.is_dir():
            continue
        for path in sorted(p for p in part.iterdir() if p.suffix in WEIGHT_SUFFIXES):
            digest.update(f"{sub}/".encode())
            update_sampled(digest, path)
    return digest.hexdigest()


def tree_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over the relative paths, sizes and sampled contents (as `weights_fingerprint`) of
    every file under `folder`: for an orbax checkpoint, whose array files have no suffix."""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).parent}/".encode())
        update_sampled(digest, path)
    return digest.hexdigest()


def init_from_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint of an `init_from` folder: its unet/ and controlnet/ weight files for a
    release, every file for an orbax inference checkpoint (python -m xpsr_jax.export orbax)."""
    try:
        kind = detect_weights_format(path)
    except WeightsFormatError:  # not weights at all: loading init_from reports it
        kind = None
    if kind == ORBAX_INFERENCE:
        return tree_fingerprint(path)
    return weights_fingerprint(path, ("unet", "controlnet"))
