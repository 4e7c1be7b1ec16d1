"""Regenerates examples/hr/*.png from scikit-image's bundled sample images (see README.md).

    python examples/make_examples.py          # needs scikit-image (the `test` extra)

Each image: the largest centred square, resized to SIZE x SIZE with PIL's Lanczos filter.
"""

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

SIZE = 128
# file stem -> scikit-image loader (public domain / CC0 images only; see README.md)
SOURCES = {"astronaut": data.astronaut, "chelsea": data.chelsea, "coffee": data.coffee,
           "rocket": data.rocket}


def centred_square(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top:top + side, left:left + side]


def main() -> None:
    out = Path(__file__).resolve().parent / "hr"
    out.mkdir(exist_ok=True)
    for stem, loader in SOURCES.items():
        square = Image.fromarray(centred_square(loader()))
        square.resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(out / f"{stem}.png", optimize=True)
        print(out / f"{stem}.png")


if __name__ == "__main__":
    main()
