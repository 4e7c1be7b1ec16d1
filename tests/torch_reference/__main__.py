"""Print the state-dict keys and shapes of the tiny reference models (or SD 1.5 sized ones).

    cd tests && python -m torch_reference [--sd15] [--no-sfa]

Tiny: tiny_unet_config with SFA in every block that can have it, and tiny_controlnet_config.
--sd15: SD 1.5 widths (the released XPSR UNet is --sd15 --no-sfa) and the ControlNet that
from_unet builds from it (official defaults). Built on the meta device (shapes only).
"""

from __future__ import annotations

import argparse

import torch

from .config import sd15_unet_config, tiny_controlnet_config, tiny_unet_config
from .controlnet import XPSRControlNetTorch
from .unet import XPSRUNetTorch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd15", action="store_true", help="SD 1.5 widths, not the tiny config")
    parser.add_argument("--no-sfa", action="store_true", help="UNet without Semantic-Fusion Attn.")
    args = parser.parse_args()
    sfa = {} if args.no_sfa else dict(down_use_lowlevel_prompt=True, mid_use_lowlevel_prompt=True,
                                      up_use_lowlevel_prompt=[True] * 4)
    with torch.device("meta"):  # shapes only, no memory
        if args.sd15:
            unet = XPSRUNetTorch({**sd15_unet_config(), **sfa})
            controlnet = XPSRControlNetTorch.from_unet(unet, load_weights_from_unet=False)
        else:
            unet = XPSRUNetTorch(tiny_unet_config(**sfa))
            controlnet = XPSRControlNetTorch(tiny_controlnet_config())
    for name, model in (("XPSRUNetTorch", unet), ("XPSRControlNetTorch", controlnet)):
        state = model.state_dict()
        print(f"# {name}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values")
        for key, value in state.items():
            print(key, tuple(value.shape))


if __name__ == "__main__":
    main()
