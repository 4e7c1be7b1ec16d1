"""What a compiled TPU program says about a pod run: per-chip memory against the chip's HBM, FLOPs,
every collective by kind, and a lower bound of the step time.

    plan = analyse(compiled, generation, images_per_chip=...)     # ProgramFigures
    collectives(compiled.as_text())                               # {kind: Collective}
    exhausted = resource_exhausted(error)                         # XLA's "does not fit", or None
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from xpsr_jax.tpu_plan.hardware import Generation, hbm_per_device

COLLECTIVE_KINDS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+(?P<op>" +
                          "|".join(re.escape(kind) for kind in COLLECTIVE_KINDS) + r")(?P<start>-start)?\(",
                          re.MULTILINE)
_ARRAY = re.compile(r"\b(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[0-9,]*)\]")
_ITEM_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16,
              "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128}
_CUSTOM_CALL = re.compile(r'custom_call_target="(?P<target>[^"]+)"')
_EXHAUSTED = re.compile(r"RESOURCE_EXHAUSTED[^\n]*")
_USED = re.compile(r"Used (?P<needed>[0-9.]+)(?P<needed_unit>[KMGT]) of (?P<available>[0-9.]+)(?P<available_unit>[KMGT]) hbm")
_EXCEEDS = re.compile(r"\((?P<needed>[0-9.]+)(?P<needed_unit>[KMGT])\) exceeds available HBM "
                      r"\((?P<available>[0-9.]+)(?P<available_unit>[KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass
class Collective:
    count: int = 0
    bytes: int = 0  # of the results, per chip and step
    bytes_by_dtype: Counter = field(default_factory=Counter)


def _array_bytes(dtype: str, dims: str) -> int:
    elements = 1
    for dim in filter(None, dims.split(",")):
        elements *= int(dim)
    bits = _ITEM_BITS.get(dtype, 8 if dtype.startswith("f8") else 32)
    return elements * bits // 8


def collectives(hlo_text: str) -> dict[str, Collective]:
    """Every collective of a compiled program's HLO text, by kind: instances, result bytes and
    element types. Asynchronous pairs count once (their -start); the -start's sync scalars and,
    for gathers and permutes, its copy of the operands are left out."""
    found = {kind: Collective() for kind in COLLECTIVE_KINDS}
    for match in _INSTRUCTION.finditer(hlo_text):
        arrays = [(m["dtype"], m["dims"]) for m in _ARRAY.finditer(match["shape"])]
        if match["start"]:
            arrays = [a for a in arrays if a[1] != ""]  # sync flags are scalars
            if match["op"] in ("all-gather", "collective-permute") and len(arrays) % 2 == 0:
                arrays = arrays[len(arrays) // 2:]  # (operands..., results...)
        entry = found[match["op"]]
        entry.count += 1
        for dtype, dims in arrays:
            size = _array_bytes(dtype, dims)
            entry.bytes += size
            entry.bytes_by_dtype[dtype] += size
    return found


def custom_calls(hlo_text: str) -> Counter:
    """Custom calls of a compiled program by target: a Pallas (Mosaic) kernel is `tpu_custom_call`."""
    return Counter(match["target"] for match in _CUSTOM_CALL.finditer(hlo_text))


@dataclass
class Memory:
    """Per-chip bytes of XLA's buffer plan (`compiled.memory_analysis()`)."""

    arguments: int
    outputs: int
    temp: int
    aliased: int  # outputs that reuse an argument's buffer (the donated train state)
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temp + self.code

    @classmethod
    def of(cls, compiled) -> "Memory":
        stats = compiled.memory_analysis()
        return cls(arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
                   temp=int(stats.temp_size_in_bytes), aliased=int(stats.alias_size_in_bytes),
                   code=int(stats.generated_code_size_in_bytes))


@dataclass
class ProgramFigures:
    memory: Memory
    hbm_bytes: int
    flops: float | None
    collectives: dict[str, Collective]
    custom_calls: Counter  # target -> instances (Pallas kernels: tpu_custom_call)
    compute_seconds: float | None  # FLOPs / peak bf16
    collective_seconds: float  # collective bytes / ICI bandwidth
    images_per_step: int  # per chip

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.hbm_bytes

    @property
    def step_seconds(self) -> float | None:
        """A lower bound: the step cannot beat its FLOPs at peak nor its traffic at full ICI speed."""
        bounds = [s for s in (self.compute_seconds, self.collective_seconds) if s]
        return max(bounds) if bounds else None

    @property
    def images_per_second(self) -> float | None:
        return self.images_per_step / self.step_seconds if self.step_seconds else None

    def to_json(self) -> dict:
        return {"fits": self.fits, "hbm_bytes": self.hbm_bytes,
                "memory": {**asdict(self.memory), "total": self.memory.total}, "flops": self.flops,
                "collectives": {kind: {"count": c.count, "bytes": c.bytes, "bytes_by_dtype": dict(c.bytes_by_dtype)}
                                for kind, c in self.collectives.items()},
                "custom_calls": dict(self.custom_calls),
                "roofline": {"compute_seconds": self.compute_seconds, "collective_seconds": self.collective_seconds,
                             "step_seconds": self.step_seconds, "images_per_second_per_chip": self.images_per_second},
                "images_per_step_per_chip": self.images_per_step}


def cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (a backend without cost analysis)
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def analyse(compiled, generation: Generation, *, images_per_chip: int) -> ProgramFigures:
    flops = cost_flops(compiled)
    text = compiled.as_text()
    found = collectives(text)
    traffic = sum(c.bytes for c in found.values())
    return ProgramFigures(memory=Memory.of(compiled), hbm_bytes=hbm_per_device(generation), flops=flops,
                          collectives=found, custom_calls=custom_calls(text),
                          compute_seconds=flops / generation.peak_bf16_flops if flops else None,
                          collective_seconds=traffic / generation.ici_bytes_per_second,
                          images_per_step=images_per_chip)


@dataclass
class Exhausted:
    """XLA:TPU refused the program for memory: its own line, and the figures it gives."""

    message: str
    needed_bytes: int | None
    available_bytes: int | None


def resource_exhausted(error: BaseException) -> Exhausted | None:
    """XLA's RESOURCE_EXHAUSTED of a compile error, with the bytes it needed and had (None for any
    other error). XLA:TPU says "Used 26.01G of 15.75G hbm" or "... (24.96G) exceeds available HBM
    (15.75G)"."""
    text = str(error)
    match = _EXHAUSTED.search(text)
    if match is None:
        return None
    figures = _USED.search(text) or _EXCEEDS.search(text)
    needed = available = None
    if figures is not None:
        needed = int(float(figures["needed"]) * _UNITS[figures["needed_unit"]])
        available = int(float(figures["available"]) * _UNITS[figures["available_unit"]])
    return Exhausted(match.group(0).strip(), needed, available)
