"""Scoring a folder of predictions: every requested metric that can run, per image and mean.

    result = evaluate_folders(pred_dir, gt_dir=None, metrics=None, crop_border=0)

`metrics=None` means all of `ALL_METRICS`. Full-reference metrics need `gt_dir`; without it
(no-reference mode, RealLR200 style) they are reported as unavailable, like pyiqa metrics
whose package or weights are missing. Images are read as 8-bit RGB; an unreadable file is an
`ImageReadError` naming it. A pair whose sizes differ is not scored (`result.skipped` names both
files and sizes) while the rest are, unless `crop_gt_to_pred`: then a ground truth larger than
its prediction is cropped to it from the top left, the SR convention for sides that are not
multiples of the scale (a 451 x 300 HR against a 448 x 300 SR).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xpsr_jax.data.images import read_rgb
from xpsr_jax.evaluation import iqa
from xpsr_jax.evaluation.pairing import pair_images
from xpsr_jax.evaluation.psnr_ssim import psnr_y, ssim_y
from xpsr_jax.evaluation.report import EvaluationResult
from xpsr_jax.progress import progress_bar

Y_CHANNEL_METRICS = {"psnr": psnr_y, "ssim": ssim_y}  # ours, numpy; full-reference
ALL_METRICS = ("psnr", "ssim", *iqa.IQA_METRICS)


def parse_metric_names(spec: str | None) -> list[str]:
    """'psnr,ssim,lpips' -> ['psnr', 'ssim', 'lpips']; None or 'all' -> ALL_METRICS."""
    if spec is None or spec.strip() == "all":
        return list(ALL_METRICS)
    names = [name.strip().lower() for name in spec.split(",") if name.strip()]
    for name in names:
        if name == "maniqa":
            raise ValueError(
                "metric 'maniqa' is ambiguous: name the variant, maniqa_koniq (pyiqa's "
                "'maniqa', used by the XPSR release) or maniqa_pipal"
            )
        if name not in ALL_METRICS:
            raise ValueError(f"unknown metric {name!r}; valid: {', '.join(ALL_METRICS)}")
    return list(dict.fromkeys(names))


def needs_reference(name: str) -> bool:
    return name in Y_CHANNEL_METRICS or iqa.IQA_METRICS[name].needs_reference


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path | None = None,
    metrics: list[str] | None = None,
    crop_border: int = 0,
    device: str | None = None,
    progress: bool = True,
    crop_gt_to_pred: bool = False,
) -> EvaluationResult:
    """Scores every prediction in pred_dir (paired by stem with gt_dir when given)."""
    names = list(ALL_METRICS) if metrics is None else list(metrics)
    pairs = pair_images(pred_dir, gt_dir)
    unavailable: dict[str, str] = {}
    if gt_dir is None:
        for name in names:
            if needs_reference(name):
                unavailable[name] = "full-reference metric: needs --gt (no-reference mode)"
    runnable = [name for name in names if name not in unavailable]
    iqa_metrics, iqa_unavailable = iqa.load_iqa_metrics(
        [name for name in runnable if name in iqa.IQA_METRICS], device=device)
    unavailable.update(iqa_unavailable)
    running = [name for name in runnable if name not in unavailable]
    if not running:
        reasons = "\n".join(f"  {name}: {why}" for name, why in unavailable.items())
        raise ValueError(f"none of the requested metrics can run:\n{reasons}")

    per_image: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    per_image_names = [name for name in running
                       if name in Y_CHANNEL_METRICS or not iqa_metrics[name].metric.over_folders]
    for pair in progress_bar(pairs, desc="evaluating", unit="image", disable=not progress):
        pred = read_rgb(pair.pred)
        gt = None if pair.gt is None else read_rgb(pair.gt)
        if gt is not None and pred.shape != gt.shape:
            larger = gt.shape[0] >= pred.shape[0] and gt.shape[1] >= pred.shape[1]
            if crop_gt_to_pred and larger:
                gt = gt[:pred.shape[0], :pred.shape[1]]
            else:
                hint = "" if crop_gt_to_pred or not larger else " (--crop-gt-to-pred crops the HR to it)"
                skipped[pair.stem] = (f"size mismatch: {pair.pred} is {pred.shape[1]}x{pred.shape[0]} but "
                                      f"{pair.gt} is {gt.shape[1]}x{gt.shape[0]} (width x height){hint}")
                continue
        scores = {}
        for name in per_image_names:
            if name in Y_CHANNEL_METRICS:
                scores[name] = Y_CHANNEL_METRICS[name](pred, gt, crop_border=crop_border)
            else:
                scores[name] = iqa_metrics[name].score_image(pred, gt)
        per_image[pair.stem] = scores

    if not per_image:
        raise ValueError("no image could be scored:\n" + "\n".join(f"  {why}" for why in skipped.values()))
    means = {name: float(np.mean([scores[name] for scores in per_image.values()]))
             for name in per_image_names}
    for name in running:
        if name not in means:  # set metrics (FID)
            means[name] = iqa_metrics[name].score_folders(pred_dir, gt_dir)
    settings = {
        "pred_dir": str(pred_dir),
        "gt_dir": None if gt_dir is None else str(gt_dir),
        "mode": "no-reference" if gt_dir is None else "full-reference",
        "crop_border": crop_border,
        "crop_gt_to_pred": crop_gt_to_pred,
        "psnr_ssim": "BT.601 Y channel, float64, SSIM 11x11 Gaussian sigma 1.5 valid",
    }
    return EvaluationResult(metrics=running, per_image=per_image, means=means,
                            unavailable=unavailable, settings=settings, skipped=skipped)
