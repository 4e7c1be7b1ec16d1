"""The sample images shipped with the package (README.md here: sources and licences), and a test
set made from them for trying the commands after `pip install .`:

    python -m xpsr_jax.examples --out /tmp/xpsr-examples
    # /tmp/xpsr-examples/HR/*.png        the four 128 px samples (ground truth)
    # /tmp/xpsr-examples/LR/*.png        x1/4 bicubic, 32 px (the inputs)
    # /tmp/xpsr-examples/highlevel_prompt/, lowlevel_prompt_q/   their LR prompts
    # /tmp/xpsr-examples/captions.jsonl  every prompt (LR and HR), keyed by crop id (stem + "_000"),
    #                                    for `python -m xpsr_jax.data.prepare --captions`

The folder is in the official test-set layout, so `infer --input /tmp/xpsr-examples` reads the
prompts from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from xpsr_jax.captions.io import load_captions
from xpsr_jax.data import official_layout
from xpsr_jax.data.images import read_rgb, write_png_atomic
from xpsr_jax.files import image_files, write_bytes_atomic

PACKAGED_EXAMPLES = Path(__file__).resolve().parent
PACKAGED_HR = PACKAGED_EXAMPLES / "hr"
PACKAGED_CAPTIONS = PACKAGED_EXAMPLES / "captions.jsonl"
SCALE = 4


def write_lr_images(out: str | os.PathLike, hr_folder: Path = PACKAGED_HR) -> list[Path]:
    """Each image of `hr_folder` downscaled x1/4 (bicubic) into `out`, so that its x4 SR output is
    the original's size; the written paths, sorted."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for hr in image_files(hr_folder, "sample folder"):
        image = Image.fromarray(read_rgb(hr))
        lr = image.resize((image.width // SCALE, image.height // SCALE), Image.BICUBIC)
        write_png_atomic(out / f"{hr.stem}.png", np.asarray(lr))
        written.append(out / f"{hr.stem}.png")
    return written


def write_test_set(out: str | os.PathLike) -> Path:
    """The packaged samples as an official-layout test set in `out` (see the module docstring)."""
    out = Path(out)
    lr_paths = write_lr_images(out / official_layout.LR_FOLDER)
    (out / official_layout.HR_FOLDER).mkdir(parents=True, exist_ok=True)
    captions = load_captions(PACKAGED_CAPTIONS)
    for kind, folder in (("highlevel", official_layout.HIGHLEVEL_FOLDER),
                         ("lowlevel", official_layout.LOWLEVEL_FOLDER)):
        (out / folder).mkdir(exist_ok=True)
        for lr in lr_paths:
            # captions.jsonl is keyed by the quickstart's crop ids: file stem + "_000"
            text = captions[(f"{lr.stem}_000", "lr", kind)]
            write_bytes_atomic(out / folder / f"{lr.stem}.txt", (text + "\n").encode("utf-8"))
    for hr in image_files(PACKAGED_HR, "sample folder"):
        write_png_atomic(out / official_layout.HR_FOLDER / hr.name, read_rgb(hr))
    write_bytes_atomic(out / PACKAGED_CAPTIONS.name, PACKAGED_CAPTIONS.read_bytes())
    return out
