"""Export outputs appear whole or not at all: written into a temporary sibling folder, checked
for free disk space first, and renamed onto the destination only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class ExportError(ValueError):
    """Bad export input or an output that cannot be written; the message names the path."""


# Safety margin over the estimate: serialisation formats add headers, JSON and alignment.
DISK_MARGIN = 1.1


def check_free_disk(out: str | os.PathLike, required_bytes: int) -> None:
    """Raises ExportError when the file system of `out` has less than `required_bytes` free."""
    out = Path(out).absolute()
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needed = int(required_bytes * DISK_MARGIN)
    if free < needed:
        raise ExportError(f"{out}: not enough free disk: the export needs about {needed / 2**20:.1f} MiB, "
                          f"{probe} has {free / 2**20:.1f} MiB free")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, required_bytes: int = 0,
                      overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder next to `out`; on success it becomes `out`, on any error
    it is removed (and an existing `out` is left untouched).

    `out` must not exist unless `overwrite` (then it is replaced only after the new one is whole).
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; choose a new --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    check_free_disk(out, required_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
            os.replace(out, previous)
            os.replace(staging, out)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
