"""Suite-wide settings.

Parity tests check the maths, not the chip: on NVIDIA GPUs JAX runs float32 matmuls in TF32
by default (measured on an H200: 2e-3 to 4e-3 max-abs drift on SD-sized layers), so the whole
suite asks for full float32 precision. On CPU this changes nothing.
"""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
