"""Training the one-step XPSR (`configs/train.py:one_step`): networks, the trainable split, the step.

The generator (XPSR's ControlNet + UNet, the VAE encoder's LoRA) and the regulariser (LoRA on the
frozen SD 1.5 UNet) train in one jitted step on the same mesh. The official code runs two
optimizers, each AdamW with the same settings and its own gradient clip, one after the other on
the same generator output: here both gradients come from one step (the regulariser's loss takes
the generator's latents before the update, as there), each group is clipped to its own norm,
and one AdamW (elementwise, so the same as two) updates both. The state is the usual TrainState:
`params` = {"unet": XPSR's trainable UNet modules and conv_in, "controlnet", "unet_lora",
"vae_lora", "regulariser_lora"}; checkpoints, resume and sharding are those of XPSR training.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from xpsr_jax.cli_config import ConfigError
from xpsr_jax.models import UNet2DCondition, load_clip_tokenizer, tokenize
from xpsr_jax.models.dtypes import dtype_from_name
from xpsr_jax.models.lora import (
    init_lora,
    lora_scaling,
    osediff_unet_targets,
    osediff_vae_encoder_targets,
    with_lora,
)
from xpsr_jax.models.lpips import LPIPSWeightsError, load_lpips
from xpsr_jax.training.loss import latent_shape_for
from xpsr_jax.training.models import load_training_models
from xpsr_jax.training.one_step import (
    OneStepLoRA,
    OneStepNetworks,
    OneStepWeights,
    one_step_generator_loss,
    regulariser_loss,
    sample_one_step_draws,
)
from xpsr_jax.training.optimizer import learning_rate_at, make_optimizer
from xpsr_jax.training.step import TrainState, apply_gradients, flat_layout, place_train_state
from xpsr_jax.training.trainable import TRAINABLE_UNET_MODULES, is_trainable_unet_path
from xpsr_jax.weights.convert import module_param_names

NETWORK_NAMES = OneStepNetworks._fields
GENERATOR_GROUP = ("unet", "controlnet", "unet_lora", "vae_lora")
LORA_KEYS = {"unet_lora": "unet", "vae_lora": "vae", "regulariser_lora": "regulariser"}


def _generator_unet_filter(path, _value) -> bool:
    # XPSR's trainable modules, and conv_in (osediff.py set_train: unet.conv_in.requires_grad_(True))
    return is_trainable_unet_path(path) or (len(path) > 0 and str(path[0]) == "conv_in")


def trainable_filter(name: str):
    if name == "controlnet":
        return nnx.Param
    if name == "unet":
        return nnx.All(nnx.Param, _generator_unet_filter)
    return nnx.Nothing


class LoRATargets(NamedTuple):
    unet: tuple[str, ...]
    vae: tuple[str, ...]
    regulariser: tuple[str, ...]


def lora_targets(networks: OneStepNetworks) -> LoRATargets:
    """OSEDiff's targets: the generator UNet's SD tensors (not XPSR's own trainable modules, which
    train whole), the VAE encoder, and the whole SD 1.5 UNet for the regulariser."""
    unet = osediff_unet_targets(module_param_names(networks.unet), TRAINABLE_UNET_MODULES)
    regulariser = osediff_unet_targets(module_param_names(networks.sd_unet))
    return LoRATargets(unet=sum(unet.values(), ()), vae=osediff_vae_encoder_targets(module_param_names(networks.vae)),
                       regulariser=sum(regulariser.values(), ()))


def load_one_step_networks(config: Any) -> OneStepNetworks:
    """The networks of a one-step run: XPSR's (from base_model, or init_from: a multi-step
    release), the SD 1.5 UNet of base_model (frozen; VSD's score and the regulariser's base),
    and LPIPS (loss.lpips_backbone, loss.lpips_weights)."""
    dtype = dtype_from_name(config.precision.compute_dtype, "precision.compute_dtype")
    param_dtype = dtype_from_name(config.precision.param_dtype, "precision.param_dtype")
    try:
        lpips = load_lpips(config.loss.lpips_backbone, config.loss.lpips_weights or None, dtype=dtype)
    except LPIPSWeightsError as error:
        raise ConfigError(f"train config: {error}") from None
    models = load_training_models(
        config.base_model, config.init_from, config.model.to_dict(), dtype=dtype, param_dtype=param_dtype,
        attention_backend=config.attention_backend, remat_unet=config.remat.unet,
        remat_controlnet=config.remat.controlnet, seed=int(config.seed))
    sd_unet = UNet2DCondition.from_pretrained(config.base_model, subfolder="unet", dtype=dtype,
                                              param_dtype=param_dtype, attention_backend=config.attention_backend)
    return OneStepNetworks(unet=models.unet, controlnet=models.controlnet, vae=models.vae,
                           text_encoder=models.text_encoder, sd_unet=sd_unet, lpips=lpips)


def initial_lora(networks: OneStepNetworks, rank: int, seed: int) -> dict[str, dict]:
    """Fresh LoRA sets (peft's gaussian init), {"unet_lora", "vae_lora", "regulariser_lora"}."""
    targets = lora_targets(networks)
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), 0x10A), 3)
    return {
        "unet_lora": init_lora(nnx.state(networks.unet, nnx.Param), targets.unet, rank, keys[0]),
        "vae_lora": init_lora(nnx.state(networks.vae, nnx.Param), targets.vae, rank, keys[1]),
        "regulariser_lora": init_lora(nnx.state(networks.sd_unet, nnx.Param), targets.regulariser, rank, keys[2]),
    }


def split_one_step(networks: OneStepNetworks, lora: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """(graphdefs, trainable, frozen) by network name; trainable also holds the LoRA sets."""
    graphdefs, trainable, frozen = {}, dict(lora), {}
    for name in NETWORK_NAMES:
        graphdefs[name], params, frozen[name] = nnx.split(getattr(networks, name), trainable_filter(name), ...)
        if name in ("unet", "controlnet"):
            trainable[name] = params
    return graphdefs, trainable, frozen


def merge_networks(graphdefs: Mapping[str, Any], params: Mapping[str, Any], frozen: Mapping[str, Any]
                   ) -> OneStepNetworks:
    return OneStepNetworks(**{name: nnx.merge(graphdefs[name], params[name], frozen[name]) if name in params
                              else nnx.merge(graphdefs[name], frozen[name]) for name in NETWORK_NAMES})


def merged_generator(graphdefs: Mapping[str, Any], params: Mapping[str, Any], frozen: Mapping[str, Any],
                     scaling: float) -> OneStepNetworks:
    """The trained generator's networks with its LoRA merged into the UNet and the VAE (what
    inference and export use; sd_unet and lpips as stored)."""
    networks = merge_networks(graphdefs, params, frozen)
    return networks._replace(unet=with_lora(networks.unet, params["unet_lora"], scaling),
                             vae=with_lora(networks.vae, params["vae_lora"], scaling))


def one_step_optimizer(config: Any) -> optax.GradientTransformation:
    """AdamW as configured, without its global-norm clip: the step clips each group itself."""
    settings = config.optimizer.to_dict()
    settings["grad_clip_norm"] = 0.0
    return make_optimizer(settings, int(config.total_steps))


def create_one_step_state(networks: OneStepNetworks, config: Any, mesh: Mesh) -> tuple[TrainState, dict, dict]:
    """(state, frozen, graphdefs) of a one-step run, placed like XPSR training's."""
    lora = initial_lora(networks, int(config.one_step.lora_rank), int(config.seed))
    graphdefs, params, frozen = split_one_step(networks, lora)
    state, frozen = place_train_state(params, frozen, config, mesh, one_step_optimizer(config))
    return state, frozen, graphdefs


def negative_prompt_ids(config: Any):
    """(1, 77) token ids of one_step.negative_prompt (the tokenizer of pipeline.tokenizer_path)."""
    return tokenize(load_clip_tokenizer(Path(config.pipeline.tokenizer_path)), [str(config.one_step.negative_prompt)])


def weights_from_config(config: Any) -> OneStepWeights:
    one_step = config.one_step
    return OneStepWeights(l2=float(one_step.lambda_l2), lpips=float(one_step.lambda_lpips),
                          vsd=float(one_step.lambda_vsd), regulariser=float(one_step.lambda_vsd_lora),
                          cfg_vsd=float(one_step.cfg_vsd))


def _clip(grads: Any, max_norm: float) -> Any:
    if max_norm <= 0:
        return grads
    norm = optax.tree.norm(grads)
    return jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / norm).astype(g.dtype), grads)


def one_step_train_step(state: TrainState, frozen: Any, batch: Mapping[str, jax.Array], *,
                        graphdefs: Mapping[str, Any], tx: optax.GradientTransformation, layout: Any,
                        noise_schedule: Any, negative_input_ids: Any, weights: OneStepWeights, scaling: float,
                        clip_norm: float, optimizer_config: Any, total_steps: int
                        ) -> tuple[TrainState, dict[str, jax.Array]]:
    """The generator's loss and gradient, the regulariser's on the generator's latents, each
    clipped to `clip_norm`, one AdamW update of both; a non-finite loss or gradient leaves the
    state unchanged (`is_finite` False)."""
    key = jax.random.fold_in(state.rng, state.step)
    vae = nnx.merge(graphdefs["vae"], frozen["vae"])
    pixel_values = batch["pixel_values"]
    draws = sample_one_step_draws(key, pixel_values.shape[0], latent_shape_for(vae, pixel_values.shape),
                                  noise_schedule.num_train_timesteps)
    negative = jnp.asarray(negative_input_ids)

    def generator_loss(generator):
        params = {**generator, "regulariser_lora": state.params["regulariser_lora"]}
        networks = merge_networks(graphdefs, params, frozen)
        lora = OneStepLoRA(unet=params["unet_lora"], vae=params["vae_lora"], regulariser=params["regulariser_lora"])
        return one_step_generator_loss(networks, lora, scaling, batch, negative, draws,
                                       noise_schedule=noise_schedule, weights=weights)

    generator = {name: state.params[name] for name in GENERATOR_GROUP}
    (loss, (terms, output)), generator_grads = jax.value_and_grad(generator_loss, has_aux=True)(generator)

    sd_unet = nnx.merge(graphdefs["sd_unet"], frozen["sd_unet"])

    def regulariser(regulariser_lora):
        value = regulariser_loss(with_lora(sd_unet, regulariser_lora, scaling), output.latents,
                                 output.highlevel_prompt_embeds, draws.regulariser_timesteps,
                                 draws.regulariser_noise, noise_schedule=noise_schedule)
        return weights.regulariser * value, value

    (_, regulariser_value), regulariser_grads = jax.value_and_grad(regulariser, has_aux=True)(
        state.params["regulariser_lora"])
    grads = {**_clip(generator_grads, clip_norm), "regulariser_lora": _clip(regulariser_grads, clip_norm)}
    total = loss + weights.regulariser * regulariser_value
    new_state, grad_norm, _, apply = apply_gradients(state, grads, total, tx=tx, layout=layout,
                                                     optimizer_config=optimizer_config)
    metrics = {**terms, "regulariser": regulariser_value, "grad_norm": grad_norm, "is_finite": apply,
               "generator_grad_norm": optax.tree.norm(generator_grads),
               "regulariser_grad_norm": optax.tree.norm(regulariser_grads),
               "learning_rate": learning_rate_at(optimizer_config, total_steps, state.step)}
    return new_state, metrics


def one_step_step_fn(config: Any, graphdefs: Mapping[str, Any], noise_schedule: Any, mesh: Mesh,
                     state: TrainState, negative_input_ids: Any = None):
    """The `step_fn` of `make_train_step` for a one-step run; `negative_input_ids` (1, 77) default
    to the tokenized one_step.negative_prompt (a plan from shapes passes any ids)."""
    rank = int(config.one_step.lora_rank)
    if negative_input_ids is None:
        negative_input_ids = negative_prompt_ids(config)
    return functools.partial(
        one_step_train_step, graphdefs=graphdefs, tx=one_step_optimizer(config),
        layout=flat_layout(state.params, mesh, config), noise_schedule=noise_schedule,
        negative_input_ids=negative_input_ids, weights=weights_from_config(config),
        scaling=lora_scaling(rank, float(config.one_step.lora_alpha)),
        clip_norm=float(config.optimizer.grad_clip_norm), optimizer_config=config.optimizer,
        total_steps=int(config.total_steps))
