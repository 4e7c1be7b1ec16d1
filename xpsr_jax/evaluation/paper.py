"""The XPSR paper's published numbers (shared/xpsr-reference.md section 6), for `--paper`.

    PAPER_RESULTS["DRealSR"]["lpips"] -> 0.3864

Keys are our metric names. The paper's MANIQA is filed under `maniqa_koniq`: the release's
test.py scores with `pyiqa.create_metric('maniqa')` (pyiqa==0.1.10 pinned), pyiqa's KonIQ-10k
model. RealSR / DRealSR are 128 px LR centre crops with 512 px HR crops; RealLR200 has no
ground truth, so only no-reference metrics.
"""

from __future__ import annotations

PAPER_RESULTS: dict[str, dict[str, float]] = {
    "RealLR200": {"maniqa_koniq": 0.5589, "clipiqa": 0.7524, "musiq": 69.30},
    "DRealSR": {
        "ssim": 0.7220, "lpips": 0.3864, "fid": 164.68, "maniqa_koniq": 0.5713, "musiq": 67.84,
    },
    "RealSR": {
        "ssim": 0.6870, "lpips": 0.3517, "fid": 141.95, "maniqa_koniq": 0.6059, "musiq": 70.23,
    },
}


# Supplement Table 3, the effect of the MLLM: setting -> (SSIM, LPIPS, FID, MANIQA, MUSIQ).
MLLM_ABLATION_METRICS = ("ssim", "lpips", "fid", "maniqa_koniq", "musiq")
PAPER_MLLM_ABLATION: dict[str, dict[str, tuple[float, ...]]] = {
    "DRealSR": {
        "original": (0.7220, 0.3864, 164.68, 0.5713, 67.84),
        "llava13b": (0.7237, 0.3870, 165.70, 0.5760, 67.94),
        "simple": (0.7190, 0.3859, 168.10, 0.5697, 67.74),
        "downscale64": (0.7212, 0.3884, 167.80, 0.5706, 67.44),
        "upscale256": (0.7204, 0.3876, 167.38, 0.5733, 67.89),
        "blur": (0.7121, 0.3926, 175.77, 0.5730, 67.16),
        "jpeg": (0.7137, 0.3902, 170.83, 0.5690, 67.42),
    },
    "RealSR": {
        "original": (0.6870, 0.3517, 141.95, 0.6059, 70.23),
        "llava13b": (0.6920, 0.3508, 141.94, 0.6099, 70.32),
        "simple": (0.6880, 0.3537, 148.93, 0.5991, 69.89),
        "downscale64": (0.6856, 0.3588, 144.54, 0.5966, 69.86),
        "upscale256": (0.6855, 0.3525, 142.45, 0.6079, 70.36),
        "blur": (0.6812, 0.3624, 146.62, 0.5945, 69.38),
        "jpeg": (0.6822, 0.3578, 145.00, 0.6040, 69.70),
    },
}

# Supplement Table 1, the blind user study: 20 participants x 50 real LR images (DRealSR and
# RealSR), each picking the best of six methods' results shown with the LR. Selection rates.
PAPER_USER_STUDY: dict[str, float] = {
    "BSRGAN": 0.007, "Real-ESRGAN": 0.009, "StableSR": 0.053, "PASD": 0.140, "SeeSR": 0.148, "XPSR": 0.643,
}


def paper_results(dataset: str) -> dict[str, float]:
    """The paper's numbers for `dataset` (case-insensitive); ValueError naming the valid ones."""
    for name, results in PAPER_RESULTS.items():
        if name.lower() == dataset.lower():
            return results
    raise ValueError(f"no paper numbers for dataset {dataset!r}; known: {', '.join(PAPER_RESULTS)}")
