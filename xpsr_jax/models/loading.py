"""The XPSR networks (UNet + ControlNet) from any stored format, through one entry point.

    unet, controlnet = load_xpsr_networks("xpsr-release")      # official layout: unet/ + controlnet/
    unet, controlnet = load_xpsr_networks("xpsr-orbax", sharding=NamedSharding(mesh, P()))

Formats (told apart by `xpsr_jax.weights.formats.detect_weights_format`): an official-layout
release (config.json + safetensors per network, as the release's `save_pretrained` writes) and
an inference-only orbax checkpoint (`python -m xpsr_jax.export orbax`: state/ restored straight
into the requested shardings). A StableHLO artifact holds programs, not networks: it is refused
with a pointer to `xpsr_jax.weights.artifact.load_artifact`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from xpsr_jax.models.xpsr_controlnet import XPSRControlNet, XPSRControlNetConfig
from xpsr_jax.models.xpsr_unet import XPSRUNet, XPSRUNetConfig
from xpsr_jax.models.lora import from_peft_state_dict, lora_scaling
from xpsr_jax.weights.files import WeightFileError, read_state_dict
from xpsr_jax.weights.formats import (
    ONE_STEP_RECORD,
    ORBAX_INFERENCE,
    RELEASE,
    STABLEHLO,
    VAE_ENCODER_ADAPTER,
    VAE_ENCODER_LORA,
    WeightsFormatError,
    detect_weights_format,
    read_manifest,
)
from xpsr_jax.weights.pretrained import eval_shape_model

NETWORKS = ("unet", "controlnet")
STATE_DIR = "state"  # the orbax inference checkpoint's parameter folder
ShardingSpec = Any  # None | jax.sharding.Sharding | Callable[[str, nnx.State], pytree of Sharding]


def load_xpsr(folder: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              attention_backend: str = "auto") -> tuple[XPSRUNet, XPSRControlNet]:
    """(unet, controlnet) from a release folder's `unet/` and `controlnet/` (config.json + weights).

    The weights stored in the release are used as they are: unlike the official
    `from_pretrained_orig`, the SFA tensors are NOT re-copied from `attentions` on load.
    """
    folder = Path(folder)
    missing = [name for name in NETWORKS if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder}: an XPSR release needs the subfolders unet/ and controlnet/; "
                                f"missing: {', '.join(missing)}")
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend)
    return (XPSRUNet.from_pretrained(folder / "unet", **kwargs),
            XPSRControlNet.from_pretrained(folder / "controlnet", **kwargs))


_ABSTRACT_CACHE: dict = {}


def abstract_network(model_class: type, config, **model_kwargs):
    """`model_class(config, rngs=..., **model_kwargs)` built for shapes only (no initialiser runs).

    The traced build (seconds for a UNet) is cached per (class, config.json, kwargs); every call
    returns a new module whose variables are its own."""
    key = (model_class, json.dumps(config.to_dict(), sort_keys=True, default=str),
           tuple(sorted((k, str(v)) for k, v in model_kwargs.items())))
    if key not in _ABSTRACT_CACHE:
        _ABSTRACT_CACHE[key] = nnx.split(eval_shape_model(
            lambda: model_class(config, rngs=nnx.Rngs(0), **model_kwargs)))
    graphdef, state = _ABSTRACT_CACHE[key]
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # fresh Variables


def _target(name: str, abstract_params, sharding: ShardingSpec, param_dtype):
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


def load_xpsr_networks(path: str | os.PathLike, *, sharding: ShardingSpec = None,
                       **model_kwargs) -> tuple[XPSRUNet, XPSRControlNet]:
    """(unet, controlnet) from a release folder or an orbax inference checkpoint (`model_kwargs`:
    dtype, param_dtype, attention_backend; `sharding` only applies to orbax checkpoints, which
    restore onto it). WeightsFormatError names the folder and what it is when it is neither."""
    folder = Path(path)
    kind = detect_weights_format(folder)
    if kind == RELEASE:
        return load_xpsr(folder, **model_kwargs)
    if kind == ORBAX_INFERENCE:
        return load_inference_checkpoint(folder, sharding=sharding, **model_kwargs)
    assert kind == STABLEHLO, kind
    raise WeightsFormatError(f"{folder}: a StableHLO artifact holds compiled programs, not networks; "
                             "run it with xpsr_jax.weights.artifact.load_artifact")


class OneStepRelease(NamedTuple):
    """What a one-step XPSR release adds to the VAE of SD 1.5: its encoder's LoRA and scaling."""

    vae_lora: dict
    scaling: float
    record: dict


def read_one_step_release(folder: str | os.PathLike) -> OneStepRelease | None:
    """The VAE-encoder LoRA of a one-step release (ONE_STEP_RECORD + VAE_ENCODER_LORA), or None
    for a multi-step one; WeightsFormatError naming the file when they are broken."""
    folder = Path(folder)
    record_path = folder / ONE_STEP_RECORD
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        lora = record["vae_encoder_lora"]
        scaling = lora_scaling(int(lora["rank"]), float(lora["lora_alpha"]))
        state = read_state_dict(folder / lora["file"])
        vae_lora = from_peft_state_dict(state, lora.get("adapter_name", VAE_ENCODER_ADAPTER))
    except (OSError, ValueError, KeyError, TypeError, WeightFileError) as error:
        raise WeightsFormatError(f"{record_path}: a one-step XPSR release needs this record and its "
                                 f"{VAE_ENCODER_LORA} ({type(error).__name__}: {error})") from error
    if not vae_lora:
        raise WeightsFormatError(f"{folder / lora['file']}: holds no LoRA tensors of adapter "
                                 f"{lora.get('adapter_name', VAE_ENCODER_ADAPTER)!r}")
    return OneStepRelease(vae_lora, scaling, record)


__all__ = ["NETWORKS", "OneStepRelease", "STATE_DIR", "abstract_network", "load_inference_checkpoint", "load_xpsr",
           "load_xpsr_networks", "read_inference_manifest", "read_one_step_release"]
