"""Validation of the training config (configs/train.py), the resolved config stored in the workdir,
and the fingerprint of the frozen base weights. Everything here runs before any compilation and
raises one-line errors that name the key (or path), the bad value and what is valid.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ml_collections import config_dict

from xpsr_jax.cli_config import ConfigError, config_value, invalid_value
from xpsr_jax.data.pipeline import validate_pipeline_config
from xpsr_jax.models.attention import ATTENTION_BACKENDS
from xpsr_jax.models.dtypes import DTYPE_NAMES
from xpsr_jax.models.single_file import is_single_file, sd15_folder
from xpsr_jax.training.loss_scale import LOSS_SCALINGS
from xpsr_jax.training.models import REMAT_POLICIES
from xpsr_jax.training.optimizer import validate_optimizer_config
from xpsr_jax.weights.files import WeightFileError
from xpsr_jax.weights.fingerprints import init_from_fingerprint, weights_fingerprint

# What base_model must hold: subfolder -> a file that proves it is there.
BASE_MODEL_PARTS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "vocab.json",
    "scheduler": "scheduler_config.json",
}
WORKDIR_CONFIG_FILE = "config.json"
# Keys that fix the network architecture, the trainable set, the optimizer-state structure or
# the data stream: a workdir cannot be resumed with other values. The rest (steps, cadence,
# learning rate, batch size, mesh, remat, precision of compute, validation, threads) may change.
RESUME_KEYS = (
    "init_from",
    "model.down_use_lowlevel_prompt",
    "model.mid_use_lowlevel_prompt",
    "model.up_use_lowlevel_prompt",
    "seed",
    "pipeline.dataset",
    "pipeline.split",
    "pipeline.seed",
    "pipeline.resolution",
    "pipeline.scale",
    "pipeline.random_flip",
    "pipeline.hr_conditioning_prob",
    "pipeline.highlevel_prompt_source",
    "pipeline.max_length",
    "optimizer.gradient_accumulation_steps",
    "optimizer.ema_decay",
    "precision.param_dtype",
    "precision.loss_scaling",
    "loss.dfc_weight",
    "objective",
    "one_step.lora_rank",
)
# What a workdir written before a RESUME_KEYS key existed ran with.
RESUME_DEFAULTS = {"objective": "xpsr", "one_step.lora_rank": 4}
OBJECTIVES = ("xpsr", "one_step")


def _bad(key: str, value: Any, valid: str) -> ConfigError:
    return invalid_value(key, value, valid, "train")


def resolve_train_config(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """A copy with the defaults that depend on other keys filled in
    (pipeline.tokenizer_path "" -> base_model/tokenizer; a single-file base_model -> the diffusers
    folder it is converted into, once, in the user cache)."""
    resolved = config_dict.ConfigDict(config.to_dict())
    one_step_init = resolved.get("one_step", {}).get("init_from", "")
    if one_step_init:
        if resolved.init_from and resolved.init_from != one_step_init:
            raise ConfigError(f"train config: one_step.init_from={one_step_init!r} and init_from="
                              f"{resolved.init_from!r} differ; give one of them (they name the same release)")
        resolved.init_from = one_step_init
    if resolved.base_model and is_single_file(resolved.base_model):
        try:
            resolved.base_model = str(sd15_folder(resolved.base_model,
                                                  tokenizer=resolved.pipeline.tokenizer_path or None,
                                                  config_folder=resolved.get("base_model_config") or None))
        except WeightFileError as error:
            raise ConfigError(f"train config: base_model={config.base_model!r}: {error}") from None
    if not resolved.pipeline.tokenizer_path and resolved.base_model:
        resolved.pipeline.tokenizer_path = str(Path(resolved.base_model) / "tokenizer")
    resolved.lock()
    return resolved


def _check_int(config, key: str, minimum: int, valid: str | None = None) -> None:
    value = config_value(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(key, value, valid or f"an integer >= {minimum}")


def _check_choice(config, key: str, choices) -> None:
    value = config_value(config, key)
    if value not in choices:
        raise _bad(key, value, " | ".join(choices))


def check_base_model(path: str, key: str = "base_model") -> None:
    folder = Path(path)
    if not path:
        raise _bad(key, path, "a diffusers Stable Diffusion 1.5 folder "
                   f"({', '.join(BASE_MODEL_PARTS)})")
    if not folder.is_dir():
        raise ConfigError(f"train config: {key}={path!r}: no such folder (a diffusers SD 1.5 folder, or the "
                          "single-file checkpoint: .safetensors / .ckpt)")
    missing = [f"{part}/{name}" for part, name in BASE_MODEL_PARTS.items()
               if not (folder / part / name).is_file()]
    if missing:
        raise ConfigError(f"train config: {key}={path!r} is not a Stable Diffusion 1.5 folder: "
                          f"missing {', '.join(missing)}")


def check_dataset(pipeline: config_dict.ConfigDict) -> None:
    """The dataset folder exists and holds a built `pipeline.dataset` (TFDS layout)."""
    data_dir = pipeline.data_dir
    if not data_dir:
        raise _bad("pipeline.data_dir", data_dir,
                   "the TFDS data_dir holding a built xpsr_pairs dataset")
    if not Path(data_dir).is_dir():
        raise ConfigError(f"train config: pipeline.data_dir={data_dir!r}: no such folder "
                          "(build the dataset with python -m xpsr_jax.data.prepare)")
    name = pipeline.dataset.split(":")[0]
    dataset_folder = Path(data_dir, *name.split("/"))
    if not any(dataset_folder.glob("**/dataset_info.json")):
        raise ConfigError(f"train config: pipeline.dataset={pipeline.dataset!r} is not built in "
                          f"pipeline.data_dir={data_dir!r} (no {dataset_folder}/*/"
                          "dataset_info.json; build it with python -m xpsr_jax.data.prepare)")


def validate_train_config(config: config_dict.ConfigDict, *, check_paths: bool = True) -> None:
    """Raises ConfigError (one line: key, value, what is valid) for the first bad value.

    `config` is the resolved config (resolve_train_config). `check_paths=False` skips the
    file-system checks (base_model, dataset, init_from, validation.lr_dir)."""
    if check_paths:
        check_base_model(config.base_model)
        if config.init_from and not Path(config.init_from).is_dir():
            raise ConfigError(f"train config: init_from={config.init_from!r}: no such folder "
                              "(a release folder with unet/ and controlnet/, an orbax inference "
                              "checkpoint of python -m xpsr_jax.export orbax, or \"\")")
        check_dataset(config.pipeline)
    try:
        validate_pipeline_config(config.pipeline)
    except ValueError as error:
        raise ConfigError(f"train config: {error}".replace("pipeline config: ", "pipeline.")
                          ) from error
    up = tuple(config.model.up_use_lowlevel_prompt)
    if len(up) != 4 or not all(isinstance(v, bool) for v in up):
        raise _bad("model.up_use_lowlevel_prompt", up, "4 booleans, one per up block")
    for key in ("model.down_use_lowlevel_prompt", "model.mid_use_lowlevel_prompt",
                "mesh.shard_trainable", "mesh.shard_frozen"):
        if not isinstance(config_value(config, key), bool):
            raise _bad(key, config_value(config, key), "True | False")
    if not isinstance(config.mesh.get("shard_optimizer", False), bool):
        raise _bad("mesh.shard_optimizer", config.mesh.shard_optimizer, "True | False")

    _check_int(config, "total_steps", 1)
    _check_int(config, "log_every", 1)
    _check_int(config, "checkpoint_every", 1)
    _check_int(config, "keep_checkpoints", 1)
    _check_int(config, "seed", 0)

    try:
        validate_optimizer_config(config.optimizer, config.total_steps)
    except (ValueError, KeyError) as error:
        raise ConfigError(f"train config: {str(error).strip(chr(34) + chr(39))}") from error
    if not (isinstance(config.loss.dfc_weight, (int, float)) and math.isfinite(config.loss.dfc_weight)
            and config.loss.dfc_weight >= 0):
        raise _bad("loss.dfc_weight", config.loss.dfc_weight, "a finite number >= 0")

    for key in ("param_dtype", "compute_dtype", "frozen_dtype"):
        _check_choice(config, f"precision.{key}", DTYPE_NAMES)
    _check_choice(config, "precision.loss_scaling", LOSS_SCALINGS)
    if config.precision.compute_dtype == "float16" and config.precision.loss_scaling != "dynamic":
        # float16 gradients of the small DFC / MSE terms underflow to zero without scaling
        raise ConfigError("train config: precision.compute_dtype='float16' needs "
                          "precision.loss_scaling='dynamic' (or use compute_dtype='bfloat16')")

    if config.mesh.get("shard_optimizer", False) is True and config.mesh.shard_trainable:
        raise _bad("mesh.shard_optimizer", True, "False with mesh.shard_trainable=True (the optimizer state is then "
                                                 "sharded with the params)")
    for key in ("data", "fsdp"):
        value = config.mesh[key]
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            raise _bad(f"mesh.{key}", value, "an integer >= 1, or -1 for the devices left over")
    if config.mesh.data == -1 and config.mesh.fsdp == -1:
        raise _bad("mesh.fsdp", -1, "an integer >= 1 when mesh.data is -1")

    for key in ("unet", "controlnet"):
        _check_choice(config, f"remat.{key}", tuple(REMAT_POLICIES))
    _check_choice(config, "attention_backend", ATTENTION_BACKENDS)
    if not isinstance(config.get("compile_cache", "default"), str):
        raise _bad("compile_cache", config.compile_cache, '"default" (WORKDIR/compile_cache), a folder, or "" (off)')
    if not isinstance(config.get("checkpoint_dir", ""), str):
        raise _bad("checkpoint_dir", config.checkpoint_dir, '"" (WORKDIR/checkpoints), a folder or a bucket (gs://...)')
    if not isinstance(config.get("xla_cpu_fast_compile", True), bool):
        raise _bad("xla_cpu_fast_compile", config.xla_cpu_fast_compile, "true or false")

    _check_objective(config, check_paths)
    _check_int(config, "validation.every", 0)
    _check_int(config, "validation.num_images", 1)
    if config.validation.every > 0 and check_paths and not Path(config.validation.lr_dir).is_dir():
        raise ConfigError(f"train config: validation.lr_dir={config.validation.lr_dir!r}: no such "
                          "folder (needed with validation.every > 0)")


def _check_objective(config: config_dict.ConfigDict, check_paths: bool) -> None:
    objective = config.get("objective", "xpsr")
    if objective not in OBJECTIVES:
        raise _bad("objective", objective, " | ".join(OBJECTIVES))
    if objective != "one_step":
        return
    _check_int(config, "one_step.lora_rank", 1)
    for key in ("one_step.lora_alpha", "one_step.lambda_l2", "one_step.lambda_lpips", "one_step.lambda_vsd",
                "one_step.lambda_vsd_lora", "one_step.cfg_vsd"):
        value = config_value(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise _bad(key, value, "a finite number >= 0")
    if not isinstance(config.one_step.negative_prompt, str):
        raise _bad("one_step.negative_prompt", config.one_step.negative_prompt, "a string")
    if config.precision.loss_scaling != "none":
        raise _bad("precision.loss_scaling", config.precision.loss_scaling,
                   '"none" with objective "one_step" (use bfloat16 compute)')
    if config.validation.every:
        raise _bad("validation.every", config.validation.every,
                   '0 with objective "one_step" (its validation grids are not built yet; run infer on a checkpoint '
                   "export)")
    if check_paths and not Path(config.loss.lpips_backbone or "").is_file():
        raise ConfigError(f"train config: loss.lpips_backbone={config.loss.lpips_backbone!r}: no such file; the "
                          "one-step objective's LPIPS needs torchvision's VGG16 ImageNet weights "
                          "(vgg16-397923af.pth)")


# ----------------------------------------------------------------------------- workdir


def config_to_json(config: config_dict.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def _normalise(value: Any) -> Any:
    """JSON round trip: tuples become lists, so a stored config compares with a fresh one."""
    return json.loads(json.dumps(value, default=list))


def check_workdir_config(config: config_dict.ConfigDict, workdir: str | os.PathLike) -> None:
    """Raises ConfigError when `workdir/config.json` was written by a config that differs in a
    RESUME_KEYS key. A workdir without one is fine (a new run)."""
    path = Path(workdir) / WORKDIR_CONFIG_FILE
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"workdir {str(workdir)!r}: {path} is not valid JSON ({error}); "
                          "use a new --workdir") from error
    for key in RESUME_KEYS:
        wanted = _normalise(config_value(config, key))
        have = stored
        for part in key.split("."):
            have = have.get(part, "<absent>") if isinstance(have, dict) else "<absent>"
        if have == "<absent>":
            have = RESUME_DEFAULTS.get(key, have)
        if _normalise(have) != wanted:
            raise ConfigError(
                f"workdir {str(workdir)!r} was written by an incompatible config: {key}="
                f"{wanted!r} here but {have!r} in {path}; resume with the same value or use a new "
                "--workdir")


def write_workdir_config(config: config_dict.ConfigDict, workdir: str | os.PathLike) -> Path:
    """Stores the resolved config as workdir/config.json (atomically)."""
    path = Path(workdir) / WORKDIR_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(config_to_json(config) + "\n")
    os.replace(temporary, path)
    return path


# ----------------------------------------------------------------------------- base weights

def frozen_base_reference(config: config_dict.ConfigDict) -> dict[str, str]:
    """{"base_model", "base_model_sha256", "init_from", "init_from_sha256"}: what the frozen
    weights were read from, stored in each checkpoint and checked on resume."""
    reference = {"base_model": str(config.base_model),
                 "base_model_sha256": weights_fingerprint(config.base_model),
                 "init_from": str(config.init_from), "init_from_sha256": ""}
    if config.init_from:
        reference["init_from_sha256"] = init_from_fingerprint(config.init_from)
    return reference


def check_frozen_base(stored: dict[str, str], current: dict[str, str]) -> None:
    """Raises ConfigError when the frozen weights differ from those a checkpoint was trained on."""
    for key in ("base_model", "init_from"):
        if stored.get(f"{key}_sha256", "") != current[f"{key}_sha256"]:
            raise ConfigError(
                f"{key} weights do not match the checkpoint: {key}={current[key]!r} has sha256 "
                f"{current[f'{key}_sha256'][:16]}... but the checkpoint was trained on "
                f"{stored.get(key)!r} with sha256 {stored.get(f'{key}_sha256', '')[:16]}...")
