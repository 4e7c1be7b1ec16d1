"""Shared timing helper for the benchmark scripts (run them as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import contextlib
import signal
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


class RowTimeout(Exception):
    """Raised inside `time_limit` when its seconds run out."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise RowTimeout in the main thread after `seconds` (None: no limit), so one slow row
    (a torch.compile that does not finish) is reported instead of stalling the whole table."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise RowTimeout(f"did not finish in {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def torch_compiled(module, backend: str | None):
    """`torch.compile(module, backend=backend)`, or the module itself when backend is None."""
    if backend is None:
        return module
    import torch

    return torch.compile(module, backend=backend)
