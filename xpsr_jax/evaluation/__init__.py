"""Evaluation with the paper's metrics: PSNR/SSIM on Y (ours), pyiqa metrics when local.

    from xpsr_jax.evaluation import evaluate_folders, psnr_y, ssim_y, rgb_to_y
    result = evaluate_folders("out/RealSR", "data/RealSR/HR", ["psnr", "ssim", "lpips"])
    result.means, result.per_image, result.unavailable

Command line: ``python -m xpsr_jax.evaluate --help``.
"""

from xpsr_jax.evaluation.color import rgb_to_y
from xpsr_jax.evaluation.pairing import ImagePair, PairingError, pair_images
from xpsr_jax.evaluation.paper import PAPER_RESULTS, paper_results
from xpsr_jax.evaluation.psnr_ssim import psnr, psnr_y, ssim, ssim_y
from xpsr_jax.evaluation.report import EvaluationResult, markdown_table, write_reports
from xpsr_jax.evaluation.runner import ALL_METRICS, evaluate_folders, parse_metric_names

__all__ = [
    "ALL_METRICS", "EvaluationResult", "ImagePair", "PAPER_RESULTS", "PairingError",
    "evaluate_folders", "markdown_table", "pair_images", "paper_results", "parse_metric_names",
    "psnr", "psnr_y", "rgb_to_y", "ssim", "ssim_y", "write_reports",
]
