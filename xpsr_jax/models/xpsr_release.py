"""Loading a whole XPSR release folder (official layout: `unet/` and `controlnet/`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from xpsr_jax.models.xpsr_controlnet import XPSRControlNet
from xpsr_jax.models.xpsr_unet import XPSRUNet


def load_xpsr(folder: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              attention_backend: str = "auto") -> tuple[XPSRUNet, XPSRControlNet]:
    """(unet, controlnet) from `folder/unet` and `folder/controlnet`, each config.json + weights.

    The weights stored in the release are used as they are: unlike the official
    `from_pretrained_orig`, the SFA tensors are NOT re-copied from `attentions` on load.
    """
    folder = Path(folder)
    missing = [name for name in ("unet", "controlnet") if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder}: an XPSR release needs the subfolders unet/ and controlnet/; "
                                f"missing: {', '.join(missing)}")
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend)
    return (XPSRUNet.from_pretrained(folder / "unet", **kwargs),
            XPSRControlNet.from_pretrained(folder / "controlnet", **kwargs))
