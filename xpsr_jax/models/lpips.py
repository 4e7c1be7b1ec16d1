"""LPIPS (Zhang et al. 2018, v0.1, VGG trunk) in Flax NNX, as the `lpips` package computes it.

`LPIPS()(x, y)` for NHWC images in [-1, 1] gives (B,) distances: the package's ScalingLayer,
torchvision's VGG16 `features` up to relu5_3, each of the five taps (relu1_2 ... relu5_3)
unit-normalised over channels (eps 1e-10), squared differences weighted by the 1x1 `lin` layers,
averaged over space and summed. The weights come from two PyTorch files: the package's
`weights/v0.1/vgg.pth` (the lin layers) and a torchvision VGG16 checkpoint (the trunk); no
maintained JAX LPIPS reads them.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xpsr_jax.models.layers import conv2d, deinterleave, interleave
from xpsr_jax.weights.convert import load_state_dict_into
from xpsr_jax.weights.files import read_state_dict

# torchvision's VGG16 config "D" features: the index of each conv, and the indices after which a
# 2x2 max pool follows (torchvision's Sequential: conv, ReLU, ..., MaxPool2d(2, 2)).
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
# lpips' vgg16 slices end after these convs (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) ...
TAP_AFTER_CONV = (1, 3, 6, 9, 12)
# ... and the trunk pools before these convs (features 4, 9, 16, 23).
POOL_BEFORE_CONV = (2, 4, 7, 10)
SCALING_SHIFT = (-0.030, -0.088, -0.188)
SCALING_SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10
PACKAGED_LIN_WEIGHTS = os.path.join("weights", "v0.1", "vgg.pth")


class LPIPSWeightsError(FileNotFoundError):
    """An LPIPS weights file is missing or is not what it should be."""


class LPIPS(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        in_channels = (3,) + VGG16_CHANNELS[:-1]
        self.features = nnx.List([conv2d(c_in, c_out, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                  for c_in, c_out in zip(in_channels, VGG16_CHANNELS)])
        self.lins = nnx.List([conv2d(VGG16_CHANNELS[i], 1, 1, use_bias=False, rngs=rngs, dtype=dtype,
                                     param_dtype=param_dtype) for i in TAP_AFTER_CONV])
        self.dtype = dtype

    def taps(self, images: jax.Array) -> list[jax.Array]:
        """The five relu taps of the trunk for scaled images."""
        h = images.astype(self.dtype)
        taps = []
        for i, conv in enumerate(self.features):
            if i in POOL_BEFORE_CONV:
                h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            h = jax.nn.relu(conv(h))
            if i in TAP_AFTER_CONV:
                taps.append(h)
        return taps

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """(B,) LPIPS distances of NHWC images x, y in [-1, 1], float32."""
        shift = jnp.asarray(SCALING_SHIFT, jnp.float32)
        scale = jnp.asarray(SCALING_SCALE, jnp.float32)
        both = interleave(x, y).astype(jnp.float32)  # per example, so a sharded batch stays put
        taps = self.taps((both - shift) / scale)
        total = jnp.zeros((x.shape[0],), jnp.float32)
        for tap, lin in zip(taps, self.lins):
            tap = tap.astype(jnp.float32)
            unit = tap / (jnp.sqrt(jnp.sum(jnp.square(tap), axis=-1, keepdims=True)) + NORMALIZE_EPS)
            first, second = deinterleave(unit)
            weighted = lin(jnp.square(first - second).astype(self.dtype)).astype(jnp.float32)
            total = total + jnp.mean(weighted, axis=(1, 2, 3))
        return total


def packaged_lin_weights() -> Path:
    """The lin-layer file the `lpips` package ships (found without importing the package, which
    needs torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise LPIPSWeightsError("the LPIPS lin layers come from the `lpips` package's weights/v0.1/vgg.pth: "
                                "install it (`pip install --no-deps lpips`) or give the file as loss.lpips_weights")
    return Path(spec.origin).parent / PACKAGED_LIN_WEIGHTS


def _trunk_name(key: str) -> str:
    match = re.fullmatch(r"features\.(\d+)\.(weight|bias)", key)
    if not match or int(match.group(1)) not in VGG16_CONV_INDICES:
        return key
    return f"features.{VGG16_CONV_INDICES.index(int(match.group(1)))}.{match.group(2)}"


def load_lpips(backbone_file: str | os.PathLike, lin_file: str | os.PathLike | None = None, *,
               dtype: Any = jnp.float32, key: str = "loss.lpips_backbone") -> LPIPS:
    """LPIPS with the trunk from a torchvision VGG16 checkpoint (`vgg16-397923af.pth` or any state
    dict with its `features.N` keys; the classifier is ignored) and the lin layers from `lin_file`
    (default: the `lpips` package's). Missing files are errors naming `key`."""
    backbone_file = Path(backbone_file) if backbone_file else None
    if backbone_file is None or not backbone_file.is_file():
        raise LPIPSWeightsError(f"{key}={str(backbone_file or '')!r}: no such file; LPIPS needs torchvision's "
                                f"VGG16 ImageNet weights (vgg16-397923af.pth)")
    lin_file = Path(lin_file) if lin_file else packaged_lin_weights()
    if not lin_file.is_file():
        raise LPIPSWeightsError(f"{lin_file}: no such file (the LPIPS v0.1 VGG lin layers)")
    trunk = {k: v for k, v in read_state_dict(backbone_file).items() if k.startswith("features.")}
    lins = {}
    for name, value in read_state_dict(lin_file).items():
        # `lins.N` is the same tensor under the package's ModuleList alias (in a full state dict)
        match = re.fullmatch(r"lins?\.?(\d)\.model\.1\.weight", name)
        if match is None:
            raise LPIPSWeightsError(f"{lin_file}: unexpected tensor {name!r}; not an LPIPS v0.1 lin-layer file")
        lins[f"lins.{match.group(1)}.weight"] = np.asarray(value)
    model = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0), dtype=dtype))
    return load_state_dict_into(model, {**{_trunk_name(k): v for k, v in trunk.items()}, **lins},
                                source=f"{backbone_file} + {lin_file}")
