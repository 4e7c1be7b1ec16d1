"""XPSR training core: the trainable split, the objective, optimizer, sharding and the train step."""

from xpsr_jax.training.loss import BATCH_KEYS, LossDraws, sample_loss_draws, xpsr_loss
from xpsr_jax.training.models import XPSRModels, init_xpsr_from_sd, load_training_models
from xpsr_jax.training.optimizer import (
                                    ema_update,
                                    make_learning_rate_schedule,
                                    make_optimizer,
)
from xpsr_jax.training.resize import resize_bilinear
from xpsr_jax.training.sharding import (
                                    batch_sharding,
                                    global_batch,
                                    make_mesh,
                                    tree_shardings,
)
from xpsr_jax.training.step import (
                                    CompiledTrainStep,
                                    TrainState,
                                    create_train_state,
                                    format_memory_estimate,
                                    make_train_step,
                                    memory_estimate,
                                    merge_models,
                                    state_shardings,
)
from xpsr_jax.training.trainable import (
                                    TRAINABLE_UNET_MODULES,
                                    is_trainable_unet_path,
                                    trainable_filter,
)

__all__ = [
    "BATCH_KEYS", "CompiledTrainStep", "LossDraws", "TRAINABLE_UNET_MODULES", "TrainState", "XPSRModels",
    "batch_sharding", "create_train_state", "ema_update", "format_memory_estimate", "global_batch",
    "init_xpsr_from_sd", "is_trainable_unet_path", "load_training_models", "make_learning_rate_schedule",
    "make_mesh", "make_optimizer", "make_train_step", "memory_estimate", "merge_models", "resize_bilinear",
    "sample_loss_draws", "state_shardings", "trainable_filter", "tree_shardings", "xpsr_loss",
]
