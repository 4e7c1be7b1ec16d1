"""The train state and the jitted, sharded, ahead-of-time compiled train step.

The four networks are split ONCE (`create_train_state`): trainable parameters (the official
split, `trainable.py`) go into `TrainState.params` with their optimizer state; everything else
is `frozen` (no optimizer state, no weight gradients, stored in the frozen dtype). The optimizer
state is kept in the flat layout of `flat.py` (a few large buffers), so clipping, AdamW and the
finite guard compile to a handful of fused ops; checkpoints hold it as it is, with the layout in
their meta (`checkpoint_restore_target` converts when a run resumes with another one). The
step is a plain `jax.jit` of a module-level pure function of (state, frozen, batch); the networks are
merged inside the loss, so gradients still flow through the frozen UNet into the ControlNet.
Per-step randomness is `fold_in(state.rng, state.step)`: resuming needs only the step.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from xpsr_jax.cli_config import invalid_value
from xpsr_jax.compile_cache import watch_compile
from xpsr_jax.models.dtypes import dtype_from_name
from xpsr_jax.training.flat import FlatLayout
from xpsr_jax.training.loss import latent_shape_for, sample_loss_draws, xpsr_loss
from xpsr_jax.training.loss_scale import (
    LOSS_SCALINGS,
    all_finite,
    initial_loss_scale,
    scaled_value_and_grad,
    update_loss_scale,
)
from xpsr_jax.training.models import XPSRModels
from xpsr_jax.training.optimizer import ema_update, learning_rate_at, make_optimizer
from xpsr_jax.training.sharding import batch_sharding, replicated, tree_shardings
from xpsr_jax.training.trainable import MODEL_NAMES, split_trainable

TRAINABLE_MODELS = ("unet", "controlnet")

# XLA options for a train step on CPU devices (config key `xla_cpu_fast_compile`; figures in
# benchmarks/README.md, "Compile time"). Without YNNPACK fusions the tiny step loads from the
# compile cache in about 8 s instead of 25-28 s: XLA:CPU's loader searches the whole program once
# per YNNPACK fusion. LLVM at optimisation level 1 then compiles it faster (39 s vs 44 s) at no
# cost in step time; level 0 is faster still but triples the step.
CPU_FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 1, "xla_cpu_experimental_ynn_fusion_type": ""}


@struct.dataclass
class TrainState:
    """step: int32 scalar (micro-steps done); params: {"unet", "controlnet"} -> nnx.State of the
    trainable parameters; opt_state: optax state of the params' flat layout (`flat_layout`);
    rng: uint32[2] key of the per-step draws; ema_params: like params, or None when ema_decay
    is 0; loss_scale: a LossScaleState with precision.loss_scaling="dynamic", else None."""

    step: jax.Array
    params: dict
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None
    loss_scale: Any = None


class CompiledTrainStep(NamedTuple):
    """`compiled(state, frozen, batch) -> (state, metrics)`; the state argument is donated.

    flops: XLA's cost-analysis FLOP count of one step (of the partitioned per-device program),
    None where the backend gives none. compile_seconds = lower_seconds (Python tracing and
    lowering, which no cache skips) + XLA's compile (or the cache read); cache: where it came from.
    """

    compiled: Any
    compile_seconds: float
    flops: float | None
    lower_seconds: float = 0.0
    cache: str = "compiled"

    def __call__(self, state: TrainState, frozen: Any, batch: Mapping[str, jax.Array]):
        return self.compiled(state, frozen, batch)


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def split_models(models: XPSRModels) -> tuple[dict, dict, dict]:
    """(graphdefs, trainable, frozen), dicts by model name; trainable has unet and controlnet."""
    graphdefs, trainable, frozen = {}, {}, {}
    for name in MODEL_NAMES:
        graphdefs[name], params, frozen[name] = split_trainable(getattr(models, name), name)
        if name in TRAINABLE_MODELS:
            trainable[name] = params
    return graphdefs, trainable, frozen


def merge_models(graphdefs: Mapping[str, Any], params: Mapping[str, Any], frozen: Mapping[str, Any]) -> XPSRModels:
    """The four networks from the split state (for the loss, validation and export)."""
    return XPSRModels(**{name: nnx.merge(graphdefs[name], params[name], frozen[name]) if name in params
                         else nnx.merge(graphdefs[name], frozen[name]) for name in MODEL_NAMES})


def flat_layout(params: Any, mesh: Mesh, config: Any) -> FlatLayout:
    """The flat layout of the trainable params under this run's sharding rule."""
    return FlatLayout.for_params(params, fsdp_size=mesh.shape["fsdp"], shard=bool(config.mesh.shard_trainable),
                                 shard_optimizer=bool(config.mesh.get("shard_optimizer", False)))


def state_shardings(state: TrainState, mesh: Mesh, config: Any) -> TrainState:
    """Shardings of a TrainState: params / EMA by the fsdp rule when mesh.shard_trainable, else
    replicated; the flat optimizer state split the same way (`FlatLayout.shardings`); step and
    rng replicated."""
    layout = flat_layout(state.params, mesh, config)
    shard = bool(config.mesh.shard_trainable)
    return TrainState(step=replicated(mesh), params=tree_shardings(state.params, mesh, shard=shard),
                      opt_state=layout.tree_shardings(state.opt_state, mesh), rng=replicated(mesh),
                      ema_params=None if state.ema_params is None
                      else tree_shardings(state.ema_params, mesh, shard=shard),
                      loss_scale=None if state.loss_scale is None
                      else jax.tree.map(lambda _: replicated(mesh), state.loss_scale))


def optimizer_layout_record(state: TrainState, mesh: Mesh, config: Any) -> dict:
    """The flat layout of `state.opt_state` as JSON (kept in each checkpoint's meta)."""
    return flat_layout(state.params, mesh, config).record()


def _with_shardings(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings)


def checkpoint_restore_target(state: TrainState, mesh: Mesh, config: Any,
                              saved_layout: Mapping[str, Any] | None) -> tuple[TrainState, Any]:
    """(abstract state to restore a checkpoint into, conversion to this run's state or None).

    A checkpoint holds the optimizer state in the flat layout it was trained with (its meta's
    `optimizer_layout`). The same layout (the usual resume, or another data-parallel size)
    restores as it is. Another one (a new fsdp size or sharding switch) or none (a checkpoint
    from before the flat layout: per-parameter optimizer state) restores replicated and is
    converted through the per-parameter form by one jitted program.
    """
    layout = flat_layout(state.params, mesh, config)
    running = _with_shardings(state, state_shardings(state, mesh, config))
    if saved_layout is not None and dict(saved_layout) == layout.record():
        return running, None
    if saved_layout is None:
        source = None
    else:
        source = FlatLayout.for_params(state.params, fsdp_size=int(saved_layout.get("fsdp_size", 1)),
                                       shard=bool(saved_layout.get("shard", False)),
                                       shard_optimizer=bool(saved_layout.get("shard_optimizer", False)))
        if source.record() != dict(saved_layout):
            raise ValueError(f"the checkpoint's optimizer layout {dict(saved_layout)} does not fit this run's "
                             f"trainable parameters (expected groups {source.record()['groups']}): was it "
                             "written with another precision.param_dtype or model?")

    def to_source(opt_state):
        per_parameter = layout.to_per_parameter(opt_state)
        return per_parameter if source is None else source.from_per_parameter(per_parameter)

    saved_opt_state = jax.eval_shape(to_source, state.opt_state)
    target = running.replace(opt_state=_with_shardings(
        saved_opt_state, jax.tree.map(lambda _: replicated(mesh), saved_opt_state)))

    def convert(saved: TrainState) -> TrainState:
        per_parameter = saved.opt_state if source is None else source.to_per_parameter(saved.opt_state)
        return saved.replace(opt_state=layout.from_per_parameter(per_parameter))

    return target, jax.jit(convert, out_shardings=state_shardings(state, mesh, config), donate_argnums=(0,))


def frozen_shardings(frozen: Any, mesh: Mesh, config: Any) -> Any:
    return tree_shardings(frozen, mesh, shard=bool(config.mesh.shard_frozen))


def _check_precision(config: Any) -> None:
    if config.precision.loss_scaling not in LOSS_SCALINGS:
        raise invalid_value("precision.loss_scaling", config.precision.loss_scaling,
                            " | ".join(LOSS_SCALINGS) + ' (float16 compute needs "dynamic"; bfloat16 none)')


def run_optimizer(config: Any) -> optax.GradientTransformation:
    """The run's optimizer, built the same way where the state is made and where the step is."""
    return make_optimizer(config.optimizer, int(config.total_steps))


def create_train_state(models: XPSRModels, config: Any, mesh: Mesh) -> tuple[TrainState, dict, dict]:
    """(state, frozen, graphdefs), placed on `mesh` by the config's sharding rules.

    Trainable params are cast to precision.param_dtype, frozen ones to precision.frozen_dtype.
    The optimizer state is initialised under jit straight into its sharding.
    """
    graphdefs, params, frozen = split_models(models)
    state, frozen = place_train_state(params, frozen, config, mesh, run_optimizer(config))
    return state, frozen, graphdefs


def place_train_state(params: Any, frozen: Any, config: Any, mesh: Mesh,
                      tx: optax.GradientTransformation) -> tuple[TrainState, Any]:
    """(TrainState, frozen) of split trainable / frozen trees (any objective's), cast and placed
    by the config's precision and sharding rules, the optimizer state of `tx` made under jit."""
    _check_precision(config)
    param_dtype = dtype_from_name(config.precision.param_dtype, "precision.param_dtype")
    frozen_dtype = dtype_from_name(config.precision.frozen_dtype, "precision.frozen_dtype")
    params = _cast_floats(params, param_dtype)
    frozen = _cast_floats(frozen, frozen_dtype)
    shard = bool(config.mesh.shard_trainable)
    params = jax.device_put(params, tree_shardings(params, mesh, shard=shard))
    frozen = jax.device_put(frozen, frozen_shardings(frozen, mesh, config))
    layout = flat_layout(params, mesh, config)

    def init(params):
        return tx.init(layout.flatten(params))

    opt_state = jax.jit(init, out_shardings=layout.tree_shardings(jax.eval_shape(init, params), mesh))(params)
    ema = None
    if float(config.optimizer.ema_decay) > 0:
        ema = jax.tree.map(jnp.copy, params)
    rng = jax.device_put(jax.random.PRNGKey(int(config.seed)), replicated(mesh))
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh))
    loss_scale = None
    if config.precision.loss_scaling == "dynamic":
        loss_scale = jax.device_put(initial_loss_scale(), replicated(mesh))
    state = TrainState(step=step, params=params, opt_state=opt_state, rng=rng, ema_params=ema, loss_scale=loss_scale)
    return state, frozen


def _where_tree(condition: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


def train_step(state: TrainState, frozen: Any, batch: Mapping[str, jax.Array], *, graphdefs: Mapping[str, Any],
               tx: optax.GradientTransformation, layout: FlatLayout, noise_schedule: Any, dfc_weight: float,
               optimizer_config: Any, total_steps: int) -> tuple[TrainState, dict[str, jax.Array]]:
    """One micro-step: loss and gradients of the trainable params, then the optimizer update.

    A non-finite loss or gradient leaves params / optimizer state unchanged (is_finite = False in
    the metrics; the loop stops on it). With dynamic loss scaling an overflowing gradient is
    expected now and then: that step is skipped and the scale halved (metrics `loss_scale`,
    `skipped`); only a non-finite loss stops the run. Clipping, AdamW and the guard run on the
    flat buffers of `layout`; the new params are split back into tensors.
    """
    key = jax.random.fold_in(state.rng, state.step)
    vae = nnx.merge(graphdefs["vae"], frozen["vae"])
    pixel_values = batch["pixel_values"]
    draws = sample_loss_draws(key, pixel_values.shape[0], latent_shape_for(vae, pixel_values.shape),
                              noise_schedule.num_train_timesteps)

    def loss_fn(params):
        models = merge_models(graphdefs, params, frozen)
        return xpsr_loss(models, batch, draws, noise_schedule=noise_schedule, dfc_weight=dfc_weight)

    loss_scale = state.loss_scale
    if loss_scale is None:
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    else:
        (loss, terms), grads = scaled_value_and_grad(loss_fn, loss_scale)(state.params)
    new_state, grad_norm, grads_finite, apply = apply_gradients(state, grads, loss, tx=tx, layout=layout,
                                                                optimizer_config=optimizer_config)
    metrics = {**terms, "grad_norm": grad_norm,
               "learning_rate": learning_rate_at(optimizer_config, total_steps, state.step)}
    if loss_scale is None:
        metrics["is_finite"] = apply
    else:
        metrics.update(is_finite=jnp.isfinite(loss), loss_scale=loss_scale.scale, skipped=~apply)
        loss_scale = update_loss_scale(loss_scale, grads_finite)
    return new_state.replace(loss_scale=loss_scale), metrics


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array, *, tx: optax.GradientTransformation,
                    layout: FlatLayout, optimizer_config: Any) -> tuple[TrainState, jax.Array, jax.Array, jax.Array]:
    """(state one step on, grad norm, gradients finite, update applied): the optimizer update of
    `grads` (a tree like state.params) on the flat buffers of `layout`; a non-finite loss or
    gradient leaves params, optimizer state and EMA unchanged."""
    grads = layout.flatten(grads)
    old_params = layout.flatten(state.params)
    grad_norm = optax.tree.norm(grads)
    grads_finite = all_finite(grads)
    apply = jnp.isfinite(loss) & grads_finite
    updates, opt_state = tx.update(grads, state.opt_state, old_params)
    params = layout.unflatten(_where_tree(apply, optax.apply_updates(old_params, updates), old_params))
    opt_state = _where_tree(apply, opt_state, state.opt_state)
    ema = state.ema_params
    if ema is not None:
        accumulation = int(optimizer_config.gradient_accumulation_steps)
        updated = apply & ((state.step + 1) % accumulation == 0)  # only when the weights moved
        ema = _where_tree(updated, ema_update(ema, params, float(optimizer_config.ema_decay)), ema)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new_state, grad_norm, grads_finite, apply


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def lower_train_step(config: Any, graphdefs: Mapping[str, Any], noise_schedule: Any, mesh: Mesh,
                     state: TrainState, frozen: Any, batch: Mapping[str, Any], *,
                     step_fn: Any = None) -> tuple[Any, float]:
    """jax.jit of `train_step` (or `step_fn(state, frozen, batch)`, another objective's step) with
    explicit in/out shardings and the state donated, lowered for the shapes of (state, frozen,
    batch) (arrays or ShapeDtypeStructs); returns (lowered, seconds).

    Lowering traces the NNX modules, which must happen on one thread at a time; compiling the
    result (`compile_train_step`) may run in other threads (XLA compiles outside the GIL).
    """
    _check_precision(config)
    if step_fn is None:
        step_fn = functools.partial(train_step, graphdefs=graphdefs, tx=run_optimizer(config),
                                    layout=flat_layout(state.params, mesh, config), noise_schedule=noise_schedule,
                                    dfc_weight=float(config.loss.dfc_weight), optimizer_config=config.optimizer,
                                    total_steps=int(config.total_steps))
    state_sh = state_shardings(state, mesh, config)
    batch_sh = {key: batch_sharding(mesh) for key in batch}
    jitted = jax.jit(step_fn, in_shardings=(state_sh, frozen_shardings(frozen, mesh, config), batch_sh),
                     out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,))
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # the mesh kernels under shard_map (the "splash" attention) split over
        lowered = jitted.lower(_abstract(state), _abstract(frozen), _abstract(batch))
    return lowered, time.perf_counter() - start


def train_compiler_options(config: Any, mesh: Mesh) -> dict | None:
    """The XLA options the train step compiles with: CPU_FAST_COMPILE_OPTIONS when every device
    of `mesh` is a CPU and `xla_cpu_fast_compile` is on, else None (XLA's defaults)."""
    if not config.get("xla_cpu_fast_compile", True):
        return None
    if {device.platform for device in mesh.devices.flat} != {"cpu"}:
        return None
    return dict(CPU_FAST_COMPILE_OPTIONS)


def compile_train_step(lowered: Any, lower_seconds: float = 0.0,
                       compiler_options: Mapping[str, Any] | None = None) -> CompiledTrainStep:
    """XLA-compiles a `lower_train_step` result with `compiler_options` (XLA options, e.g.
    `train_compiler_options`; part of the compile cache's key); compile_seconds counts the
    lowering too."""
    start = time.perf_counter()
    with watch_compile() as record:
        compiled = lowered.compile(compiler_options=dict(compiler_options) if compiler_options else None)
    return CompiledTrainStep(compiled=compiled, compile_seconds=lower_seconds + time.perf_counter() - start,
                             flops=_flops(compiled), lower_seconds=lower_seconds, cache=record.describe())


def make_train_step(config: Any, graphdefs: Mapping[str, Any], noise_schedule: Any, mesh: Mesh,
                    state: TrainState, frozen: Any, batch: Mapping[str, Any], *,
                    step_fn: Any = None) -> CompiledTrainStep:
    """The train step lowered (`lower_train_step`) and compiled now for the shapes of
    (state, frozen, batch)."""
    return compile_train_step(*lower_train_step(config, graphdefs, noise_schedule, mesh, state, frozen, batch,
                                                step_fn=step_fn),
                              compiler_options=train_compiler_options(config, mesh))


def _per_device_bytes(tree: Any) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else np.shape(leaf)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def count_parameters(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))


def memory_estimate(state: TrainState, frozen: Any, batch_per_device: int | None = None,
                    resolution: int | None = None) -> dict[str, Any]:
    """Bytes per device of the trainable params, optimizer state, EMA and frozen params, the
    parameter counts, and a rough note on activations (which XLA's memory stats measure)."""
    estimate = {
        "trainable_parameters": count_parameters(state.params),
        "frozen_parameters": count_parameters(frozen),
        "params_bytes": _per_device_bytes(state.params),
        "opt_state_bytes": _per_device_bytes(state.opt_state),
        "ema_bytes": _per_device_bytes(state.ema_params) if state.ema_params is not None else 0,
        "frozen_bytes": _per_device_bytes(frozen),
    }
    estimate["gradients_bytes"] = estimate["params_bytes"]  # one gradient per trainable tensor, transient
    estimate["total_state_bytes"] = sum(estimate[k] for k in ("params_bytes", "opt_state_bytes", "ema_bytes",
                                                              "frozen_bytes", "gradients_bytes"))
    note = "activations not included: they scale with per-device batch x resolution^2 and the remat policy"
    if batch_per_device and resolution:
        note += f" (per-device batch {batch_per_device} at {resolution} px)"
    estimate["activation_note"] = note
    return estimate


def format_memory_estimate(estimate: Mapping[str, Any]) -> str:
    gib = 1024 ** 3
    return (f"trainable {estimate['trainable_parameters']:,} params, frozen {estimate['frozen_parameters']:,}; "
            f"per device: params {estimate['params_bytes'] / gib:.2f} GiB, optimizer "
            f"{estimate['opt_state_bytes'] / gib:.2f} GiB, EMA {estimate['ema_bytes'] / gib:.2f} GiB, gradients "
            f"{estimate['gradients_bytes'] / gib:.2f} GiB, frozen {estimate['frozen_bytes'] / gib:.2f} GiB, "
            f"total {estimate['total_state_bytes'] / gib:.2f} GiB + activations ({estimate['activation_note']})")
