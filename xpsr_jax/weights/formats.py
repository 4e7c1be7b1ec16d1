"""What kind of weights a folder holds, told apart without loading anything, and the checksums
that exports record.

Every export writes `manifest.json` with a "format" key; an official-layout release from
elsewhere has none and is recognised by its unet/ and controlnet/ subfolders.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
RELEASE = "release"  # official layout: unet/ + controlnet/ (config.json + safetensors each)
ORBAX_INFERENCE = "orbax-inference"  # inference-only orbax checkpoint of the UNet and ControlNet
STABLEHLO = "stablehlo"  # serialized jax.export artifact
FORMATS = (RELEASE, ORBAX_INFERENCE, STABLEHLO)
# A one-step XPSR release is a release (its UNet holds the merged LoRA) plus these two files: the
# VAE encoder's LoRA in peft's keys and layout, and what it needs (docs/one_step.md).
ONE_STEP_RECORD = "one_step.json"
VAE_ENCODER_LORA = "vae_encoder_lora.safetensors"
VAE_ENCODER_ADAPTER = "default_encoder"  # OSEDiff's adapter name for the VAE encoder

# The Stable Diffusion 1.5 folder layout (diffusers' `save_pretrained` of the pipeline): what
# inference reads besides the two XPSR networks, and what training reads from `base_model`.
SD15_INFERENCE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
SD15_TRAINING_PARTS = ("unet", "vae", "text_encoder")


class WeightsFormatError(FileNotFoundError):
    """A path that is none of the weight formats (the message names it and what was expected)."""


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise WeightsFormatError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        raise WeightsFormatError(f"{path}: 'format' must be one of {list(FORMATS)}; got "
                                 f"{manifest.get('format') if isinstance(manifest, dict) else manifest!r}")
    return manifest


def detect_weights_format(folder: str | os.PathLike) -> str:
    """RELEASE, ORBAX_INFERENCE or STABLEHLO for `folder`; WeightsFormatError otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsFormatError(f"{folder}: weights folder not found")
    manifest = read_manifest(folder)
    if manifest is not None:
        return manifest["format"]
    if (folder / "unet").is_dir() and (folder / "controlnet").is_dir():
        return RELEASE
    raise WeightsFormatError(
        f"{folder}: not XPSR weights: expected an official-layout release (unet/ and controlnet/), "
        f"or an export of `python -m xpsr_jax.export` (with {MANIFEST}); found "
        f"{sorted(p.name for p in folder.iterdir())[:10]}")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_checksums(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (sorted; `skip`: top-level names)."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in skip}
