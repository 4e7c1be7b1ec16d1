"""XLA's persistent compilation cache, on by default wherever a command compiles.

Training keeps it in `WORKDIR/compile_cache`, so a resumed run (and every host of a pod sharing the
workdir) reads what the first run compiled; the other commands use the user cache folder
(`$XDG_CACHE_HOME/xpsr_jax/jax_cache`, by default `~/.cache/xpsr_jax/jax_cache`). Each command's
config key `compile_cache` moves it (a folder) or turns it off (""). A cache already chosen for the
process (`JAX_COMPILATION_CACHE_DIR`, or a caller that enabled one first) is kept. JAX writes each
entry atomically, so processes sharing a folder are safe.

`watch_compile()` tells whether a compile came from the cache, from JAX's own monitoring events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

DEFAULT = "default"  # the command's default folder


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xpsr_jax" / "jax_cache"


def cache_dir(setting: str, default: Path) -> Path | None:
    """The folder a `compile_cache` setting names: "default" -> `default`, "" -> None (off)."""
    if setting is None or str(setting).strip() == "":
        return None
    return default if setting == DEFAULT else Path(setting).expanduser()


def enable_compile_cache(folder: Path | None) -> Path | None:
    """Use `folder` as this process's persistent compilation cache, unless one is already set.
    Returns the folder in use (None: off)."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX keeps only programs that took >= 1 s; the small ones add up: the eager random init
        # of the fresh layers compiles one per tensor shape (16 s of a tiny run's start-up on 2
        # CPU cores, 3.6 s when they come from the cache).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # JAX decides once per process whether a cache is used
    return folder


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
