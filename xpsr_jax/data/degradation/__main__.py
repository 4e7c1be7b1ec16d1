"""`python -m xpsr_jax.data.degradation --image hr.png --out lr.png --seed 0 --example-id 3`:
degrade one image (its sides cut to multiples of the scale) and print the parameters drawn."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import cv2

from xpsr_jax.cli_config import CommandParser
from xpsr_jax.data.degradation.apply import degrade
from xpsr_jax.data.degradation.config import default_degradation_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="python -m xpsr_jax.data.degradation",
                                     description="Real-ESRGAN second-order degradation of one HR image.")
    parser.add_argument("--image", required=True, help="HR image to degrade (any format cv2 reads)")
    parser.add_argument("--out", required=True, help="where to write the LR image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--example-id", type=int, default=0)
    args = parser.parse_args(argv)
    config = default_degradation_config()
    bgr = cv2.imread(args.image, cv2.IMREAD_COLOR)
    if bgr is None:
        parser.error(f"cannot read image {args.image!r}")
    hr = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    height, width = (side - side % config.scale for side in hr.shape[:2])
    try:
        lr, params = degrade(hr[:height, :width], config, seed=args.seed, example_id=args.example_id)
    except ValueError as error:
        parser.error(f"{args.image}: {error}")
    if not cv2.imwrite(args.out, cv2.cvtColor(lr, cv2.COLOR_RGB2BGR)):
        parser.error(f"cannot write {args.out!r} (unknown extension or folder not writable)")
    print(json.dumps(params, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
