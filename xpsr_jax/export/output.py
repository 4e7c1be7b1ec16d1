"""Export outputs appear whole or not at all, and never at the cost of anything else.

An export is written into a temporary sibling folder (`.NAME.partial-HOST-PID-*`), checked for free
disk space first, and renamed onto the destination only when complete. `--overwrite` replaces only
a folder that an export wrote (one with our manifest.json), and no output may be, contain or lie
inside one of the export's inputs (a training workdir, a checkpoint, weights, the SD 1.5 folder):
`--out RUN --overwrite` with `--workdir RUN` is refused instead of deleting the run. Staging
folders left by a killed export on this host are removed by the next export to the same place.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from xpsr_jax.files import current_umask
from xpsr_jax.weights.formats import MANIFEST, ONE_STEP_RECORD, WeightsFormatError, read_manifest


class ExportError(ValueError):
    """Bad export input or an output that cannot be written; the message names the path."""


def refuse_one_step_release(weights: str | os.PathLike, what: str) -> None:
    """ExportError for a one-step release where `what` (an export format) does not carry its
    VAE-encoder LoRA yet: the output would sample as multi-step weights."""
    if (Path(weights) / ONE_STEP_RECORD).is_file():
        raise ExportError(f"{weights}: a one-step XPSR release ({ONE_STEP_RECORD}); {what} does not carry its "
                          "VAE-encoder LoRA yet: use the release folder itself (infer --config infer.py:one_step)")


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


def _overlap(out: Path, source: Path) -> str | None:
    """How `out` overlaps the input `source` ("is", "contains", "lies inside"), or None."""
    out, source = Path(os.path.realpath(out)), Path(os.path.realpath(source))
    if out == source:
        return "is"
    if out in source.parents:
        return "contains"
    if source in out.parents:
        return "lies inside"
    return None


def is_export_folder(folder: Path) -> bool:
    """True for a folder an export wrote (its manifest.json names one of our formats)."""
    try:
        return read_manifest(folder) is not None
    except (WeightsFormatError, OSError, UnicodeDecodeError):
        return False


def check_output_target(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                        overwrite: bool = False, required_bytes: int = 0) -> None:
    """Every check on `out` that needs no data, run before anything slow is loaded: it overlaps no
    input; it is new, or (with `overwrite`) an earlier export; the disk has room."""
    out = Path(out).absolute()
    for source in inputs:
        if source is None:
            continue
        relation = _overlap(out, Path(source))
        if relation:
            raise ExportError(f"--out {out} {relation} the export's input {Path(source).absolute()}; "
                              "writing there could destroy the input: choose an --out outside it")
    if out.exists():
        if not overwrite:
            raise ExportError(f"{out}: already exists; choose a new --out or pass --overwrite")
        if not out.is_dir():
            raise ExportError(f"{out}: exists and is not a folder")
        if not is_export_folder(out):
            raise ExportError(f"{out}: exists and is not an xpsr-jax export (no {MANIFEST} of ours); "
                              "--overwrite only replaces a folder an export wrote: remove it yourself or "
                              "choose a new --out")
    check_free_disk(out, required_bytes)


_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:partial|previous)-(?P<host>[^-]+)-(?P<pid>\d+)(?:-.*)?$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Removes the staging folders of `out` whose export died on this host (kill -9, power loss);
    returns them. Another host's or a live process's folders are left alone."""
    host = _host()
    removed = []
    if not out.parent.is_dir():
        return removed
    for path in out.parent.iterdir():
        match = _STAGING.match(path.name)
        if not match or match["name"] != out.name or match["host"] != host or not path.is_dir():
            continue
        if not _pid_alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, required_bytes: int = 0, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yields an empty temporary folder next to `out`; on success it becomes `out`, on any error
    it is removed (and an existing `out` is left untouched). `check_output_target` runs first."""
    out = Path(out).absolute()
    check_output_target(out, inputs=inputs, overwrite=overwrite, required_bytes=required_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tag = f"{_host()}-{os.getpid()}"
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{tag}-", dir=out.parent))
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700: end as a plain mkdir would
    try:
        yield staging
        if out.exists():
            previous = out.with_name(f".{out.name}.previous-{tag}")
            os.replace(out, previous)
            os.replace(staging, out)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
