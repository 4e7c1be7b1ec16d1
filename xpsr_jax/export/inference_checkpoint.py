"""`python -m xpsr_jax.export orbax`: a release folder -> an inference-only orbax checkpoint.

    python -m xpsr_jax.export orbax --weights xpsr-release --out xpsr-orbax [--sd15 sd15] [--dtype bfloat16]
    unet, controlnet = load_inference_checkpoint("xpsr-orbax")               # one device
    unet, controlnet = load_inference_checkpoint("xpsr-orbax", sharding=NamedSharding(mesh, P()))

Layout of OUT (no optimizer state, nothing but the two networks' parameters):

    manifest.json                 format "orbax-inference", source, step, dtype, configs, checksums
    unet/config.json              the release's config.json, byte for byte
    controlnet/config.json        likewise
    state/                        orbax PyTree checkpoint {"unet": params, "controlnet": params}
    vae/ text_encoder/ tokenizer/ scheduler/     only with --sd15: copied from the SD 1.5 folder

With `--sd15` the frozen SD parts are copied as they are (diffusers / transformers files): they
are small, never trained, and the pipeline reads them from the weights folder when it has them,
so `infer.py --weights OUT` then needs no `--sd15`. The networks are restored from `state/` onto
whatever shardings the caller asks for (orbax reshards on load), so a checkpoint written on one
device restores onto a pod slice and the reverse. `train.py` accepts OUT as `init_from`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from xpsr_jax.export.output import ExportError, atomic_output_dir, check_output_target, refuse_one_step_release
from xpsr_jax.models.dtypes import DTYPE_NAMES
from xpsr_jax.models.loading import NETWORKS, STATE_DIR, load_xpsr
from xpsr_jax.models.single_file import add_single_file_arguments, is_single_file, sd15_folder
from xpsr_jax.weights.files import WeightFileError
from xpsr_jax.weights.formats import (
    MANIFEST,
    ORBAX_INFERENCE,
    RELEASE,
    SD15_INFERENCE_PARTS,
    detect_weights_format,
    folder_checksums,
    read_manifest,
)

BASE_PARTS = SD15_INFERENCE_PARTS  # what --sd15 copies: everything inference needs besides the two networks
MANIFEST_VERSION = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="an official-layout release folder (unet/, controlnet/)")
    parser.add_argument("--sd15", default=None,
                        help="SD 1.5 folder: copy its vae/, text_encoder/, tokenizer/, scheduler/ into OUT "
                             "so the checkpoint is self-contained for inference (or the single original-layout "
                             ".safetensors / .ckpt file, converted first)")
    add_single_file_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="stored parameter dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT once the new one is complete")


def run(args: argparse.Namespace) -> int:
    sd15 = args.sd15
    if sd15 is not None and is_single_file(sd15):
        try:
            sd15 = sd15_folder(sd15, tokenizer=args.tokenizer, config_folder=args.sd15_config)
        except WeightFileError as error:
            raise ExportError(str(error)) from None
    out = export_inference_checkpoint(args.weights, args.out, sd15=sd15, dtype=args.dtype,
                                      overwrite=args.overwrite)
    print(f"wrote the orbax inference checkpoint {out}")
    return 0


# ----------------------------------------------------------------------------- helpers


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def save_inference_checkpoint(folder: str | os.PathLike, unet, controlnet, *, configs: dict[str, bytes],
                              manifest: dict) -> dict:
    """Writes `state/`, the two config.json and manifest.json into `folder` (which must be empty or
    new); every process of a multi-process run must call it (orbax writes each shard once).

    `configs`: {"unet": bytes, "controlnet": bytes} of the config.json files to store. The
    manifest gets the format, the dtype of the parameters and the checksums. Returns it.
    """
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    tree = {"unet": nnx.state(unet, nnx.Param), "controlnet": nnx.state(controlnet, nnx.Param)}
    dtypes = sorted({str(np.dtype(x.dtype)) for x in jax.tree.leaves(tree)})
    ocp.PyTreeCheckpointer().save(folder / STATE_DIR, args=ocp.args.PyTreeSave(tree))  # synchronous
    for name in NETWORKS:
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "config.json").write_bytes(configs[name])
    manifest = {**manifest, "format": ORBAX_INFERENCE, "version": MANIFEST_VERSION,
                "networks": list(NETWORKS), "param_dtypes": dtypes,
                "config": {name: json.loads(configs[name]) for name in NETWORKS}}
    if jax.process_index() == 0:
        manifest["checksums"] = folder_checksums(folder, skip=(MANIFEST,))
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def export_inference_checkpoint(weights: str | os.PathLike, out: str | os.PathLike, *,
                                sd15: str | os.PathLike | None = None, dtype: str = "float32",
                                overwrite: bool = False) -> Path:
    """Release folder `weights` -> inference checkpoint `out` (see the module docstring)."""
    if dtype not in DTYPE_NAMES:
        raise ExportError(f"--dtype={dtype!r} is invalid; valid: {' | '.join(DTYPE_NAMES)}")
    weights = Path(weights).absolute()
    refuse_one_step_release(weights, "an orbax inference checkpoint")
    kind = detect_weights_format(weights)
    if kind != RELEASE:
        raise ExportError(f"{weights}: is a {kind!r} export; --weights needs an official-layout release "
                          "folder (unet/ and controlnet/, e.g. the output of `python -m xpsr_jax.export torch`)")
    for name in NETWORKS:
        if not (weights / name / "config.json").is_file():
            raise ExportError(f"{weights / name}: missing config.json (an XPSR release needs "
                              "unet/config.json and controlnet/config.json)")
    base = None
    if sd15 is not None:
        base = Path(sd15).absolute()
        missing = [part for part in BASE_PARTS if not (base / part).is_dir()]
        if missing:
            raise ExportError(f"{base}: not an SD 1.5 folder: missing {', '.join(f'{m}/' for m in missing)} "
                              f"(--sd15 copies {', '.join(BASE_PARTS)})")
    scale = {"float32": 1.0, "float16": 0.5, "bfloat16": 0.5}[dtype]
    required = int(sum(_folder_bytes(weights / name) for name in NETWORKS) * scale)
    if base is not None:
        required += sum(_folder_bytes(base / part) for part in BASE_PARTS)

    inputs = (weights, base)
    check_output_target(out, inputs=inputs, overwrite=overwrite, required_bytes=required)  # before the slow load
    try:
        unet, controlnet = load_xpsr(weights, param_dtype=jnp.dtype(dtype))
    except (OSError, ValueError) as error:
        raise ExportError(f"{weights}: cannot load the release: {error}") from error
    source_manifest = read_manifest(weights) or {}
    manifest = {"source": str(weights), "source_format": RELEASE, "step": source_manifest.get("step"),
                "dtype": dtype, "base_model": str(base) if base is not None else "",
                "base_parts": list(BASE_PARTS) if base is not None else [],
                "source_manifest": source_manifest or None,
                "created_by": "python -m xpsr_jax.export orbax"}
    configs = {name: (weights / name / "config.json").read_bytes() for name in NETWORKS}
    with atomic_output_dir(out, required_bytes=required, overwrite=overwrite, inputs=inputs) as staging:
        try:
            if base is not None:  # before the manifest, so its checksums cover the copies
                for part in BASE_PARTS:
                    shutil.copytree(base / part, staging / part)
            save_inference_checkpoint(staging, unet, controlnet, configs=configs, manifest=manifest)
        except OSError as error:
            raise ExportError(f"{Path(out).absolute()}: writing the checkpoint failed ({error}); "
                              "nothing was written") from error
    return Path(out).absolute()


__all__ = ["export_inference_checkpoint", "save_inference_checkpoint"]
