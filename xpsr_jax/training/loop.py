"""The XPSR training loop: `train(config, workdir)`.

    from configs import train as train_configs
    config = train_configs.get_config("tiny")
    config.base_model, config.pipeline.data_dir = "tiny/sd15", "tiny/tfds"
    train(config, "runs/tiny")          # resumes when runs/tiny has a checkpoint

Order of work: distributed set-up -> config checks (paths, workdir, frozen-base checksum
against the checkpoint) -> models, train state, mesh -> restore -> compile -> steps. Every
check that can fail on bad input runs before anything is compiled.

Each step dispatches the next jitted step before reading the metrics of the previous one, so
the host never waits for the device except at checkpoints. A step whose loss or gradient is not
finite stops the run (`TrainingDiverged`): the core step leaves the weights unchanged on such a
step, and nothing at or after it is saved. SIGTERM / SIGINT (`StopSignal`) save a checkpoint
after the current step and stop; all processes agree on the step through a tiny collective.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from xpsr_jax.compile_cache import CompileCacheError, use_compile_cache
from xpsr_jax.data import tfds_builder
from xpsr_jax.data.pipeline import make_train_iterator
from xpsr_jax.distributed import DistributedOptions, initialize_distributed, wait_for_every_process
from xpsr_jax.models.dtypes import dtype_from_name
from xpsr_jax.progress import progress_bar
from xpsr_jax.schedulers import load_scheduler_config, noise_schedule_from_config
from xpsr_jax.training import config as train_config
from xpsr_jax.training.checkpoint import (
    StopSignal,
    TrainCheckpoints,
    checkpoint_directory,
    finalized_steps,
    read_checkpoint_meta,
)
from xpsr_jax.training.loss import BATCH_KEYS
from xpsr_jax.training.metrics import MetricsWriter
from xpsr_jax.training.models import load_training_models
from xpsr_jax.training.one_step_train import create_one_step_state, load_one_step_networks, one_step_step_fn
from xpsr_jax.training.sharding import global_batch, make_mesh
from xpsr_jax.training.step import (
    checkpoint_restore_target,
    create_train_state,
    format_memory_estimate,
    make_train_step,
    memory_estimate,
    optimizer_layout_record,
)
from xpsr_jax.training.validation import Validator

STATE_VERSION = 2  # 2: optimizer state in the flat layout of meta["optimizer_layout"]


SPEED_WINDOW = 10  # steps the logged s/step and img/s are averaged over
PROGRESS_TERMS = ("loss", "mse", "dfc", "l2", "lpips", "vsd", "regulariser")  # those a step has, on the bar
COMPILE_CACHE_DIR = "compile_cache"  # in the workdir, with compile_cache="default"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class TrainResult:
    start_step: int
    final_step: int
    stopped_by_signal: str = ""
    compile_seconds: float = 0.0


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _hr_target(data_dir: str, dataset: str) -> str:
    """The dataset's HR target (usm | original | unknown), as the TFDS builder recorded it."""

    reader = getattr(tfds_builder, "read_hr_target", None)
    if reader is None:
        return "unknown (this xpsr_jax.data has no read_hr_target)"
    try:
        return str(reader(data_dir, dataset))
    except Exception as error:  # reporting only: the pipeline itself opens the dataset
        return f"unknown ({error})"


class _AnyProcessFlag:
    """An async logical OR over processes of a per-process host flag: one tiny collective, read
    one step later, so it never stalls the device queue."""

    def __init__(self, mesh):
        self.devices = mesh.devices.reshape(-1)
        self.sharding = NamedSharding(jax.sharding.Mesh(self.devices, ("all",)),
                                      PartitionSpec("all"))
        self.local_count = sum(d.process_index == jax.process_index() for d in self.devices)
        self.reduce = jax.jit(jnp.max, out_shardings=NamedSharding(self.sharding.mesh,
                                                                   PartitionSpec()))

    def __call__(self, flag: bool) -> jax.Array:
        local = np.full((self.local_count,), int(flag), np.int32)
        return self.reduce(jax.make_array_from_process_local_data(self.sharding, local))


def _model_batch(local_batch: Mapping[str, Any], keys) -> dict[str, np.ndarray]:
    return {key: np.asarray(local_batch[key]) for key in keys}


def _host_metrics(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    return {key: float(np.asarray(value)) for key, value in metrics.items()}


def _summary(config, mesh, state, frozen, global_batch_size: int, start_step: int,
             compile_seconds: float | None = None) -> None:
    devices = jax.devices()
    per_device = global_batch_size // mesh.size
    _say(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}), "
         f"{jax.process_count()} process(es), {jax.local_device_count()} local")
    _say(f"mesh: {dict(mesh.shape)}; shard_trainable={config.mesh.shard_trainable} "
         f"shard_frozen={config.mesh.shard_frozen}")
    _say(f"global batch: {global_batch_size} ({config.pipeline.batch_size} per process, "
         f"{per_device} per device), gradient accumulation "
         f"{config.optimizer.gradient_accumulation_steps}: "
         f"{global_batch_size * config.optimizer.gradient_accumulation_steps} examples per update")
    estimate = memory_estimate(state, frozen, per_device, int(config.pipeline.resolution))
    _say(f"parameters and memory: {format_memory_estimate(estimate)}")
    _say(f"data: {config.pipeline.dataset} in {config.pipeline.data_dir}, hr_target="
         f"{_hr_target(config.pipeline.data_dir, config.pipeline.dataset)}, "
         f"{config.pipeline.resolution} px, high-level prompt "
         f"{config.pipeline.highlevel_prompt_source!r}")
    _say(f"precision: params {config.precision.param_dtype}, compute "
         f"{config.precision.compute_dtype}, frozen {config.precision.frozen_dtype}; remat unet="
         f"{config.remat.unet} controlnet={config.remat.controlnet}; attention "
         f"{config.attention_backend}")
    _say(f"steps: {start_step} -> {config.total_steps}" +
         (" (resumed)" if start_step else " (new run)"))


def _check_inputs(config, workdir: Path) -> tuple[dict, int | None, dict | None]:
    """All checks that need no model: (frozen-base reference, latest step, its meta)."""
    train_config.validate_train_config(config)
    train_config.check_workdir_config(config, workdir)
    reference = train_config.frozen_base_reference(config)
    checkpoints_dir = checkpoint_directory(workdir, config.get("checkpoint_dir", ""))
    steps = finalized_steps(checkpoints_dir)
    latest = steps[-1] if steps else None
    meta = read_checkpoint_meta(checkpoints_dir, latest) if latest is not None else None
    if meta is not None:
        train_config.check_frozen_base(meta.get("frozen_base", {}), reference)
    return reference, latest, meta


def _create_state(config, mesh):
    """(state, frozen, graphdefs) of the config's objective, placed on `mesh`."""
    if config.get("objective", "xpsr") == "one_step":
        return create_one_step_state(load_one_step_networks(config), config, mesh)
    models = load_training_models(
        config.base_model, config.init_from, config.model.to_dict(),
        dtype=dtype_from_name(config.precision.compute_dtype, "precision.compute_dtype"),
        param_dtype=dtype_from_name(config.precision.param_dtype, "precision.param_dtype"),
        attention_backend=config.attention_backend, remat_unet=config.remat.unet,
        remat_controlnet=config.remat.controlnet, seed=int(config.seed))
    return create_train_state(models, config, mesh)


def train(config, workdir: str | os.PathLike, *,
          distributed: DistributedOptions | None = None) -> TrainResult:
    """Trains (or resumes) in `workdir`; see the module docstring. Raises ConfigError on bad
    input (before any compilation) and TrainingDiverged on a non-finite step."""

    initialize_distributed(distributed)
    workdir = Path(workdir).absolute()
    config = train_config.resolve_train_config(config)
    reference, latest, meta = _check_inputs(config, workdir)
    is_writer = jax.process_index() == 0
    if is_writer:
        train_config.write_workdir_config(config, workdir)
    # Before anything compiles: a resumed run reads the steps the first run compiled.
    try:
        use_compile_cache(config.get("compile_cache", "default"), workdir / COMPILE_CACHE_DIR)
    except CompileCacheError as error:
        raise train_config.ConfigError(f"train config: {error}") from None

    mesh = make_mesh(config.mesh)
    global_batch_size = int(config.pipeline.batch_size) * jax.process_count()
    if global_batch_size % mesh.size:
        raise train_config.ConfigError(
            f"train config: pipeline.batch_size={config.pipeline.batch_size} x "
            f"{jax.process_count()} process(es) = {global_batch_size} is not divisible by the "
            f"{mesh.size} devices; valid: a per-process batch that makes it divisible")

    state, frozen, graphdefs = _create_state(config, mesh)
    noise_schedule = noise_schedule_from_config(load_scheduler_config(config.base_model))

    checkpoints_dir = checkpoint_directory(workdir, config.get("checkpoint_dir", ""))
    checkpoints = TrainCheckpoints(checkpoints_dir, keep=int(config.keep_checkpoints))
    optimizer_layout = optimizer_layout_record(state, mesh, config)
    start_step, data_position = 0, 0
    if latest is not None:
        target, convert = checkpoint_restore_target(state, mesh, config, meta.get("optimizer_layout"))
        state, meta = checkpoints.restore(latest, target)
        if convert is not None:
            _say(f"checkpoint {latest}: optimizer state converted from layout "
                 f"{meta.get('optimizer_layout') or 'per parameter'} to this run's")
            state = convert(state)
        start_step, data_position = int(meta["step"]), int(meta["data_position"])
        if int(np.asarray(state.step)) != start_step:
            raise RuntimeError(f"checkpoint {latest}: state.step={int(np.asarray(state.step))} "
                               f"but meta step={start_step}")
    _summary(config, mesh, state, frozen, global_batch_size, start_step)
    if start_step >= config.total_steps:
        _say(f"nothing to do: the run is at step {start_step} >= total_steps={config.total_steps}; to train on, "
             f"rerun with a larger --config.total_steps")
        checkpoints.close()
        return TrainResult(start_step=start_step, final_step=start_step)

    iterator = make_train_iterator(config.pipeline, start_index=data_position)
    _say(f"data: process {jax.process_index()} of {jax.process_count()} starts at global "
         f"position {data_position}, reading blocks of {config.pipeline.batch_size}")
    first = global_batch(_model_batch(next(iterator), BATCH_KEYS), mesh)
    _say(f"compiling the train step (global batch {global_batch_size} at {config.pipeline.resolution} px; "
         f"compile cache: {jax.config.jax_compilation_cache_dir or 'off'}) ...")
    objective_step = None
    if config.get("objective", "xpsr") == "one_step":
        objective_step = one_step_step_fn(config, graphdefs, noise_schedule, mesh, state)
    step_fn = make_train_step(config, graphdefs, noise_schedule, mesh, state, frozen, first, step_fn=objective_step)
    wait_for_every_process("xpsr_train_step_compiled")  # the first step's collectives start together
    _say(f"compiled the train step in {step_fn.compile_seconds:.1f} s (tracing and lowering "
         f"{step_fn.lower_seconds:.1f} s, XLA {step_fn.compile_seconds - step_fn.lower_seconds:.1f} s, "
         f"{step_fn.cache})" + (f"; {step_fn.flops / 1e9:.1f} GFLOP per device per step" if step_fn.flops else ""))

    writer = MetricsWriter(workdir, resumed_step=start_step if start_step else None) \
        if is_writer else None
    progress = None
    if is_writer:
        progress = progress_bar(total=int(config.total_steps), initial=start_step, desc="train",
                                dynamic_ncols=True, file=sys.stderr)
    validator = None
    if config.validation.every > 0:
        validator = Validator(config, workdir)
    stop = StopSignal()
    any_stop = _AnyProcessFlag(mesh)
    result = TrainResult(start_step=start_step, final_step=start_step,
                         compile_seconds=step_fn.compile_seconds)
    last_saved = latest
    pending: deque = deque()  # (step number, metrics arrays) not yet read on the host
    # Host read times of the last steps: with a step in flight, two reads can come back to back
    # (after a checkpoint save, at the end), so speed is averaged over a window, not one gap.
    read_times: deque = deque([time.perf_counter()], maxlen=SPEED_WINDOW + 1)

    def meta_for(step: int) -> dict:
        return {"version": STATE_VERSION, "step": step,
                "data_position": data_position + (step - start_step) * global_batch_size,
                "global_batch_size": global_batch_size, "process_count": jax.process_count(),
                "frozen_base": reference, "optimizer_layout": optimizer_layout, "config": json.loads(
                    train_config.config_to_json(config))}

    def read(step: int, metrics: Mapping[str, jax.Array]) -> None:
        values = _host_metrics(metrics)
        read_times.append(time.perf_counter())
        step_seconds = (read_times[-1] - read_times[0]) / (len(read_times) - 1)
        if not values.pop("is_finite", 1.0) or not math.isfinite(values["loss"]):
            where = (f"the last good checkpoint is step {last_saved} in "
                     f"{checkpoints_dir}" if last_saved is not None
                     else "no checkpoint was saved")
            raise TrainingDiverged(
                f"non-finite loss or gradient at step {step} (loss={values.get('loss')}, "
                f"grad_norm={values.get('grad_norm')}); stopped without saving; {where}")
        values["images_per_second"] = global_batch_size / max(step_seconds, 1e-9)
        values["step_seconds"] = step_seconds
        if writer is not None and (step % config.log_every == 0 or step == config.total_steps):
            writer.write(step, values)
        if progress is not None:
            progress.update(1)
            terms = " ".join(f"{key} {values[key]:.4f}" for key in PROGRESS_TERMS if key in values)
            progress.set_postfix_str(f"{terms} {values['images_per_second']:.1f} img/s {step_seconds:.2f} s/step",
                                     refresh=False)

    def drain() -> None:
        while pending:
            read(*pending.popleft())

    def save(step: int) -> None:
        nonlocal last_saved
        drain()  # every step up to `step` is finite before its state is written
        checkpoints.save(step, state, meta_for(step))
        last_saved = step

    step, batch, stop_votes = start_step, first, deque()
    try:
        while step < config.total_steps:
            state, metrics = step_fn(state, frozen, batch)
            step += 1
            pending.append((step, metrics))
            stop_votes.append(any_stop(stop.requested))
            if step < config.total_steps:
                batch = global_batch(_model_batch(next(iterator), BATCH_KEYS), mesh)
            while len(pending) > 1:  # keep one step in flight
                read(*pending.popleft())
            stop_now = len(stop_votes) > 1 and bool(np.asarray(stop_votes.popleft()))
            if stop_now or step % config.checkpoint_every == 0 or step == config.total_steps:
                save(step)
            if validator is not None and step % config.validation.every == 0:
                drain()  # validate finite weights only
                weights = state.ema_params if state.ema_params is not None else state.params
                path = validator(step, graphdefs, weights, frozen)
                if path is not None:
                    _say(f"validation grid of step {step}: {path}")
            if stop_now:
                result.stopped_by_signal = stop.signal_name or "SIGTERM (another process)"
                _say(f"stopped by {result.stopped_by_signal} at step {step}; checkpoint saved; "
                     "rerun the same command to resume")
                break
        drain()
        result.final_step = step
    finally:
        stop.restore()
        checkpoints.close()  # waits for the last async save
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
    if not result.stopped_by_signal and last_saved is not None:
        _say(f"done: step {result.final_step}; last checkpoint {checkpoints_dir / str(last_saved)}")
    return result
