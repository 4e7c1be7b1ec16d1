"""Super-resolution with a StableHLO artifact (`python -m xpsr_jax.export stablehlo`): telling one
apart from other weights, checking that it covers the requested recipe and sizes, and running it
through the shared host-side path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xpsr_jax.inference.batching import SampledBatch, finite_per_image, super_resolve
from xpsr_jax.inference.sampling import SamplingNoise
from xpsr_jax.weights.artifact import ArtifactInputError
from xpsr_jax.weights.formats import STABLEHLO, WeightsFormatError, read_manifest

# Run-time settings: not part of an exported program (the seed enters as keys, batches are split).
ARTIFACT_RUNTIME_KEYS = ("batch_size", "seed", "apply_exif_orientation", "compile_cache", "max_output_pixels",
                         "captioner")


def stablehlo_artifact_path(weights: str) -> Path | None:
    """`weights` when it is a StableHLO artifact (manifest.json with format "stablehlo"), else None
    (anything else, broken or not, is left to the pipeline's own checks)."""
    try:
        manifest = read_manifest(weights) if Path(weights).is_dir() else None
    except WeightsFormatError:
        return None
    return Path(weights) if manifest is not None and manifest["format"] == STABLEHLO else None


def _flat(tree: dict, prefix: str = "") -> dict:
    items = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            items.update(_flat(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def artifact_config_differences(artifact, config) -> list[str]:
    """'key: artifact A, requested B' for every recipe setting the artifact was not exported with."""
    exported, requested = _flat(artifact.config), _flat(config.to_dict())
    return [f"{key}: artifact {exported.get(key)!r}, requested {requested.get(key)!r}"
            for key in sorted(set(exported) | set(requested))
            if key.split(".")[0] not in ARTIFACT_RUNTIME_KEYS and exported.get(key) != requested.get(key)]


def check_artifact_covers(artifact, config) -> None:
    differences = artifact_config_differences(artifact, config)
    if differences:
        raise ValueError(f"--weights {artifact.path}: the StableHLO artifact does not cover this recipe; it was "
                         f"exported with other settings ({'; '.join(differences)}). Run without --config to use "
                         f"its recipe, or export it again with these settings")


def check_artifact_size(artifact, conditioning_shape) -> None:
    size = tuple(conditioning_shape[:2])
    if size not in artifact.sizes:
        covered = ", ".join(f"{h}x{w}" for h, w in artifact.sizes)
        raise ArtifactInputError(f"processed size {size[0]}x{size[1]} is not covered by the StableHLO artifact "
                                 f"{artifact.path} (it covers {covered}); export it with --size {size[0]}x{size[1]}")


class ArtifactRunner:
    """The pipeline's `__call__` on a StableHLO artifact: the shared host-side path
    (`xpsr_jax.inference.batching`) with the artifact's sampler. Exported programs take their
    draws from seeds only (no injected noise)."""

    def __init__(self, artifact, config):
        self.artifact, self.config = artifact, config
        self.on_compile, self.compile_seconds = None, 0.0  # exported programs compile on their first call

    @property
    def batch_size(self) -> int:
        limit = self.config.batch_size if self.artifact.symbolic_batch else max(self.artifact.batch_sizes)
        return int(min(self.config.batch_size, limit))

    def sample_batch(self, conditioning: np.ndarray, highlevel: list[str], lowlevel: list[str],
                     seeds: list[int], noise: SamplingNoise | None) -> SampledBatch:
        if noise is not None:
            raise ValueError(f"{self.artifact.path}: a StableHLO artifact draws its noise from seeds; "
                             "injected noise needs the pipeline")
        out = self.artifact.sample(conditioning, highlevel, lowlevel, seeds=seeds)
        return SampledBatch(np.asarray(out["images"]), finite_per_image(out["latents"], out["decoded"]))

    def non_finite_cause(self) -> str:
        recipe = self.artifact.config
        return (f"the StableHLO artifact {self.artifact.path} holds weights with NaN or inf, or its recipe "
                f"overflows (guidance_scale={recipe.get('guidance_scale')}, dtype={recipe.get('dtype')}); export it "
                "again from finite weights")

    def __call__(self, lr_images, highlevel_prompts, lowlevel_prompts, **kwargs) -> list[np.ndarray]:
        return super_resolve(self, lr_images, highlevel_prompts, lowlevel_prompts, **kwargs)
