"""TPU generations: what one chip has, with the page each figure comes from.

HBM is what a program may use per chip; peak bf16 FLOP/s and the inter-chip interconnect (ICI)
bandwidth bound a step from below (`roofline`). Figures from Google Cloud's TPU pages
(cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e, read 2026-12-07); v4's ICI figure is not on its
page and comes from the JAX scaling book (jax-ml.github.io/scaling-book/tpus: 4.5e10 B/s per link
and direction, 6 links).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Generation:
    name: str  # as in topology names: "v5e" in "v5e:2x2"
    device_kind: str  # jax's Device.device_kind
    hbm_bytes: int  # per chip
    peak_bf16_flops: float  # per chip per second
    ici_bytes_per_second: float  # per chip, both directions of every link
    devices_per_chip: int  # JAX devices a topology description lists per chip
    source: str


GENERATIONS = {
    "v4": Generation("v4", "TPU v4", 32 * GiB, 275e12, 6 * 2 * 45e9, 2,
                     "cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM); ICI: scaling book, 6 links x "
                     "2 x 45 GB/s"),
    "v5e": Generation("v5e", "TPU v5 lite", 16 * 10**9, 197e12, 400e9, 1,
                      "cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GB HBM, 400 GB/s bidirectional ICI)"),
    "v5p": Generation("v5p", "TPU v5", 95 * GiB, 459e12, 1200e9, 1,
                      "cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GiB HBM, 1200 GB/s bidirectional ICI)"),
    "v6e": Generation("v6e", "TPU v6 lite", 32 * 10**9, 918e12, 800e9, 1,
                      "cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GB HBM, 800 GB/s bidirectional ICI)"),
}


def generation_of(topology_name: str) -> Generation:
    """The generation a topology name ("v5p:4x4x4") is of; ValueError naming the known ones."""
    prefix = topology_name.split(":", 1)[0].lower()
    prefix = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}.get(prefix, prefix)
    if prefix not in GENERATIONS:
        raise ValueError(f"--topology {topology_name!r}: unknown TPU generation {prefix!r}; valid: "
                         f"{', '.join(GENERATIONS)} (e.g. v5e:2x2, v5p:4x4x4, v6e:16x16)")
    return GENERATIONS[prefix]


def hbm_per_device(generation: Generation) -> int:
    return generation.hbm_bytes // generation.devices_per_chip
