"""File conventions every layer shares: which files are images, how a file is written whole, and
a cheap fingerprint of a large file.

    image_files(folder, what)         a folder's images, or one line naming what is wrong with it
    write_bytes_atomic(path, data)    temp file + rename: a kill leaves the old file or the new one
    sampled_fingerprint(path)         sha256 of a few MiB of a weights file; any retrained file changes it
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

# Suffixes (lower case) of the image files commands read: inputs, crops, captions, evaluation.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def image_files(folder: str | os.PathLike, what: str, *, recursive: bool = False,
                unique_stems: bool = False, error: type[Exception] = FileNotFoundError) -> list[Path]:
    """The image files (`IMAGE_SUFFIXES`, any case; hidden names skipped) in `folder`, or below it
    with `recursive`, sorted by path relative to `folder`. `error` (the caller's exception type)
    is raised with a message starting "`what` `folder`:" when the folder is missing, holds no
    image, or (`unique_stems`: results and prompts are matched by stem) two images share a stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"{what} {folder}: no such folder")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    found = sorted((path for path in candidates
                    if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
                    and path.is_file()),
                   key=lambda path: path.relative_to(folder).as_posix())
    if not found:
        raise error(f"{what} {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    if unique_stems:
        by_stem: dict[str, Path] = {}
        for path in found:
            if path.stem in by_stem:
                raise error(f"{what} {folder}: {by_stem[path.stem].name} and {path.name} share the name "
                            f"{path.stem!r} (images are matched by name without extension); keep one")
            by_stem[path.stem] = path
    return found


def current_umask() -> int:
    """The process umask (read from /proc where it can be, so no other thread sees it changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The permissions a plain `open(path, "w")` gives a new file (mkstemp's are 0600)."""
    return 0o666 & ~current_umask()


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Writes `data` to `path` through a temp file in the same folder and an atomic rename; the
    file ends with the permissions a plain write would give it. `fsync`: on disk before the rename
    (a record others rely on after a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, plain_file_mode())
        with os.fdopen(handle, "wb") as temp_file:
            temp_file.write(data)
            if fsync:
                temp_file.flush()
                os.fsync(temp_file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


SAMPLED_CHUNKS = 16  # evenly spaced chunks of a large file in its sampled fingerprint
SAMPLED_CHUNK_BYTES = 1 << 16


def update_sampled(digest, path: str | os.PathLike) -> None:
    """Feeds `digest` a file's name, size, first MiB (a safetensors header) and SAMPLED_CHUNKS evenly
    spaced chunks; a small file whole."""
    path = Path(path)
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}\n".encode())
    with open(path, "rb") as handle:
        if size <= (SAMPLED_CHUNKS + 16) * SAMPLED_CHUNK_BYTES:
            digest.update(handle.read())
            return
        digest.update(handle.read(1 << 20))
        for index in range(SAMPLED_CHUNKS):
            handle.seek((size - SAMPLED_CHUNK_BYTES) * (index + 1) // SAMPLED_CHUNKS)
            digest.update(handle.read(SAMPLED_CHUNK_BYTES))


def sampled_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of `update_sampled` of one file: a few MiB read of a 4 GB weights file."""
    digest = hashlib.sha256()
    update_sampled(digest, path)
    return digest.hexdigest()
