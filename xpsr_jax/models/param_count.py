"""Parameter counts of the SD-1.5-size XPSR networks, from shapes alone (`jax.eval_shape`).

    python -m xpsr_jax.models.param_count [--unet-config unet/config.json] [--sfa]

Builds nothing in memory: the models are traced abstractly, so this runs in seconds on a laptop.
"""

from __future__ import annotations


import numpy as np
from flax import nnx

from xpsr_jax.cli_config import CommandParser
from xpsr_jax.models.unet import UNet2DCondition, UNet2DConditionConfig
from xpsr_jax.models.xpsr_controlnet import XPSRControlNet
from xpsr_jax.models.xpsr_unet import XPSRUNet, XPSRUNetConfig
from xpsr_jax.weights.pretrained import eval_shape_model

SFA_EVERYWHERE = dict(down_use_lowlevel_prompt=True, mid_use_lowlevel_prompt=True,
                      up_use_lowlevel_prompt=(True,) * 4)


def count_parameters(module: nnx.Module) -> int:
    return sum(int(np.prod(variable.get_value().shape))
               for _, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def parameter_counts(unet_config: UNet2DConditionConfig, *, sfa: bool = False) -> dict[str, int]:
    """Counts for the SD UNet, the XPSR UNet and the XPSR ControlNet built from `unet_config`."""
    fields = {k: v for k, v in vars(unet_config).items() if k != "raw"}
    xpsr_config = XPSRUNetConfig(**fields, **(SFA_EVERYWHERE if sfa else {}))
    sd_unet = eval_shape_model(lambda: UNet2DCondition(unet_config, rngs=nnx.Rngs(0)))
    xpsr_unet = eval_shape_model(lambda: XPSRUNet(xpsr_config, rngs=nnx.Rngs(0)))
    controlnet = eval_shape_model(lambda: XPSRControlNet.from_unet(xpsr_unet, rngs=nnx.Rngs(0),
                                                                 load_weights_from_unet=False)[0])
    return {"SD 1.5 UNet": count_parameters(sd_unet), "XPSR UNet": count_parameters(xpsr_unet),
            "XPSR ControlNet": count_parameters(controlnet)}


def main(argv=None) -> None:
    parser = CommandParser(prog="python -m xpsr_jax.models.param_count", description=__doc__.splitlines()[0])
    parser.add_argument("--unet-config", help="an SD unet/config.json (default: SD 1.5's values)")
    parser.add_argument("--sfa", action="store_true", help="switch Semantic-Fusion Attention on everywhere")
    args = parser.parse_args(argv)
    config = (UNet2DConditionConfig.from_json_file(args.unet_config) if args.unet_config
              else UNet2DConditionConfig())
    for name, count in parameter_counts(config, sfa=args.sfa).items():
        print(f"{name:16s} {count:>14,d} parameters ({count / 1e6:.1f} M)")


if __name__ == "__main__":
    main()
