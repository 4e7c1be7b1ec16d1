"""`python -m xpsr_jax.export torch`: a training checkpoint -> the official PyTorch release layout.

    python -m xpsr_jax.export torch --workdir runs/xpsr --out xpsr-release            # latest step
    python -m xpsr_jax.export torch --workdir runs/xpsr --step 5000 --ema --out xpsr-ema
    python -m xpsr_jax.export torch --checkpoint runs/xpsr/checkpoints/5000 --out xpsr-5000

OUT gets `unet/` and `controlnet/` (config.json + diffusion_pytorch_model.safetensors each), as
the official `save_pretrained` lays them out, plus `manifest.json` (format "release", source
checkpoint, step, resolved training config, frozen base and its fingerprints, checksums, dtype).

A training checkpoint holds only the TRAINABLE parameters (the official split: the whole
ControlNet, and the UNet's pixel / SFA attentions). The rest of the UNet is the frozen base the
run started from, named in the checkpoint's meta: `init_from` (a release or an orbax inference
checkpoint) when set, else `base_model`'s SD UNet. Its fingerprint is checked against the one
stored at training time before anything is written; `--base-model` / `--init-from` point at
the same weights in another place.

A one-step run's checkpoint (objective "one_step") gives the one-step release of
`xpsr_jax/export/one_step.py`: the UNet with its LoRA merged, plus the VAE encoder's LoRA file.

config.json: with `init_from`, the base's unet/ and controlnet/config.json are copied byte for
byte (same keys as the release the run started from); from SD 1.5, the configs the official
rule derives (`XPSRUNet.from_sd_unet` + the run's `model.*` switches, `XPSRControlNet.from_unet`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from xpsr_jax.export.one_step import restore_one_step, write_one_step_files
from xpsr_jax.export.output import ExportError, atomic_output_dir, check_output_target
from xpsr_jax.models.dtypes import DTYPE_NAMES, DTYPES_BY_NAME
from xpsr_jax.models.loading import abstract_network, load_inference_checkpoint
from xpsr_jax.models.unet import UNet2DCondition
from xpsr_jax.models.xpsr_controlnet import XPSRControlNet, XPSRControlNetConfig
from xpsr_jax.models.xpsr_unet import XPSRUNet, XPSRUNetConfig
from xpsr_jax.training.checkpoint import checkpoint_directory, finalized_steps, restore_saved_params
from xpsr_jax.training.config import WORKDIR_CONFIG_FILE
from xpsr_jax.training.models import check_release_config, sfa_overrides
from xpsr_jax.training.trainable import split_trainable
from xpsr_jax.weights.convert import load_state_dict_into, module_state_dict
from xpsr_jax.weights.files import (
    read_state_dict,
    resolve_weights_file,
    write_state_dict,
)
from xpsr_jax.weights.fingerprints import init_from_fingerprint, weights_fingerprint
from xpsr_jax.weights.formats import (
    MANIFEST,
    ORBAX_INFERENCE,
    RELEASE,
    detect_weights_format,
    folder_checksums,
)

NETWORKS = ("unet", "controlnet")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training workdir (its checkpoints/ folder)")
    source.add_argument("--checkpoint", help="one orbax checkpoint step folder (WORKDIR/checkpoints/<step>)")
    parser.add_argument("--step", type=int, default=None, help="with --workdir: the step (default: the latest)")
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="dtype of the written tensors")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (runs with ema_decay > 0)")
    parser.add_argument("--base-model", default=None,
                        help="where the checkpoint's base_model is now (checked by fingerprint)")
    parser.add_argument("--init-from", default=None,
                        help="where the checkpoint's init_from is now (checked by fingerprint)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT once the new one is complete")


def run(args: argparse.Namespace) -> int:
    if args.step is not None and args.workdir is None:
        raise ExportError("--step goes with --workdir; --checkpoint names one step folder already")
    checkpoint = resolve_checkpoint(args.workdir, args.step) if args.workdir else Path(args.checkpoint)
    out = export_torch_layout(checkpoint, args.out, dtype=args.dtype, ema=args.ema, base_model=args.base_model,
                              init_from=args.init_from, overwrite=args.overwrite)
    print(f"wrote the release folder {out}")
    return 0


# ----------------------------------------------------------------------------- checkpoint


def resolve_checkpoint(workdir: str | os.PathLike, step: int | None = None) -> Path:
    """The run's checkpoint folder (its config's `checkpoint_dir`, local or a bucket, else
    WORKDIR/checkpoints) /<step>: the latest finished one by default."""
    directory = checkpoint_directory(workdir, _recorded_checkpoint_dir(Path(workdir)))
    steps = finalized_steps(directory)
    if not steps:
        raise ExportError(f"{directory}: no finished training checkpoint (is --workdir a training workdir?)")
    if step is None:
        return directory / str(steps[-1])
    if step not in steps:
        raise ExportError(f"{directory}: no checkpoint of step {step}; finished steps: {steps}")
    return directory / str(step)


def _recorded_checkpoint_dir(workdir: Path) -> str:
    """The `checkpoint_dir` the run in `workdir` was configured with ("" when none or unknown)."""
    try:
        return str(json.loads((workdir / WORKDIR_CONFIG_FILE).read_text()).get("checkpoint_dir") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def read_meta(checkpoint: Path) -> dict:
    if not (checkpoint.is_dir() and (checkpoint / "state").is_dir() and (checkpoint / "meta").is_dir()):
        raise ExportError(f"{checkpoint}: not an orbax training checkpoint step folder (expected state/ and "
                          "meta/, as in WORKDIR/checkpoints/<step>)")
    path = checkpoint / "meta" / "metadata"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ExportError(f"{path}: cannot read the checkpoint meta ({error})") from error
    for key in ("step", "config", "frozen_base"):
        if key not in meta:
            raise ExportError(f"{path}: the checkpoint meta has no {key!r} (written by another program?)")
    return meta


class FrozenBase(NamedTuple):
    kind: str  # "init_from" | "base_model"
    path: Path


def verify_frozen_base(meta: dict, checkpoint: Path, *, base_model: str | None = None,
                       init_from: str | None = None) -> FrozenBase:
    """The folder the frozen UNet weights come from, after checking its fingerprint against the
    one stored in the checkpoint; ExportError naming the path otherwise."""

    stored = meta["frozen_base"]
    kind = "init_from" if stored.get("init_from") else "base_model"
    override = init_from if kind == "init_from" else base_model
    path = Path(override or stored.get(kind, "")).absolute()
    flag = "--init-from" if kind == "init_from" else "--base-model"
    if not path.is_dir():
        raise ExportError(f"{kind} {str(path)!r}: no such folder; the checkpoint {checkpoint} was trained on "
                          f"{stored.get(kind)!r} (pass {flag} PATH where those weights are now)")
    expected = stored.get(f"{kind}_sha256", "")
    if not expected:
        raise ExportError(f"{checkpoint}: the checkpoint meta stores no {kind}_sha256 to verify {path} against")
    have = init_from_fingerprint(path) if kind == "init_from" else weights_fingerprint(path)
    if have != expected:
        raise ExportError(f"{kind} {str(path)!r} does not match the checkpoint {checkpoint}: its weights have "
                          f"fingerprint {have[:16]}... but the run was trained on {stored.get(kind)!r} with "
                          f"{expected[:16]}... (the frozen weights differ; pass {flag} with the original ones)")
    return FrozenBase(kind, path)


# ----------------------------------------------------------------------------- networks


class BaseNetworks(NamedTuple):
    """unet / controlnet: modules whose frozen parameters hold the base's values (trainable ones
    may be abstract); configs: config.json bytes to write per network."""

    unet: Any
    controlnet: Any
    configs: dict


def _json_bytes(config) -> bytes:
    return (json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def _sd_base_networks(base_model: Path, train_config: dict) -> BaseNetworks:
    """The XPSR networks initialised from SD 1.5 as the official rule shapes them: SD tensors for
    the frozen UNet part; the trainable parts stay abstract (the checkpoint replaces them), so no
    random initialisation is computed."""

    sd_unet = UNet2DCondition.from_pretrained(base_model, subfolder="unet")
    try:  # the configs XPSRUNet.from_sd_unet (+ the run's SFA switches) and XPSRControlNet.from_unet derive
        unet_config = XPSRUNetConfig.from_sd(sd_unet.config, **sfa_overrides(train_config.get("model")))
        controlnet_config = XPSRControlNetConfig.from_unet(unet_config)
    except ValueError as error:
        raise ExportError(f"the XPSR config derived from {base_model}/unet: {error}") from error

    unet = abstract_network(XPSRUNet, unet_config)
    graphdef, trainable, frozen = split_trainable(unet, "unet")
    sd_flat = dict(nnx.to_flat_state(nnx.state(sd_unet, nnx.Param)))
    for path, variable in nnx.to_flat_state(frozen):
        source = sd_flat.get(path)
        if source is None or tuple(source.get_value().shape) != tuple(variable.get_value().shape):
            raise ExportError(f"{base_model}/unet: has no tensor for the frozen XPSR UNet parameter "
                              f"{'.'.join(map(str, path))}; is base_model the SD 1.5 folder the run used?")
        variable.set_value(source.get_value())
    unet = nnx.merge(graphdef, trainable, frozen)
    controlnet = abstract_network(XPSRControlNet, controlnet_config)
    return BaseNetworks(unet, controlnet, {"unet": _json_bytes(unet_config),
                                           "controlnet": _json_bytes(controlnet_config)})


def load_base_networks(base: FrozenBase, train_config: dict) -> BaseNetworks:
    if base.kind == "base_model":
        return _sd_base_networks(base.path, train_config)
    if detect_weights_format(base.path) == ORBAX_INFERENCE:
        unet, controlnet = load_inference_checkpoint(base.path)
    else:  # XPSRUNet.from_pretrained with a cached abstract build
        folder = base.path / "unet"
        weights_path = resolve_weights_file(folder, XPSRUNet.weights_stem)
        unet_config = XPSRUNetConfig.from_json_file(folder / "config.json")
        unet = load_state_dict_into(abstract_network(XPSRUNet, unet_config), read_state_dict(weights_path),
                                    source=str(weights_path))
        # The ControlNet is all trainable: only its shapes are needed.
        config = XPSRControlNetConfig.from_json_file(base.path / "controlnet" / "config.json")
        controlnet = abstract_network(XPSRControlNet, config)
    check_release_config(unet, train_config.get("model"), str(base.path))
    return BaseNetworks(unet, controlnet, {name: (base.path / name / "config.json").read_bytes()
                                           for name in NETWORKS})


def restore_trainable(checkpoint: Path, networks: BaseNetworks, *, ema: bool, param_dtype) -> tuple[Any, Any]:
    """(unet, controlnet) with the checkpoint's trainable parameters (or its EMA) merged in.

    Only `params` (or `ema_params`) are read: no optimizer state, RNG or step."""

    # Shapes only (the base's trainable values, if any, are replaced), in the checkpoint's dtype.
    parts = {name: split_trainable(getattr(networks, name), name) for name in NETWORKS}
    try:
        restored = restore_saved_params(checkpoint, {name: parts[name][1] for name in NETWORKS}, ema=ema,
                                        param_dtype=param_dtype)
    except (ValueError, KeyError, TypeError) as error:
        raise ExportError(f"{checkpoint}: its trainable parameters do not fit the networks of the frozen base "
                          f"(the checkpoint's config does not match the base: {str(error)[:500]})") from error
    return tuple(nnx.merge(parts[name][0], restored[name], parts[name][2]) for name in NETWORKS)


# ----------------------------------------------------------------------------- writing


def torch_state_dict(module, dtype: str) -> dict:
    """The module's PyTorch-layout state dict with floating tensors cast to `dtype`."""

    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return {k: v.astype(target) if np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16 else v
            for k, v in module_state_dict(module).items()}


def write_release(folder: Path, networks: dict, configs: dict[str, bytes], dtype: str) -> None:
    for name in NETWORKS:
        (folder / name).mkdir(parents=True)
        write_state_dict(folder / name / WEIGHTS_NAME, torch_state_dict(networks[name], dtype))
        (folder / name / "config.json").write_bytes(configs[name])


def _parameter_bytes(modules, dtype: str) -> int:
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    return sum(int(np.prod(x.shape)) * itemsize for m in modules for x in jax.tree.leaves(nnx.state(m, nnx.Param)))


def _estimated_bytes(checkpoint: Path, base: FrozenBase, dtype: str) -> int:
    """The output size, estimated before loading: the trainable params (a third of the train
    state at most: Adam keeps two moments per parameter) plus the base UNet's weights file."""
    state = sum(p.stat().st_size for p in (checkpoint / "state").rglob("*") if p.is_file()) // 3
    unet = base.path / ("unet" if base.kind == "base_model" or (base.path / "unet" / WEIGHTS_NAME).is_file()
                        else "state")
    frozen = sum(p.stat().st_size for p in unet.rglob("*") if p.is_file()) if unet.is_dir() else 0
    return int((state + frozen) * {"float32": 1.0, "float16": 0.5, "bfloat16": 0.5}[dtype])


def export_torch_layout(checkpoint: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
                        ema: bool = False, base_model: str | None = None, init_from: str | None = None,
                        overwrite: bool = False) -> Path:
    """One training checkpoint step folder -> release folder `out` (see the module docstring).
    Every check runs before anything is written; a failure leaves no partial output."""

    if dtype not in DTYPE_NAMES:
        raise ExportError(f"--dtype={dtype!r} is invalid; valid: {' | '.join(DTYPE_NAMES)}")
    checkpoint = Path(checkpoint).absolute()
    meta = read_meta(checkpoint)
    train_config = meta["config"]
    if ema and not float(train_config.get("optimizer", {}).get("ema_decay", 0.0)) > 0:
        # The loop keeps EMA weights exactly when optimizer.ema_decay > 0.
        raise ExportError(f"{checkpoint}: has no EMA weights (trained with optimizer.ema_decay=0); drop --ema")
    base = verify_frozen_base(meta, checkpoint, base_model=base_model, init_from=init_from)
    inputs = (checkpoint, base.path)  # out may not be, contain or lie inside them (e.g. the workdir)
    check_output_target(out, inputs=inputs, overwrite=overwrite,
                        required_bytes=_estimated_bytes(checkpoint, base, dtype))  # before the slow load
    try:
        networks = load_base_networks(base, train_config)
    except (OSError, ValueError) as error:
        raise ExportError(f"{base.kind} {str(base.path)!r}: cannot load the frozen base ({error})") from error
    param_dtype = DTYPES_BY_NAME.get(train_config.get("precision", {}).get("param_dtype", "float32"), jnp.float32)
    one_step = None
    if train_config.get("objective", "xpsr") == "one_step":
        one_step = restore_one_step(checkpoint, networks, train_config, ema=ema, param_dtype=param_dtype,
                                    base_model=base_model)
        unet, controlnet = one_step.unet, one_step.controlnet
    else:
        unet, controlnet = restore_trainable(checkpoint, networks, ema=ema, param_dtype=param_dtype)
    manifest = {"format": RELEASE, "version": 1, "source": str(checkpoint), "source_format": "orbax-train",
                "step": int(meta["step"]), "ema": bool(ema), "dtype": dtype, "config": train_config,
                "frozen_base": {**meta["frozen_base"], "verified": base.kind, "verified_path": str(base.path)},
                "created_by": "python -m xpsr_jax.export torch"}
    with atomic_output_dir(out, required_bytes=_parameter_bytes((unet, controlnet), dtype),
                           overwrite=overwrite, inputs=inputs) as staging:
        try:
            write_release(staging, {"unet": unet, "controlnet": controlnet}, networks.configs, dtype)
            if one_step is not None:
                write_one_step_files(staging, one_step, ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))
            manifest["checksums"] = folder_checksums(staging)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        except OSError as error:
            raise ExportError(f"{Path(out).absolute()}: writing the release failed ({error}); nothing was "
                              "written") from error
    return Path(out).absolute()
