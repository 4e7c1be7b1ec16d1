"""Suite-wide settings.

Parity tests check the maths, not the chip: on NVIDIA GPUs JAX runs float32 matmuls in TF32
by default (measured on an H200: 2e-3 to 4e-3 max-abs drift on SD-sized layers), so the whole
suite asks for full float32 precision. On CPU this changes nothing.
"""

import os
import tempfile

import jax

jax.config.update("jax_default_matmul_precision", "highest")
# Commands keep XLA's compile cache in the user cache folder by default: in tests (and the
# commands they start) that is a temporary folder, not the home directory.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="xpsr_test_cache_")
