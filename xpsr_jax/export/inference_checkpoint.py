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
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

NETWORKS = ("unet", "controlnet")
STATE_DIR = "state"
BASE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = ("float32", "float16", "bfloat16")
MANIFEST_VERSION = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="an official-layout release folder (unet/, controlnet/)")
    parser.add_argument("--sd15", default=None,
                        help="SD 1.5 folder: copy its vae/, text_encoder/, tokenizer/, scheduler/ into OUT "
                             "so the checkpoint is self-contained for inference")
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="stored parameter dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT once the new one is complete")


def run(args: argparse.Namespace) -> int:
    out = export_inference_checkpoint(args.weights, args.out, sd15=args.sd15, dtype=args.dtype,
                                      overwrite=args.overwrite)
    print(f"wrote the orbax inference checkpoint {out}")
    return 0


# ----------------------------------------------------------------------------- helpers


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_checksums(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (sorted; `skip`: top-level names)."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in skip}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def save_inference_checkpoint(folder: str | os.PathLike, unet, controlnet, *, configs: dict[str, bytes],
                              manifest: dict) -> dict:
    """Writes `state/`, the two config.json and manifest.json into `folder` (which must be empty or
    new); every process of a multi-process run must call it (orbax writes each shard once).

    `configs`: {"unet": bytes, "controlnet": bytes} of the config.json files to store. The
    manifest gets the format, the dtype of the parameters and the checksums. Returns it.
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx

    from xpsr_jax.export.formats import MANIFEST, ORBAX_INFERENCE

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
    import jax.numpy as jnp

    from xpsr_jax.export.formats import RELEASE, detect_weights_format, read_manifest
    from xpsr_jax.export.output import ExportError, atomic_output_dir, check_output_target
    from xpsr_jax.models import load_xpsr

    if dtype not in DTYPES:
        raise ExportError(f"--dtype={dtype!r} is invalid; valid: {' | '.join(DTYPES)}")
    weights = Path(weights).absolute()
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


# ----------------------------------------------------------------------------- loading


_ABSTRACT_CACHE: dict = {}


def abstract_network(model_class: type, config, **model_kwargs):
    """`model_class(config, rngs=..., **model_kwargs)` built for shapes only (no initialiser runs).

    The traced build (seconds for a UNet) is cached per (class, config.json, kwargs); every call
    returns a new module whose variables are its own."""
    import jax
    from flax import nnx

    from xpsr_jax.weights.pretrained import eval_shape_model

    key = (model_class, json.dumps(config.to_dict(), sort_keys=True, default=str),
           tuple(sorted((k, str(v)) for k, v in model_kwargs.items())))
    if key not in _ABSTRACT_CACHE:
        _ABSTRACT_CACHE[key] = nnx.split(eval_shape_model(
            lambda: model_class(config, rngs=nnx.Rngs(0), **model_kwargs)))
    graphdef, state = _ABSTRACT_CACHE[key]
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # fresh Variables


ShardingSpec = Any  # None | jax.sharding.Sharding | Callable[[str, nnx.State], pytree of Sharding]


def _target(name: str, abstract_params, sharding: ShardingSpec, param_dtype):
    import jax

    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
        shardings = sharding(name, abstract_params)
    else:
        shardings = jax.tree.map(lambda _: sharding, abstract_params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, param_dtype or x.dtype, sharding=s),
                        abstract_params, shardings)


def read_inference_manifest(path: str | os.PathLike) -> dict:
    """The manifest of an inference checkpoint; WeightsFormatError when `path` is none."""
    from xpsr_jax.export.formats import ORBAX_INFERENCE, WeightsFormatError, detect_weights_format, read_manifest

    path = Path(path)
    kind = detect_weights_format(path)
    if kind != ORBAX_INFERENCE:
        raise WeightsFormatError(f"{path}: is a {kind!r} folder, not an orbax inference checkpoint "
                                 "(made by `python -m xpsr_jax.export orbax`)")
    if not (path / STATE_DIR).is_dir():
        raise WeightsFormatError(f"{path}: orbax inference checkpoint without its {STATE_DIR}/ folder")
    return read_manifest(path)


def load_inference_checkpoint(path: str | os.PathLike, *, sharding: ShardingSpec = None, dtype: Any = None,
                              param_dtype: Any = None, attention_backend: str = "auto"):
    """(unet, controlnet) from an inference checkpoint, restored straight into `sharding`.

    `sharding`: None (the first local device), one `jax.sharding.Sharding` for every parameter
    (e.g. `NamedSharding(mesh, P())`), or `fn(network_name, abstract_param_state) -> pytree of
    shardings` (e.g. the fsdp rule of `xpsr_jax.training.sharding.tree_shardings`).
    `dtype`: compute dtype (default float32); `param_dtype`: stored dtype on load (default: as
    saved). The networks are built abstractly, so no random initialisation runs.
    """
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx

    from xpsr_jax.export.formats import WeightsFormatError
    from xpsr_jax.models.xpsr_controlnet import XPSRControlNet, XPSRControlNetConfig
    from xpsr_jax.models.xpsr_unet import XPSRUNet, XPSRUNetConfig
    path = Path(path).absolute()
    read_inference_manifest(path)
    dtype = jnp.float32 if dtype is None else dtype
    param_dtype = None if param_dtype is None else jnp.dtype(param_dtype)
    classes = {"unet": (XPSRUNet, XPSRUNetConfig), "controlnet": (XPSRControlNet, XPSRControlNetConfig)}
    graphdefs, targets, rests = {}, {}, {}
    for name, (model_class, config_class) in classes.items():
        config = config_class.from_json_file(path / name / "config.json")
        abstract = abstract_network(model_class, config, dtype=dtype, param_dtype=param_dtype or jnp.float32,
                                    attention_backend=attention_backend)
        graphdefs[name], params, rests[name] = nnx.split(abstract, nnx.Param, ...)
        targets[name] = _target(name, params, sharding, param_dtype)
    try:
        restored = ocp.PyTreeCheckpointer().restore(path / STATE_DIR, args=ocp.args.PyTreeRestore(
            item=targets, restore_args=ocp.checkpoint_utils.construct_restore_args(targets)))
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise WeightsFormatError(f"{path / STATE_DIR}: does not hold the parameters of the networks "
                                 f"in {path}/unet/config.json and controlnet/config.json ({error})") from error
    return tuple(nnx.merge(graphdefs[name], restored[name], rests[name]) for name in NETWORKS)


__all__ = ["export_inference_checkpoint", "load_inference_checkpoint", "save_inference_checkpoint",
           "read_inference_manifest", "folder_checksums", "sha256_file"]
