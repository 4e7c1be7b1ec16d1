"""XLA's persistent compilation cache, on by default wherever a command compiles.

Training keeps it in `WORKDIR/compile_cache`, so a resumed run (and every host of a pod sharing the
workdir) reads what the first run compiled; the other commands use the user cache folder
(`$XDG_CACHE_HOME/xpsr_jax/jax_cache`, by default `~/.cache/xpsr_jax/jax_cache`). Each command's
config key `compile_cache` moves it (a folder) or turns it off (""). A cache already chosen for the
process (`JAX_COMPILATION_CACHE_DIR`, or a caller that enabled one first) is kept. JAX writes each
entry atomically, so processes sharing a folder are safe. A default folder that cannot be used
(XDG_CACHE_HOME a file, a read-only home) costs a warning line, not the run; a folder the user
named that cannot be used is an error naming it.

`watch_compile()` tells whether a compile came from the cache, from JAX's own monitoring events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

DEFAULT = "default"  # the command's default folder


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xpsr_jax" / "jax_cache"


def cache_dir(setting: str, default: Path) -> Path | str | None:
    """The folder a `compile_cache` setting names: "default" -> `default`, "" -> None (off); a
    bucket (gs://...) stays a URL, which JAX's cache writes through etils."""
    if setting is None or str(setting).strip() == "":
        return None
    if setting == DEFAULT:
        return default
    return str(setting) if "://" in str(setting) else Path(setting).expanduser()


class CompileCacheError(ValueError):
    """A compile cache folder the user named that cannot be used (the message says why)."""


def _unusable(folder: Path | str) -> str | None:
    """Why a local `folder` cannot hold the cache (None: it can): made if missing, and written to.
    A bucket is left to JAX (it warns and goes on without the cache when it cannot write)."""
    if isinstance(folder, str):
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except FileExistsError:
        return "a file is in the way"
    except OSError as error:
        return error.strerror or str(error)
    return None


def use_compile_cache(setting: str, default: Path, *,
                      warn: Callable[[str], None] | None = None) -> Path | str | None:
    """`enable_compile_cache` for a command's `compile_cache` setting ("default" -> `default`, a
    folder, or "" for none). A folder the user named that cannot be used is a CompileCacheError;
    the default folder that cannot be used (XDG_CACHE_HOME a file, a read-only home) is a warning
    line, and the run goes on without a cache."""
    explicit = setting not in (DEFAULT, None) and str(setting).strip() != ""
    return enable_compile_cache(cache_dir(setting, default), explicit=explicit, warn=warn)


def enable_compile_cache(folder: Path | str | None, *, explicit: bool = True,
                         warn: Callable[[str], None] | None = None) -> Path | str | None:
    """Use `folder` as this process's persistent compilation cache, unless one is already set.
    Returns the folder in use (None: off). A folder that cannot be made or written is a
    CompileCacheError when `explicit`, else `warn(line)` (default: stderr) and no cache."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current if "://" in current else Path(current)
    if folder is None:
        return None
    reason = _unusable(folder)
    if reason is not None:
        if explicit:
            raise CompileCacheError(f"compile_cache={folder}: cannot be used as the compile cache ({reason}); give a "
                                    'folder that can be written, or "" for none')
        (warn or _to_stderr)(f"warning: the compile cache {folder} cannot be used ({reason}); going on without one "
                             '(every program compiles each run; set compile_cache to a writable folder, or "" for '
                             "none)")
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX keeps only programs that took >= 1 s; the small ones add up: the eager random init
        # of the fresh layers compiles one per tensor shape (16 s of a tiny run's start-up on 2
        # CPU cores, 3.6 s when they come from the cache).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # JAX decides once per process whether a cache is used
    return folder


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclasses.dataclass
class CompileRecord:
    """Persistent-cache hits and misses seen while a block ran."""

    hits: int = 0
    misses: int = 0

    def describe(self) -> str:
        if self.hits and not self.misses:
            return "from the compile cache"
        if self.hits:
            return f"partly from the compile cache ({self.hits} of {self.hits + self.misses} programs)"
        return "compiled" + ("" if jax.config.jax_compilation_cache_dir else ", no compile cache")


@contextlib.contextmanager
def watch_compile() -> Iterator[CompileRecord]:
    """Counts the compilation cache's hits and misses during the block (JAX's monitoring events)."""
    record = CompileRecord()

    def listener(event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            record.hits += 1
        elif event == "/jax/compilation_cache/cache_misses":
            record.misses += 1

    jax.monitoring.register_event_listener(listener)
    try:
        yield record
    finally:
        jax.monitoring.unregister_event_listener(listener)
