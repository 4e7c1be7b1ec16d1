"""The one host-side path from LR images to SR images, shared by `XPSRPipeline`, the StableHLO
artifact runner and `infer.py`: preprocess -> group by processed size -> batch -> sample ->
resize back to exactly `upscale` x the input.

A runner supplies `config` (process_size, upscale, seed), `batch_size` (images per sampling call)
and `sample_batch(conditioning uint8 (B, H, W, 3), highlevel, lowlevel, seeds, noise) -> uint8
(B, 4H', 4W', 3)`. `super_resolve_iter` yields each result as its batch finishes, so a caller
can write and report progress as it goes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from xpsr_jax.inference.memory import DeviceMemoryError
from xpsr_jax.inference.preprocess import preprocess_lr, resize_output
from xpsr_jax.inference.sampling import SamplingNoise


class Runner(Protocol):
    config: Any
    batch_size: int

    def sample_batch(self, conditioning: np.ndarray, highlevel: list[str], lowlevel: list[str],
                     seeds: list[int], noise: SamplingNoise | None) -> np.ndarray: ...


def batches_by_size(shapes: Sequence[tuple[int, ...]], batch_size: int) -> list[list[int]]:
    """Indices grouped by processed (H, W) (one compiled program each), in batches of `batch_size`;
    sizes in sorted order, inputs in their order within a size."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape[:2]), []).append(index)
    return [indices[start:start + batch_size] for _, indices in sorted(groups.items())
            for start in range(0, len(indices), batch_size)]


def _stacked_noise(parts: Sequence[SamplingNoise]) -> SamplingNoise:
    """Single-image draws (batch 1 each) as one batch (the per-step draws stack on axis 1)."""
    first = parts[0]
    return SamplingNoise(*(np.concatenate([np.asarray(getattr(p, f)) for p in parts], axis=0)
                           for f in ("vae_sample", "first", "added")),
                         None if first.steps is None else np.concatenate([np.asarray(p.steps) for p in parts],
                                                                         axis=1))


def super_resolve_iter(runner: Runner, lr_images: Sequence[np.ndarray], highlevel_prompts: Sequence[str],
                       lowlevel_prompts: Sequence[str], *, seeds: Sequence[int] | None = None,
                       noise: Sequence[SamplingNoise] | None = None,
                       on_too_large: Callable[[list[int], DeviceMemoryError], None] | None = None,
                       ) -> Iterator[tuple[int, np.ndarray]]:
    """(input index, SR image) for every LR image (uint8 (H, W, 3)), a batch at a time. `seeds`:
    one per image (default config.seed); `noise`: one single-image SamplingNoise per image.
    `on_too_large(indices, error)`, when given, takes a batch that would not fit in device memory
    (refused before it runs) and the other sizes go on; without it the error propagates."""
    lr_images = list(lr_images)
    count = len(lr_images)
    if not (len(highlevel_prompts) == len(lowlevel_prompts) == count):
        raise ValueError(f"pipeline: {count} images, {len(highlevel_prompts)} high-level and "
                         f"{len(lowlevel_prompts)} low-level prompts; give one of each per image")
    seeds = [runner.config.seed] * count if seeds is None else list(seeds)
    if len(seeds) != count or (noise is not None and len(noise) != count):
        raise ValueError(f"pipeline: seeds/noise must have one entry per image ({count})")
    config = runner.config
    conditioning = [preprocess_lr(image, config.process_size, upscale=config.upscale) for image in lr_images]
    for chunk in batches_by_size([c.shape for c in conditioning], runner.batch_size):
        try:
            images = runner.sample_batch(np.stack([conditioning[i] for i in chunk]),
                                         [highlevel_prompts[i] for i in chunk], [lowlevel_prompts[i] for i in chunk],
                                         [seeds[i] for i in chunk],
                                         None if noise is None else _stacked_noise([noise[i] for i in chunk]))
        except DeviceMemoryError as error:
            if on_too_large is None:
                raise
            on_too_large(chunk, error)
            continue
        for index, image in zip(chunk, images):
            yield index, resize_output(image, lr_images[index].shape, upscale=config.upscale)


def super_resolve(runner: Runner, lr_images: Sequence[np.ndarray], highlevel_prompts: Sequence[str],
                  lowlevel_prompts: Sequence[str], **kwargs) -> list[np.ndarray]:
    """`super_resolve_iter`, collected in input order."""
    results: list[np.ndarray | None] = [None] * len(lr_images)
    for index, image in super_resolve_iter(runner, lr_images, highlevel_prompts, lowlevel_prompts, **kwargs):
        results[index] = image
    return results
