"""The [tpu] extra on a machine without a TPU: libtpu stays quiet, and processes do not lock
each other out.

With libtpu installed, JAX tries the TPU backend in every process; on a machine with no TPU chip
libtpu then asks the cloud metadata server for the slice's hosts and type, fails, and prints a
dozen lines (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES, InitGoogle) before JAX falls back to the
CPU. It also takes a machine-wide lock file, so a second process compiling for a TPU topology
(a test worker, a second plan) fails with "Internal error when accessing libtpu multi-process
lockfile". `quiet_libtpu_without_tpu()` sets those values (and allows several libtpu processes)
where the user has not, only when no TPU chip is on the PCI bus: nothing changes on a TPU VM.
Compile-only TPU devices (`jax.experimental.topologies`) work as before.

The core install has no PyTorch; transformers (our tokenizers and configs) then prints "PyTorch
was not found. Models won't be available..." in every command. `quiet_transformers_without_torch`
turns off transformers' advisory warnings where torch is not installed and the user has not set
TRANSFORMERS_NO_ADVISORY_WARNINGS.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import MutableMapping
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips sit on the PCI bus under Google's vendor id
PCI_DEVICES = Path("/sys/bus/pci/devices")
LIBTPU_WITHOUT_TPU_ENV = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": "v5litepod-1",
                          "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def has_tpu_chips(pci_devices: Path = PCI_DEVICES) -> bool:
    """Whether a TPU chip is attached to this machine."""
    try:
        return any((device / "vendor").read_text().strip() == GOOGLE_PCI_VENDOR for device in pci_devices.iterdir())
    except OSError:
        return False


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def quiet_transformers_without_torch(environ: MutableMapping[str, str] = os.environ) -> bool:
    """True when it set TRANSFORMERS_NO_ADVISORY_WARNINGS (torch not installed, not set by the user)."""
    if importlib.util.find_spec("torch") is not None or "TRANSFORMERS_NO_ADVISORY_WARNINGS" in environ:
        return False
    environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    return True


def quiet_libtpu_without_tpu(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Sets LIBTPU_WITHOUT_TPU_ENV's values the user has not set, when libtpu is installed and no
    TPU chip is present; returns whether it applied. Must run before JAX starts its backends."""
    if not libtpu_installed() or has_tpu_chips():
        return False
    for key, value in LIBTPU_WITHOUT_TPU_ENV.items():
        environ.setdefault(key, value)
    return True
