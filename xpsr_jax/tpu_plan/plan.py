"""Compile a program for a TPU topology and read off whether and how it runs (`PlanResult`); find
the largest per-chip batch that fits (`search_batch`)."""

from __future__ import annotations

import copy
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xpsr_jax.tpu_plan.analysis import Exhausted, ProgramFigures, analyse, resource_exhausted
from xpsr_jax.tpu_plan.programs import Program
from xpsr_jax.tpu_plan.topology import Topology


@dataclass
class PlanResult:
    program: str
    description: str
    topology: Topology
    batch_per_chip: int
    lower_seconds: float
    compile_seconds: float
    host_peak_rss_bytes: int
    figures: ProgramFigures | None  # None when XLA refused it
    exhausted: Exhausted | None  # XLA's own "does not fit"

    @property
    def fits(self) -> bool:
        return self.figures is not None and self.figures.fits

    def to_json(self) -> dict:
        topology = self.topology
        return {"program": self.program, "description": self.description, "fits": self.fits,
                "topology": {"name": topology.name, "num_slices": topology.num_slices, "chips": topology.chips,
                             "devices": len(topology.devices), "hosts": topology.hosts,
                             "device_kind": topology.device_kind, "generation": topology.generation.name,
                             "hbm_bytes_per_chip": topology.generation.hbm_bytes,
                             "peak_bf16_flops_per_chip": topology.generation.peak_bf16_flops,
                             "ici_bytes_per_second_per_chip": topology.generation.ici_bytes_per_second,
                             "source": topology.generation.source},
                "batch_per_chip": self.batch_per_chip,
                "compile": {"lower_seconds": self.lower_seconds, "compile_seconds": self.compile_seconds,
                            "host_peak_rss_bytes": self.host_peak_rss_bytes},
                "figures": self.figures.to_json() if self.figures is not None else None,
                "resource_exhausted": None if self.exhausted is None else {
                    "message": self.exhausted.message, "needed_bytes": self.exhausted.needed_bytes,
                    "available_bytes": self.exhausted.available_bytes}}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def compile_plan(program: Program, topology: Topology) -> PlanResult:
    """XLA:TPU's compile of `program`, analysed; a program XLA refuses for memory is a result
    that does not fit (with XLA's figures), any other compile error propagates."""
    start = time.perf_counter()
    figures, exhausted = None, None
    try:
        compiled = program.lowered.compile()
    except Exception as error:  # noqa: BLE001  (XLA raises its runtime error type for every failure)
        exhausted = resource_exhausted(error)
        if exhausted is None:
            raise
    else:
        figures = analyse(compiled, topology.generation, images_per_chip=program.images_per_chip)
    return PlanResult(program.name, program.description, topology, program.images_per_chip, program.lower_seconds,
                      time.perf_counter() - start, peak_rss_bytes(), figures, exhausted)


@dataclass
class SearchRow:
    remat: str
    largest_batch: int  # 0: not even one image per chip fits
    at_largest: PlanResult | None
    tried: list[tuple[int, bool]]  # (batch per chip, fits) in the order compiled


def search_batch(build: Callable[[Any, int], Program], config: Any, topology: Topology, remat: str, *,
                 max_batch: int, log: Callable[[str], None] = print) -> SearchRow:
    """The largest per-chip batch <= max_batch whose program fits, for the remat policy `remat`
    (both networks): doubling from 1 until one does not fit, then bisecting."""
    config = copy.deepcopy(config)
    config.remat.unet = config.remat.controlnet = remat
    tried: list[tuple[int, bool]] = []
    results: dict[int, PlanResult] = {}

    def fits(batch: int) -> bool:
        result = compile_plan(build(config, batch), topology)
        results[batch] = result
        tried.append((batch, result.fits))
        total = result.figures.memory.total / 2**30 if result.figures else None
        log(f"  remat {remat}, batch {batch} per chip: {'fits' if result.fits else 'does not fit'}"
            + (f" ({total:.2f} GiB)" if total is not None else "") + f", compiled in {result.compile_seconds:.0f} s")
        return result.fits

    good, bad, batch = 0, None, 1
    while batch <= max_batch:
        if not fits(batch):
            bad = batch
            break
        good, batch = batch, batch * 2
    if bad is None:  # every power of two up to max_batch fits: bisect above the last one
        bad = max_batch + 1
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return SearchRow(remat, good, results.get(good), tried)
