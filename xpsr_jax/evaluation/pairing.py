"""Finding the images to score and pairing predictions with ground truth by file-name stem.

    list_images(folder) -> dict[stem, Path]            every image file, keyed by stem
    pair_images(pred_dir, gt_dir) -> list[ImagePair]   sorted by stem; PairingError if unmatched

`0001.png` in the prediction folder pairs with `0001.png`, `0001.jpg`, ... in the ground-truth
folder. Files that are not images (by suffix) are ignored; two images with the same stem in one
folder are an error, as is an image in one folder with no partner in the other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from xpsr_jax.files import image_files

# How many unmatched names an error message lists before it only counts the rest.
_LISTED_NAMES = 20


class PairingError(ValueError):
    """Prediction and ground-truth folders whose images do not match one to one."""


@dataclasses.dataclass(frozen=True)
class ImagePair:
    stem: str
    pred: Path
    gt: Path | None  # None in no-reference mode


def list_images(folder: str | Path) -> dict[str, Path]:
    """All image files directly in `folder` (by suffix), keyed by file stem, sorted by stem."""
    images = image_files(folder, "image folder", unique_stems=True, error=PairingError)
    return dict(sorted((path.stem, path) for path in images))


def pair_images(pred_dir: str | Path, gt_dir: str | Path | None) -> list[ImagePair]:
    """Predictions paired with ground truth by stem; with gt_dir=None, predictions alone."""
    preds = list_images(pred_dir)
    if gt_dir is None:
        return [ImagePair(stem, path, None) for stem, path in preds.items()]
    gts = list_images(gt_dir)
    pred_only = [preds[stem].name for stem in preds if stem not in gts]
    gt_only = [gts[stem].name for stem in gts if stem not in preds]
    if pred_only or gt_only:
        problems = []
        if pred_only:
            problems.append(f"in {pred_dir} without ground truth: {_names(pred_only)}")
        if gt_only:
            problems.append(f"in {gt_dir} without prediction: {_names(gt_only)}")
        raise PairingError("unmatched images (pairing is by file stem); " + "; ".join(problems))
    return [ImagePair(stem, preds[stem], gts[stem]) for stem in preds]


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED_NAMES])
    rest = len(names) - _LISTED_NAMES
    return f"{shown} (and {rest} more)" if rest > 0 else shown
