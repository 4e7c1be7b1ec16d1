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


def paper_results(dataset: str) -> dict[str, float]:
    """The paper's numbers for `dataset` (case-insensitive); ValueError naming the valid ones."""
    for name, results in PAPER_RESULTS.items():
        if name.lower() == dataset.lower():
            return results
    raise ValueError(f"no paper numbers for dataset {dataset!r}; known: {', '.join(PAPER_RESULTS)}")
