"""UNet blocks of the XPSR reference, built from diffusers' public layers.

State-dict names follow the official release (``models/xpsr/unet_2d_blocks.py``):

    CrossAttnDownBlock2D:     attentions, [attentions_lowlevel, attentions_connect], resnets,
                              downsamplers
    DownBlock2D:              resnets, downsamplers
    UNetMidBlock2DCrossAttn:  attentions, [attentions_lowlevel, attentions_connect], resnets
    CrossAttnUpBlock2D:       attentions, resnets, pixel_attentions, [attentions_lowlevel,
                              attentions_connect], upsamplers
    UpBlock2D:                resnets, pixel_attentions, upsamplers

(``[...]`` only where Semantic-Fusion Attention, SFA, is switched on.) Registration order is the
official one, so ``state_dict()`` lists keys in the official order too.

Layer k of an attention block runs ``h = resnets[k](h, temb)`` and then ``attend(k, h, ...)``:
``hi = attentions[k](h, high)``; with SFA and a low-level embedding
``lo = attentions_lowlevel[k](h, low)`` and ``h = attentions_connect[k](hi, tokens(lo))``,
otherwise ``h = hi``. Up blocks then run ``pixel_attentions[k](h, tokens(r))`` when a ControlNet
residual r is given for that layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn


def tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), tokens in row-major (h, w) order.

    The official code writes this as ``x.view(B, C, -1).permute(0, 2, 1)`` (SFA) and
    ``rearrange(x, 'b c h w -> b (h w) c')`` (pixel attention); both give this order.
    """
    return x.flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class LayerSpec:
    """What every ResNet and Transformer2D of one block is built with."""

    temb_channels: int
    groups: int
    eps: float
    act_fn: str
    time_scale_shift: str
    heads: int
    transformer_layers: int
    context_dim: int
    use_linear_projection: bool
    only_cross_attention: bool
    upcast_attention: bool
    output_scale_factor: float = 1.0

    def resnet(self, in_channels: int, out_channels: int) -> ResnetBlock2D:
        return ResnetBlock2D(
            in_channels=in_channels,
            out_channels=out_channels,
            temb_channels=self.temb_channels,
            eps=self.eps,
            groups=self.groups,
            dropout=0.0,
            time_embedding_norm=self.time_scale_shift,
            non_linearity=self.act_fn,
            output_scale_factor=self.output_scale_factor,
            pre_norm=True,
        )

    def transformer(self, channels: int, context_dim: int | None = None) -> Transformer2DModel:
        """Transformer2D with `heads` heads of width channels // heads (SD convention)."""
        return Transformer2DModel(
            self.heads,
            channels // self.heads,
            in_channels=channels,
            num_layers=self.transformer_layers,
            cross_attention_dim=self.context_dim if context_dim is None else context_dim,
            norm_num_groups=self.groups,
            use_linear_projection=self.use_linear_projection,
            only_cross_attention=self.only_cross_attention,
            upcast_attention=self.upcast_attention,
        )


def _transformer_out(transformer: Transformer2DModel, h: torch.Tensor,
                     context: torch.Tensor) -> torch.Tensor:
    return transformer(h, encoder_hidden_states=context, return_dict=False)[0]


class SemanticFusion:
    """Mixin: builds attentions (+ SFA lists) and runs layer k's (semantic-fusion) attention."""

    use_lowlevel_prompt: bool

    def _build_attentions(self, spec: LayerSpec, channels: int, count: int,
                          use_lowlevel_prompt: bool):
        self.use_lowlevel_prompt = use_lowlevel_prompt
        self.attentions = nn.ModuleList(spec.transformer(channels) for _ in range(count))
        if use_lowlevel_prompt:
            self.attentions_lowlevel = nn.ModuleList(
                spec.transformer(channels) for _ in range(count)
            )
            # attn2 of the connect block attends to the low-level branch's tokens (width=channels).
            self.attentions_connect = nn.ModuleList(
                spec.transformer(channels, context_dim=channels) for _ in range(count)
            )

    def attend(self, k: int, h: torch.Tensor, high: torch.Tensor,
               low: torch.Tensor | None) -> torch.Tensor:
        high_out = _transformer_out(self.attentions[k], h, high)
        if not self.use_lowlevel_prompt or low is None:
            return high_out
        low_out = _transformer_out(self.attentions_lowlevel[k], h, low)
        return _transformer_out(self.attentions_connect[k], high_out, tokens(low_out))


class CrossAttnDownBlock2D(nn.Module, SemanticFusion):
    """forward(h, temb, high, low) -> (h, skips): a skip per layer, plus one after downsampling."""

    def __init__(self, spec: LayerSpec, in_channels: int, out_channels: int, num_layers: int,
                 add_downsample: bool, downsample_padding: int, use_lowlevel_prompt: bool):
        super().__init__()
        self._build_attentions(spec, out_channels, num_layers, use_lowlevel_prompt)
        self.resnets = _down_resnets(spec, in_channels, out_channels, num_layers)
        self.downsamplers = _downsamplers(out_channels, downsample_padding, add_downsample)

    def forward(self, h, temb, high, low=None):
        skips = []
        for k, resnet in enumerate(self.resnets):
            h = self.attend(k, resnet(h, temb), high, low)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class DownBlock2D(nn.Module):
    """forward(h, temb) -> (h, skips); ResNets only (no attention, no SFA)."""

    def __init__(self, spec: LayerSpec, in_channels: int, out_channels: int, num_layers: int,
                 add_downsample: bool, downsample_padding: int):
        super().__init__()
        self.resnets = _down_resnets(spec, in_channels, out_channels, num_layers)
        self.downsamplers = _downsamplers(out_channels, downsample_padding, add_downsample)

    def forward(self, h, temb, high=None, low=None):
        skips = []
        for resnet in self.resnets:
            h = resnet(h, temb)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UNetMidBlock2DCrossAttn(nn.Module, SemanticFusion):
    """forward(h, temb, high, low) -> h: resnet, then (attention/SFA, resnet) once."""

    def __init__(self, spec: LayerSpec, channels: int, use_lowlevel_prompt: bool):
        super().__init__()
        self._build_attentions(spec, channels, 1, use_lowlevel_prompt)
        self.resnets = nn.ModuleList(spec.resnet(channels, channels) for _ in range(2))

    def forward(self, h, temb, high, low=None):
        h = self.resnets[0](h, temb)
        for k, resnet in enumerate(self.resnets[1:]):
            h = resnet(self.attend(k, h, high, low), temb)
        return h


class _UpBlock(nn.Module):
    """Shared up-path logic: concat the skip, resnet, attention (if any), pixel attention."""

    has_attentions = False

    def _build_resnets(self, spec, in_channels, prev_output_channel, out_channels, num_layers):
        """Returns the skip width of each layer (the last layer takes the lower block's width)."""
        skip_widths, resnets = [], []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            resnets.append(spec.resnet(resnet_in + skip, out_channels))
            skip_widths.append(skip)
        self.resnets = nn.ModuleList(resnets)
        return skip_widths

    def _forward_layers(self, h, skips, temb, high, low, pixel_residuals, upsample_size):
        skips = list(skips)
        pixel_residuals = None if pixel_residuals is None else list(pixel_residuals)
        for k, (resnet, pixel_attention) in enumerate(zip(self.resnets, self.pixel_attentions)):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            if self.has_attentions:
                h = self.attend(k, h, high, low)
            if pixel_residuals is not None:
                # The residual of the same skip connection: both lists are consumed from the end.
                residual = pixel_residuals.pop()
                context_dim = pixel_attention.transformer_blocks[0].attn2.to_k.in_features
                if residual.shape[1] != context_dim:
                    raise ValueError(
                        f"{type(self).__name__}: pixel_attentions[{k}] attends to "
                        f"{context_dim}-channel residuals but got {residual.shape[1]} channels "
                        f"(shape {tuple(residual.shape)})"
                    )
                h = _transformer_out(pixel_attention, h, tokens(residual))
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h


class CrossAttnUpBlock2D(_UpBlock, SemanticFusion):
    """forward(h, skips, temb, high, low, pixel_residuals, upsample_size) -> h."""

    has_attentions = True

    def __init__(self, spec: LayerSpec, in_channels: int, prev_output_channel: int,
                 out_channels: int, num_layers: int, add_upsample: bool, use_lowlevel_prompt: bool):
        super().__init__()
        self.attentions = nn.ModuleList(spec.transformer(out_channels) for _ in range(num_layers))
        skip_widths = self._build_resnets(spec, in_channels, prev_output_channel, out_channels,
                                          num_layers)
        # Official: cross_attention_dim=res_skip_channels, i.e. the ControlNet residual's width.
        self.pixel_attentions = nn.ModuleList(
            spec.transformer(out_channels, context_dim=width) for width in skip_widths
        )
        self.use_lowlevel_prompt = use_lowlevel_prompt
        if use_lowlevel_prompt:
            self.attentions_lowlevel = nn.ModuleList(
                spec.transformer(out_channels) for _ in range(num_layers)
            )
            self.attentions_connect = nn.ModuleList(
                spec.transformer(out_channels, context_dim=out_channels) for _ in range(num_layers)
            )
        self.upsamplers = _upsamplers(out_channels) if add_upsample else None

    def forward(self, h, skips, temb, high, low=None, pixel_residuals=None, upsample_size=None):
        return self._forward_layers(h, skips, temb, high, low, pixel_residuals, upsample_size)


class UpBlock2D(_UpBlock):
    """forward(h, skips, temb, high, low, pixel_residuals, upsample_size) -> h; no SFA."""

    def __init__(self, spec: LayerSpec, in_channels: int, prev_output_channel: int,
                 out_channels: int, num_layers: int, add_upsample: bool):
        super().__init__()
        self._build_resnets(spec, in_channels, prev_output_channel, out_channels, num_layers)
        # Official quirk: context width = out_channels here, not the skip width. Both are equal
        # whenever block_out_channels[-1] == block_out_channels[-2] (SD 1.x/2.x, tiny config).
        self.pixel_attentions = nn.ModuleList(
            spec.transformer(out_channels, context_dim=out_channels) for _ in range(num_layers)
        )
        self.upsamplers = _upsamplers(out_channels) if add_upsample else None

    def forward(self, h, skips, temb, high=None, low=None, pixel_residuals=None,
                upsample_size=None):
        return self._forward_layers(h, skips, temb, high, low, pixel_residuals, upsample_size)


def _down_resnets(spec: LayerSpec, in_channels: int, out_channels: int,
                  num_layers: int) -> nn.ModuleList:
    return nn.ModuleList(
        spec.resnet(in_channels if i == 0 else out_channels, out_channels)
        for i in range(num_layers)
    )


def _downsamplers(channels: int, padding: int, add_downsample: bool) -> nn.ModuleList | None:
    if not add_downsample:
        return None
    # name="op" as in SD; diffusers stores the conv as `.conv` either way.
    conv = Downsample2D(channels, use_conv=True, out_channels=channels, padding=padding, name="op")
    return nn.ModuleList([conv])


def _upsamplers(channels: int) -> nn.ModuleList:
    return nn.ModuleList([Upsample2D(channels, use_conv=True, out_channels=channels)])
