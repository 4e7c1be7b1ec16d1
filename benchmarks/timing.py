"""Shared timing helper for the benchmark scripts (run them as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import time

import numpy as np


def median_ms(fn, repeats: int) -> float:
    """Median wall milliseconds of `fn()` over `repeats` calls; the caller warms up / compiles first."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def torch_median_ms(fn, repeats: int) -> float:
    """`median_ms` for a PyTorch call: no autograd, one warm-up call, and a CUDA sync per call."""
    import torch

    def run():
        with torch.no_grad():
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    run()
    return median_ms(run, repeats)
