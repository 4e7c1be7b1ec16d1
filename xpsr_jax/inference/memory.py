"""Will a compiled sampler fit on the device? XLA's buffer plan against the device's free memory.

Checked after compiling and before running, so an image too large for the device is refused by
name before any step is sampled, rather than failing with an allocator error part-way through
(or, on some backends, after minutes of sampling). Backends that report no memory limit (CPU)
are not checked.
"""

from __future__ import annotations


class DeviceMemoryError(RuntimeError):
    """A compiled program needs more device memory than is free; raised before it runs."""


def device_free_bytes(device) -> int | None:
    """Bytes the device can still allocate, or None where the backend does not say (CPU)."""
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def program_bytes(compiled) -> int | None:
    """Device bytes a run of `compiled` adds: its scratch, outputs and code. Its arguments (the
    weights, the batch) are already on the device and counted as in use."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
               + analysis.generated_code_size_in_bytes)


def check_fits(needed: int | None, free: int | None, what: str, advice: str) -> None:
    """DeviceMemoryError naming `what`, both sizes and `advice` when `needed` > `free`."""
    if needed is None or free is None or needed <= free:
        return
    raise DeviceMemoryError(f"{what} needs {needed / 2**30:.2f} GiB of device memory and "
                            f"{max(free, 0) / 2**30:.2f} GiB is free; not run. {advice}")
