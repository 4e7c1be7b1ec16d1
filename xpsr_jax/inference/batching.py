"""The one host-side path from LR images to SR images, shared by `XPSRPipeline`, the StableHLO
artifact runner and `infer.py`: preprocess -> group by processed size -> batch -> sample ->
resize back to exactly `upscale` x the input.

A runner supplies `config` (process_size, upscale, seed), `batch_size` (images per sampling call),
`sample_batch(conditioning uint8 (B, H, W, 3), highlevel, lowlevel, seeds, noise) -> SampledBatch`
and `non_finite_cause() -> str`. `super_resolve_iter` yields each result as its batch finishes, so
a caller can write and report progress as it goes. An image whose latents or pixels hold NaN or
inf is never yielded (cast to uint8 it would be a black or noise image that looks like a result):
it fails with `NonFiniteOutputError`, naming the likely cause.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from xpsr_jax.inference.memory import DeviceMemoryError
from xpsr_jax.inference.preprocess import preprocess_lr, resize_output
from xpsr_jax.inference.sampling import SamplingNoise


class NonFiniteOutputError(ValueError):
    """A sampled image that holds NaN or inf values; no image is made of it."""


class SampledBatch(NamedTuple):
    images: np.ndarray  # uint8 (B, H, W, 3) at the processed size
    finite: np.ndarray  # bool (B,): the image's final latent and decoded pixels hold no NaN or inf


class Runner(Protocol):
    config: Any
    batch_size: int

    def sample_batch(self, conditioning: np.ndarray, highlevel: list[str], lowlevel: list[str],
                     seeds: list[int], noise: SamplingNoise | None) -> SampledBatch: ...

    def non_finite_cause(self) -> str: ...


def finite_per_image(*arrays) -> np.ndarray:
    """bool (B,): whether image b of every array (B, ...) is free of NaN and inf."""
    return np.logical_and.reduce([np.isfinite(np.asarray(a).reshape(len(a), -1)).all(axis=1) for a in arrays])


def non_finite_error(runner: Runner) -> NonFiniteOutputError:
    return NonFiniteOutputError(f"the sampled image holds NaN or inf values, so none was written; "
                                f"{runner.non_finite_cause()}")


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
                       on_failure: Callable[[list[int], Exception], None] | None = None,
                       ) -> Iterator[tuple[int, np.ndarray]]:
    """(input index, SR image) for every LR image (uint8 (H, W, 3)), a batch at a time. `seeds`:
    one per image (default config.seed); `noise`: one single-image SamplingNoise per image.
    `on_failure(indices, error)`, when given, takes the images that failed, and the others go on:
    a batch that would not fit in device memory (DeviceMemoryError, refused before it runs) and
    images that came out non-finite (NonFiniteOutputError). Without it the error propagates."""
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
    def fail(indices: list[int], error: Exception) -> None:
        if on_failure is None:
            raise error
        on_failure(indices, error)

    for chunk in batches_by_size([c.shape for c in conditioning], runner.batch_size):
        try:
            sampled = runner.sample_batch(np.stack([conditioning[i] for i in chunk]),
                                          [highlevel_prompts[i] for i in chunk], [lowlevel_prompts[i] for i in chunk],
                                          [seeds[i] for i in chunk],
                                          None if noise is None else _stacked_noise([noise[i] for i in chunk]))
        except DeviceMemoryError as error:
            fail(chunk, error)
            continue
        broken = [index for index, finite in zip(chunk, sampled.finite) if not finite]
        if broken:
            error = non_finite_error(runner)
            fail(broken, error if on_failure else NonFiniteOutputError(f"input(s) {broken}: {error}"))
        for index, image, finite in zip(chunk, sampled.images, sampled.finite):
            if finite:
                yield index, resize_output(image, lr_images[index].shape, upscale=config.upscale)


def super_resolve(runner: Runner, lr_images: Sequence[np.ndarray], highlevel_prompts: Sequence[str],
                  lowlevel_prompts: Sequence[str], **kwargs) -> list[np.ndarray]:
    """`super_resolve_iter`, collected in input order."""
    results: list[np.ndarray | None] = [None] * len(lr_images)
    for index, image in super_resolve_iter(runner, lr_images, highlevel_prompts, lowlevel_prompts, **kwargs):
        results[index] = image
    return results
