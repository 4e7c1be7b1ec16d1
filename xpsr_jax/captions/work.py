"""The work list of a caption run: which images, which shard, what is left.

Pure functions over ``WorkItem``s:
    build_work_list(folders) -> list[WorkItem]
    select_shard(items, shard, num_shards) -> list[WorkItem]
    pending(items, task, done) -> list[WorkItem]
    batched(items, size) -> Iterator[list[WorkItem]]
"""

from __future__ import annotations

import pathlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import NamedTuple

from xpsr_jax.captions.io import SOURCES, CaptionInputError, CaptionKey, list_images


class WorkItem(NamedTuple):
    image_id: str
    source: str  # "lr" | "hr"
    path: pathlib.Path


def build_work_list(folders: Mapping[str, str | None]) -> list[WorkItem]:
    """All images of ``{"lr": dir, "hr": dir}`` (None: skip), LR first, each sorted.

    The order is fixed by the file names alone, so every shard of every run
    sees the same list.
    """
    unknown = set(folders) - set(SOURCES)
    if unknown:
        raise CaptionInputError(f"unknown image source(s) {sorted(unknown)}; valid: {SOURCES}")
    if not any(folders.values()):
        raise CaptionInputError("no images to caption: give --lr-dir and/or --hr-dir")
    items = []
    for source in SOURCES:
        if folders.get(source):
            items += [WorkItem(p.stem, source, p) for p in list_images(folders[source])]
    return items


def select_shard(items: Sequence[WorkItem], shard: int, num_shards: int) -> list[WorkItem]:
    """Every ``num_shards``-th item from ``shard``: disjoint shards that cover ``items``."""
    if num_shards < 1:
        raise CaptionInputError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise CaptionInputError(
            f"--shard {shard} is out of range for --num-shards {num_shards}; "
            f"valid: 0..{num_shards - 1}"
        )
    return list(items[shard::num_shards])


def pending(items: Sequence[WorkItem], task: str, done: Collection[CaptionKey]) -> list[WorkItem]:
    """Items whose ``(image_id, source, task)`` is not in ``done``."""
    return [item for item in items if (item.image_id, item.source, task) not in done]


def batched(items: Sequence[WorkItem], size: int) -> Iterator[list[WorkItem]]:
    """Consecutive batches of ``size`` items (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
