"""Checkpoint export: the official PyTorch layout, inference-only orbax checkpoints, StableHLO.

`load_artifact(OUT)` runs a StableHLO export (`python -m xpsr_jax.export stablehlo`) without the
model code (it lives with the on-disk formats, `xpsr_jax.weights.artifact`; re-exported here).
"""

from xpsr_jax.weights.artifact import StableHLOArtifact, load_artifact

__all__ = ["StableHLOArtifact", "load_artifact"]
