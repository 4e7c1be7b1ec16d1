"""The images of a blind study: the LR folder and one folder of results per method, matched by
file stem.

    catalog = Catalog.scan("LR", {"XPSR": "out/xpsr", "SeeSR": "out/seesr"})   # StudyError lists gaps
    lr, results = catalog.load("0001", ["SeeSR", "XPSR"])    # uint8 arrays; results at one size
    lr_png, result_pngs = catalog.display_files("0001", ["SeeSR", "XPSR"], folder)   # what the page shows
    catalog.sources()    # {"--lr": Source(folder, fingerprint), "XPSR": ...}: what the votes are cast on

Every method must have a result for every LR image (a missing one is named before the study
starts). Results of one image are shown at the same size: one that differs from the largest is
resized to it (bicubic), which `scan` reports. The page gets PNG copies named by a hash of their
bytes, written once and atomically (so no name says which method made an image, and no reader
ever meets a half-written file). A file name that is not UTF-8 is refused (the image id travels
through the database and the page as text).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from xpsr_jax.data.images import ImageReadError, encode_png, read_rgb
from xpsr_jax.files import write_bytes_atomic
from xpsr_jax.files import image_files
from xpsr_jax.study.store import LR_SOURCE, Source, StudyError

METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]{0,39}$")


def parse_method(spec: str) -> tuple[str, Path]:
    """"NAME=DIR" -> (NAME, DIR); StudyError for another form or an unusable name."""
    name, sep, folder = spec.partition("=")
    name = name.strip()
    if not sep or not folder:
        raise StudyError(f"--method {spec!r}: give NAME=DIR (e.g. --method XPSR=results/xpsr)")
    if not METHOD_NAME.match(name):
        raise StudyError(f"--method {spec!r}: the name {name!r} must be 1-40 letters, digits, spaces or ._+- "
                         "(starting with a letter or digit)")
    return name, Path(folder)


def _images_by_stem(folder: Path, what: str) -> dict[str, Path]:
    found = image_files(folder, what, unique_stems=True, error=StudyError)
    for path in found:
        if not _utf8(path.name):
            raise StudyError(f"{what} {folder}: the file name {path.name!r} is not UTF-8 text; rename it")
    return {path.stem: path for path in found}


@dataclass
class Catalog:
    lr: dict[str, Path]  # image id (stem) -> LR file
    results: dict[str, dict[str, Path]]  # method -> image id -> result file
    folders: dict[str, Path] = field(default_factory=dict)  # LR_SOURCE or method -> its folder, resolved
    _shown: dict = field(default_factory=dict, repr=False)  # (folder, image, methods) -> display PNGs
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def methods(self) -> list[str]:
        return list(self.results)

    @property
    def images(self) -> list[str]:
        return sorted(self.lr)

    @classmethod
    def scan(cls, lr_folder: str | Path, methods: Mapping[str, str | Path]) -> Catalog:
        """Every LR image with a result from every method, or StudyError listing what is missing."""
        if len(methods) < 2:
            raise StudyError(f"give at least two --method NAME=DIR to compare (got {len(methods)})")
        lr = _images_by_stem(Path(lr_folder), "--lr")
        results = {name: _images_by_stem(Path(folder), f"--method {name}") for name, folder in methods.items()}
        gaps = [f"{name} ({methods[name]}) lacks {len(missing)} of {len(lr)}: {_names(missing)}"
                for name, found in results.items() if (missing := sorted(set(lr) - set(found)))]
        if gaps:
            raise StudyError("the method folders must hold a result for every LR image (matched by file name "
                             "without extension): " + "; ".join(gaps))
        folders = {LR_SOURCE: Path(lr_folder).resolve()} | {name: Path(folder).resolve()
                                                            for name, folder in methods.items()}
        return cls(lr, {name: {image: found[image] for image in lr} for name, found in results.items()}, folders)

    def sources(self) -> dict[str, Source]:
        """The LR folder (LR_SOURCE) and each method's folder with a fingerprint of the images the
        study shows from it: what a study database records, so that the same names over other
        images are refused. Reads every file once."""
        files = {LR_SOURCE: self.lr} | self.results
        return {name: Source(str(self.folders[name]), fingerprint(files[name])) for name in files}

    def load(self, image: str, methods: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(LR, results of `methods` in that order at one size) as uint8 RGB."""
        try:
            lr = read_rgb(self.lr[image])
            results = [read_rgb(self.results[method][image]) for method in methods]
        except ImageReadError as error:
            raise StudyError(str(error)) from None
        height, width = max((r.shape[:2] for r in results), key=lambda hw: hw[0] * hw[1])
        return lr, [r if r.shape[:2] == (height, width) else
                    np.asarray(Image.fromarray(r).resize((width, height), Image.BICUBIC)) for r in results]

    def display_files(self, image: str, methods: Sequence[str], folder: Path) -> tuple[Path, list[Path]]:
        """`load`'s images as PNG files in `folder`, each named by the SHA-256 of its bytes. A file
        that cannot be read or written is a StudyError without its path (a result's path would
        say which method made it); the path is in its `detail`, for the server's log."""
        key = (folder, image, tuple(sorted(methods)))
        with self._lock:
            shown = self._shown.get(key)
            if shown is None or not all(path.exists() for path in shown.values()):  # or removed since (a /tmp cleaner)
                try:
                    lr, results = self.load(image, sorted(methods))
                    shown = {None: _content_named_png(lr, folder)} | {
                        method: _content_named_png(result, folder) for method, result in zip(sorted(methods), results)}
                except (StudyError, OSError) as error:
                    raise StudyError(f"image {image} cannot be shown now: one of its files cannot be read, or its "
                                     "copy for the page cannot be written (the server's log says which)",
                                     detail=str(error)) from None
                self._shown[key] = shown
        return shown[None], [shown[method] for method in methods]

    def size_mismatches(self) -> list[str]:
        """Images whose results differ in size between methods (shown resized to the largest);
        StudyError names a file that does not open as an image."""
        mismatched = []
        for image in self.images:
            sizes = set()
            for path in [self.lr[image]] + [self.results[method][image] for method in self.methods]:
                try:
                    with Image.open(path) as opened:
                        size = opened.size
                except (OSError, ValueError) as error:
                    raise StudyError(f"{path}: not an image ({error})") from None
                if path != self.lr[image]:
                    sizes.add(size)
            if len(sizes) > 1:
                mismatched.append(image)
        return mismatched


def fingerprint(files: Mapping[str, Path]) -> str:
    """SHA-256 over the sorted image ids and each file's bytes: equal for the same images under the
    same ids, in whatever folder; different when any file or id differs."""
    digest = hashlib.sha256()
    for image in sorted(files):
        with files[image].open("rb") as file:
            content = hashlib.file_digest(file, "sha256").digest()
        name = image.encode()
        digest.update(len(name).to_bytes(4, "big") + name + content)  # length-prefixed: ids cannot run together
    return digest.hexdigest()


def _utf8(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:  # undecodable bytes of the file system's name, as surrogate escapes
        return False
    return True


def _names(names: list[str]) -> str:
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _content_named_png(rgb: np.ndarray, folder: Path) -> Path:
    data = encode_png(rgb)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not path.exists():
        write_bytes_atomic(path, data)
    return path
