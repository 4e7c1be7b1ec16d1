"""XPSR ControlNet reference: UNet-encoder copy with SFA, pyramid image encoder, latent heads.

    model = XPSRControlNetTorch(config: Mapping)                 # official config.json keys
    out = model(sample, timestep, encoder_hidden_states, lowlevel_encoder_hidden_states,
                controlnet_cond, conditioning_scale=1.0) -> XPSRControlNetOutput
    model = XPSRControlNetTorch.from_unet(unet, controlnet_conditioning_channel_order="rgb",
                                          conditioning_embedding_out_channels=(16, 32, 96, 256),
                                          load_weights_from_unet=True, **config_overrides)

The official forward (``models/xpsr/controlnet.py`` ``ControlNetModel.forward``, called with
``return_dict=False`` in train.py) returns the tuple
``(degradation_rgb, degradation_rgb_mid, down_block_res_samples, mid_block_res_sample,
controlnet_cond_mid)``; XPSRControlNetOutput names them ``latent_preds``, ``latent_pred_mid``,
``down_block_res_samples``, ``mid_block_res_sample``, ``rgb_preds`` (``to_official_tuple()``
gives the official tuple back).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from .blocks import UNetMidBlock2DCrossAttn
from .config import resolve_controlnet_config
from .init_rules import InitReport, load_with_official_rule
from .unet import build_encoder_blocks, timestep_embedding_input


# The UNet config keys the official from_unet passes on to the ControlNet.
FROM_UNET_KEYS = (
    "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
    "addition_embed_type", "addition_time_embed_dim", "in_channels", "flip_sin_to_cos",
    "freq_shift", "down_block_types", "only_cross_attention", "block_out_channels",
    "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim",
    "num_attention_heads", "use_linear_projection", "class_embed_type", "num_class_embeds",
    "upcast_attention", "resnet_time_scale_shift", "projection_class_embeddings_input_dim",
)


@dataclass
class XPSRControlNetOutput:
    """down_block_res_samples: one residual per UNet skip (scaled by conditioning_scale);
    mid_block_res_sample: scaled; latent_preds: conv_degradation[i] on each UNSCALED zero-conv
    output (empty when use_latent_pred is off); latent_pred_mid: conv_degradation_mid (or None);
    rgb_preds: to_rgbs outputs at 1/2, 1/4, 1/8 of the conditioning image (empty when
    return_rgbs is off)."""

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor
    latent_preds: list[torch.Tensor]
    latent_pred_mid: torch.Tensor | None
    rgb_preds: list[torch.Tensor]

    def to_official_tuple(self) -> tuple:
        """The official ``return_dict=False`` tuple (rgb list is None when return_rgbs is off)."""
        return (tuple(self.latent_preds), self.latent_pred_mid, list(self.down_block_res_samples),
                self.mid_block_res_sample, self.rgb_preds or None)


def zero_module(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


class ResidualDenseBlock(nn.Module):
    """ESRGAN residual dense block (basicsr ``ResidualDenseBlock``): 5 dense 3x3 convs."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        for i in range(5):
            out = num_feat if i == 4 else num_grow_ch
            conv = nn.Conv2d(num_feat + i * num_grow_ch, out, 3, 1, 1)
            # basicsr default_init_weights(scale=0.1): kaiming normal * 0.1, zero bias.
            nn.init.kaiming_normal_(conv.weight)
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)
            setattr(self, f"conv{i + 1}", conv)

    def forward(self, x):
        features = [x]
        for i in range(1, 5):
            features.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(features, 1)), 0.2))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block (basicsr ``RRDB``): rdb1..rdb3, output * 0.2 + input."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class PyramidConditioningEmbedding(nn.Module):
    """``controlnet_cond_embedding``: forward(image) -> (embedding, rgb_preds).

    conv_in 3x3 + SiLU, [preprocesser: 2 RRDBs if use_rrdb], then per stage i a 3x3 conv (same
    width) + SiLU and a 3x3 stride-2 conv (padding 1) to the next width + SiLU; after each
    stride-2 conv, to_rgbs[i] (3x3 conv -> 3 channels, no activation) predicts the image at that
    scale; conv_out (3x3, zero-initialised) maps to the UNet's first width.
    """

    def __init__(self, embedding_channels: int, conditioning_channels: int, widths: list[int],
                 return_rgbs: bool, use_rrdb: bool):
        super().__init__()
        self.return_rgbs = return_rgbs
        self.conv_in = nn.Conv2d(conditioning_channels, widths[0], kernel_size=3, padding=1)
        self.preprocesser = (
            nn.Sequential(*(RRDB(widths[0], widths[0]) for _ in range(2))) if use_rrdb else None
        )
        self.blocks = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(width_in, width_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(width_in, width_out, kernel_size=3, padding=1, stride=2))
            if return_rgbs:
                self.to_rgbs.append(nn.Conv2d(width_out, 3, kernel_size=3, padding=1))
        self.conv_out = zero_module(
            nn.Conv2d(widths[-1], embedding_channels, kernel_size=3, padding=1)
        )

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = F.silu(self.conv_in(image))
        if self.preprocesser is not None:
            h = self.preprocesser(h)
        rgb_preds = []
        for i, block in enumerate(self.blocks):
            h = F.silu(block(h))
            if i % 2 == 1 and self.return_rgbs:
                rgb_preds.append(self.to_rgbs[i // 2](h))
        return self.conv_out(h), rgb_preds


def _latent_head(channels: int, latent_channels: int) -> nn.Sequential:
    # Sequential as in the official code, hence the ".0." in conv_degradation.{i}.0.weight.
    return nn.Sequential(nn.Conv2d(channels, latent_channels, kernel_size=3, padding=1))


class XPSRControlNetTorch(nn.Module):
    """The XPSR ControlNet (official state-dict names and config keys)."""

    def __init__(self, config: Mapping):
        super().__init__()
        source = "XPSRControlNetTorch config"
        self.config = resolve_controlnet_config(config, source)
        config = self.config
        widths = config["block_out_channels"]
        time_dim = widths[0] * 4
        latent_channels = config["in_channels"]

        self.conv_in = nn.Conv2d(config["in_channels"], widths[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(widths[0], config["flip_sin_to_cos"], config["freq_shift"])
        self.time_embedding = TimestepEmbedding(widths[0], time_dim, act_fn=config["act_fn"])
        self.controlnet_cond_embedding = PyramidConditioningEmbedding(
            widths[0],
            config["conditioning_channels"],
            config["conditioning_embedding_out_channels"],
            config["return_rgbs"],
            config["use_rrdb"],
        )
        self.down_blocks, mid_spec, _ = build_encoder_blocks(
            config, source, config["use_lowlevel_prompt"], time_dim
        )
        # One zero conv (+ latent head) per UNet skip: conv_in, each layer, each downsampler.
        skip_widths = [widths[0]]
        for i, width in enumerate(widths):
            downsampled = [width] if i < len(widths) - 1 else []
            skip_widths += [width] * config["layers_per_block"] + downsampled
        use_heads = config["use_latent_pred"]
        self.controlnet_down_blocks = nn.ModuleList(
            zero_module(nn.Conv2d(w, w, kernel_size=1)) for w in skip_widths
        )
        self.conv_degradation = nn.ModuleList(
            _latent_head(w, latent_channels) if use_heads else None for w in skip_widths
        )
        self.controlnet_mid_block = zero_module(nn.Conv2d(widths[-1], widths[-1], kernel_size=1))
        self.conv_degradation_mid = _latent_head(widths[-1], latent_channels) if use_heads else None
        self.mid_block = UNetMidBlock2DCrossAttn(mid_spec, widths[-1],
                                                 config["use_lowlevel_prompt"])
        self.init_report: InitReport | None = None

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        lowlevel_encoder_hidden_states: torch.Tensor | None,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
    ) -> XPSRControlNetOutput:
        """sample: noisy latent (B, 4, h, w); controlnet_cond: image (B, 3, 8h, 8w) in [0, 1]."""
        if self.config["controlnet_conditioning_channel_order"] == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        t_emb = self.time_proj(timestep_embedding_input(timestep, sample)).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb)
        high, low = encoder_hidden_states, lowlevel_encoder_hidden_states

        h = self.conv_in(sample)
        cond_embedding, rgb_preds = self.controlnet_cond_embedding(controlnet_cond)
        if cond_embedding.shape != h.shape:
            raise ValueError(
                f"XPSRControlNetTorch.forward: controlnet_cond {tuple(controlnet_cond.shape)} "
                f"embeds to {tuple(cond_embedding.shape)} but the latent gives {tuple(h.shape)}; "
                f"the image must be {2 ** (len(self.controlnet_cond_embedding.blocks) // 2)}x "
                "the latent size"
            )
        h = h + cond_embedding
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, high, low)
            skips += block_skips
        h = self.mid_block(h, emb, high, low)

        residuals = [zero_conv(skip) for zero_conv, skip in zip(self.controlnet_down_blocks, skips)]
        mid_residual = self.controlnet_mid_block(h)
        latent_preds, latent_pred_mid = [], None
        if self.config["use_latent_pred"]:
            # Heads see the zero-conv outputs BEFORE conditioning_scale.
            latent_preds = [head(r) for head, r in zip(self.conv_degradation, residuals)]
            latent_pred_mid = self.conv_degradation_mid(mid_residual)

        residuals = [r * conditioning_scale for r in residuals]
        mid_residual = mid_residual * conditioning_scale
        if self.config["global_pool_conditions"]:
            residuals = [r.mean(dim=(2, 3), keepdim=True) for r in residuals]
            mid_residual = mid_residual.mean(dim=(2, 3), keepdim=True)
        return XPSRControlNetOutput(tuple(residuals), mid_residual, latent_preds, latent_pred_mid,
                                    rgb_preds)

    @classmethod
    def from_unet(cls, unet: nn.Module, controlnet_conditioning_channel_order: str = "rgb",
                  conditioning_embedding_out_channels=(16, 32, 96, 256),
                  load_weights_from_unet: bool = True,
                  **config_overrides) -> "XPSRControlNetTorch":
        """Official ``ControlNetModel.from_unet``.

        ``unet``: ``XPSRUNetTorch`` or diffusers ``UNet2DConditionModel`` (anything with
        ``.config`` and a state dict with the SD names). The encoder config keys are read from
        ``unet.config``; XPSR switches take the official ControlNet defaults (use_lowlevel_prompt,
        return_rgbs, use_latent_pred True; use_rrdb False) unless given in ``config_overrides``.

        Weights (``load_weights_from_unet``): conv_in and time_embedding are copied; down_blocks
        and mid_block follow the official rule: same-name same-shape tensors copied, every
        ``attentions_lowlevel``/``attentions_connect`` tensor copied from the UNet's ``attentions``
        tensor of the same name EVEN WHEN the UNet has SFA weights of its own, shape mismatches
        (connect attn2.to_k/to_v) fresh. Fresh: controlnet_cond_embedding (its conv_out zero),
        conv_degradation*, plus zero ``controlnet_down_blocks``/``controlnet_mid_block``. The
        down/mid report is ``model.init_report``.
        """
        unet_config = dict(unet.config)
        config = {key: unet_config[key] for key in FROM_UNET_KEYS if key in unet_config}
        config.update(
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=list(conditioning_embedding_out_channels),
            **config_overrides,
        )
        controlnet = cls(config)
        if load_weights_from_unet:
            source = unet.state_dict()
            with torch.no_grad():
                for name in ("conv_in", "time_embedding"):
                    prefix = name + "."
                    part = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
                    getattr(controlnet, name).load_state_dict(part)  # strict, as officially
            controlnet.init_report = load_with_official_rule(
                controlnet, source, prefixes=("down_blocks.", "mid_block.")
            )
        return controlnet
