"""Tests of the PyTorch XPSR reference (tests/torch_reference), the parity oracle of xpsr_jax.

Checked against diffusers' own UNet2DConditionModel / ControlNetModel where the architectures
coincide, against the official forward semantics (hooks on every pixel / SFA attention), and
against the official initialisation rules key by key. Tiny CPU models only.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel
from tests.torch_reference import (
    XPSRControlNetTorch,
    XPSRUNetTorch,
    randomize_all_parameters,
    resolve_controlnet_config,
    resolve_unet_config,
    tiny_controlnet_config,
    tiny_unet_config,
    tokens,
)

BATCH = 2
LATENT_HW = (8, 12)  # non-square; 12 is no multiple of 8, so upsample sizes are forwarded
CONTEXT_DIM = 24  # tiny configs' cross_attention_dim
UNET_XPSR_KEYS = {"down_use_lowlevel_prompt", "mid_use_lowlevel_prompt", "up_use_lowlevel_prompt"}
CONTROLNET_XPSR_KEYS = {"return_rgbs", "use_rrdb", "use_lowlevel_prompt", "use_latent_pred"}
SFA_ALL_ON = dict(down_use_lowlevel_prompt=True, mid_use_lowlevel_prompt=True,
                  up_use_lowlevel_prompt=[True] * 4)
TINY_PYRAMID = (4, 8, 12, 16)


def make_inputs(seed: int, latent_hw=LATENT_HW) -> dict:
    generator = torch.Generator().manual_seed(seed)
    height, width = latent_hw
    return dict(
        sample=torch.randn(BATCH, 4, height, width, generator=generator),
        timestep=torch.tensor([10, 613]),
        high=torch.randn(BATCH, 5, CONTEXT_DIM, generator=generator),
        low=torch.randn(BATCH, 7, CONTEXT_DIM, generator=generator),
        image=torch.rand(BATCH, 3, 8 * height, 8 * width, generator=generator),
    )


def skip_shapes(config: dict, latent_hw=LATENT_HW) -> tuple[list[tuple], tuple]:
    """(C, H, W) of every UNet skip connection in order, and of the mid block, from the config."""
    widths, layers = config["block_out_channels"], config["layers_per_block"]
    height, width = latent_hw
    shapes = [(widths[0], height, width)]
    for i, channels in enumerate(widths):
        shapes += [(channels, height, width)] * layers
        if i < len(widths) - 1:
            height, width = (height + 1) // 2, (width + 1) // 2  # 3x3 stride-2 conv, padding 1
            shapes.append((channels, height, width))
    return shapes, (widths[-1], height, width)


def random_residuals(config: dict, seed: int, scale: float = 0.5):
    """Random ControlNet-like residuals: (list for the skips, mid-block residual)."""
    generator = torch.Generator().manual_seed(seed)
    shapes, mid_shape = skip_shapes(config)
    down = [scale * torch.randn(BATCH, *shape, generator=generator) for shape in shapes]
    return down, scale * torch.randn(BATCH, *mid_shape, generator=generator)


def diffusers_model(cls, config: dict, xpsr_keys: set):
    """The diffusers model of the same config; only the XPSR keys may be left out."""
    accepted = set(inspect.signature(cls.__init__).parameters)
    dropped = set(config) - accepted
    assert dropped <= xpsr_keys, f"config keys diffusers does not take: {dropped - xpsr_keys}"
    return cls(**{k: v for k, v in config.items() if k in accepted})


def sfa_origin(key: str) -> str:
    """The attentions key of an SFA key, spelled out independently of the package."""
    for name in ("attentions_lowlevel", "attentions_connect"):
        key = key.replace(name, "attentions")
    return key


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    return float((a - b).abs().max())


def is_sfa_key(key: str) -> bool:
    return ".attentions_lowlevel." in key or ".attentions_connect." in key


def transformer_name_filter(*kinds: str):
    """Matches names of the Transformer2D modules themselves, e.g. 'up_blocks.1.attentions.2'."""
    kinds_pattern = "|".join(kinds)
    pattern = re.compile(rf"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.({kinds_pattern})\.\d+$")
    return lambda name: pattern.match(name) is not None


class Recorder:
    """Forward (pre-)hooks on named Transformer2D modules: last input, context and output."""

    def __init__(self, model: torch.nn.Module, name_filter):
        self.calls: dict[str, dict] = {}
        self.handles = []
        for name, module in model.named_modules():
            if name_filter(name):
                pre = module.register_forward_pre_hook(self._pre(name), with_kwargs=True)
                self.handles += [pre, module.register_forward_hook(self._post(name))]

    def _pre(self, name):
        def hook(module, args, kwargs):
            self.calls[name] = {"input": args[0].detach().clone(),
                                "context": kwargs.get("encoder_hidden_states")}
        return hook

    def _post(self, name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.calls[name]["output"] = out.detach().clone()
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


# ----------------------------------------------------------------------------------------- UNet

@pytest.mark.parametrize(
    "overrides",
    [
        {},
        # SD 2.x flavour: linear projections, per-block head counts; plus per-block switches whose
        # order flips on the way up.
        dict(use_linear_projection=True, attention_head_dim=[1, 2, 2, 4],
             only_cross_attention=[True, False, False, False],
             transformer_layers_per_block=[2, 1, 1, 1]),
    ],
    ids=["sd1-conv-proj", "sd2-linear-proj"],
)
def test_unet_matches_diffusers_unet(overrides):
    config = tiny_unet_config(**overrides)
    reference = diffusers_model(UNet2DConditionModel, config, UNET_XPSR_KEYS).eval()
    randomize_all_parameters(reference, seed=1)
    ours = XPSRUNetTorch(config).eval()
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=False)
    assert unexpected == []
    pixel_keys = {k for k in ours.state_dict() if ".pixel_attentions." in k}
    assert pixel_keys and set(missing) == pixel_keys

    x = make_inputs(seed=2)
    args = (x["sample"], x["timestep"], x["high"])
    with torch.no_grad():
        assert max_abs(ours(*args), reference(*args).sample) < 1e-5

        # With ControlNet residuals and every pixel attention made the identity (zero proj_out),
        # the residuals must act exactly like diffusers' ControlNet residuals (added to skips/mid).
        down, mid = random_residuals(config, seed=3)
        for name, param in ours.named_parameters():
            if ".pixel_attentions." in name and ".proj_out." in name:
                param.zero_()
        want = reference(*args, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        got = ours(*args, None, down, mid)
        assert max_abs(got, want) < 1e-5
        assert max_abs(got, ours(*args)) > 1e-3  # the residuals do matter


def test_pixel_attentions_get_the_residual_of_their_skip():
    config = tiny_unet_config(up_use_lowlevel_prompt=[True, True, False, True])
    model = randomize_all_parameters(XPSRUNetTorch(config).eval(), seed=4)
    x = make_inputs(seed=5)
    args = (x["sample"], x["timestep"], x["high"], x["low"])
    down, mid = random_residuals(config, seed=6)
    skips, _ = skip_shapes(config)
    recorder = Recorder(model, transformer_name_filter("pixel_attentions", "attentions",
                                                       "attentions_connect"))
    resnet_out = {}
    for i, block in enumerate(model.up_blocks):
        for j, resnet in enumerate(block.resnets):
            resnet.register_forward_hook(
                lambda m, a, out, key=(i, j): resnet_out.__setitem__(key, out.detach()))
    with torch.no_grad():
        model(*args, down, mid)

    consumed = 0
    for i, block in enumerate(model.up_blocks):
        for j in range(len(block.resnets)):
            index = len(skips) - 1 - consumed  # residuals are consumed from the end, like skips
            consumed += 1
            call = recorder.calls[f"up_blocks.{i}.pixel_attentions.{j}"]
            assert torch.equal(call["context"], tokens(down[index])), (i, j, index)
            if hasattr(block, "attentions"):
                last = "attentions_connect" if block.use_lowlevel_prompt else "attentions"
                before = recorder.calls[f"up_blocks.{i}.{last}.{j}"]["output"]
            else:
                before = resnet_out[(i, j)]  # UpBlock2D: straight after the resnet
            assert torch.equal(call["input"], before), (i, j)
    assert consumed == len(skips)
    assert torch.equal(tokens(down[0])[0, 13], down[0][0, :, 1, 1])  # (h, w) row-major tokens

    # No residuals: the pixel attentions do not run. All-zero residuals: they DO run and change
    # the output (attn2 on zero keys/values still adds to_out's bias; attn1 and ff run as usual).
    recorder.calls.clear()
    with torch.no_grad():
        plain = model(*args)
        assert not any(".pixel_attentions." in name for name in recorder.calls)
        zeros = model(*args, [torch.zeros_like(d) for d in down], torch.zeros_like(mid))
    assert all(f"up_blocks.{i}.pixel_attentions.0" in recorder.calls for i in range(4))
    assert max_abs(plain, zeros) > 1e-3
    recorder.remove()


def test_semantic_fusion_attention_blocks_and_forward():
    flags = dict(down_use_lowlevel_prompt=True, mid_use_lowlevel_prompt=True,
                 up_use_lowlevel_prompt=[True, False, True, True])
    model = randomize_all_parameters(XPSRUNetTorch(tiny_unet_config(**flags)).eval(), seed=7)
    # Which blocks get SFA: every cross-attention down block, the mid block, and up block i iff
    # flag i is on AND it has attentions (UpBlock2D at position 0 ignores its flag).
    with_sfa = {name.rsplit(".attentions_lowlevel.", 1)[0] for name in model.state_dict()
                if ".attentions_lowlevel." in name}
    assert with_sfa == {"down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
                        "up_blocks.2", "up_blocks.3"}

    x = make_inputs(seed=8)
    recorder = Recorder(model, transformer_name_filter("attentions", "attentions_lowlevel",
                                                       "attentions_connect"))
    with torch.no_grad():
        fused = model(x["sample"], x["timestep"], x["high"], x["low"])
    connects = [n for n in recorder.calls if ".attentions_connect." in n]
    assert len(connects) == 3 * 2 + 1 + 2 * 3
    for name in connects:
        high_call = recorder.calls[name.replace("attentions_connect", "attentions")]
        low_call = recorder.calls[name.replace("attentions_connect", "attentions_lowlevel")]
        call = recorder.calls[name]
        # Both branches see the resnet output; each attends to its own prompt embedding.
        assert torch.equal(low_call["input"], high_call["input"])
        assert torch.equal(high_call["context"], x["high"])
        assert torch.equal(low_call["context"], x["low"])
        assert torch.equal(call["input"], high_call["output"])
        assert torch.equal(call["context"], tokens(low_call["output"]))

    # Without a low-level embedding SFA collapses to h = attentions[k](h): the same network as an
    # SFA-free UNet with the shared weights.
    recorder.calls.clear()
    plain = XPSRUNetTorch(tiny_unet_config()).eval()
    _, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert set(unexpected) == {k for k in model.state_dict() if is_sfa_key(k)}
    with torch.no_grad():
        without_low = model(x["sample"], x["timestep"], x["high"])
        assert not any("lowlevel" in n or "connect" in n for n in recorder.calls)
        assert max_abs(without_low, plain(x["sample"], x["timestep"], x["high"])) < 1e-6
    assert max_abs(without_low, fused) > 1e-3
    recorder.remove()


# ----------------------------------------------------------------------------------- ControlNet

def test_controlnet_matches_diffusers_controlnet():
    config = tiny_controlnet_config()
    reference = diffusers_model(ControlNetModel, config, CONTROLNET_XPSR_KEYS).eval()
    randomize_all_parameters(reference, seed=9)
    ours = XPSRControlNetTorch(config).eval()
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=False)
    assert unexpected == []
    assert set(missing) == {k for k in ours.state_dict() if is_sfa_key(k) or ".to_rgbs." in k
                            or k.startswith("conv_degradation")}

    x = make_inputs(seed=10)
    args = (x["sample"], x["timestep"], x["high"])
    with torch.no_grad():
        want_down, want_mid = reference(*args, x["image"], conditioning_scale=0.7,
                                        return_dict=False)
        # No low-level embedding: SFA is inactive and the plain ControlNet remains.
        out = ours(*args, None, x["image"], conditioning_scale=0.7)
        with_low = ours(*args, x["low"], x["image"], conditioning_scale=0.7)
    assert len(out.down_block_res_samples) == len(want_down) == 12
    for got, want in zip(out.down_block_res_samples, want_down):
        assert max_abs(got, want) < 1e-5
    assert max_abs(out.mid_block_res_sample, want_mid) < 1e-5
    assert max_abs(with_low.mid_block_res_sample, want_mid) > 1e-3  # SFA is wired in


def _pyramid_oracle(state: dict, image: torch.Tensor) -> list[torch.Tensor]:
    """The pyramid encoder's rgb predictions written out with F.conv2d from its parameters."""

    def conv(h, name, stride=1):
        weight = state[f"controlnet_cond_embedding.{name}.weight"]
        bias = state[f"controlnet_cond_embedding.{name}.bias"]
        return F.conv2d(h, weight, bias, padding=1, stride=stride)

    h = F.silu(conv(image, "conv_in"))
    rgbs = []
    for stage in range(3):
        h = F.silu(conv(h, f"blocks.{2 * stage}"))
        h = F.silu(conv(h, f"blocks.{2 * stage + 1}", stride=2))
        rgbs.append(conv(h, f"to_rgbs.{stage}"))
    return rgbs


def test_controlnet_heads_and_pyramid_encoder():
    model = XPSRControlNetTorch(tiny_controlnet_config()).eval()
    randomize_all_parameters(model, seed=11)
    state = model.state_dict()
    x = make_inputs(seed=12)
    scale = 0.5
    with torch.no_grad():
        out = model(x["sample"], x["timestep"], x["high"], x["low"], x["image"],
                    conditioning_scale=scale)
        want_rgbs = _pyramid_oracle(state, x["image"])

    image_h, image_w = x["image"].shape[-2:]
    assert [tuple(r.shape) for r in out.rgb_preds] == [
        (BATCH, 3, image_h // f, image_w // f) for f in (2, 4, 8)]
    for got, want in zip(out.rgb_preds, want_rgbs):
        assert max_abs(got, want) < 1e-5

    # Latent heads run on the zero-conv outputs before conditioning_scale.
    skips, mid_shape = skip_shapes(model.config)
    assert len(out.latent_preds) == len(out.down_block_res_samples) == len(skips)
    for i, (pred, residual) in enumerate(zip(out.latent_preds, out.down_block_res_samples)):
        assert tuple(residual.shape[1:]) == skips[i]
        want = F.conv2d(residual / scale, state[f"conv_degradation.{i}.0.weight"],
                        state[f"conv_degradation.{i}.0.bias"], padding=1)
        assert pred.shape == (BATCH, 4, *skips[i][1:]) and max_abs(pred, want) < 1e-5
    want_mid = F.conv2d(out.mid_block_res_sample / scale, state["conv_degradation_mid.0.weight"],
                        state["conv_degradation_mid.0.bias"], padding=1)
    assert max_abs(out.latent_pred_mid, want_mid) < 1e-5
    assert tuple(out.mid_block_res_sample.shape[1:]) == mid_shape

    official = out.to_official_tuple()
    assert official[0] == tuple(out.latent_preds) and official[1] is out.latent_pred_mid
    assert official[2] == list(out.down_block_res_samples) and official[4] is out.rgb_preds


def test_controlnet_switches():
    full = XPSRControlNetTorch(tiny_controlnet_config()).eval()
    randomize_all_parameters(full, seed=13)
    weights = full.state_dict()
    bare = XPSRControlNetTorch(tiny_controlnet_config(
        return_rgbs=False, use_latent_pred=False, use_lowlevel_prompt=False)).eval()
    _, unexpected = bare.load_state_dict(weights, strict=False)
    assert unexpected and all(is_sfa_key(k) or ".to_rgbs." in k or k.startswith("conv_degradation")
                              for k in unexpected)
    flipped = XPSRControlNetTorch(
        tiny_controlnet_config(controlnet_conditioning_channel_order="bgr")).eval()
    flipped.load_state_dict(weights)
    pooling = XPSRControlNetTorch(tiny_controlnet_config(global_pool_conditions=True)).eval()
    pooling.load_state_dict(weights)

    x = make_inputs(seed=14)
    args = (x["sample"], x["timestep"], x["high"])
    with torch.no_grad():
        want = full(*args, None, x["image"])
        got = bare(*args, x["low"], x["image"])  # low is ignored without SFA
        bgr = flipped(*args, None, x["image"].flip(1))
        pooled = pooling(*args, None, x["image"])
    assert got.rgb_preds == [] and got.latent_preds == [] and got.latent_pred_mid is None
    assert got.to_official_tuple()[4] is None
    for a, b, c, d in zip(got.down_block_res_samples, want.down_block_res_samples,
                          bgr.down_block_res_samples, pooled.down_block_res_samples):
        assert max_abs(a, b) < 1e-6 and max_abs(c, b) < 1e-6
        assert max_abs(d, b.mean(dim=(2, 3), keepdim=True)) < 1e-6

    rrdb = XPSRControlNetTorch(tiny_controlnet_config(use_rrdb=True)).state_dict()
    rrdb_keys = [k for k in rrdb if ".preprocesser." in k]
    assert len(rrdb_keys) == 2 * 3 * 5 * 2  # 2 RRDBs x 3 dense blocks x 5 convs x (w, b)
    feat = TINY_PYRAMID[0]  # RRDB(num_feat, num_grow_ch) with both = the first pyramid width
    conv5 = rrdb["controlnet_cond_embedding.preprocesser.1.rdb3.conv5.weight"]
    assert conv5.shape == (feat, feat + 4 * feat, 3, 3)


# -------------------------------------------------------------------------- initialisation rules

def test_controlnet_from_unet_init_rule():
    unet = randomize_all_parameters(XPSRUNetTorch(tiny_unet_config(**SFA_ALL_ON)), seed=15)
    torch.manual_seed(16)
    controlnet = XPSRControlNetTorch.from_unet(unet,
                                               conditioning_embedding_out_channels=TINY_PYRAMID)
    torch.manual_seed(16)
    fresh = XPSRControlNetTorch(controlnet.config).state_dict()
    source = unet.state_dict()
    fresh_sfa = set()
    for key, value in controlnet.state_dict().items():
        encoder = key.startswith(("down_blocks.", "mid_block."))
        if key.startswith(("conv_in.", "time_embedding.")) or (encoder and not is_sfa_key(key)):
            assert torch.equal(value, source[key]), key
        elif encoder:
            if source[sfa_origin(key)].shape == value.shape:
                assert torch.equal(value, source[sfa_origin(key)]), key
                assert not torch.equal(value, source[key]), key  # the UNet's own SFA is NOT used
            else:
                assert torch.equal(value, fresh[key]), key
                fresh_sfa.add(key)
        elif key.startswith(("controlnet_down_blocks.", "controlnet_mid_block.",
                             "controlnet_cond_embedding.conv_out.")):
            assert not value.any(), key
        else:
            assert torch.equal(value, fresh[key]), key
    layers = {"down_blocks.0": 2, "down_blocks.1": 2, "down_blocks.2": 2, "mid_block": 1}
    assert fresh_sfa == {
        f"{block}.attentions_connect.{k}.transformer_blocks.0.attn2.{proj}.weight"
        for block, count in layers.items() for k in range(count) for proj in ("to_k", "to_v")}
    assert set(controlnet.init_report.fresh) == fresh_sfa

    # A diffusers UNet works as the source too.
    plain = diffusers_model(UNet2DConditionModel, tiny_unet_config(), UNET_XPSR_KEYS)
    from_diffusers = XPSRControlNetTorch.from_unet(plain,
                                                   conditioning_embedding_out_channels=TINY_PYRAMID)
    key = "mid_block.attentions_lowlevel.0.proj_in.weight"
    assert torch.equal(from_diffusers.state_dict()[key], plain.state_dict()[sfa_origin(key)])


def test_unet_from_sd_unet_init_rule():
    sd_config = tiny_unet_config()
    sd_unet = diffusers_model(UNet2DConditionModel, sd_config, UNET_XPSR_KEYS)
    randomize_all_parameters(sd_unet, seed=17)
    source = sd_unet.state_dict()
    flags = dict(down_use_lowlevel_prompt=True, mid_use_lowlevel_prompt=True,
                 up_use_lowlevel_prompt=[False, True, True, True])
    torch.manual_seed(18)
    model = XPSRUNetTorch.from_sd_unet(sd_unet, config_overrides=flags)
    torch.manual_seed(18)
    fresh = XPSRUNetTorch(model.config).state_dict()
    counts = {"copied": 0, "sfa": 0, "fresh": 0}
    for key, value in model.state_dict().items():
        if ".pixel_attentions." in key:
            assert torch.equal(value, fresh[key]), key
            counts["fresh"] += 1
        elif is_sfa_key(key) and source[sfa_origin(key)].shape == value.shape:
            assert torch.equal(value, source[sfa_origin(key)]), key
            counts["sfa"] += 1
        elif is_sfa_key(key):
            assert ".attn2.to_k." in key or ".attn2.to_v." in key, key
            assert torch.equal(value, fresh[key]), key
            counts["fresh"] += 1
        else:
            assert torch.equal(value, source[key]), key
            counts["copied"] += 1
    assert min(counts.values()) > 0
    assert len(model.init_report.fresh) == counts["fresh"]

    # From a bare state dict: SD 1.5 base config, updated by the overrides.
    torch.manual_seed(18)
    from_dict = XPSRUNetTorch.from_sd_unet(source, config_overrides={**sd_config, **flags})
    from_dict_state = from_dict.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(from_dict_state[key], value), key

    # Loading an XPSR UNet that already has (trained) SFA weights re-copies them from attentions.
    trained = randomize_all_parameters(XPSRUNetTorch(model.config), seed=19).state_dict()
    reloaded = XPSRUNetTorch.from_sd_unet(trained, config_overrides=model.config).state_dict()
    key = "up_blocks.3.attentions_lowlevel.2.transformer_blocks.0.attn2.to_q.weight"
    assert torch.equal(reloaded[key], trained[sfa_origin(key)])
    assert not torch.equal(reloaded[key], trained[key])


# ---------------------------------------------------------------------- names, randomiser, config

def test_state_dict_names_and_shapes():
    unet_config = tiny_unet_config(**SFA_ALL_ON)
    unet = XPSRUNetTorch(unet_config)
    controlnet = XPSRControlNetTorch(tiny_controlnet_config())
    unet_keys, controlnet_keys = unet.state_dict(), controlnet.state_dict()
    print(f"\n# XPSRUNetTorch(tiny_unet_config(**SFA_ALL_ON)): {len(unet_keys)} keys")
    print("\n".join(f"{k} {tuple(v.shape)}" for k, v in unet_keys.items()))
    print(f"\n# XPSRControlNetTorch(tiny_controlnet_config()): {len(controlnet_keys)} keys")
    print("\n".join(f"{k} {tuple(v.shape)}" for k, v in controlnet_keys.items()))

    for prefix in ("down_blocks.0.attentions_lowlevel.0.", "mid_block.attentions_connect.0.",
                   "up_blocks.0.pixel_attentions.2.", "up_blocks.3.attentions_connect.2."):
        assert any(k.startswith(prefix) for k in unet_keys), prefix
    skips, _ = skip_shapes(unet_config)
    consumed = 0
    for i, block in enumerate(unet.up_blocks):
        out_channels = block.resnets[0].out_channels
        for j in range(len(block.resnets)):
            skip_channels = skips[len(skips) - 1 - consumed][0]
            consumed += 1
            attn2 = "transformer_blocks.0.attn2.to_k.weight"
            pixel = unet_keys[f"up_blocks.{i}.pixel_attentions.{j}.{attn2}"]
            assert pixel.shape == (out_channels, skip_channels), (i, j)
            if i > 0:
                connect = unet_keys[f"up_blocks.{i}.attentions_connect.{j}.{attn2}"]
                lowlevel = unet_keys[f"up_blocks.{i}.attentions_lowlevel.{j}.{attn2}"]
                assert connect.shape == (out_channels, out_channels)
                assert lowlevel.shape == (out_channels, CONTEXT_DIM)

    widths = [shape[0] for shape in skips]
    zero_convs = [controlnet_keys[f"controlnet_down_blocks.{i}.weight"] for i in range(len(widths))]
    heads = [controlnet_keys[f"conv_degradation.{i}.0.weight"] for i in range(len(widths))]
    assert [w.shape for w in zero_convs] == [(c, c, 1, 1) for c in widths]
    assert [w.shape for w in heads] == [(4, c, 3, 3) for c in widths]
    assert f"controlnet_down_blocks.{len(widths)}.weight" not in controlnet_keys
    assert controlnet_keys["controlnet_mid_block.weight"].shape == (64, 64, 1, 1)
    assert controlnet_keys["conv_degradation_mid.0.weight"].shape == (4, 64, 3, 3)
    embedding = {k.removeprefix("controlnet_cond_embedding."): v.shape
                 for k, v in controlnet_keys.items() if k.startswith("controlnet_cond_embedding.")}
    assert [embedding[f"to_rgbs.{i}.weight"] for i in range(3)] == [
        (3, w, 3, 3) for w in TINY_PYRAMID[1:]]
    assert embedding["conv_in.weight"] == (TINY_PYRAMID[0], 3, 3, 3)
    assert embedding["blocks.5.weight"] == (TINY_PYRAMID[3], TINY_PYRAMID[2], 3, 3)
    assert embedding["conv_out.weight"] == (32, TINY_PYRAMID[3], 3, 3)
    assert any(k.startswith("down_blocks.2.attentions_connect.1.") for k in controlnet_keys)
    assert not any(k.startswith("down_blocks.3.attentions") for k in controlnet_keys)


def test_randomized_parameters_all_reach_the_output():
    unet = randomize_all_parameters(XPSRUNetTorch(tiny_unet_config(**SFA_ALL_ON)), seed=20)
    controlnet = randomize_all_parameters(XPSRControlNetTorch(tiny_controlnet_config()), seed=21)
    again = randomize_all_parameters(XPSRControlNetTorch(tiny_controlnet_config()), seed=21)
    assert all(torch.equal(a, b) for a, b in zip(controlnet.parameters(), again.parameters()))
    assert all(p.abs().min() > 0 for p in controlnet.parameters())  # zero-init layers included

    x = make_inputs(seed=22)
    out = controlnet(x["sample"], x["timestep"], x["high"], x["low"], x["image"])
    eps = unet(x["sample"], x["timestep"], x["high"], x["low"], out.down_block_res_samples,
               out.mid_block_res_sample)
    assert 0.05 < float(eps.detach().std()) < 20.0  # O(1) activations after randomisation
    side_outputs = out.latent_preds + out.rgb_preds + [out.latent_pred_mid]
    loss = eps.square().mean() + sum(p.square().mean() for p in side_outputs)
    loss.backward()
    for model in (unet, controlnet):
        dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
        assert dead == []


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="up_use_lowlevel_prompt"):
        resolve_unet_config({"up_use_lowlevel_prompt": [True, False]})
    with pytest.raises(ValueError, match="class_embed_type"):
        resolve_unet_config({"class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="not divisible by its head count"):
        resolve_unet_config({"block_out_channels": [32, 32, 64, 64], "norm_num_groups": 4,
                             "attention_head_dim": 3})
    with pytest.raises(ValueError, match="layers_per_block"):
        resolve_controlnet_config({"layers_per_block": [2, 2, 2, 2]})
    with pytest.raises(ValueError, match="use_lowlevel_prompts"):
        tiny_unet_config(use_lowlevel_prompts=True)
    with pytest.warns(UserWarning, match="made_up_key"):
        resolve_unet_config({"made_up_key": 1, "_class_name": "UNet2DConditionModel"})
    model = XPSRControlNetTorch(tiny_controlnet_config())
    x = make_inputs(seed=23)
    with pytest.raises(ValueError, match="8x the latent size"):
        model(x["sample"], x["timestep"], x["high"], None, x["image"][..., ::2, :])
