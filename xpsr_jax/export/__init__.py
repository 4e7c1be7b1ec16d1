"""Checkpoint export: the official PyTorch layout, inference-only orbax checkpoints, StableHLO.

`load_artifact(OUT)` runs a StableHLO export (`python -m xpsr_jax.export stablehlo`) without the
model code; this package's import stays free of the models.
"""


def load_artifact(path):
    """`load_artifact(folder) -> StableHLOArtifact` (see xpsr_jax.export.artifact)."""
    from xpsr_jax.export.artifact import load_artifact as load

    return load(path)


__all__ = ["load_artifact"]
