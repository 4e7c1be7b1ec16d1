"""XPSR's denoising UNet: SD UNet + Semantic-Fusion Attention + pixel-aware cross-attention."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from xpsr_jax.models.unet import UNet2DCondition, UNet2DConditionConfig
from xpsr_jax.models.xpsr_init import InitReport, apply_official_init
from xpsr_jax.weights.convert import module_state_dict


@dataclasses.dataclass(frozen=True)
class XPSRUNetConfig(UNet2DConditionConfig):
    """The official XPSR UNet config.json: SD keys plus where SFA is built (all off in the release)."""

    down_use_lowlevel_prompt: bool = False
    mid_use_lowlevel_prompt: bool = False
    up_use_lowlevel_prompt: tuple = (False, False, False, False)

    @classmethod
    def from_sd(cls, sd_config: UNet2DConditionConfig, **overrides: Any) -> "XPSRUNetConfig":
        """The config of the official `from_pretrained_orig`: the SD UNet's keys plus `overrides`
        (e.g. `mid_use_lowlevel_prompt=True`). The one derivation every builder uses."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        values = {name: getattr(sd_config, name) for name in fields if hasattr(sd_config, name)}
        values.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
        config = cls(**values, raw=None)
        config.validate("XPSRUNetConfig.from_sd")
        return config

    def validate(self, source: str) -> None:
        super().validate(source)
        if len(self.up_use_lowlevel_prompt) != len(self.up_block_types):
            raise ValueError(f"{source}: up_use_lowlevel_prompt has {len(self.up_use_lowlevel_prompt)} entries, "
                             f"expected one per up block ({len(self.up_block_types)})")
        if self.num_attention_heads is not None:
            raise ValueError(f"{source}: num_attention_heads={self.num_attention_heads!r} is rejected by the "
                             f"official XPSR UNet; give the head count as attention_head_dim")


class XPSRUNet(UNet2DCondition):
    """`unet(sample, timesteps, encoder_hidden_states, lowlevel_encoder_hidden_states=None,
    down_block_additional_residuals=None, mid_block_additional_residual=None) -> noise prediction`.

    NHWC arrays; timesteps (batch,). With ControlNet residuals (XPSRControlNet's
    `down_block_res_samples` / `mid_block_res_sample`) they are added to the skips and every
    up layer's `pixel_attentions` attends to its residual (all-zero residuals included). Without
    them the pixel attentions are skipped (the official UNet cannot run that way). The low-level
    prompt embedding feeds Semantic-Fusion Attention where the config builds it.
    """

    config_class = XPSRUNetConfig
    pixel_attention = True

    def _uses_lowlevel(self, where: str, index: int = 0) -> bool:
        config = self.config
        if where == "down":
            return bool(config.down_use_lowlevel_prompt)
        if where == "mid":
            return bool(config.mid_use_lowlevel_prompt)
        return bool(config.up_use_lowlevel_prompt[index])

    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 lowlevel_encoder_hidden_states: jax.Array | None = None,
                 down_block_additional_residuals: Sequence[jax.Array] | None = None,
                 mid_block_additional_residual: jax.Array | None = None) -> jax.Array:
        return self.forward(sample, timesteps, encoder_hidden_states, lowlevel_encoder_hidden_states,
                            down_block_additional_residuals, mid_block_additional_residual)

    @classmethod
    def from_sd_unet(cls, sd_unet: UNet2DCondition, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                     param_dtype: Any = jnp.float32, attention_backend: str = "auto",
                     **config_overrides: Any) -> tuple["XPSRUNet", InitReport]:
        """The official `from_pretrained_orig` initialisation from an SD UNet.

        The config is the SD UNet's plus `config_overrides` (e.g. `mid_use_lowlevel_prompt=True`);
        SD tensors are copied, SFA tensors copied from `attentions`, pixel attentions fresh.
        """
        config = XPSRUNetConfig.from_sd(sd_unet.config, **config_overrides)
        model = cls(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend)
        return apply_official_init(model, module_state_dict(sd_unet), source_name="SD UNet")


