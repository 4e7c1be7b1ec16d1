"""`export torch` of a one-step run (objective "one_step"): the release of docs/one_step.md.

The UNet's LoRA is merged into its weights, so `unet/` and `controlnet/` are an official-layout
release; the VAE encoder's LoRA applies to SD 1.5's VAE and is written beside them in peft's keys
and layout (`vae_encoder_lora.safetensors`, adapter "default_encoder" as OSEDiff names it), with
`one_step.json` saying its rank, alpha and target modules, the timestep, and the base it needs.
The regulariser is training-only and is not exported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
from flax import nnx

from xpsr_jax.export.output import ExportError
from xpsr_jax.inference.one_step import ONE_STEP_TIMESTEP
from xpsr_jax.models import AutoencoderKLConfig
from xpsr_jax.models.lora import (
    init_lora,
    lora_scaling,
    osediff_unet_targets,
    osediff_vae_encoder_targets,
    to_peft_state_dict,
    with_lora,
)
from xpsr_jax.models.loading import abstract_network
from xpsr_jax.models.vae import AutoencoderKL
from xpsr_jax.training.checkpoint import restore_saved_params
from xpsr_jax.training.one_step_train import trainable_filter
from xpsr_jax.training.trainable import TRAINABLE_UNET_MODULES
from xpsr_jax.weights.convert import module_param_names
from xpsr_jax.weights.files import write_state_dict
from xpsr_jax.weights.formats import ONE_STEP_RECORD, VAE_ENCODER_ADAPTER, VAE_ENCODER_LORA

NETWORKS = ("unet", "controlnet")


class OneStepExport(NamedTuple):
    unet: Any  # LoRA merged
    controlnet: Any
    vae_lora: dict
    record: dict


def _abstract_lora(module, targets, rank: int) -> dict:
    state = nnx.state(module, nnx.Param)
    return jax.eval_shape(lambda: init_lora(state, targets, rank, jax.random.PRNGKey(0)))


def restore_one_step(checkpoint: Path, networks: Any, train_config: dict, *, ema: bool, param_dtype,
                     base_model: str | None) -> OneStepExport:
    """The generator of a one-step checkpoint: the trained UNet parts + ControlNet on the frozen
    base (`networks`, export's BaseNetworks), the UNet LoRA merged, the VAE-encoder LoRA apart."""
    one_step = train_config.get("one_step", {})
    rank, alpha = int(one_step.get("lora_rank", 4)), float(one_step.get("lora_alpha", 8.0))
    sd15 = Path(base_model or train_config.get("base_model", ""))
    if not (sd15 / "vae" / "config.json").is_file():
        raise ExportError(f"base_model {str(sd15)!r}: no vae/config.json; the VAE-encoder LoRA of a one-step run "
                          "needs the run's SD 1.5 folder (pass --base-model PATH where it is now)")
    vae = abstract_network(AutoencoderKL, AutoencoderKLConfig.from_json_file(sd15 / "vae" / "config.json"))
    unet_targets = sum(osediff_unet_targets(module_param_names(networks.unet), TRAINABLE_UNET_MODULES).values(), ())
    vae_targets = osediff_vae_encoder_targets(module_param_names(vae))

    parts = {name: nnx.split(getattr(networks, name), trainable_filter(name), ...) for name in NETWORKS}
    shapes = {name: parts[name][1] for name in NETWORKS}
    shapes.update(unet_lora=_abstract_lora(networks.unet, unet_targets, rank),
                  vae_lora=_abstract_lora(vae, vae_targets, rank))
    try:
        restored = restore_saved_params(checkpoint, shapes, ema=ema, param_dtype=param_dtype)
    except (ValueError, KeyError, TypeError) as error:
        raise ExportError(f"{checkpoint}: its one-step parameters do not fit the networks of the frozen base and "
                          f"{sd15} (the checkpoint's config does not match them: {str(error)[:500]})") from error
    unet, controlnet = (nnx.merge(parts[name][0], restored[name], parts[name][2]) for name in NETWORKS)
    scaling = lora_scaling(rank, alpha)
    record = {"format": "xpsr-one-step", "version": 1, "timestep": ONE_STEP_TIMESTEP,
              "base_model": str(sd15),
              "vae_encoder_lora": {"file": VAE_ENCODER_LORA, "adapter_name": VAE_ENCODER_ADAPTER, "rank": rank,
                                   "lora_alpha": alpha, "target_modules": list(vae_targets)},
              "inference": "python -m xpsr_jax.infer --config infer.py:one_step"}
    return OneStepExport(with_lora(unet, restored["unet_lora"], scaling), controlnet,
                         jax.device_get(restored["vae_lora"]), record)


def write_one_step_files(folder: Path, export: OneStepExport, dtype) -> None:
    """VAE_ENCODER_LORA (peft keys) and ONE_STEP_RECORD into a release folder being written."""
    state = to_peft_state_dict(export.vae_lora, VAE_ENCODER_ADAPTER)
    write_state_dict(folder / VAE_ENCODER_LORA, {k: v.astype(dtype) for k, v in state.items()})
    (folder / ONE_STEP_RECORD).write_text(json.dumps(export.record, indent=2, sort_keys=True) + "\n")
