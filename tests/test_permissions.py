"""Atomic writes end with the permissions a plain open() / mkdir() would give (mkstemp and
mkdtemp make 0600 / 0700): SR PNGs, prepared crops and export folders stay readable by others."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from xpsr_jax.data.images import write_png_atomic
from xpsr_jax.files import write_bytes_atomic
from xpsr_jax.export.output import atomic_output_dir


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_folders_follow_the_umask(tmp_path, umask):
    png, raw = tmp_path / "sr" / "a.png", tmp_path / "crops" / "b.png"
    write_png_atomic(png, np.zeros((4, 4, 3), np.uint8))
    write_bytes_atomic(raw, b"bytes")
    with atomic_output_dir(tmp_path / "export") as staging:
        (staging / "weights.bin").write_bytes(b"w")
    plain = tmp_path / "plain.txt"
    plain.write_text("reference")
    assert mode(png) == mode(raw) == mode(plain) == 0o666 & ~umask
    assert mode(tmp_path / "export") == 0o777 & ~umask
    assert mode(tmp_path / "export" / "weights.bin") == 0o666 & ~umask
