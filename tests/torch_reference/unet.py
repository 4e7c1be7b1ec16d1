"""XPSR UNet reference: SD 1.x/2.x UNet + Semantic-Fusion Attention + pixel-aware cross-attention.

    model = XPSRUNetTorch(config: Mapping)                       # official config.json keys
    eps = model(sample, timestep, encoder_hidden_states,
                lowlevel_encoder_hidden_states=None,
                down_block_additional_residuals=None,
                mid_block_additional_residual=None) -> Tensor    # NCHW like diffusers
    model = XPSRUNetTorch.from_sd_unet(diffusers_unet_or_state_dict, config_overrides=None)

Official behaviour reproduced (``models/xpsr/unet_2d_condition.py`` ``forward``): ControlNet
residuals are added to the skip features and the mid-block output; the same (un-summed) residuals
are handed to the up blocks, where each is consumed from the end of the list together with its
skip and feeds that layer's ``pixel_attentions``. Difference: the official forward cannot run
without residuals (it slices ``None``); here the pixel attentions are skipped then. All-zero
residuals are NOT the same as no residuals: the pixel attentions still run on them and change
the output (attn2 over zero keys/values adds its to_out bias; attn1 and the feed-forward run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from diffusers.models.activations import get_activation
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from .blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    LayerSpec,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)
from .config import per_block, resolve_unet_config, sd15_unet_config
from .init_rules import InitReport, load_with_official_rule


def timestep_embedding_input(timestep, sample: torch.Tensor) -> torch.Tensor:
    """Timesteps as a (batch,) tensor, the way the official forward broadcasts them."""
    if not torch.is_tensor(timestep):
        dtype = torch.float64 if isinstance(timestep, float) else torch.int64
        timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
    elif timestep.ndim == 0:
        timestep = timestep[None].to(sample.device)
    return timestep.expand(sample.shape[0])


def build_encoder_blocks(config: dict, source: str, use_lowlevel_prompt: bool,
                         temb_channels: int) -> tuple[nn.ModuleList, LayerSpec, list[LayerSpec]]:
    """(down blocks, mid-block spec, per-down-block specs) as the official UNet and ControlNet
    build their (shared) encoder. Heads = num_attention_heads or attention_head_dim."""
    n = len(config["down_block_types"])
    widths = config["block_out_channels"]
    head_key = "num_attention_heads" if config["num_attention_heads"] else "attention_head_dim"
    heads = per_block(config, head_key, n, source)
    context = per_block(config, "cross_attention_dim", n, source)
    layers = per_block(config, "layers_per_block", n, source)
    transformer_layers = per_block(config, "transformer_layers_per_block", n, source)
    cross_only = per_block(config, "only_cross_attention", n, source)
    specs = [
        LayerSpec(
            temb_channels=temb_channels,
            groups=config["norm_num_groups"],
            eps=config["norm_eps"],
            act_fn=config["act_fn"],
            time_scale_shift=config["resnet_time_scale_shift"],
            heads=heads[i],
            transformer_layers=transformer_layers[i],
            context_dim=context[i],
            use_linear_projection=config["use_linear_projection"],
            only_cross_attention=cross_only[i],
            upcast_attention=config["upcast_attention"],
        )
        for i in range(n)
    ]
    down_blocks = nn.ModuleList()
    out_channels = widths[0]
    for i, block_type in enumerate(config["down_block_types"]):
        in_channels, out_channels = out_channels, widths[i]
        common = dict(in_channels=in_channels, out_channels=out_channels, num_layers=layers[i],
                      add_downsample=i < n - 1, downsample_padding=config["downsample_padding"])
        if block_type == "CrossAttnDownBlock2D":
            down_blocks.append(
                CrossAttnDownBlock2D(specs[i], use_lowlevel_prompt=use_lowlevel_prompt, **common)
            )
        else:
            down_blocks.append(DownBlock2D(specs[i], **common))
    # The official mid block takes no only_cross_attention (always False) but the mid scale factor.
    mid_spec = dataclasses.replace(specs[-1], only_cross_attention=False,
                                   output_scale_factor=config["mid_block_scale_factor"])
    return down_blocks, mid_spec, specs


class XPSRUNetTorch(nn.Module):
    """The XPSR denoising UNet (official state-dict names and config keys)."""

    def __init__(self, config: Mapping):
        super().__init__()
        source = "XPSRUNetTorch config"
        self.config = resolve_unet_config(config, source)
        config = self.config
        widths = config["block_out_channels"]
        n = len(widths)
        time_dim = widths[0] * 4

        in_kernel, out_kernel = config["conv_in_kernel"], config["conv_out_kernel"]
        self.conv_in = nn.Conv2d(config["in_channels"], widths[0], kernel_size=in_kernel,
                                 padding=(in_kernel - 1) // 2)
        self.time_proj = Timesteps(widths[0], config["flip_sin_to_cos"], config["freq_shift"])
        self.time_embedding = TimestepEmbedding(widths[0], time_dim, act_fn=config["act_fn"])

        self.down_blocks, mid_spec, specs = build_encoder_blocks(
            config, source, config["down_use_lowlevel_prompt"], time_dim
        )
        # Registered before mid_block, as in the official __init__ (state-dict order).
        self.up_blocks = nn.ModuleList()
        self.mid_block = UNetMidBlock2DCrossAttn(mid_spec, widths[-1],
                                                 config["mid_use_lowlevel_prompt"])

        layers = per_block(config, "layers_per_block", n, source)
        reversed_widths = list(reversed(widths))
        out_channels = reversed_widths[0]
        for i, block_type in enumerate(config["up_block_types"]):
            prev_output_channel, out_channels = out_channels, reversed_widths[i]
            in_channels = reversed_widths[min(i + 1, n - 1)]
            common = dict(in_channels=in_channels, prev_output_channel=prev_output_channel,
                          out_channels=out_channels, num_layers=layers[n - 1 - i] + 1,
                          add_upsample=i < n - 1)
            spec = specs[n - 1 - i]  # per-block settings are reversed on the way up
            if block_type == "CrossAttnUpBlock2D":
                self.up_blocks.append(CrossAttnUpBlock2D(
                    spec, use_lowlevel_prompt=bool(config["up_use_lowlevel_prompt"][i]), **common))
            else:
                # up_use_lowlevel_prompt[i] is accepted but has no effect here (no attentions).
                self.up_blocks.append(UpBlock2D(spec, **common))

        self.conv_norm_out = nn.GroupNorm(num_channels=widths[0], eps=config["norm_eps"],
                                          num_groups=config["norm_num_groups"])
        self.conv_act = get_activation(config["act_fn"])
        self.conv_out = nn.Conv2d(widths[0], config["out_channels"], kernel_size=out_kernel,
                                  padding=(out_kernel - 1) // 2)
        self.init_report: InitReport | None = None

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        lowlevel_encoder_hidden_states: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise prediction (B, out_channels, H, W). Residuals: both or neither (XPSR never uses
        the official T2I-Adapter path that down-only residuals would select)."""
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError(
                "XPSRUNetTorch.forward: give both down_block_additional_residuals and "
                "mid_block_additional_residual (ControlNet) or neither"
            )
        residuals = down_block_additional_residuals
        residuals = None if residuals is None else list(residuals)
        upsample_factor = 2 ** (len(self.up_blocks) - 1)
        forward_upsample_size = any(s % upsample_factor for s in sample.shape[-2:])

        if self.config["center_input_sample"]:
            sample = 2 * sample - 1.0
        t_emb = self.time_proj(timestep_embedding_input(timestep, sample)).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb)
        high, low = encoder_hidden_states, lowlevel_encoder_hidden_states

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, high, low)
            skips += block_skips

        if residuals is not None:
            if len(residuals) != len(skips):
                raise ValueError(
                    f"XPSRUNetTorch.forward: {len(residuals)} down_block_additional_residuals for "
                    f"{len(skips)} skip connections"
                )
            for i, (skip, residual) in enumerate(zip(skips, residuals)):
                if skip.shape != residual.shape:
                    raise ValueError(
                        f"XPSRUNetTorch.forward: residual {i} has shape {tuple(residual.shape)}, "
                        f"skip {i} has {tuple(skip.shape)}"
                    )
            skips = [skip + residual for skip, residual in zip(skips, residuals)]

        h = self.mid_block(h, emb, high, low)
        if residuals is not None:
            h = h + mid_block_additional_residual

        upsample_size = None
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            block_residuals = None
            if residuals is not None:
                block_residuals, residuals = residuals[-n:], residuals[:-n]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            h = block(h, block_skips, emb, high, low, block_residuals, upsample_size)

        return self.conv_out(self.conv_act(self.conv_norm_out(h)))

    @classmethod
    def from_sd_unet(cls, diffusers_unet_or_state_dict, config_overrides: Mapping | None = None,
                     ) -> "XPSRUNetTorch":
        """Official ``from_pretrained_orig`` initialisation from a Stable Diffusion UNet.

        ``diffusers_unet_or_state_dict``: a module with ``.config`` (diffusers
        ``UNet2DConditionModel`` or ``XPSRUNetTorch``) or a bare state dict; for a state dict the
        base config is SD 1.5's ``unet/config.json`` (``sd15_unet_config()``). ``config_overrides``
        (official keys, e.g. ``{"down_use_lowlevel_prompt": True}``) update that config.

        Rule (``UNet2DConditionModel.from_pretrained_orig``): every tensor whose name and shape
        match the source is copied; each ``attentions_lowlevel``/``attentions_connect`` tensor is
        taken from the ``attentions`` tensor of the same name, even when the source already has
        SFA tensors of its own (the official loader overwrites them); shape mismatches (the
        connect blocks' attn2.to_k/to_v, unless context width == channels) and all
        ``pixel_attentions`` keep their fresh initialisation. The report is ``model.init_report``.
        """
        if isinstance(diffusers_unet_or_state_dict, Mapping):
            base_config, state_dict = sd15_unet_config(), diffusers_unet_or_state_dict
        else:
            base_config = dict(diffusers_unet_or_state_dict.config)
            state_dict = diffusers_unet_or_state_dict.state_dict()
        model = cls({**base_config, **dict(config_overrides or {})})
        model.init_report = load_with_official_rule(model, state_dict)
        return model
